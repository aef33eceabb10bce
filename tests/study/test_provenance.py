"""study.provenance: which build (git commit) and which machine produced an output."""

import importlib.util
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from study import provenance
from tests.conftest import ROOT


def test_machine_names_cores_architecture_system_and_python():
    text = provenance.machine()
    assert text == (f"{os.cpu_count()}-core {platform.machine()} {platform.system()}, "
                    f"Python {platform.python_version()}")
    assert re.fullmatch(r"\d+-core \S+ \S+, Python \d+\.\d+\.\d+\S*", text)


def test_git_commit_is_a_commit_of_this_checkout():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (an installed copy, a job's copied folder)")
    commit = provenance.git_commit()
    assert commit is not None and re.fullmatch(r"[0-9a-f]{40}", commit)
    # HEAD may move while the suite runs (commits beside it); the commit must exist all the same
    known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True)
    assert known.returncode == 0


def test_git_commit_is_none_outside_a_checkout(tmp_path, monkeypatch):
    """A copy of the module outside any git repository (as in a job's copied folder) answers None."""
    copy = tmp_path / "provenance_copy.py"
    shutil.copy(Path(provenance.__file__), copy)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # git may not look above tmp_path
    spec = importlib.util.spec_from_file_location("provenance_copy", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.git_commit() is None


def test_git_commit_is_none_without_git(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(provenance.subprocess, "run", missing)
    assert provenance.git_commit() is None
