"""IoU and hit at a threshold tuned on validation positives (docs/STUDY.md §9, CheXlocalize's protocol).

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
from study import maps
from study.atomic import write_text_atomic

COLUMNS = maps.TUNED  # added to the test rows before the heatmap (study.maps)
SPLIT = maps.SPLIT  # which split a row's image is from: "val" rows tune, "test" rows are kept


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
    tuner = Tuner(keys, metrics_config, fallback)
    tuner.add(table)
    records = tuner.finish()
    return tuner.score(table.filter(pc.equal(table.column(SPLIT), "test"))), records


class Tuner:
    """`apply` in a form that streams: `add` every row of a run as it arrives (only the
    validation rows' keys, ids and IoU curves are kept, a few hundred bytes each; test rows
    contribute their set's key), `finish` once all are in, then `score` the test rows batch by
    batch. The explain stage spills test rows to disk meanwhile, so no run's heatmaps are ever
    held at once."""

    def __init__(self, keys: Sequence[str], metrics_config: Any, fallback: Optional[Callable[[tuple], tuple]] = None):
        self.keys, self.fallback = list(keys), fallback
        self.grid, self.hit_iou = tuning_thresholds(metrics_config.tuning_steps), metrics_config.hit_iou
        self.sets: dict[tuple, None] = {}  # every set's key, in order of first appearance
        self.curves: dict[tuple, list[np.ndarray]] = {}  # validation IoU curves per set
        self.val_ids: dict[tuple, list[str]] = {}
        self.chosen: Optional[dict[tuple, tuple[Optional[int], np.ndarray]]] = None

    def add(self, table: pa.Table) -> None:
        if self.chosen is not None:
            raise RuntimeError("Tuner.add after finish: the thresholds are already chosen")
        split = table.column(SPLIT).to_numpy(zero_copy_only=False)
        validation = np.flatnonzero(split == "val")
        curves = _curves(table.take(validation)) if len(validation) else None
        ids = table.column("image_id").take(validation).to_pylist() if len(validation) else []
        position = {row: i for i, row in enumerate(validation)}
        for key, rows in self._groups(table):
            self.sets.setdefault(key, None)
            val = [row for row in rows if split[row] == "val"]
            if val:
                self.curves.setdefault(key, []).extend(curves[[position[row] for row in val]])
                self.val_ids.setdefault(key, []).extend(ids[position[row]] for row in val)

    def finish(self) -> list[dict]:
        """Choose every set's threshold; one record per set (for _tuning.json)."""
        self.chosen = {key: choose(np.stack(curves)) for key, curves in self.curves.items()}
        records = []
        for key in self.sets:
            source = self._source(key)
            index, mean = self.chosen.get(source, (None, np.full(len(self.grid), np.nan)))
            records.append({**{k: _plain(v) for k, v in zip(self.keys, key)},
                            "threshold": float(self.grid[index]) if index is not None else None,
                            "tuned_on": "its own maps" if source == key else
                            "the maps of " + ", ".join(f"{k}={_plain(v)}" for k, v in zip(self.keys, source)),
                            "val_images": len(self.val_ids.get(source, [])),
                            "image_ids": list(self.val_ids.get(source, [])),
                            "mean_iou_by_threshold": dict(zip(map(float, self.grid), map(_plain, mean)))})
        return records

    def score(self, test: pa.Table) -> pa.Table:
        """Test rows with COLUMNS added (the split and the IoU curve dropped, the map kept last)."""
        if self.chosen is None:
            raise RuntimeError("Tuner.score before finish: the thresholds are not chosen yet")
        curves = _curves(test) if len(test) else np.zeros((0, len(self.grid)))
        threshold, iou = np.full(len(test), np.nan), np.full(len(test), np.nan)
        for key, rows in self._groups(test):
            index, _ = self.chosen.get(self._source(key), (None, None))
            if index is not None:
                threshold[rows], iou[rows] = self.grid[index], curves[rows, index]
        tuned = test.append_column(COLUMNS[0], pa.array(threshold)).append_column(COLUMNS[1], pa.array(iou))
        hit = np.where(np.isfinite(iou), iou >= self.hit_iou, np.nan)
        kept = tuned.append_column(COLUMNS[2], pa.array(hit)).drop_columns([SPLIT, IOU_CURVE])
        order = [name for name in kept.column_names if name != "heatmap"] + ["heatmap"]  # the map stays last
        return kept.select([name for name in order if name in kept.column_names])

    def _source(self, key: tuple) -> tuple:
        """The set whose validation maps choose `key`'s threshold: its own, else the fallback's."""
        return key if key in self.curves or self.fallback is None else self.fallback(key)

    def _groups(self, table: pa.Table) -> list[tuple[tuple, np.ndarray]]:
        if not len(table):
            return []
        groups = table.select(self.keys).to_pandas()
        return [((values if isinstance(values, tuple) else (values,)), rows)
                for values, rows in groups.groupby(self.keys, sort=False, dropna=False).indices.items()]


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
