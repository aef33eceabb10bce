"""Starting Ray and its actors. A local Ray whose raylet dies during start-up (its dashboard agent too slow to report its
ports: ray-project/ray#65983, seen under load in this suite) is started again, with the real
raylet, the real agent and its real timeout: the agent is made slow once by a sitecustomize."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from tests.conftest import ROOT

# Runs in every Python process that finds it on PYTHONPATH: the first dashboard agent sleeps past
# the raylet's wait (the raylet then aborts), later agents start as usual
SLOW_AGENT_ONCE = """
import os, sys, time
marker = os.environ.get("CAMSTUDY_TEST_SLOW_AGENT_MARKER")
if marker and sys.argv and sys.argv[0].endswith(os.path.join("dashboard", "agent.py")) and not os.path.exists(marker):
    open(marker, "w").close()
    time.sleep(40)
"""

START = """
import ray
from orchestrator.ray_setup import start_local_ray
start_local_ray(num_cpus=1, include_dashboard=False, log_to_driver=False)
print("cpus", ray.cluster_resources()["CPU"], flush=True)
ray.shutdown()
"""


@pytest.mark.slow  # two Ray start-ups, the first waits out Ray's 30 s node timeout
@pytest.mark.timeout(300)
def test_a_local_ray_whose_raylet_dies_during_start_up_is_started_again(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SLOW_AGENT_ONCE)
    marker = tmp_path / "agent-slowed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
           "CAMSTUDY_TEST_SLOW_AGENT_MARKER": str(marker), "RAY_ADDRESS": "local"}
    try:
        done = subprocess.run([sys.executable, "-c", START], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=280)
    finally:
        _stop_slowed_agent(marker)
    assert marker.exists(), "the first dashboard agent was not slowed: the test proves nothing"
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "the local Ray node did not start (attempt 1 of 2" in done.stdout
    assert "cpus 1.0" in done.stdout


def _stop_slowed_agent(marker) -> None:
    """The slowed agent outlives its raylet while it sleeps (orphaned, so the retry cannot reach
    it): found by the marker in its environment, the only process this test leaves."""
    for process in psutil.process_iter():
        try:
            if process.environ().get("CAMSTUDY_TEST_SLOW_AGENT_MARKER") == str(marker):
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


class _Cluster:
    """ray.nodes / cluster_resources / available_resources of a fake cluster whose CPUs come back
    after `busy_polls` polls."""

    def __init__(self, nodes: int, busy_polls: int):
        self.nodes, self.busy_polls, self.polls = nodes, busy_polls, 0

    def install(self, monkeypatch):
        import ray

        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}] * self.nodes + [{"Alive": False}])
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 1e9})
        monkeypatch.setattr(ray, "available_resources", self._available)

    def _available(self):
        self.polls += 1
        return {"CPU": 1.0 if self.polls <= self.busy_polls else 2.0, "memory": 5e8}


def test_a_stage_waits_for_held_cpus_on_a_cluster_of_several_nodes_only(monkeypatch, capsys):
    from orchestrator.ray_setup import await_released_resources

    cluster = _Cluster(nodes=2, busy_polls=3)
    cluster.install(monkeypatch)
    await_released_resources("explain", timeout_s=10, poll_s=0.01)
    assert cluster.polls == 4 and capsys.readouterr().out == ""  # waited until the CPU came back, silently
    single = _Cluster(nodes=1, busy_polls=10**6)
    single.install(monkeypatch)
    await_released_resources("explain", timeout_s=10, poll_s=0.01)
    assert single.polls == 0  # one node: nothing to spread over, no wait
    stuck = _Cluster(nodes=3, busy_polls=10**6)
    stuck.install(monkeypatch)
    await_released_resources("explain", timeout_s=0.05, poll_s=0.01)
    assert "[explain] 1 CPU of the cluster still held by other work after 0 s" in capsys.readouterr().out
