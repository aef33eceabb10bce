"""`camstudy run` killed mid-study and run again finishes without redoing finished work.

The study is the real demo config shrunk (STYLE.md §7). The process is SIGKILLed as a whole
process group (the driver and the local Ray it started) once the first training run has
finished, while the others are still training; the second invocation must skip that run,
finish the rest and leave no half-written output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SHRINK = ["--set", "models.names=[resnet18,resnet34,vit_small]", "--set", "data.synthetic.n=120",
          "--set", "split.n_val=16", "--set", "split.n_test=24", "--set", "preprocess.image_size=32",
          "--set", "recipes.resnet.epochs=2", "--set", "recipes.vit.epochs=1",
          "--set", "resources.max_concurrent_runs=1"]


def _command(storage: Path) -> list[str]:
    return [sys.executable, "-m", "orchestrator", "run", "configs/demo.yaml", "--set", f"storage={storage}", *SHRINK]


def _kill_when(condition, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the study ended (status {process.returncode}) before the kill point")
        if condition():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail("the kill point was not reached in time")


def test_killed_run_resumes_without_redoing_finished_work(tmp_path):
    study = tmp_path / "store" / "demo"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_command(tmp_path / "store"), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    _kill_when(lambda: any((study / "train").glob("*/done.json")), first, timeout=1200)
    first_done = next((study / "train").glob("*/done.json"))
    finished_at = first_done.stat().st_mtime
    assert not (study / "cams").exists() or not any((study / "cams").glob("*/_done.json"))

    second = subprocess.run(_command(tmp_path / "store"), cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"{first_done.parent.name}: finished earlier, skipped" in second.stdout
    assert first_done.stat().st_mtime == finished_at, "a finished run was trained again"
    for model in ("resnet18", "resnet34", "vit_small"):
        run_dir = study / "train" / f"{model}-seed0"
        summary = json.loads((run_dir / "done.json").read_text())
        assert len(summary["history"]) == summary["epochs"]
        cams = pd.read_parquet(study / "cams" / f"{model}-seed0")
        assert len(cams) > 0 and set(cams["randomized"]) == {False, True}
    assert not list(study.rglob(".*.tmp-*")), "a temporary output was left behind"
    assert (study / "analysis" / "report.html").is_file()
    assert "compare runs: mlflow ui --backend-store-uri sqlite:///" in second.stdout
    _check_mlflow(study)


PARAMS = {"model", "family", "depth", "params_millions", "seed", "optimizer", "lr", "epochs", "batch_size",
          "image_size", "pretrained", "cam_layer"}


def _check_mlflow(study: Path) -> None:
    """One parent for the study, one FINISHED child per (model, seed) with the documented params."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{study / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("camstudy")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if run.data.tags.get("camstudy.role") == "parent"]
    children = [run for run in runs if run.data.tags.get("camstudy.role") == "child"]
    assert len(parents) == 1
    assert sorted(run.info.run_name for run in children) == ["resnet18-seed0", "resnet34-seed0", "vit_small-seed0"]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert PARAMS <= set(child.data.params), PARAMS - set(child.data.params)
        assert child.info.status == "FINISHED"
        assert {"test_auc", "test_auc_lo", "test_auc_hi", "val_auc"} <= set(child.data.metrics)
        history = client.get_metric_history(child.info.run_id, "val_auc")
        assert [point.step for point in history] == list(range(1, len(history) + 1))
