"""One map set's rows, as every map dataset stores them (`cams/`, `sanity/`, `baselines/`).

`map_table` turns a batch of heatmaps into rows: the map as stored (float16) and every metric
computed from exactly that stored map, so re-scoring the Parquet reproduces each number. The
columns, their order and their meaning are `study.maps` (the analysis reads them from there):
`map_table` gives `study.maps.ROW_COLUMNS`, and `explain.tuning.apply` turns them into
`study.maps.COLUMNS` (the split and the IoU curve dropped, the tuned columns added before the heatmap).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

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
              final_layer: bool, matched_layer: bool, copy: Copy = TRAINED, reference: Any = None) -> pa.Table:
    """Rows for heatmaps `heat` (B, S, S) of the images in `rows` (one per row, with `masks`).

    The map is cast to float16 first and scored as stored. `reference`: the trained model's
    maps of the same images (stored), for the similarity columns of a randomised copy's rows
    (computed for test rows only: validation rows only tune thresholds)."""
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
               **_similarities(rows, stored, reference)}
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
