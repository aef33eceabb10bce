"""The layers of the code base: `training` never imports the orchestrator, explain or analysis;
the study contract and the analysis's readers load without torch; no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "training", "explain", "analysis")


def _imports(path: Path) -> set[str]:
    """Modules of this project that a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


@pytest.mark.parametrize("path", sorted((ROOT / "training").glob("*.py")), ids=lambda p: p.name)
def test_training_imports_only_training(path):
    assert {name for name in _imports(path) if not name.startswith("training")} == set()


def test_module_level_imports_have_no_cycles():
    graph = {}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            module = f"{package}.{path.stem}"
            top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
            names = set()
            for node in top:
                if isinstance(node, ast.ImportFrom) and node.module:
                    names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
                elif isinstance(node, ast.Import):
                    names |= {a.name for a in node.names}
            graph[module] = {n for n in names if n in {f"{p}.{f.stem}" for p in PACKAGES for f in (ROOT / p).glob("*.py")}}

    def visit(module, trail):
        assert module not in trail, " -> ".join([*trail, module])
        for child in graph.get(module, ()):
            visit(child, [*trail, module])

    for module in graph:
        visit(module, [])


def test_the_contract_and_the_analysis_readers_load_without_torch():
    code = ("import sys, study.records, study.store, study.models, study.config, analysis.inputs, analysis.stats; "
            "print(sorted(m for m in ('torch', 'timm', 'ray') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
