"""Connecting to Ray: the job's cluster, a cluster already running here, else an embedded local one."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import ray

from training.config import StudyConfig


def running_cluster() -> str | None:
    """The address of the cluster this process should join: RAY_ADDRESS (set by `ray job
    submit`), or a cluster started on this machine with `ray start --head`; None when neither."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(None)


def init_ray(config: StudyConfig | None = None) -> None:
    """Start or join Ray once per process; a second call does nothing.

    A running cluster (inside `ray job submit`, or `ray start --head` on this machine) owns its
    resources, so `ray.init()` joins it without resource arguments (Ray refuses them there).
    Otherwise a local Ray uses every core, without the dashboard. `config` is not needed yet; it
    is where cluster options (runtime env, namespace) will come from.
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
    if address:
        print(f"[ray] joining the running cluster at {address}", flush=True)
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    if threading.current_thread() is threading.main_thread() and on_sigterm is not None:
        signal.signal(signal.SIGTERM, on_sigterm)
    local_data_context(progress=sys.stderr.isatty())


def local_data_context(progress: bool = True) -> None:
    """Ray Data options for this driver: one global progress bar (or none), no per-operator bars."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = progress
    context.enable_operator_progress_bars = False  # one bar per pipeline is enough for map_batches
    context.print_on_execution_start = False  # the stage prints its own line per step


# Ray notices that say nothing a camstudy user acts on, matched by logger and message start: the
# local cluster's default token auth (the "disabled" warning, a security risk, still shows) and
# Ray Data's note that its bars are off (camstudy turns them off off a terminal and prints its own).
KNOWN_NOTICES = {
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled",
    "ray.data._internal.progress": "Progress bars disabled",
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
