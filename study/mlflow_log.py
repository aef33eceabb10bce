"""Logging to MLflow in batches, for every writer of the study's runs: the driver's tracking
(per-epoch and test metrics of each run's child) and the analysis (the results on the parent,
the map summaries on each child). The one rule of what is logged as a metric: a finite number,
Python or numpy, never a boolean (a flag is a tag, or logged explicitly as 0.0/1.0).

Torch-free and Ray-free; MLflow is imported when something is logged."""

from __future__ import annotations

import math
import numbers
import time
from typing import Any, Mapping


def is_metric(value: Any) -> bool:
    """A finite real number (int, float, numpy scalar), not a boolean (numpy's is no `numbers.Real`)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def log_metrics(client: Any, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
    """Log the entries of `metrics` that are metrics (`is_metric`) at `step`, in one batch."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items() if is_metric(value)]
    if batch:
        client.log_batch(run_id, metrics=batch)


def set_tags(client: Any, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set every tag of `tags` in one batch, each value as text cut to MLflow's 5,000 characters."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, str(value)[:5000]) for key, value in tags.items()])
