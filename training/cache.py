"""The preprocessing cache: network-size images and masks, built once, read from memory.

    <cache>/images.npy   float16 (N, S, S)  decoded -> CLAHE -> resized -> per-image z-scored
    <cache>/masks.npy    uint8   (N, S, S)  union mask, nearest-neighbour resized, 0/1
    <cache>/index.parquet  row, image_id, split, label, mask_fraction, rle_rows, n_regions, elongation
                           (row = index into the arrays; the lesion covariates of `training.lesions`)

One grey channel is stored; it is replicated to 3 channels on the device at batch time, which
keeps the cache 3x smaller (paper scale: 5,338 images x 224^2 x 2 bytes = 0.54 GB).
`mask_fraction` and the lesion covariates are measured at native resolution (from the manifest),
not on the resized mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from study.atomic import atomic_dir
from study.errors import DataError
from study.store import StudyStore

INDEX_COLUMNS = StudyStore.CACHE_INDEX_COLUMNS


@dataclass(frozen=True)
class CachedSplit:
    """One split of the cache, in memory."""

    image_ids: list[str]
    images: torch.Tensor  # float16 (N, 1, S, S)
    masks: torch.Tensor  # uint8 (N, S, S)
    labels: torch.Tensor  # int64 (N,)
    mask_fraction: np.ndarray  # float64 (N,)

    def __len__(self) -> int:
        return len(self.image_ids)


def write_cache(cache_dir: str | Path, index: pd.DataFrame, images: np.ndarray, masks: np.ndarray) -> None:
    """Write the cache atomically. `index` rows are in array order (columns INDEX_COLUMNS minus row)."""
    if len(index) != len(images) or images.shape[:1] != masks.shape[:1]:
        raise ValueError(f"cache arrays disagree: {len(index)} index rows, {len(images)} images, {len(masks)} masks")
    with atomic_dir(cache_dir) as tmp:
        np.save(tmp / StudyStore.CACHE_IMAGES, images.astype(np.float16, copy=False))
        np.save(tmp / StudyStore.CACHE_MASKS, masks.astype(np.uint8, copy=False))
        table = index.reset_index(drop=True).assign(row=np.arange(len(index)))
        table[list(INDEX_COLUMNS)].to_parquet(tmp / StudyStore.CACHE_INDEX, index=False)


def read_index(cache_dir: str | Path) -> pd.DataFrame:
    path = Path(cache_dir) / StudyStore.CACHE_INDEX
    if not path.is_file():
        raise DataError(f"{path}: no preprocessing cache; run `camstudy prepare CONFIG` first")
    return pd.read_parquet(path)


def load_split(cache_dir: str | Path, split: str) -> CachedSplit:
    """Load one split ('train', 'val' or 'test') into memory."""
    index = read_index(cache_dir)
    rows = index[index["split"] == split]
    if rows.empty:
        raise DataError(f"{cache_dir}: the cache has no {split!r} images (splits present: "
                        f"{sorted(index['split'].unique())}); rerun `camstudy prepare`")
    images = np.load(Path(cache_dir) / StudyStore.CACHE_IMAGES, mmap_mode="r")
    masks = np.load(Path(cache_dir) / StudyStore.CACHE_MASKS, mmap_mode="r")
    take = rows["row"].to_numpy()
    return CachedSplit(
        image_ids=rows["image_id"].tolist(),
        images=torch.from_numpy(np.ascontiguousarray(images[take]))[:, None],
        masks=torch.from_numpy(np.ascontiguousarray(masks[take])),
        labels=torch.from_numpy(rows["label"].to_numpy().astype(np.int64)),
        mask_fraction=rows["mask_fraction"].to_numpy(dtype=np.float64),
    )
