"""The baseline ladder's model-free maps (docs/STUDY.md §9), scored on the same images as every CAM.

- `prior`: the location prior, the mean of the training split's positive masks at the scored
  size (training split only: no validation or test mask enters it), min-max normalised. It is
  the same map for every image: it knows where lesions usually are and nothing about this image.
- `image_only`: the Sobel gradient magnitude of the preprocessed image, Gaussian-smoothed
  (sigma `baselines.image_only_sigma` of the image side), min-max normalised: edges, no learning.

Chance and the oracle (h = M) are analytic and need no map (`analysis.ladder`). The rows go to
`baselines/part-00000.parquet` with the columns of `cams/` (`model` and `cam_method` name the
baseline, `seed` is null), tuned on the validation positives like any map set
(`baselines/_tuning.json`); `baselines/_done.json` is written last, with the inputs it was made
from (`study.records.baselines_inputs`). Whether they are made again is the stage skeleton's
decision (`study.records.run_stage`), as for every output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa

from explain import tuning
from explain.rows import map_table
from explain.sink import MapSink, ParquetSink
from study import objectstore
from study.atomic import atomic_dir
from study.records import Output, baselines_inputs, run_stage
from study.store import StudyStore
from training.cache import read_index

NAMES = ("prior", "image_only")
BATCH = 64  # images scored at once (the metrics sort each map; memory grows with the batch)


def location_prior(index: pd.DataFrame, masks: np.ndarray) -> np.ndarray:
    """Mean of the training positives' masks (S, S), min-max normalised; all-zero without any."""
    train = index[(index["split"] == "train") & (index["label"] == 1)]["row"].to_numpy()
    if len(train) == 0:
        return np.zeros(masks.shape[1:], np.float32)
    mean = np.zeros(masks.shape[1:], np.float64)
    for start in range(0, len(train), 256):  # bounded memory at paper scale
        mean += np.asarray(masks[np.sort(train[start:start + 256])], np.float64).sum(axis=0)
    return _min_max(mean / len(train))


def image_only(images: np.ndarray, sigma: float) -> np.ndarray:
    """Sobel gradient magnitude of each image (B, S, S), smoothed by a Gaussian of `sigma` (a
    fraction of the image side), each map min-max normalised."""
    maps = []
    for image in np.asarray(images, np.float32):
        dx = cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT)
        dy = cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT)
        smooth = cv2.GaussianBlur(np.sqrt(dx * dx + dy * dy), (0, 0), sigmaX=sigma * image.shape[-1],
                                  borderType=cv2.BORDER_REFLECT)
        maps.append(_min_max(smooth))
    return np.stack(maps) if maps else np.zeros((0, *np.shape(images)[1:]), np.float32)


def model_free_maps(images: np.ndarray, prior: np.ndarray, image_only_sigma: float) -> dict[str, np.ndarray]:
    """name -> maps (B, S, S) of these images, for each of NAMES: the location prior (the same map
    for every image) and the image-only map. `baselines/` and the faithfulness controls
    (`explain.road`) both take their maps from here."""
    return {"prior": np.repeat(np.asarray(prior)[None], len(images), axis=0),
            "image_only": image_only(np.asarray(images), image_only_sigma)}


def _min_max(x: np.ndarray) -> np.ndarray:
    low, high = float(x.min()), float(x.max())
    return ((x - low) / (high - low) if high > low else np.zeros_like(x)).astype(np.float32)


def explain_baselines(config, store: StudyStore, force: bool = False) -> Optional[Path]:
    """Score both baselines into baselines/ unless they are up to date (None when turned off)."""
    if not config.baselines.enabled:
        objectstore.remove([store.baselines_dir])  # no stale ladder beside new results
        return None
    # written into a temporary folder renamed into place: nothing stale to remove first
    output = Output("baselines", store.baselines_dir / StudyStore.CAM_DONE, baselines_inputs(config))
    run_stage("explain", [output], lambda todo: _write(config, store, output), force=force,
              doing="scoring the location prior and the image-only map")
    return store.baselines_dir


def _write(config, store: StudyStore, output: Output) -> Path:
    index = read_index(store.cache_dir)
    images = np.load(store.cache_dir / StudyStore.CACHE_IMAGES, mmap_mode="r")
    masks = np.load(store.cache_dir / StudyStore.CACHE_MASKS, mmap_mode="r")
    rows = _rows(index)
    prior = location_prior(index, masks)
    sink = MapSink(store.root, "baselines", ["model"], config.metrics)
    try:
        for start in range(0, len(rows), BATCH):  # scored and spilled a batch at a time: no set held whole
            for table in _score(config, rows.iloc[start:start + BATCH], images, masks, prior):
                sink.add(table)
        records = sink.finish()
        with atomic_dir(store.baselines_dir) as tmp:
            maps = ParquetSink(tmp / StudyStore.CAM_PART)
            try:
                for table in sink.scored():
                    maps.write(table)
            finally:
                maps.close()
            tuning.write_records(tmp / StudyStore.CAM_TUNING, records, config.metrics)
            train = int(((index["split"] == "train") & (index["label"] == 1)).sum())
            output.done(at=tmp / StudyStore.CAM_DONE, rows=maps.rows, prior_from_train_positives=train)
    finally:
        sink.discard()
    print(f"[explain] baselines: {maps.rows} maps written -> {store.baselines_dir}"
          f" (prior from {train} training masks)")
    return store.baselines_dir


def _rows(index: pd.DataFrame) -> pd.DataFrame:
    """Every positive test image (scored) and validation image (tunes), with no prediction."""
    rows = index[index["label"] == 1]
    rows = rows[rows["split"].isin(["test", "val"])].sort_values(["split", "row"], ascending=[True, True])
    return rows.assign(probability=np.nan, correct=pd.array([None] * len(rows), dtype="boolean"),
                       randomized=False).reset_index(drop=True)


def _score(config, rows: pd.DataFrame, images: np.ndarray, masks: np.ndarray, prior: np.ndarray) -> list[pa.Table]:
    take = rows["row"].to_numpy()
    mask = np.asarray(masks[take]).astype(bool)
    size = mask.shape[-1]
    maps = model_free_maps(images[take], prior, config.baselines.image_only_sigma)
    return [map_table(rows, mask, maps[name], config.metrics, model=name, seed=None, method=name, layer="",
                      depth=float("nan"), map_size=size, final_layer=True, matched_layer=False)
            for name in NAMES]
