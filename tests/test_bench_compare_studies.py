"""bench/compare_studies.py, run as the README shows it: equal studies pass, a moved number fails."""

import json
import shutil
import subprocess
import sys

import pandas as pd

from tests.conftest import ROOT


def _study(folder):
    (folder / "analysis" / "tables").mkdir(parents=True)
    (folder / "data").mkdir()
    pd.DataFrame({"model": ["vgg16", "resnet18"], "auc": [0.61, 0.73]}).to_csv(
        folder / "analysis" / "tables" / "table1.csv", index=False)
    (folder / "analysis" / "statistics.json").write_text(json.dumps({"alpha": 0.05, "finished": "today"}))
    pd.DataFrame({"image_id": ["a", "b"], "label": [0, 1]}).to_parquet(folder / "data" / "manifest.parquet")
    return folder


def _compare(before, after, *flags):
    return subprocess.run([sys.executable, "bench/compare_studies.py", str(before), str(after), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_equal_studies_pass_and_a_moved_number_fails_naming_its_cell(tmp_path):
    before = _study(tmp_path / "before")
    after = tmp_path / "after"
    shutil.copytree(before, after)
    (after / "analysis" / "statistics.json").write_text(json.dumps({"alpha": 0.05, "finished": "tomorrow"}))
    same = _compare(before, after)
    assert same.returncode == 0 and "equal: 3 files" in same.stdout, same.stdout + same.stderr

    pd.DataFrame({"model": ["vgg16", "resnet18"], "auc": [0.61, 0.73 + 1e-16 * 4]}).to_csv(
        after / "analysis" / "tables" / "table1.csv", index=False)
    moved = _compare(before, after)
    assert moved.returncode == 1 and "table1.csv: row 1 auc" in moved.stdout, moved.stdout
    assert _compare(before, after, "--atol", "1e-15").returncode == 0
