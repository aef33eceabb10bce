"""The study contract through the real CLI, on the demo config shrunk to one tiny model: a diverged
run fails once with one line, a fixed rerun and `--force train` each get a fresh MLflow child,
a second writer is refused, SIGTERM ends the command in seconds with its runs KILLED, the
rerun finishes with exactly one current FINISHED child per run, and an unreachable tracking
server neither stops the study nor loses what it would have logged; in a finished study a
truncated maps file is recomputed and a damaged training output refused."""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.mlflow_server import free_port, mlflow_server
from orchestrator import tracking
from study.records import FILES, read_record
from study.store import StudyStore
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
SHRINK = {"models.names": "[resnet18]", "data.synthetic.n": 60, "data.synthetic.size": 64, "split.n_val": 16,
          "split.n_test": 16, "preprocess.image_size": 32, "recipes.resnet.epochs": 2, "training.batch_size": 16,
          "resources.prepare_actors": 0, "cam.sanity_randomized": "false"}


def _command(stage: str, storage: Path, *extra: str, **overrides) -> list[str]:
    sets = [item for key, value in {**SHRINK, "storage": storage, **overrides}.items()
            for item in ("--set", f"{key}={value}")]
    return [sys.executable, "-m", "orchestrator", stage, "configs/demo.yaml", *sets, *extra]


def _camstudy(stage: str, storage: Path, *extra: str, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run(_command(stage, storage, *extra, **overrides), cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def _client(storage: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'demo' / 'mlflow.db'}")
    return client, client.get_experiment_by_name("camstudy").experiment_id


def _runs(storage: Path, role: str) -> list:
    client, experiment = _client(storage)
    return client.search_runs([experiment], filter_string=f"tags.`{tracking.ROLE_TAG}` = '{role}'",
                              order_by=["attributes.start_time ASC"])


def _current(children: list) -> list:
    return [run for run in children if run.data.tags[tracking.SUPERSEDED_TAG] == "false"]


def test_failed_fixed_and_forced_attempts_each_get_one_child_and_a_second_writer_is_refused(tmp_path):
    storage = tmp_path / "store"
    diverged = _camstudy("train", storage, **{"recipes.resnet.lr": 1e30})
    assert diverged.returncode == 2, diverged.stdout[-2000:] + diverged.stderr[-2000:]
    # (MLflow and Ray write their own log lines to stderr too)
    error_lines = [line for line in diverged.stderr.splitlines() if line.startswith("camstudy: error: ")]
    assert len(error_lines) == 1 and re.match(r"camstudy: error: resnet18 seed 0: the (train|validation) loss is nan in epoch 1; the run diverged", error_lines[0])
    assert diverged.stderr.strip().splitlines()[-1] == error_lines[0]
    assert "diverged" in error_lines[0] and "Traceback" not in diverged.stderr
    assert diverged.stdout.count("resnet18-seed0: FAILED") == 1
    (parent,), (failed,) = _runs(storage, "parent"), _runs(storage, "child")
    assert parent.info.status == "FAILED" and failed.info.status == "FAILED"
    assert failed.data.params["lr"] == "1e+30" and "diverged" in failed.data.tags["camstudy.error"]

    fixed = _camstudy("train", storage)
    assert fixed.returncode == 0, fixed.stdout[-3000:] + fixed.stderr[-3000:]
    children = _runs(storage, "child")
    (current,) = _current(children)
    assert len(children) == 2 and current.info.run_id != failed.info.run_id
    assert current.info.status == "FINISHED" and current.data.params["lr"] == "0.001"  # the demo recipe
    assert "camstudy.error" not in current.data.tags and _runs(storage, "parent")[0].info.status == "FINISHED"

    forced = _camstudy("train", storage, "--force")
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    children = _runs(storage, "child")
    (newest,) = _current(children)
    assert len(children) == 3 and newest.info.run_id not in {failed.info.run_id, current.info.run_id}
    client, _ = _client(storage)
    assert [m.step for m in client.get_metric_history(newest.info.run_id, "train/loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(current.info.run_id, "train/loss")] == [1, 2]

    first = subprocess.Popen(_command("explain", storage), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = storage / "demo" / ".lock"
    deadline = time.time() + 120
    while time.time() < deadline and f'"pid": {first.pid}' not in (lock.read_text() if lock.is_file() else ""):
        time.sleep(0.2)
    second = _camstudy("analyze", storage)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, out[-2000:] + err[-2000:]
    assert second.returncode == 2 and second.stderr.strip().splitlines()[-1].startswith("camstudy: error: ")
    assert f"another camstudy command is writing this study ('camstudy explain configs/demo.yaml" in second.stderr
    assert f"PID {first.pid} on " in second.stderr
    assert not (storage / "demo" / "analysis").exists()


EPOCHS = 6  # long enough that SIGTERM after epoch 1 usually lands mid-run


@pytest.fixture(scope="module")
def sigtermed(tmp_path_factory):
    """`camstudy run` stopped with SIGTERM after its first epoch, run again to the end, then
    analysed again: what each step left (the MLflow runs as they were at that moment), for the
    test below. The finished study is also what test_a_truncated_cams_file_... damages (a copy)."""
    tmp_path = tmp_path_factory.mktemp("sigterm")
    storage = tmp_path / "store"
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(_command("run", storage, **{"recipes.resnet.epochs": EPOCHS}), cwd=ROOT, stdout=out,
                                 stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + 600
        while time.time() < deadline and "resnet18-seed0 epoch 1:" not in log.read_text():
            assert first.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        sent = time.time()
        first.wait(timeout=60)
    stopped_after = time.time() - sent
    run_dir = storage / "demo" / "train" / "resnet18-seed0"
    killed = SimpleNamespace(returncode=first.returncode, stopped_after=stopped_after, text=log.read_text(),
                             parents=_runs(storage, "parent"), children=_runs(storage, "child"),
                             kept=(run_dir / "checkpoint.pt").is_file() or (run_dir / "done.json").is_file())

    rerun = _camstudy("run", storage, **{"recipes.resnet.epochs": EPOCHS})
    parents, children = _runs(storage, "parent"), _runs(storage, "child")
    client, _ = _client(storage)
    loss_steps = {run.info.run_id: [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
                  for run in killed.children + children}
    analyzed = storage / "demo" / "stages" / "analyze.json"
    cams_record = storage / "demo" / "cams" / "resnet18-seed0" / "_done.json"
    analyzed_cams = json.loads(analyzed.read_text())["inputs"]["cams"] if analyzed.is_file() else None
    cams_fingerprint = json.loads(cams_record.read_text())["fingerprint"] if cams_record.is_file() else None
    again = _camstudy("analyze", storage, **{"recipes.resnet.epochs": EPOCHS})
    return SimpleNamespace(storage=storage, killed=killed, rerun=rerun, parents=parents, children=children,
                           loss_steps=loss_steps, analyzed_cams=analyzed_cams, cams_fingerprint=cams_fingerprint,
                           again=again)


def test_sigterm_stops_the_study_in_seconds_and_the_rerun_resumes_the_same_child(sigtermed):
    stopped = sigtermed.killed
    text = stopped.text
    assert stopped.returncode == 143, text[-3000:]
    assert stopped.stopped_after < 30 and "camstudy: terminated; finished work is kept" in text
    (parent,), (killed,) = stopped.parents, stopped.children
    assert parent.info.status == "KILLED" and killed.info.status == "KILLED"
    # the progress line reaches the driver up to 2 s late, so on a busy machine the run may already
    # have finished its last epoch when the signal lands: killed mid-run (checkpoint) or just after
    assert stopped.kept  # the run's checkpoint.pt or its done.json

    rerun = sigtermed.rerun
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    (parent,), children = sigtermed.parents, sigtermed.children
    assert parent.info.status == "FINISHED"
    assert [c.info.run_id for c in children] == [killed.info.run_id]  # resumed: the same attempt
    assert children[0].info.status == "FINISHED"
    # each epoch once; epochs whose report died with the killed driver are back-filled from done.json
    # when the run closes, so they arrive after the resumed ones (the UI plots by step)
    assert sorted(sigtermed.loss_steps[killed.info.run_id]) == list(range(1, EPOCHS + 1))
    assert sigtermed.analyzed_cams == {"resnet18-seed0": sigtermed.cams_fingerprint}
    again = sigtermed.again
    assert again.returncode == 0 and "[analyze] up to date" in again.stdout


def test_a_truncated_cams_file_is_recomputed_with_one_line_and_a_damaged_training_output_is_refused(sigtermed,
                                                                                                   tmp_path):
    """A finished study (a copy of the one above, without its MLflow store); its cams/ Parquet cut
    to half; `camstudy run` again recomputes that run's maps (one line naming the file) to the same
    rows. Then its test predictions cut: the run is refused with one line naming the file and
    `--force train`, and nothing is retrained."""
    assert sigtermed.rerun.returncode == 0, "the study to copy did not finish"
    storage = tmp_path / "store"
    shutil.copytree(sigtermed.storage, storage, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", ".lock"))
    study = storage / "demo"

    def camstudy() -> subprocess.CompletedProcess:
        return _camstudy("run", storage, **{"recipes.resnet.epochs": EPOCHS})

    part = study / "cams" / "resnet18-seed0" / StudyStore.CAM_PART
    before = pd.read_parquet(part).drop(columns=["heatmap"])
    record = read_record(part.parent / StudyStore.CAM_DONE)
    assert StudyStore.CAM_PART in record[FILES]
    for stage_record in ("prepare", "analyze"):
        assert read_record(study / "stages" / f"{stage_record}.json")[FILES], stage_record
    done = study / "train" / "resnet18-seed0" / StudyStore.DONE
    assert sorted(read_record(done)[FILES]) == ["model.pt", "predictions.parquet", "test_metrics.json"]
    trained_at = done.stat().st_mtime_ns

    size = part.stat().st_size
    os.truncate(part, size // 2)
    again = camstudy()
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    line = (f"[explain] resnet18-seed0: cams/resnet18-seed0/part-00000.parquet is {size // 2:,} bytes, "
            f"recorded {size:,} (truncated or changed); computing its heatmaps")
    assert line in again.stdout.splitlines(), again.stdout[-3000:]
    assert "[prepare] up to date" in again.stdout and "resnet18-seed0: finished earlier, skipped" in again.stdout
    after = pd.read_parquet(part).drop(columns=["heatmap"])
    keys = ["image_id", "cam_method", "cam_layer"]  # one map per image, method and layer
    pd.testing.assert_frame_equal(after.sort_values(keys).reset_index(drop=True),
                                  before.sort_values(keys).reset_index(drop=True))
    assert done.stat().st_mtime_ns == trained_at

    predictions = study / "train" / "resnet18-seed0" / StudyStore.PREDICTIONS
    os.truncate(predictions, predictions.stat().st_size - 1)
    refused = camstudy()
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("camstudy: error: ")]
    assert len(errors) == 1 and errors[0].startswith("camstudy: error: train/resnet18-seed0/predictions.parquet is ")
    assert "`--force train`" in errors[0] and "Traceback" not in refused.stderr
    assert done.stat().st_mtime_ns == trained_at  # refused, not retrained


def test_an_unreachable_tracking_server_never_stops_the_study_and_catches_up_later(tmp_path):
    storage, port = tmp_path / "store", free_port()
    url = f"http://127.0.0.1:{port}"
    offline = _camstudy("train", storage, **{"tracking.uri": url})
    assert offline.returncode == 0, offline.stdout[-3000:] + offline.stderr[-3000:]
    assert offline.stdout.count(f"[mlflow] {url} cannot be reached") == 1
    assert (storage / "demo" / "train" / "resnet18-seed0" / "done.json").is_file()

    with mlflow_server(tmp_path, port):
        online = _camstudy("train", storage, **{"tracking.uri": url})
        assert online.returncode == 0, online.stdout[-3000:] + online.stderr[-3000:]
        assert "cannot be reached" not in online.stdout and "resnet18-seed0: finished earlier, skipped" in online.stdout
        client = MlflowClient(tracking_uri=url)
        experiment = client.get_experiment_by_name("camstudy").experiment_id
        (child,) = client.search_runs([experiment], filter_string=f"tags.`{tracking.ROLE_TAG}` = 'child'")
        assert child.info.status == "FINISHED" and "test/auc" in child.data.metrics
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")] == [1, 2]
