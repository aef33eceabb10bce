"""Ray Data settings shared by the prepare and explain stages."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

from study.errors import CamstudyError
from training import ray_private


@contextlib.contextmanager
def without_budget_backpressure(context: Any) -> Iterator[None]:
    """Run Ray Data without its object-store budget policy (the other policies stay).

    Measured on 2 CPUs (bench/prepare.py): that policy delays the second task by ~1 s and each
    later task by ~0.2 s while it estimates output sizes, a third of the wall time of a
    preprocessing pass. The budget guards the object store against outputs piling up; here
    the driver takes every output as it arrives and at most one task per CPU is in flight.
    """
    policies = ray_private.backpressure_policies()
    key = policies.ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY
    before = context.get_config(key, policies.ENABLED_BACKPRESSURE_POLICIES)
    context.set_config(key, [p for p in before if p is not policies.ResourceBudgetBackpressurePolicy])
    try:
        yield
    finally:
        context.set_config(key, before)


# Where the full trace of a failed Ray Data task goes: the study's log file (attached by
# `study_log`), never the console, which gets camstudy's one line.
TRACE_LOGGER = "camstudy.trace"
_LOGGERS = ("ray.data", TRACE_LOGGER)


@contextlib.contextmanager
def study_log(path: Path) -> Iterator[None]:
    """For the block: Ray Data's records (a failed task's traceback is 60-150 lines) and camstudy's
    task traces are appended to `path`; of Ray Data's records only warnings still reach the
    console (its info lines repeat what the stages print)."""
    import ray.data  # noqa: F401 (it configures the "ray.data" logger on import, dropping handlers)

    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    consoles = [handler for handler in logging.getLogger("ray.data").handlers
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]
    for name in _LOGGERS:
        logging.getLogger(name).addHandler(to_file)
    logging.getLogger(TRACE_LOGGER).propagate = False
    for handler in consoles:
        handler.addFilter(_only_warnings)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(_only_warnings)
        for name in _LOGGERS:
            logging.getLogger(name).removeHandler(to_file)
        to_file.close()


def _only_warnings(record) -> bool:
    return record.levelno == logging.WARNING


def own_error(error: BaseException) -> CamstudyError | None:
    """camstudy's own error inside a Ray task failure (RayTaskError.cause, UserCodeException's
    __cause__), or None. A RayTaskError made `as_instanceof_cause` is also an instance of the
    cause's class, but its text is the whole remote traceback, so the cause itself is returned."""
    for _ in range(8):
        inner = getattr(error, "cause", None) or error.__cause__
        if inner is None:
            return error if isinstance(error, CamstudyError) else None
        error = inner
    return None


def reraise_own(error: BaseException) -> None:
    """Raise camstudy's error inside `error` alone (its one line names the file and the remedy),
    after writing the full trace to the study log; return if there is none."""
    own = own_error(error)
    if own is not None:
        logging.getLogger(TRACE_LOGGER).error("a Ray task failed: %s", own, exc_info=error)
        # Ray Data appends its retry advice to the message as more lines; camstudy's is the first
        raise type(own)(str(own).split("\n", 1)[0]) from None
