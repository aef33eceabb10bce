"""SIGTERM through the real CLI (the demo config shrunk to one tiny model, `tests.e2e.camstudy_cli`):
the command ends in seconds with its runs KILLED and the rerun finishes with exactly one current
FINISHED child per run; in the finished study a truncated maps file is recomputed and a damaged
training output refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from types import SimpleNamespace

import pandas as pd
import pytest

from study.records import FILES, read_record
from study.store import StudyStore
from tests.conftest import ROOT
from tests.e2e import camstudy_cli as cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


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
        first = subprocess.Popen(cli.command("run", storage, **{"recipes.resnet.epochs": EPOCHS}), cwd=ROOT, stdout=out,
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
                             parents=cli.runs(storage, "parent"), children=cli.runs(storage, "child"),
                             kept=(run_dir / "checkpoint.pt").is_file() or (run_dir / "done.json").is_file())

    rerun = cli.camstudy("run", storage, **{"recipes.resnet.epochs": EPOCHS})
    parents, children = cli.runs(storage, "parent"), cli.runs(storage, "child")
    client, _ = cli.client(storage)
    loss_steps = {run.info.run_id: [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
                  for run in killed.children + children}
    analyzed = storage / "demo" / "stages" / "analyze.json"
    cams_record = storage / "demo" / "cams" / "resnet18-seed0" / "_done.json"
    analyzed_cams = json.loads(analyzed.read_text())["inputs"]["cams"] if analyzed.is_file() else None
    cams_fingerprint = json.loads(cams_record.read_text())["fingerprint"] if cams_record.is_file() else None
    again = cli.camstudy("analyze", storage, **{"recipes.resnet.epochs": EPOCHS})
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
        return cli.camstudy("run", storage, **{"recipes.resnet.epochs": EPOCHS})

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
