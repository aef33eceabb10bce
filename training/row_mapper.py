"""One batch function mapped over the rows of a table: with Ray Data (`workers` "auto" or a number
of tasks) or in a plain in-process loop (`workers` 0: the reference path, used by the bench and
for debugging). Both use the same functions and run OpenCV single-threaded, so their outputs
are identical and a timing comparison is fair.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Iterator, Literal, Union

import cv2
import numpy as np
import pandas as pd

from training.ray_data import reraise_own, without_budget_backpressure

BATCH_SIZE = 16  # images per Ray Data block and batch: ~1.6 MB of 224-px float16 output
BLOCKS_PER_TASK = 4  # Ray Data blocks per task slot: few, long tasks with a short tail
Workers = Union[int, Literal["auto"]]


def map_rows(rows: pd.DataFrame, fn: Callable[..., dict[str, np.ndarray]], workers: Workers,
             label: str, **fn_kwargs: Any) -> dict[str, np.ndarray]:
    """Apply a batch function to every row and return its columns in the order of `rows`.

    `workers` 0 runs a plain loop in this process; "auto" or k > 0 runs Ray Data tasks (k at
    most in flight), each reading its files by path. OpenCV is single-threaded on both paths.
    """
    if rows.empty:
        raise ValueError(f"map_rows({label}): no rows")
    start = time.perf_counter()
    if workers == 0:
        with opencv_threads(1):
            parts = _map_serial(rows, fn, label, fn_kwargs)
    else:
        parts = _map_ray(rows, fn, workers, label, fn_kwargs)
    columns = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    position = pd.Series(np.arange(len(columns["image_id"])), index=columns["image_id"])
    take = position.loc[rows["image_id"].to_numpy()].to_numpy()  # Ray Data does not keep row order
    elapsed = time.perf_counter() - start
    how = "in-process loop" if workers == 0 else f"Ray Data ({workers} tasks)"
    print(f"[prepare] {label}: {len(rows)} images in {elapsed:.1f} s ({len(rows) / elapsed:.1f} img/s, {how})")
    return {key: values[take] for key, values in columns.items()}


@contextlib.contextmanager
def opencv_threads(n: int) -> Iterator[None]:
    """Run the block with OpenCV limited to `n` threads (process-global), then restore it."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


class _Progress:
    """A line on stderr at every tenth of the work (Ray Data's bar only shows on a terminal)."""

    def __init__(self, label: str, total: int, show: bool = True):
        self.label, self.total, self.show, self.done, self.shown = label, total, show, 0, 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.show and self.done - self.shown >= max(1, self.total // 10) and self.done < self.total:
            print(f"[prepare] {self.label}: {self.done}/{self.total}", file=sys.stderr)
            self.shown = self.done


def _map_serial(rows: pd.DataFrame, fn: Callable, label: str, fn_kwargs: dict) -> list[dict]:
    parts, progress = [], _Progress(label, len(rows))
    for start in range(0, len(rows), BATCH_SIZE):
        parts.append(fn(rows.iloc[start:start + BATCH_SIZE], **fn_kwargs))
        progress.advance(len(parts[-1]["image_id"]))
    return parts


def _map_ray(rows: pd.DataFrame, fn: Callable, workers: Workers, label: str, fn_kwargs: dict) -> list[dict]:
    import ray.data

    context = ray.data.DataContext.get_current()
    # a worker's DataError should reach the driver as itself, not wrapped in UserCodeException
    context.raise_original_map_exception = True
    parallel = int(ray.cluster_resources().get("CPU", 1)) if workers == "auto" else int(workers)
    step = _block_rows(len(rows), parallel)
    blocks = [rows.iloc[i:i + step] for i in range(0, len(rows), step)]
    compute = None if workers == "auto" else ray.data.TaskPoolStrategy(size=parallel)
    parts, progress = [], _Progress(label, len(rows), show=not context.enable_progress_bars)
    try:
        with without_budget_backpressure(context):  # a Dataset copies the context it is made in
            dataset = ray.data.from_pandas(blocks).map_batches(
                _single_threaded, batch_size=min(step, BATCH_SIZE), batch_format="pandas",
                compute=compute, fn_args=(fn,), fn_kwargs=fn_kwargs)
            for part in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                parts.append(part)
                progress.advance(len(part["image_id"]))
        return parts
    except Exception as error:
        reraise_own(error)
        raise


def _block_rows(n_rows: int, parallel: int) -> int:
    """Rows per Ray Data block, hence per task: BLOCKS_PER_TASK blocks for each task slot.

    Every task start costs scheduling and argument transfer, so tasks are few and long; a task still works through its
    block BATCH_SIZE rows at a time and streams each batch's output to the driver. A few blocks
    per slot keep the tail short when one block runs slower than another.
    """
    return max(1, -(-n_rows // (BLOCKS_PER_TASK * parallel)))


def _single_threaded(batch: pd.DataFrame, fn: Callable, **kwargs: Any) -> dict[str, np.ndarray]:
    # a Ray task worker owns one CPU; OpenCV's own thread pool would oversubscribe it
    cv2.setNumThreads(1)
    return fn(batch, **kwargs)
