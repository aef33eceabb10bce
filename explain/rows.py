"""One map set's rows, as every map dataset stores them (`cams/`, `sanity/`, `baselines/`).

`map_table` turns a batch of heatmaps into rows: the map as stored (float16) and every metric
computed from exactly that stored map, so re-scoring the Parquet reproduces each number. The
column order is `COLUMNS` (after `explain.tuning.apply`: the split and the IoU curve dropped,
`tuning.COLUMNS` added before the heatmap):

    image_id, model, seed, label, probability, correct       the image and the run's prediction
    mask_fraction, rle_rows, n_regions, elongation           the lesion (training.lesions)
    randomized, cam_method, cam_layer                        which map
    layer_depth, map_size, final_layer, matched_layer        where in the network (training.registry)
    split                                                    "test" (kept) or "val" (tunes, then dropped)
    diff_gradcam ... auroc_pixel, cam_all_zero                every metric of explain.metrics
    cam_constant                                             max = min: all-zero or flat
    iou_curve                                                IoU at each tuning threshold (dropped)
    heatmap                                                  float16 (S, S), FixedShapeTensorArray
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from explain.metrics import COLUMNS as METRICS, IOU_CURVE, score_batch

IMAGE_COLUMNS = ("image_id", "label", "probability", "correct", "mask_fraction", "rle_rows", "n_regions",
                 "elongation", "split")  # taken from the work rows as they are
COLUMNS = ("image_id", "model", "seed", "label", "probability", "correct", "mask_fraction", "rle_rows",
           "n_regions", "elongation", "randomized", "cam_method", "cam_layer", "layer_depth", "map_size",
           "final_layer", "matched_layer", "split", *METRICS, "cam_constant", IOU_CURVE, "heatmap")


def map_table(rows: pd.DataFrame, masks: Any, heat: Any, metrics_config: Any, *, model: str,
              seed: Optional[int], method: str, layer: str, depth: float, map_size: int,
              final_layer: bool, matched_layer: bool, randomized: Optional[bool] = None) -> pa.Table:
    """Rows for heatmaps `heat` (B, S, S) of the images in `rows` (one per row, with `masks`).

    The map is cast to float16 first and scored as stored (max 1 rounds to exactly 1.0).
    `randomized` defaults to the rows' own column."""
    import torch

    stored = torch.as_tensor(heat).to(torch.float16)
    scores = score_batch(stored, masks, metrics_config)
    flat = stored.flatten(1)
    n = len(rows)
    copy = rows["randomized"].to_numpy() if randomized is None else np.full(n, randomized)
    columns = {**{name: pa.array(rows[name], from_pandas=True) for name in IMAGE_COLUMNS[:-1]},
               "model": [model] * n, "seed": pa.array([seed] * n, pa.int64()), "randomized": copy,
               "cam_method": [method] * n, "cam_layer": [layer] * n, "layer_depth": np.full(n, depth, float),
               "map_size": np.full(n, map_size, np.int64), "final_layer": np.full(n, final_layer),
               "matched_layer": np.full(n, matched_layer), "split": rows["split"].to_numpy(),
               **{name: np.asarray(scores[name]) for name in METRICS},
               "cam_constant": (flat.amax(1) == flat.amin(1)).cpu().numpy()}
    table = pa.table({name: columns[name] for name in COLUMNS[:-2]})
    curves = np.ascontiguousarray(scores[IOU_CURVE], dtype=np.float64)
    table = table.append_column(IOU_CURVE, pa.FixedSizeListArray.from_arrays(pa.array(curves.ravel()),
                                                                             curves.shape[1]))
    maps = np.ascontiguousarray(stored.cpu().numpy(), dtype=np.float16)
    return table.append_column("heatmap", pa.FixedShapeTensorArray.from_numpy_ndarray(maps))
