"""Ray's private and developer APIs that camstudy uses, all of them, in this one module (Ray 2.60).

Each is imported here and nowhere else (tests/test_layering.py checks it); every other module
asks this one. Per entry: what it is, why no public API does the job, and what happens if a Ray
release moves or changes it. tests/training/test_ray_private.py resolves every entry against
the installed Ray, so an upgrade that moves one fails there by name, not in the middle of a
study. Nothing is imported at module import: Ray loads only when an entry is asked for.

It lives in `training` (not `orchestrator`) because the prepare stage's row mapper
(`training.row_mapper`) needs the first entry; the orchestrator may import training.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional


def backpressure_policies() -> ModuleType:
    """`ray.data._internal.execution.backpressure_policy`: its `ENABLED_BACKPRESSURE_POLICIES`
    (Ray Data's default policy list), `ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY` (the
    `DataContext.set_config` key that replaces the list) and `ResourceBudgetBackpressurePolicy`.

    Why: `training.ray_data.without_budget_backpressure` drops the budget policy, which costs a
    third of a preprocessing pass's wall time on 2 CPUs (bench/prepare.py); Ray Data exposes
    the config key but not the policy classes or the default list.
    If Ray moves it, or renames the key, the list or the class: the prepare and explain stages
    fail at their first Ray Data pipeline with an ImportError or AttributeError naming it.
    """
    from ray.data._internal.execution import backpressure_policy

    return backpressure_policy


def bootstrap_address() -> Optional[str]:
    """`ray._private.services.canonicalize_bootstrap_address(None)`: the address of the cluster
    this process would join (RAY_ADDRESS, set by `ray job submit`, or a `ray start --head` on
    this machine), None when `ray.init()` would start a local one.

    Why: `orchestrator.ray_setup.init_ray` must know before `ray.init` whether it joins a
    cluster (which refuses resource arguments) or starts one (given every core, no dashboard);
    `ray.init` decides the same internally but says so only by failing.
    If Ray moves it: every stage fails with ImportError in `init_ray`, before any work starts.
    """
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(None)


def worker_module() -> ModuleType:
    """`ray._private.worker`, whose `print_to_stdstream(data, ignore_prefix)` prints what the
    raylet pushes to the driver (memory-monitor kill reports among it) whatever `log_to_driver`
    says.

    Why: `orchestrator.ray_setup.route_memory_reports` wraps that function so a kill report (45-60
    lines) goes to the study log and the console gets one line naming the run; Ray has no public
    hook for these messages.
    If Ray moves the module: ImportError in `init_ray`. If it renames the function, the wrapper
    is not installed (route_memory_reports checks) and the reports print in full, as Ray's own.
    """
    import ray._private.worker as worker

    return worker


def v2_data_parallel_trainer() -> type:
    """`ray.train.v2.api.data_parallel_trainer.DataParallelTrainer`, Ray Train V2's base class of
    `TorchTrainer` (a DeveloperAPI; `ray.train.data_parallel_trainer` is the V1 class, which V2's
    controller and callbacks do not drive).

    Why: a one-worker run needs no torch.distributed group, and `TorchTrainer`'s `TorchConfig`
    makes the Train controller import torch, ~3 CPU-seconds of every run's start on a small
    machine (`orchestrator.train_runs`).
    If Ray moves it: single-worker runs fail with ImportError when the train stage starts them;
    using `ray.train.torch.TorchTrainer` for them instead works, only slower to start.
    """
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    return DataParallelTrainer


# Loggers of Ray's private modules whose notices `orchestrator.ray_setup` drops (logger names, not
# imports: if Ray renames a module the notice simply shows again).
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
PROGRESS_LOGGER = "ray.data._internal.progress"
