"""IoU and hit at a threshold tuned on validation positives (STUDY.md §9, CheXlocalize's protocol).

For each map set (a run's method × layer × trained/randomised copy, or one baseline), the maps of
the validation positives choose the threshold t of the grid k/steps (k = 1..steps-1) that
maximises their mean IoU of {h >= t} with M (the lowest such t on a tie). Every test map is then
scored at that t: `iou_tuned`, and `hit_tuned` = (iou_tuned >= metrics.hit_iou). The test maps
never see the choice being made. Each row records `tuned_threshold`; `_tuning.json` beside the
Parquet records, per set, the threshold, the validation images it came from and the mean IoU at
every candidate.

Rows arrive as one pyarrow table with a `split` column ("val" or "test") and the (B, K)
`metrics.IOU_CURVE` of `score_batch`; `apply` returns the test rows without either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from explain.metrics import IOU_CURVE, tuning_thresholds
from training.atomic import write_text_atomic

COLUMNS = ("tuned_threshold", "iou_tuned", "hit_tuned")
SPLIT = "split"  # which split a row's image is from: "val" rows tune, "test" rows are kept


def choose(curves: np.ndarray) -> tuple[Optional[int], np.ndarray]:
    """(index of the chosen threshold, mean IoU per candidate) over the validation maps' IoU
    curves (N, K); the index is None when no validation map has a defined IoU."""
    defined = np.isfinite(curves).sum(axis=0)
    mean = np.where(defined > 0, np.nansum(curves, axis=0) / np.maximum(defined, 1), np.nan)
    if not np.isfinite(mean).any():
        return None, mean
    return int(np.nanargmax(mean)), mean  # the first maximum: the lowest threshold on a tie


def apply(table: pa.Table, keys: Sequence[str], metrics_config: Any,
          fallback: Optional[Callable[[tuple], tuple]] = None) -> tuple[pa.Table, list[dict]]:
    """The test rows of `table` with COLUMNS added, each set (rows equal on `keys`) scored at its
    own tuned threshold; a set without validation rows at the threshold of the set `fallback`
    names (none without one); and one record per set for _tuning.json."""
    grid, hit_iou = tuning_thresholds(metrics_config.tuning_steps), metrics_config.hit_iou
    curves = _curves(table)
    split = table.column(SPLIT).to_numpy(zero_copy_only=False)
    groups = table.select(list(keys)).to_pandas()
    sets = {(values if isinstance(values, tuple) else (values,)): rows
            for values, rows in groups.groupby(list(keys), sort=False, dropna=False).indices.items()}
    chosen = {key: choose(curves[rows[split[rows] == "val"]]) for key, rows in sets.items()}
    threshold, iou, records = np.full(len(table), np.nan), np.full(len(table), np.nan), []
    validation = {key: rows[split[rows] == "val"] for key, rows in sets.items()}
    for key, rows in sets.items():
        test = rows[split[rows] == "test"]
        source = key if len(validation[key]) or fallback is None else fallback(key)
        tuned_on = validation.get(source, np.array([], np.int64))
        index, mean = chosen.get(source, (None, np.full(len(grid), np.nan)))
        if index is not None:
            threshold[test], iou[test] = grid[index], curves[test, index]
        records.append({**{k: _plain(v) for k, v in zip(keys, key)},
                        "threshold": float(grid[index]) if index is not None else None,
                        "tuned_on": "its own maps" if source == key else
                        "the maps of " + ", ".join(f"{k}={_plain(v)}" for k, v in zip(keys, source)),
                        "val_images": len(tuned_on), "image_ids": table.column("image_id").take(tuned_on).to_pylist(),
                        "mean_iou_by_threshold": dict(zip(map(float, grid), map(_plain, mean)))})
    tuned = table.append_column(COLUMNS[0], pa.array(threshold)).append_column(COLUMNS[1], pa.array(iou))
    hit = np.where(np.isfinite(iou), iou >= hit_iou, np.nan)
    tuned = tuned.append_column(COLUMNS[2], pa.array(hit))
    kept = tuned.filter(pc.equal(tuned.column(SPLIT), "test")).drop_columns([SPLIT, IOU_CURVE])
    order = [name for name in kept.column_names if name != "heatmap"] + ["heatmap"]  # the map stays last
    return kept.select([name for name in order if name in kept.column_names]), records


def write_records(path: Path, records: list[dict], metrics_config: Any) -> None:
    """_tuning.json: the grid, the hit criterion and one record per map set."""
    document = {"grid": [float(t) for t in tuning_thresholds(metrics_config.tuning_steps)],
                "rule": "threshold maximising mean IoU of {h >= t} with the mask over the validation positives "
                        "(lowest on a tie); hit_tuned = iou_tuned >= hit_iou",
                "hit_iou": metrics_config.hit_iou, "sets": records}
    write_text_atomic(path, json.dumps(document, indent=1))


def _curves(table: pa.Table) -> np.ndarray:
    column = table.column(IOU_CURVE).combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), width)


def _plain(value: Any) -> Any:
    """JSON-able: numpy scalars as Python numbers, NaN as None."""
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
