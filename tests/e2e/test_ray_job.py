"""`ray job submit` against a real local head, as users run the study on a cluster.

The head is started with `ray start --head --block` as a child process on free local ports, so
stopping that one process (by its PID) stops exactly the Ray processes this test started.
Ray >= 2.59 enables token auth for local clusters; the CLI then needs RAY_AUTH_MODE=token.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT

RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


PORT_TAKEN = "address already in use"
ATTEMPTS = 3  # a free port can be taken before the head binds it (another test process's Ray): new ports


@pytest.fixture
def ray_head(tmp_path):
    """A local Ray head on free ports; yields (dashboard address, environment for the CLI)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    for attempt in range(1, ATTEMPTS + 1):
        log = tmp_path / f"head{attempt}.log"
        head, address, ray_temp = _start_head(env, log)
        try:
            if _wait_for_dashboard(address, env, head, log, last=attempt == ATTEMPTS):
                yield address, env
                return
        finally:
            _stop_head(head, ray_temp)


def _start_head(env: dict, log: Path) -> tuple[subprocess.Popen, str, str]:
    gcs, dashboard, client, node_manager, object_manager, agent_http, agent_grpc, metrics, runtime_env = _free_ports(9)
    ray_temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # AF_UNIX socket paths must stay < 108 bytes
    with open(log, "w") as out:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
             f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
             f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
             f"--temp-dir={ray_temp}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return head, f"http://127.0.0.1:{dashboard}", ray_temp


def _stop_head(head: subprocess.Popen, ray_temp: str) -> None:
    head.send_signal(signal.SIGTERM)  # --block: the head stops the processes it started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(ray_temp, ignore_errors=True)


def _wait_for_dashboard(address: str, env: dict, head: subprocess.Popen, log: Path, last: bool) -> bool:
    """True once the head answers `ray job list`; False if it exited because a port was taken
    (unless this is the `last` attempt); any other exit or a timeout fails the test."""
    deadline = time.time() + 180
    while time.time() < deadline:
        if head.poll() is not None:
            if PORT_TAKEN in log.read_text() and not last:
                return False
            pytest.fail(f"ray start --head exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        probe = subprocess.run([RAY, "job", "list", "--address", address], env=env,
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return True
        time.sleep(2)
    pytest.fail(f"the Ray dashboard at {address} did not come up:\n{log.read_text()[-3000:]}")


def test_ray_job_submit_runs_the_study(ray_head, tmp_path):
    address, env = ray_head
    storage = tmp_path / "store"
    entrypoint = (f"{sys.executable} -m orchestrator run configs/demo.yaml "
                  f"--set storage={storage} --set models.names=[resnet18] --set data.synthetic.n=60 "
                  "--set split.n_val=16 --set split.n_test=16 --set preprocess.image_size=32 "
                  "--set recipes.resnet.epochs=1 --set resources.prepare_actors=0 --set cam.sanity_randomized=false")
    job = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
                          "--", *entrypoint.split()],
                         env=env, capture_output=True, text=True, timeout=1400)
    assert job.returncode == 0, f"ray job submit failed:\n{job.stdout[-4000:]}\n{job.stderr[-4000:]}"
    assert "succeeded" in (job.stdout + job.stderr).lower()
    study = storage / "demo"
    assert (study / "train" / "resnet18-seed0" / "done.json").is_file()
    cams = pd.read_parquet(study / "cams" / "resnet18-seed0")
    assert len(cams) > 0 and set(cams["model"]) == {"resnet18"}
    assert f"[study] demo (id {json.loads((study / 'study.json').read_text())['id']}) in {study}" in job.stdout
    assert (study / "analysis" / "report.html").is_file()
    assert (study / "mlflow.db").is_file()
