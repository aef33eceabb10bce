"""One map set's rows, as every map dataset stores them (`cams/`, `sanity/`, `baselines/`).

`map_table` turns a batch of heatmaps into rows: the map as stored (float16) and every metric
computed from exactly that stored map, so re-scoring the Parquet reproduces each number. The
columns, their order and their meaning are `study.maps` (the analysis reads them from there):
`map_table` gives `study.maps.ROW_COLUMNS`, and `explain.tuning.apply` turns them into
`study.maps.COLUMNS` (the split and the IoU curve dropped, the tuned columns added before the heatmap).
The faithfulness and robustness columns (docs/STUDY.md §11) are unscored (NaN, null) unless given
(`score_columns`); the ROAD stage fills its columns later (`with_scores`).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from explain.metrics import COLUMNS as METRICS
from explain.metrics import IOU_CURVE, score_batch
from explain.similarity import MEASURES, similarity
from study import maps


class Copy(NamedTuple):
    """Which copy of a model made a map (docs/STUDY.md §10)."""

    randomization: str = "none"  # "none" (trained), "full", "cascade" or "labels"
    stages_randomized: int = 0  # cascade units re-initialised (full: all of them)
    randomized_from: str = ""  # the deepest stage layer re-initialised ("head" for the first step)

    @property
    def randomized(self) -> bool:  # every map but a trained model's is a sanity map
        return self.randomization != "none"


TRAINED = Copy()

# taken from the work rows as they are
IMAGE_COLUMNS = ("image_id", "label", "probability", "correct", *maps.LESION, maps.SPLIT)
COLUMNS = maps.ROW_COLUMNS


def stored_map(heat: Any):
    """The map as every dataset stores it: float16 (max 1 rounds to exactly 1.0)."""
    import torch

    return torch.as_tensor(heat).to(torch.float16)


def map_table(rows: pd.DataFrame, masks: Any, heat: Any, metrics_config: Any, *, model: str,
              seed: Optional[int], method: str, layer: str, depth: float, map_size: int,
              final_layer: bool, matched_layer: bool, copy: Copy = TRAINED, reference: Any = None,
              given: Optional[Mapping[str, np.ndarray]] = None) -> pa.Table:
    """Rows for heatmaps `heat` (B, S, S) of the images in `rows` (one per row, with `masks`).

    The map is cast to float16 first and scored as stored. `reference`: the trained model's
    maps of the same images (stored), for the similarity columns of a randomised copy's rows
    (computed for test rows only: validation rows only tune thresholds). `given`: faithfulness or
    robustness columns computed elsewhere (`score_columns`), one value per row, NaN where unscored."""
    stored = stored_map(heat)
    scores = score_batch(stored, masks, metrics_config)
    flat = stored.flatten(1)
    n = len(rows)
    columns = {**{name: pa.array(rows[name], from_pandas=True) for name in IMAGE_COLUMNS[:-1]},
               "model": [model] * n, "seed": pa.array([seed] * n, pa.int64()), "randomized": np.full(n, copy.randomized),
               "randomization": [copy.randomization] * n, "stages_randomized": np.full(n, copy.stages_randomized),
               "randomized_from": [copy.randomized_from] * n,
               "cam_method": [method] * n, "cam_layer": [layer] * n, "layer_depth": np.full(n, depth, float),
               "map_size": np.full(n, map_size, np.int64), "final_layer": np.full(n, final_layer),
               "matched_layer": np.full(n, matched_layer), "split": rows["split"].to_numpy(),
               **{name: np.asarray(scores[name]) for name in METRICS},
               "cam_constant": (flat.amax(1) == flat.amin(1)).cpu().numpy(),
               **_similarities(rows, stored, reference), **score_columns(n, given)}
    table = pa.table({name: columns[name] for name in COLUMNS[:-2]})
    curves = np.ascontiguousarray(scores[IOU_CURVE], dtype=np.float64)
    table = table.append_column(IOU_CURVE, pa.FixedSizeListArray.from_arrays(pa.array(curves.ravel()),
                                                                             curves.shape[1]))
    maps = np.ascontiguousarray(stored.cpu().numpy(), dtype=np.float16)
    return table.append_column("heatmap", pa.FixedShapeTensorArray.from_numpy_ndarray(maps))


def _similarities(rows: pd.DataFrame, stored: Any, reference: Any) -> dict[str, np.ndarray]:
    values = {name: np.full(len(rows), np.nan) for name in MEASURES.values()}
    test = (rows["split"] == "test").to_numpy()
    if reference is not None and test.any():
        for name, found in similarity(stored[test], stored_map(reference)[test]).items():
            values[name][test] = found
    return values


def score_columns(n: int, scores: Optional[Mapping[str, np.ndarray]] = None) -> dict[str, pa.Array]:
    """The faithfulness and robustness columns of `n` rows (`study.maps.FAITHFULNESS`, `ROBUSTNESS`),
    from NaN-coded arrays: a float per row, NaN where unscored (stored as NaN; `sensitivity_kept` as
    a null int64), and for the per-step lists (n, S), a row of NaN where unscored (a null list).
    Columns not in `scores` are unscored."""
    scores = scores or {}
    columns = {}
    for name in (*maps.FAITHFULNESS, *maps.ROBUSTNESS):
        given = scores.get(name)
        if name in maps.STEP_LISTS:
            columns[name] = _step_lists(n, given)
            continue
        values = np.full(n, np.nan) if given is None else np.asarray(given, np.float64).reshape(n)
        if name == maps.KEPT:
            missing = np.isnan(values)
            columns[name] = pa.array(np.where(missing, 0, values).astype(np.int64), pa.int64(), mask=missing)
        else:
            columns[name] = pa.array(values, pa.float64())
    return columns


def _step_lists(n: int, given: Optional[np.ndarray]) -> pa.Array:
    kind = pa.list_(pa.float64())
    if given is None:
        return pa.nulls(n, kind)
    values = np.asarray(given, np.float64).reshape(n, -1)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * values.shape[1], pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values.ravel(), pa.float64()),
                                    mask=pa.array(np.isnan(values).all(axis=1)))


def with_scores(table: pa.Table, scores: Mapping[str, np.ndarray]) -> pa.Table:
    """`table` with the columns named in `scores` (NaN-coded arrays, one value per row, as
    `score_columns` takes them) replaced."""
    for name, column in score_columns(len(table), scores).items():
        if name in scores:
            table = table.set_column(table.schema.get_field_index(name), name, column)
    return table
