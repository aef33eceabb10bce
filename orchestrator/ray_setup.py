"""Connecting to Ray: the job's cluster, a cluster already running here, else an embedded local one."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Optional

import ray

from study.config import StudyConfig
from training import ray_private
from training.ray_data import TRACE_LOGGER

# How often Ray restarts a task that its memory monitor killed. Ray's default has no limit
# (system config `task_oom_retries` -1: "There are infinite oom retries remaining"), so a run too
# big for its node is killed and restarted for ever. One retry: a kill caused by a neighbour's
# peak can pass once the neighbour is done; a second kill fails the run with one line. Every Ray
# process reads RAY_<key> at start, the driver too, and the driver owns (so retries) the run
# tasks: on a local cluster (checked with Ray 2.60) a killed task then runs twice and fails with
# OutOfMemoryError. A task with max_retries=0 is never retried on a kill. A value already in the
# environment is kept.
OOM_RETRIES_ENV, OOM_RETRIES = "RAY_task_oom_retries", 1
# Worker processes the raylet may start at once. Its default is the node's CPU count, and it warns
# when 4x that many are starting; the train stage starts per run a driver task, a Ray Train
# controller and its workers, and the explain stage its actors, all using little or no CPU while
# they start, so on a 2-core machine a normal study passes that line. The stages' own demand sets
# the limit instead (a value already in the environment is kept).
STARTUP_CONCURRENCY_ENV = "RAY_worker_maximum_startup_concurrency"
# The name of a train-stage run's task in Ray (dashboard, memory-monitor reports): the report
# then says which run was killed.
RUN_TASK = "train[{}]"


def running_cluster() -> str | None:
    """The address of the cluster this process should join: RAY_ADDRESS (set by `ray job
    submit`), or a cluster started on this machine with `ray start --head`; None when neither."""
    return ray_private.bootstrap_address()


def init_ray(config: StudyConfig | None = None) -> None:
    """Start or join Ray once per process; a second call does nothing.

    A running cluster (inside `ray job submit`, or `ray start --head` on this machine) owns its
    resources, so `ray.init()` joins it without resource arguments (Ray refuses them there).
    Otherwise a local Ray uses every core, without the dashboard, and Ray's defaults for memory:
    the object store takes 30% of the memory free at start, and the rest is the node's `memory`
    resource that training workers and explain actors reserve from. Either way a task killed by
    Ray's memory monitor is retried `OOM_RETRIES` times, and its report goes to the study log with
    one line on the console (`route_memory_reports`). `config` is not needed yet; it is where
    cluster options (runtime env, namespace) will come from.
    """
    if ray.is_initialized():
        return
    _quiet_known_notices()
    # Worker and controller logs stay in Ray's session log folder (and the dashboard): Ray
    # Train's controller repeats internal notices many times a second on small machines, and
    # the stages print their own progress and surface every run's error on the driver.
    address = running_cluster()
    # ray.init installs SIGTERM handlers of its own (Python: exit 1; its core's: log, then abort);
    # the command's handler (orchestrator.cli: stop the runs, mark them KILLED) is put back
    on_sigterm = signal.getsignal(signal.SIGTERM)
    os.environ.setdefault(OOM_RETRIES_ENV, str(OOM_RETRIES))
    os.environ.setdefault(STARTUP_CONCURRENCY_ENV, str(max(8, 2 * (os.cpu_count() or 1))))
    if address:
        print(f"[ray] joining the running cluster at {address}", flush=True)
        ray.init(address=address, log_to_driver=False)
    else:
        start_local_ray(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                        logging_level=logging.WARNING)
    if threading.current_thread() is threading.main_thread() and on_sigterm is not None:
        signal.signal(signal.SIGTERM, on_sigterm)
    route_memory_reports()
    local_data_context(progress=sys.stderr.isatty())


# Ray's words when its raylet died before registering (ray._private.node): on a busy machine, the
# raylet gives its dashboard agent a fixed ~15 s to report its ports and aborts when the agent's
# imports take longer (ray-project/ray#65983); a second start usually finds the imports cached
NODE_START_TIMEOUT = "timed out during startup"
LOCAL_START_ATTEMPTS = 2


def start_local_ray(**options) -> None:
    """`ray.init(**options)` for a Ray started by this process, tried again once when its raylet
    dies during start-up; the processes the failed attempt started are stopped first (they are
    this process' children: nothing else is touched)."""
    import psutil

    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            ray.init(**options)
            return
        except Exception as error:  # noqa: BLE001 (Ray raises a bare Exception here)
            if NODE_START_TIMEOUT not in str(error):
                raise
            _stop_new_children(before)
            if attempt == LOCAL_START_ATTEMPTS:
                raise RuntimeError(
                    f"the local Ray node did not start ({error}) in {LOCAL_START_ATTEMPTS} attempts; its raylet's "
                    "reason is in raylet.err of the newest session under Ray's temp folder (/tmp/ray/session_latest/"
                    "logs by default). On a busy machine it is usually the dashboard agent starting too slowly: "
                    "run again when the machine is less loaded, or start Ray yourself (`ray start --head`) and "
                    "the study joins it") from error
            print(f"[ray] the local Ray node did not start (attempt {attempt} of {LOCAL_START_ATTEMPTS}: its raylet "
                  "stopped waiting for Ray's dashboard agent, which is slow to start on a busy machine); "
                  "starting it again", flush=True)


def _stop_new_children(before: set[int]) -> None:
    """Kill the child processes that appeared since `before` (a failed Ray start's GCS, agents and
    raylet, were any left) and wait for them."""
    import psutil

    started = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
    for child in started:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(started, timeout=10)


# How long a stage that places actors waits for the previous stage's resources to come back
RELEASE_WAIT_S = 60.0


def await_released_resources(stage: str, timeout_s: float = RELEASE_WAIT_S, poll_s: float = 0.5) -> None:
    """On a cluster of several nodes, wait (at most `timeout_s`) until no CPU or GPU is held, so a
    stage's actors are placed over every node. Ray spreads new actors over the nodes that have room
    *now*: a node whose Ray Train workers were still shutting down after the train stage was passed
    over, and both explain actors of tests/e2e/test_multinode.py landed on the other node. A single
    node (a laptop, the demo) places nothing elsewhere and does not wait."""
    if sum(1 for node in ray.nodes() if node.get("Alive")) < 2:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        total, free = ray.cluster_resources(), ray.available_resources()
        held = {name: round(total[name] - free.get(name, 0.0), 3) for name in ("CPU", "GPU")
                if total.get(name, 0.0) - free.get(name, 0.0) > 1e-6}
        if not held:
            return
        if time.monotonic() >= deadline:
            print(f"[{stage}] {', '.join(f'{n:g} {name}' for name, n in held.items())} of the cluster still held by "
                  f"other work after {timeout_s:.0f} s; its actors start now and may share nodes", flush=True)
            return
        time.sleep(poll_s)


def local_data_context(progress: bool = True) -> None:
    """Ray Data options for this driver: one global progress bar (or none), no per-operator bars."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = progress
    context.enable_operator_progress_bars = False  # one bar per pipeline is enough for map_batches
    context.print_on_execution_start = False  # the stage prints its own line per step
    # Ray Data's issue detectors advise on memory requests; the explain stage reserves its actors'
    # memory itself (from the estimate and measured peaks), so their advice would contradict it
    context.issue_detectors_config.detectors = []


# Ray notices that say nothing a camstudy user acts on, matched by logger and message start: the
# local cluster's default token auth (the "disabled" warning, a security risk, still shows) and
# Ray Data's note that its bars are off (camstudy turns them off off a terminal and prints its own).
KNOWN_NOTICES = {
    ray_private.TOKEN_AUTH_LOGGER: "Token authentication is enabled",
    ray_private.PROGRESS_LOGGER: "Progress bars disabled",
}


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _quiet_known_notices() -> None:
    for name, prefix in KNOWN_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(prefix))


# --------------------------------------------------------------------------- memory-monitor kills


def memory_kill(text: str) -> Optional[dict]:
    """What a Ray memory-monitor report says (the raylet's kill report, 45-60 lines, also the text
    of the OutOfMemoryError a killed task raises): the node's memory in use and its limit in GB,
    the runs (RUN_TASK names) and other tasks killed, Ray's retries left; None for other text."""
    node = re.search(r"Memory on the node \(IP: ([^,]+),[^)]*\) was ([\d.]+)GB used / ([\d.]+)GB limit", text)
    if node is None or "running low on memory" not in text:
        return None
    killed = list(dict.fromkeys(re.findall(r"task name=(.+?), required resources", text)))
    run_name = re.compile(re.escape(RUN_TASK).replace(r"\{\}", "(.+)"))
    runs = {name: run_name.fullmatch(name) for name in killed}
    retries = re.search(r"There are (\w+) oom retries remaining", text)
    return {"ip": node.group(1), "used_gb": float(node.group(2)), "limit_gb": float(node.group(3)),
            "runs": [match.group(1) for match in runs.values() if match],
            "others": [name for name, match in runs.items() if not match],
            "retries": retries.group(1) if retries else None}


def memory_kill_line(text: str) -> Optional[str]:
    """One console line for a memory-monitor report, naming the runs it killed; None for other text."""
    kill = memory_kill(text)
    if kill is None:
        return None
    victims = ", ".join(kill["runs"]) or ", ".join(kill["others"][:3]) or "a worker"
    retries = kill["retries"]
    retry = "" if retries is None else "; not retried" if retries == "0" else f"; Ray retries it ({retries} left)"
    return (f"[ray] the memory monitor killed {victims} (node {kill['ip']} at {kill['used_gb']:.1f} of "
            f"{kill['limit_gb']:.1f} GB){retry}; the full report is in the study log")


def route_memory_reports() -> None:
    """Send Ray's memory-monitor reports to the study log (logger TRACE_LOGGER) and print one line
    each on the console instead. The raylet pushes them to the driver, which prints them on stdout
    whatever `log_to_driver` says, through `ray._private.worker.print_to_stdstream`: Ray has no
    public hook for these messages, so that function is wrapped (a Ray without it prints them as
    before; `training.ray_private.worker_module`). Every other pushed message passes unchanged."""
    ray_worker = ray_private.worker_module()

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "routes_memory_reports", False):
        return

    def routed(data, *args, **kwargs):
        text = "\n".join(map(str, data.get("lines", ()))) if data.get("pid") == "raylet" else ""
        line = memory_kill_line(text) if text else None
        if line is None:
            return original(data, *args, **kwargs)
        logging.getLogger(TRACE_LOGGER).error("Ray's memory monitor:\n%s", text)
        print(line, flush=True)

    routed.routes_memory_reports = True
    ray_worker.print_to_stdstream = routed
