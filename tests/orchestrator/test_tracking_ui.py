"""The MLflow UI command a study prints works as printed in a fresh shell (no virtual environment
on the PATH), and the experiment it opens carries the runs view the printed URL names
(orchestrator/tracking.py): read back through MLflow's REST API from the UI server itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from orchestrator import tracking
from tests.mlflow_server import free_port
from study.config import load_config
from study.store import StudyStore
from tests.conftest import ROOT


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as answer:
        return json.loads(answer.read())


@pytest.mark.slow
def test_the_printed_ui_command_works_in_a_fresh_shell_and_opens_the_study(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "UI_PORT", free_port())  # the printed command names the port it uses
    config = load_config(ROOT / "configs" / "demo.yaml", {"storage": str(tmp_path / "store")})
    tracker = tracking.StudyTracker(config, StudyStore(config.study_dir))
    tracker.start("camstudy analyze configs/demo.yaml")
    tracker.client.set_tag(tracker.parent_run(), "mlflow.note.content", "the study's summary")
    printed = tracking.ui_lines(tracker)
    command, url_line = printed.splitlines()
    url = url_line.split("then open ", 1)[1]
    assert url.startswith(f"http://127.0.0.1:{tracking.UI_PORT}/#/experiments/{tracker.experiment_id}/runs?")
    query = urllib.parse.parse_qs(url.split("?", 1)[1])
    assert query == {"workflowType": ["machine_learning"], "viewStateShareKey": [tracking.VIEW_KEY]}

    fresh = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}  # no .venv/bin, no VIRTUAL_ENV
    log = tmp_path / "ui.log"
    server = subprocess.Popen(["bash", "-c", command], cwd=tmp_path, env=fresh, stdout=open(log, "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{tracking.UI_PORT}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        with urllib.request.urlopen(base + "/", timeout=60) as page:  # the UI itself is served
            assert b"<html" in page.read().lower()
        experiment = get(f"{base}/api/2.0/mlflow/experiments/get?experiment_id={tracker.experiment_id}")["experiment"]
        tags = {t["key"]: t["value"] for t in experiment["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"  # model training, not GenAI
        view = json.loads(tags[f"mlflow.sharedViewState.{tracking.VIEW_KEY}"])
        assert view["searchFilter"] == f"tags.`mlflow.parentRunId` = '{tracker.parent_run()}'"
        assert "metrics.`test/auc`" in view["selectedColumns"] and "params.`model`" in view["selectedColumns"]
        parent = get(f"{base}/api/2.0/mlflow/runs/get?run_id={tracker.parent_run()}")["run"]
        notes = {t["key"]: t["value"] for t in parent["data"]["tags"]}
        assert notes["mlflow.note.content"] == "the study's summary"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
