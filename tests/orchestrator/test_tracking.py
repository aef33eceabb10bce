"""MLflow identity (study id, one child per attempt), the study lock and the contract's records,
against a real SQLite-backed MLflow and real processes; no training."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import tracking
from orchestrator.lock import StudyBusy, study_lock
from study.config import load_config
from study.mlflow_log import log_metrics
from study.runs import plan_runs
from study.store import StudyStore
from study.records import changed_keys, record_reason, write_record
from tests.conftest import ROOT

DEMO = ROOT / "configs" / "demo.yaml"


def _config(storage: Path, uri: str):
    return load_config(DEMO, {"storage": str(storage), "tracking.uri": uri})


def _tracker(storage: Path, uri: str) -> tracking.StudyTracker:
    config = _config(storage, uri)
    return tracking.StudyTracker(config, StudyStore(config.study_dir))


@pytest.mark.slow  # MLflow SQLite stores (their schema migrations take seconds)
def test_two_stores_with_one_study_name_on_one_tracking_uri_stay_apart(tmp_path):
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    one, two = (_tracker(tmp_path / name, uri) for name in ("a", "b"))
    assert one.study == two.study == "demo" and one.study_id != two.study_id
    assert one.parent_run() != two.parent_run()
    child_one = one.attempt_child("resnet18-seed0", tmp_path / "a" / "demo" / "train" / "resnet18-seed0",
                                  {"lr": 1}, "fp1", fresh=True)
    child_two = two.attempt_child("resnet18-seed0", tmp_path / "b" / "demo" / "train" / "resnet18-seed0",
                                  {"lr": 2}, "fp2", fresh=True)
    assert one.current_children() == {"resnet18-seed0": child_one}
    assert two.current_children() == {"resnet18-seed0": child_two}
    # a second tracker on the same store finds the same parent (the id is in the store)
    assert _tracker(tmp_path / "a", uri).parent_run() == one.parent_run()


@pytest.mark.slow  # MLflow SQLite stores (their schema migrations take seconds)
def test_a_fresh_attempt_gets_a_new_child_and_supersedes_the_old_one(tmp_path):
    tracker = _tracker(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_dir = tmp_path / "demo" / "train" / "resnet18-seed0"
    first = tracker.attempt_child("resnet18-seed0", run_dir, {"lr": 1e6}, "bad", fresh=True)
    tracking.end_run(tracker.client, first, "TrainingError: non-finite loss")
    # resuming the same attempt (a checkpoint exists, same fingerprint) continues its child
    assert tracker.attempt_child("resnet18-seed0", run_dir, {"lr": 1e6}, "bad", fresh=False) == first
    second = tracker.attempt_child("resnet18-seed0", run_dir, {"lr": 1e-4}, "good", fresh=False)  # settings changed
    assert second != first and tracker.current_children() == {"resnet18-seed0": second}
    old, new = tracker.client.get_run(first), tracker.client.get_run(second)
    assert old.data.tags[tracking.SUPERSEDED_TAG] == "true" and old.data.tags["camstudy.superseded_by"] == second
    assert old.info.status == "KILLED"  # it was RUNNING again when superseded
    assert new.data.params["lr"] == "0.0001" and "camstudy.error" not in new.data.tags
    assert json.loads((run_dir / StudyStore.ATTEMPT).read_text()) == {"run_id": second, "fingerprint": "good"}


@pytest.mark.slow  # MLflow SQLite stores (their schema migrations take seconds)
def test_a_run_killed_before_its_first_epoch_keeps_its_child_and_one_with_history_does_not(tmp_path):
    tracker = _tracker(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_dir = tmp_path / "demo" / "train" / "resnet18-seed0"
    first = tracker.attempt_child("resnet18-seed0", run_dir, {"lr": 1e-4}, "fp", fresh=True)
    tracking.end_run(tracker.client, first, "interrupted", status="KILLED")
    # started again from epoch 0 (no checkpoint yet) with nothing logged: the same attempt
    assert tracker.attempt_child("resnet18-seed0", run_dir, {"lr": 1e-4}, "fp", fresh=True) == first
    assert tracker.client.get_run(first).info.status == "RUNNING"
    assert "camstudy.error" not in tracker.client.get_run(first).data.tags  # the kill reason went with it
    log_metrics(tracker.client, first, {"val/auc": 0.6}, step=1)
    # from epoch 0 again after an epoch was logged (checkpoint lost): epochs 1,1 would mix, so a new child
    second = tracker.attempt_child("resnet18-seed0", run_dir, {"lr": 1e-4}, "fp", fresh=True)
    assert second != first and tracker.current_children() == {"resnet18-seed0": second}
    assert tracker.client.get_run(first).data.tags[tracking.SUPERSEDED_TAG] == "true"


@pytest.mark.slow  # MLflow SQLite stores (their schema migrations take seconds)
def test_a_child_made_by_a_command_killed_before_recording_it_is_taken_up_not_doubled(tmp_path):
    tracker = _tracker(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_dir = tmp_path / "demo" / "train" / "resnet18-seed0"
    first = tracker.attempt_child("resnet18-seed0", run_dir, {"lr": 1e-4}, "fp", fresh=True)
    (run_dir / StudyStore.ATTEMPT).unlink()  # the kill came between create_run and the attempt record
    again = _tracker(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")  # the next command
    assert again.attempt_child("resnet18-seed0", run_dir, {"lr": 1e-4}, "fp", fresh=True) == first
    assert json.loads((run_dir / StudyStore.ATTEMPT).read_text()) == {"run_id": first, "fingerprint": "fp"}
    children = again.client.search_runs([again.experiment_id], filter_string=f"tags.`{tracking.ROLE_TAG}` = 'child'")
    assert [run.info.run_id for run in children] == [first]
    # other settings are another attempt: a new child, the unrecorded one superseded
    (run_dir / StudyStore.ATTEMPT).unlink()
    other = again.attempt_child("resnet18-seed0", run_dir, {"lr": 1e-3}, "fp2", fresh=True)
    assert other != first and again.current_children() == {"resnet18-seed0": other}


@pytest.mark.slow  # MLflow SQLite stores (their schema migrations take seconds)
def test_mlflow_layout_classic_view_prefixed_metrics_and_source_tags(tmp_path):
    tracker = _tracker(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    child = tracker.attempt_child("resnet18-seed0", tmp_path / "demo" / "train" / "resnet18-seed0", {"lr": 1}, "fp",
                                  fresh=True)
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"  # not the GenAI view
    for run_id in (tracker.parent_run(), child):
        tags = tracker.client.get_run(run_id).data.tags
        assert tags["mlflow.user"] and tags["mlflow.source.name"].startswith("camstudy")
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        assert tags.get("mlflow.source.git.commit") == (head.stdout.strip() if head.returncode == 0 else None)
    assert [tracking.metric_name(k) for k in ("train_loss", "val_auc", "lr", "best_epoch", "epoch_seconds")] == [
        "train/loss", "val/auc", "train/lr", "val/best_epoch", "train/epoch_seconds"]


@pytest.mark.slow  # MLflow SQLite stores (their schema migrations take seconds)
def test_the_parent_ends_with_the_command(tmp_path):
    tracker = _tracker(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.start("camstudy run configs/demo.yaml")
    client = MlflowClient(tracking_uri=tracker.uri)
    assert client.get_run(tracker.parent_run()).info.status == "RUNNING"
    tracker.finish("KILLED", "interrupted")
    parent = client.get_run(tracker.parent_run())
    assert parent.info.status == "KILLED" and parent.data.tags["camstudy.error"] == "interrupted"
    tracker.start("camstudy run configs/demo.yaml")
    tracker.finish("FINISHED")
    assert client.get_run(tracker.parent_run()).info.status == "FINISHED"


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from orchestrator.lock import study_lock
    with study_lock(Path(sys.argv[1]), "camstudy run configs/demo.yaml"):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken(tmp_path):
    lock = tmp_path / "study" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StudyBusy) as refused:
            with study_lock(lock, "camstudy train"):
                pass
        message = str(refused.value)
        assert "another camstudy command is writing this study" in message and "\n" not in message
        assert f"PID {holder.pid} on " in message and "'camstudy run configs/demo.yaml'" in message
    finally:
        holder.kill()  # SIGKILL: no cleanup ran, the kernel drops the flock
        holder.wait()
    with study_lock(lock, "camstudy train"):
        assert json.loads(lock.read_text())["command"] == "camstudy train"


def test_records_name_the_changed_keys_and_sweep_removes_dead_writers_files(tmp_path):
    record = tmp_path / "stages" / "explain.json"
    inputs = {"cam": {"methods": ["gradcam"], "images": "positives"}, "metrics": {"ehr_thresholds": 100}}
    assert record_reason(record, inputs) == "not done yet"
    write_record(record, inputs)
    assert record_reason(record, inputs) is None
    changed = {"cam": {"methods": ["gradcam", "hirescam"], "images": "positives"}, "metrics": {"ehr_thresholds": 50}}
    assert record_reason(record, changed) == "cam.methods, metrics.ehr_thresholds changed"
    assert changed_keys({"a": 1}, {"a": 1, "b": {"c": 2}}) == ["b.c"]
    record.write_text("{not json")
    assert record_reason(record, inputs) == "not done yet"
    store = StudyStore(tmp_path)
    stale = [tmp_path / "train" / "r" / ".checkpoint.pt.tmp-4242", tmp_path / "cams" / ".r.tmp-77" / "part.parquet"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    kept = tmp_path / "train" / "r" / "checkpoint.pt"
    kept.write_text("whole")
    assert sorted(p.name for p in store.sweep_temporary()) == [".checkpoint.pt.tmp-4242", ".r.tmp-77"]
    assert kept.is_file() and not any(p.exists() for p in stale) and not (tmp_path / "cams" / ".r.tmp-77").exists()


def test_training_progress_says_runs_done_and_time_left_from_the_start(tmp_path, capsys):
    """Lines from the first minute on; the time left from the planned work once an epoch is
    measured (a resumed run's first report stands for its earlier epochs). The estimate's
    accuracy over a whole stage: tests/orchestrator/test_train_runs.py."""
    from orchestrator import train_runs

    config = load_config(DEMO, {"storage": str(tmp_path), "models.names": ["resnet18"], "training.seeds": [0, 1],
                                "recipes.resnet.epochs": 4})
    plans = plan_runs(config, StudyStore(config.study_dir))
    clock = [1000.0]
    status = train_runs.StageProgress(config, plans, slots=1, clock=lambda: clock[0])
    assert status.line() == "0/2 runs done, time left: estimating (no epoch finished yet)"
    status.run_started("resnet18-seed0")
    clock[0] += 61
    status.heartbeat(in_flight=1)  # a line in the first minute, before any epoch ends
    assert "[train     61s] 0/2 runs done, time left: estimating" in capsys.readouterr().out
    status.epoch_reported("resnet18-seed0", 3, 40.0)  # resumed at epoch 3: epochs 1-3 are done
    # seed0: 1 epoch of 40 s left; seed1 waits: start-up (21 s measured: 61 - 40) + 4 x 40 s
    assert status.line() == "0/2 runs done, ~3m41s left"
    clock[0] += 40
    status.epoch_reported("resnet18-seed0", 4, 40.0)
    clock[0] += 5
    status.run_finished("resnet18-seed0")  # a 5 s tail after the last epoch
    assert status.line() == "1/2 runs done, ~3m06s left"  # 21 + 4 x 40 + 5
