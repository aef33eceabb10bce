"""The study contract through the real CLI, on the demo config shrunk to one tiny model
(`tests.e2e.camstudy_cli`): a diverged run fails once with one line, a fixed rerun and
`--force train` each get a fresh MLflow child, a second writer is refused, and an unreachable
tracking server neither stops the study nor loses what it would have logged. SIGTERM and damaged
outputs: tests/e2e/test_sigterm.py."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import tracking
from tests.conftest import ROOT
from tests.e2e import camstudy_cli as cli
from tests.mlflow_server import free_port, mlflow_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_failed_fixed_and_forced_attempts_each_get_one_child_and_a_second_writer_is_refused(tmp_path):
    storage = tmp_path / "store"
    diverged = cli.camstudy("train", storage, **{"recipes.resnet.lr": 1e30})
    assert diverged.returncode == 2, diverged.stdout[-2000:] + diverged.stderr[-2000:]
    # (MLflow and Ray write their own log lines to stderr too)
    error_lines = [line for line in diverged.stderr.splitlines() if line.startswith("camstudy: error: ")]
    assert len(error_lines) == 1 and re.match(r"camstudy: error: resnet18 seed 0: the (train|validation) loss is nan in epoch 1; the run diverged", error_lines[0])
    assert diverged.stderr.strip().splitlines()[-1] == error_lines[0]
    assert "diverged" in error_lines[0] and "Traceback" not in diverged.stderr
    assert diverged.stdout.count("resnet18-seed0: FAILED") == 1
    (parent,), (failed,) = cli.runs(storage, "parent"), cli.runs(storage, "child")
    assert parent.info.status == "FAILED" and failed.info.status == "FAILED"
    assert failed.data.params["lr"] == "1e+30" and "diverged" in failed.data.tags["camstudy.error"]

    fixed = cli.camstudy("train", storage)
    assert fixed.returncode == 0, fixed.stdout[-3000:] + fixed.stderr[-3000:]
    children = cli.runs(storage, "child")
    (current,) = cli.current(children)
    assert len(children) == 2 and current.info.run_id != failed.info.run_id
    assert current.info.status == "FINISHED" and current.data.params["lr"] == "0.001"  # the demo recipe
    assert "camstudy.error" not in current.data.tags and cli.runs(storage, "parent")[0].info.status == "FINISHED"

    forced = cli.camstudy("train", storage, "--force")
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    children = cli.runs(storage, "child")
    (newest,) = cli.current(children)
    assert len(children) == 3 and newest.info.run_id not in {failed.info.run_id, current.info.run_id}
    client, _ = cli.client(storage)
    assert [m.step for m in client.get_metric_history(newest.info.run_id, "train/loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(current.info.run_id, "train/loss")] == [1, 2]

    first = subprocess.Popen(cli.command("explain", storage), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = storage / "demo" / ".lock"
    deadline = time.time() + 120
    while time.time() < deadline and f'"pid": {first.pid}' not in (lock.read_text() if lock.is_file() else ""):
        time.sleep(0.2)
    second = cli.camstudy("analyze", storage)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, out[-2000:] + err[-2000:]
    assert second.returncode == 2 and second.stderr.strip().splitlines()[-1].startswith("camstudy: error: ")
    assert "another camstudy command is writing this study ('camstudy explain configs/demo.yaml" in second.stderr
    assert f"PID {first.pid} on " in second.stderr
    assert not (storage / "demo" / "analysis").exists()


def test_an_unreachable_tracking_server_never_stops_the_study_and_catches_up_later(tmp_path):
    storage, port = tmp_path / "store", free_port()
    url = f"http://127.0.0.1:{port}"
    offline = cli.camstudy("train", storage, **{"tracking.uri": url})
    assert offline.returncode == 0, offline.stdout[-3000:] + offline.stderr[-3000:]
    assert offline.stdout.count(f"[mlflow] {url} cannot be reached") == 1
    assert (storage / "demo" / "train" / "resnet18-seed0" / "done.json").is_file()

    with mlflow_server(tmp_path, port):
        online = cli.camstudy("train", storage, **{"tracking.uri": url})
        assert online.returncode == 0, online.stdout[-3000:] + online.stderr[-3000:]
        assert "cannot be reached" not in online.stdout and "resnet18-seed0: finished earlier, skipped" in online.stdout
        client = MlflowClient(tracking_uri=url)
        experiment = client.get_experiment_by_name("camstudy").experiment_id
        (child,) = client.search_runs([experiment], filter_string=f"tags.`{tracking.ROLE_TAG}` = 'child'")
        assert child.info.status == "FINISHED" and "test/auc" in child.data.metrics
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")] == [1, 2]
