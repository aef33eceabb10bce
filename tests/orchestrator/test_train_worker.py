"""orchestrator.train_worker: what runs inside Ray Train's processes.

The worker body is run in-process with Ray Train's context and the training loop stood in for,
to check its contract with the driver: rank 0 clears an earlier attempt's error.json, reports go
to Ray with their epoch, camstudy's own error becomes error.json (written by rank 0, the worker
returning normally so Ray does not retry it), anything else propagates for Ray to restart."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import ray.train

from orchestrator import train_worker as tw
from study.errors import TrainingError
from study.store import StudyStore
from tests.conftest import ROOT


class ListQueue:
    """Stands in for ray.util.queue.Queue: the reporter only puts."""

    def __init__(self):
        self.items = []

    def put(self, item):
        self.items.append(item)


def test_epoch_reporter_forwards_rank_zeros_metrics_with_the_run_key():
    queue = ListQueue()
    reporter = tw.EpochReporter("resnet18-seed0", queue)
    assert isinstance(reporter, ray.train.UserCallback)
    reporter.after_report(None, [{"epoch": 2, "val_auc": 0.8}, {"epoch": 2, "val_auc": 0.8}], None)
    reporter.after_report(None, [{"epoch": 3, "val_auc": 0.9}], None)
    assert queue.items == [("resnet18-seed0", {"epoch": 2, "val_auc": 0.8}),
                           ("resnet18-seed0", {"epoch": 3, "val_auc": 0.9})]


def test_the_module_loads_without_torch_timm_mlflow_or_the_training_code():
    """Ray imports this module in every Train controller: it must stay light (its docstring)."""
    code = ("import sys, orchestrator.train_worker; print(sorted(m for m in ('torch', 'timm', 'mlflow', "
            "'training.loop', 'training.registry') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.fixture
def worker(tmp_path, monkeypatch):
    """Run `train_worker` as rank `rank` with `train_run` replaced by `train`; returns what Ray got."""
    import torch

    threads = torch.get_num_threads()
    reports = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kwargs: reports.append(metrics))
    monkeypatch.setattr("ray.train.torch.get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr("training.registry.get_spec", lambda models, name: f"spec of {name}")
    monkeypatch.setattr("training.registry.recipe_for", lambda spec, recipes: f"recipe of {spec}")
    store = StudyStore(tmp_path / "study")

    def run(train, rank=0, permuted=False):
        monkeypatch.setattr(ray.train, "get_context", lambda: types.SimpleNamespace(get_world_rank=lambda: rank))
        monkeypatch.setattr("training.loop.train_run", train)
        config = types.SimpleNamespace(study_dir=str(store.root), models="models", recipes="recipes")
        return tw.train_worker({"config": config, "model": "resnet18", "seed": 3, "torch_threads": 1,
                                "fingerprint": "f00d", "permuted": permuted})

    yield types.SimpleNamespace(run=run, store=store, reports=reports)
    torch.set_num_threads(threads)


def stale_error(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / StudyStore.ERROR
    path.write_text(json.dumps({"kind": "TrainingError", "message": "an earlier attempt"}))
    return path


@pytest.mark.parametrize("permuted", [False, True])
def test_a_run_trains_in_its_folder_and_reports_each_epoch(worker, permuted):
    run_dir = worker.store.run_dir("resnet18", 3, permuted)
    error = stale_error(run_dir)
    seen = {}

    def train(*args, report, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        report(1, {"val_auc": 0.7})
        report(2, {"val_auc": 0.75, "loss": 0.3})

    assert worker.run(train, permuted=permuted) is None
    assert not error.exists()  # rank 0 cleared the earlier attempt's error
    assert seen["args"][:2] == ("spec of resnet18", "recipe of spec of resnet18")
    assert run_dir in seen["args"] and 3 in seen["args"]
    assert seen["kwargs"]["fingerprint"] == "f00d" and seen["kwargs"]["permuted_labels"] is permuted
    assert worker.reports == [{"epoch": 1, "val_auc": 0.7}, {"epoch": 2, "val_auc": 0.75, "loss": 0.3}]


def test_camstudy_error_is_written_by_rank_zero_and_not_raised(worker):
    def diverges(*args, **kwargs):
        raise TrainingError("resnet18 seed 3: the loss diverged at epoch 2")

    assert worker.run(diverges) is None  # returns normally: Ray Train must not retry it
    record = json.loads((worker.store.run_dir("resnet18", 3) / StudyStore.ERROR).read_text())
    assert record == {"kind": "TrainingError", "message": "resnet18 seed 3: the loss diverged at epoch 2"}


def test_other_ranks_neither_clear_nor_write_the_error(worker):
    error = stale_error(worker.store.run_dir("resnet18", 3))

    def diverges(*args, **kwargs):
        raise TrainingError("the loss diverged")

    assert worker.run(diverges, rank=1) is None
    assert json.loads(error.read_text())["message"] == "an earlier attempt"


def test_a_crash_propagates_for_ray_to_restart(worker):
    def crashes(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        worker.run(crashes)
    assert not (worker.store.run_dir("resnet18", 3) / StudyStore.ERROR).exists()
