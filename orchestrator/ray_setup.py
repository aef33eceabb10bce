"""Connecting to Ray: the job's cluster under `ray job submit`, else an embedded local one."""

from __future__ import annotations

import logging
import os
import sys

import ray

from orchestrator.config import StudyConfig


def init_ray(config: StudyConfig | None = None) -> None:
    """Start or join Ray once per process; a second call does nothing.

    Inside `ray job submit` RAY_ADDRESS is set and the cluster owns the resources, so `ray.init()`
    gets no resource arguments. Otherwise a local Ray uses every core, without the dashboard.
    `config` is not needed yet; it is where cluster options (runtime env, namespace) will come from.
    """
    if ray.is_initialized():
        return
    # Worker and controller logs stay in Ray's session log folder (and the dashboard): Ray
    # Train's controller repeats internal notices many times a second on small machines, and
    # the stages print their own progress and surface every run's error on the driver.
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    local_data_context(progress=sys.stderr.isatty())


def local_data_context(progress: bool = True) -> None:
    """Ray Data options for this driver: one global progress bar (or none), no per-operator bars."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = progress
    context.enable_operator_progress_bars = False  # one bar per pipeline is enough for map_batches
    context.print_on_execution_start = False  # the stage prints its own line per step
