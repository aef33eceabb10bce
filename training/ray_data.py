"""Ray Data settings shared by the prepare and explain stages."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def without_budget_backpressure(context: Any) -> Iterator[None]:
    """Run Ray Data without its object-store budget policy (the other policies stay).

    Measured on 2 CPUs (bench/prepare.py): that policy delays the second task by ~1 s and each
    later task by ~0.2 s while it estimates output sizes, a third of the wall time of a
    preprocessing pass. The budget guards the object store against outputs piling up; here
    the driver takes every output as it arrives and at most one task per CPU is in flight.
    """
    from ray.data._internal.execution import backpressure_policy as policies

    key = policies.ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY
    before = context.get_config(key, policies.ENABLED_BACKPRESSURE_POLICIES)
    context.set_config(key, [p for p in before if p is not policies.ResourceBudgetBackpressurePolicy])
    try:
        yield
    finally:
        context.set_config(key, before)
