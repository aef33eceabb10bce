"""`camstudy run` killed with SIGKILL at five points and run again finishes without redoing work.

The study is the real demo config shrunk. The process is SIGKILLed as a whole
process group (the driver and the local Ray it started) during prepare, in the middle of the
first training run (after its first epoch), between training runs, during explain and during
analyze; each kill is followed by the same command, and the last one must finish with every
run trained once (its done.json never rewritten), no half-written output, and exactly one
FINISHED MLflow child per run (a resumed run continues its attempt's child).
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

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

SHRINK = ["--set", "models.names=[resnet18,resnet34,vit_small]", "--set", "data.synthetic.n=120",
          "--set", "split.n_val=16", "--set", "split.n_test=24", "--set", "preprocess.image_size=32",
          "--set", "recipes.resnet.epochs=2", "--set", "recipes.vit.epochs=1",
          "--set", "resources.max_concurrent_runs=1"]
MODELS = ("resnet18", "resnet34", "vit_small")


def _command(storage: Path) -> list[str]:
    return [sys.executable, "-m", "orchestrator", "run", "configs/demo.yaml", "--set", f"storage={storage}", *SHRINK]


def _run_until(storage: Path, log: Path, condition, timeout: float = 1200) -> None:
    """Start the study and SIGKILL its process group once `condition(log text)` holds."""
    with open(log, "w") as out:
        process = subprocess.Popen(_command(storage), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition(log.read_text()):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return
        if process.poll() is not None:
            pytest.fail(f"the study ended (status {process.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"the kill point was not reached in time:\n{log.read_text()[-3000:]}")


# Ray's worker start-up warning, its core worker's error about actor arguments in the object store,
# Ray Data's memory advice, MLflow's table creation
THIRD_PARTY_NOTICES = ("maximum expected startup concurrency", "has constructor arguments in the object store",
                       "issue_detector", "Creating initial MLflow database tables")


KILL_POINTS = {
    "prepare": lambda text: "labelled images in" in text,
    "mid-epoch": lambda text: " epoch 1: " in text,
    "between runs": lambda text: "[train] " in text and ": done" in text,
    "explain": lambda text: "heatmaps to compute" in text,
    "analyze": lambda text: "[analyze] " in text and "analysing" in text,
}


def test_killed_five_times_the_study_resumes_without_redoing_finished_work(tmp_path):
    storage, study = tmp_path / "store", tmp_path / "store" / "demo"
    trained: dict[Path, float] = {}  # done.json -> mtime when first seen
    for point, condition in KILL_POINTS.items():
        _run_until(storage, tmp_path / f"{point}.log", condition)
        for done in (study / "train").glob("*/done.json") if (study / "train").is_dir() else []:
            assert trained.setdefault(done, done.stat().st_mtime) == done.stat().st_mtime, f"{done} rewritten ({point})"
    assert trained, "no run finished before the explain kill"

    last = subprocess.run(_command(storage), cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    # the console carries camstudy's lines, not third-party notices it causes (ray_setup, tracking, extract)
    console = "".join((tmp_path / f"{point}.log").read_text() for point in KILL_POINTS) + last.stdout + last.stderr
    for notice in THIRD_PARTY_NOTICES:
        assert notice not in console, notice
    for done, mtime in trained.items():
        assert done.stat().st_mtime == mtime, f"{done.parent.name} was trained again"
        assert f"{done.parent.name}: finished earlier, skipped" in last.stdout
    for model in MODELS:
        run_dir = study / "train" / f"{model}-seed0"
        summary = json.loads((run_dir / "done.json").read_text())
        assert len(summary["history"]) == summary["epochs"]
        cams, sanity = (pd.read_parquet(study / folder / f"{model}-seed0") for folder in ("cams", "sanity"))
        assert set(cams["randomized"]) == {False} and set(sanity["randomized"]) == {True}
        assert set(sanity["randomization"]) == {"full", "cascade"}  # the twin and the cascade's steps
        assert (sanity["randomization"] == "full").sum() == cams["final_layer"].sum() > 0
    assert not list(study.rglob(".*.tmp-*")), "a temporary output was left behind"
    assert (study / "analysis" / "report.html").is_file()
    # the command as printed works in a fresh shell (tests/orchestrator/test_tracking_ui.py runs it): the interpreter by path
    assert f"compare runs in MLflow: {sys.executable} -m mlflow ui --backend-store-uri sqlite:///" in last.stdout
    assert "then open http://127.0.0.1:5000/#/experiments/" in last.stdout
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
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # one child per run: every kill resumed its run's attempt instead of starting a new one
    assert sorted(run.info.run_name for run in children) == ["resnet18-seed0", "resnet34-seed0", "vit_small-seed0"]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert PARAMS <= set(child.data.params), PARAMS - set(child.data.params)
        assert child.info.status == "FINISHED"
        assert {"test/auc", "test/auc_lo", "test/auc_hi", "val/auc", "best/val_auc", "best/epoch"} <= set(child.data.metrics)
        assert not {"test/tp", "test/n", "test/seed", "test/threshold"} & set(child.data.metrics)  # bookkeeping: tags
        assert child.data.tags["camstudy.test.n"] == "24" and "mlflow.source.name" in child.data.tags
        history = client.get_metric_history(child.info.run_id, "val/auc")
        assert [point.step for point in history] == list(range(1, len(history) + 1))
