"""The layers of the code base (docs/ARCHITECTURE.md, "Layout"), checked on every import statement at
every level: module level, inside functions and methods, inside classes, under `if`/`try`.

- Direction: orchestrator -> analysis, explain, training -> study; explain -> training;
  study imports none of the four packages. Each package may import itself and what
  `MAY_IMPORT` lists; `ALLOWED_EDGES` names the few modules another package may use besides,
  each with its reason.
- No import cycles between modules, function-level imports included (a cycle hidden in a
  function is still a cycle: each module needs the other to work). Only imports under
  `if TYPE_CHECKING:` are left out of this graph, since they never run; the direction rule
  still counts them.
- The ground floor stays light: `study` imports no torch, timm, Ray, OpenCV or pydicom at any
  level, and a fresh interpreter that imports every study module (and every analysis module:
  the analyze stage runs on the driver without them) has loaded none of them.
- Ray's private APIs are imported in one module, `training.ray_private`, which says why each is
  needed and what breaks if Ray moves it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import ROOT

PACKAGES = ("study", "training", "explain", "analysis", "orchestrator")
MAY_IMPORT = {
    "study": set(),
    "training": {"study"},
    "explain": {"training", "study"},
    "analysis": {"study"},
    "orchestrator": {"analysis", "explain", "training", "study"},
}
# (importing package, imported module): why this one edge outside MAY_IMPORT is right. Each
# target is numpy/scipy only (the fresh-interpreter test below imports all of analysis).
ALLOWED_EDGES = {
    ("analysis", "explain.similarity"):
        "the cascade and stability analyses compare maps with the very measures (Spearman, SSIM, top-10% IoU) "
        "that the sanity checks store per map: one implementation, so a reader's number equals the stored one",
    ("analysis", "training.classification"):
        "the paired DeLong and McNemar comparisons of Table 1 use the AUC and intervals that each run's test "
        "report (training.loop) was computed with: one implementation of the classification statistics",
}
HEAVY = ("torch", "timm", "ray", "cv2", "pydicom")
RAY_PRIVATE_HOME = "training.ray_private"


def _modules() -> dict[str, Path]:
    return {f"{package}.{path.stem}": path for package in PACKAGES for path in sorted((ROOT / package).glob("*.py"))}


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST, type_checking: bool = False) -> Iterator[tuple[ast.stmt, bool]]:
    """Every Import/ImportFrom in the tree, at any depth, and whether it sits under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, type_checking
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _import_nodes(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _import_nodes(ast.Module(body=[child], type_ignores=[]), type_checking)
        else:
            yield from _import_nodes(node, type_checking)


def _imported_names(node: ast.stmt, module: str) -> set[str]:
    """Dotted names an import statement brings in: `from a.b import c` gives a.b and a.b.c."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        parent = module.split(".")[: -node.level]
        base = ".".join([*parent, base] if base else parent)
    return {base, *(f"{base}.{alias.name}" for alias in node.names)}


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported name, line, under TYPE_CHECKING) for every import in a module, at every level."""
    tree = ast.parse(MODULES[module].read_text())
    return [(name, node.lineno, guarded) for node, guarded in _import_nodes(tree)
            for name in sorted(_imported_names(node, module))]


def _project_target(name: str) -> str | None:
    """The project module an imported name lands in (`study.models.specs_for` -> study.models;
    `from training import registry` -> training.registry); None outside the project."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return f"{parts[0]}.__init__"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    package = module.split(".")[0]
    wrong = sorted({f"{name} (line {line})" for name, line, _ in imports(module)
                    if (target := _project_target(name)) and target.split(".")[0] not in {package, *MAY_IMPORT[package]}
                    and (package, target) not in ALLOWED_EDGES})
    assert not wrong, f"{module} may import {sorted(MAY_IMPORT[package]) or 'nothing'} of ours; it imports {wrong}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("study.")))
def test_the_ground_floor_imports_no_heavy_library_at_any_level(module):
    found = sorted({f"{name} (line {line})" for name, line, _ in imports(module) if name.split(".")[0] in HEAVY})
    assert not found, f"{module} imports {found}"


def test_rays_private_apis_are_imported_in_one_module():
    def private(name: str) -> bool:
        parts = name.split(".")
        return parts[0] == "ray" and ("_private" in parts or "_internal" in parts or parts[1:3] == ["train", "v2"])

    found = sorted(f"{module}: {name} (line {line})" for module in MODULES if module != RAY_PRIVATE_HOME
                   for name, line, _ in imports(module) if private(name))
    assert not found, f"import Ray's private APIs through {RAY_PRIVATE_HOME}: {found}"
    assert any(private(name) for name, _, _ in imports(RAY_PRIVATE_HOME))


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports at run time (any level; TYPE_CHECKING left out)."""
    return {module: {target for name, _, guarded in imports(module) if not guarded
                     if (target := _project_target(name)) and target != module and target in MODULES}
            for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph.get(node, ())):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_walk_sees_function_class_and_guarded_imports():
    source = ("import study.store\n"
              "def f():\n    from training import registry\n"
              "class C:\n    import explain.cam\n    def m(self):\n        from analysis.inputs import x\n"
              "try:\n    import orchestrator.cli\nexcept ImportError:\n    pass\n"
              "if TYPE_CHECKING:\n    from study.config import SplitConfig\n")
    found = {(name, guarded) for node, guarded in _import_nodes(ast.parse(source))
             for name in _imported_names(node, "study.x")}
    assert {("study.store", False), ("training.registry", False), ("explain.cam", False),
            ("analysis.inputs.x", False), ("orchestrator.cli", False), ("study.config.SplitConfig", True)} <= found


def test_no_import_cycles_at_any_level():
    found = cycles(import_graph())
    assert not found, "import cycles (function-level imports included): " + "; ".join(" <-> ".join(c) for c in found)


_FRESH = """
import importlib, sys
heavy = {heavy!r}
for module in {modules!r}:
    before = {{name for name in heavy if name in sys.modules}}
    importlib.import_module(module)
    for name in heavy:
        if name in sys.modules and name not in before:
            print(f"{{module}} loads {{name}}")
"""


@pytest.mark.parametrize("package", ["study", "analysis"])
def test_a_fresh_interpreter_imports_the_package_without_heavy_libraries(package):
    modules = sorted(m for m in MODULES if m.startswith(f"{package}."))
    code = _FRESH.format(heavy=HEAVY, modules=modules)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", done.stdout
