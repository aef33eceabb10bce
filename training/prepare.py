"""The prepare stage's parts: the preprocessing and pixel-hash batch functions, the manifest, the cache index.

The selection and split live in `training.split`, the row mapper (Ray Data or in-process) in
`training.row_mapper`, the data report in `training.data_report`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from study.atomic import write_atomic
from study.config import PreprocessConfig, SplitConfig
from study.errors import DataError
from study.selection import Selection, plan_selection
from study.store import StudyStore
from training import lesions, rle
from training.data import read_image
from training.preprocess import preprocess_image, resize_mask
from training.row_mapper import Workers, map_rows
from training.split import apply_selection, available

MANIFEST_COLUMNS = ["image_id", "split", "label", "mask_rle", "rle_rows", "mask_fraction", "n_regions",
                    "elongation", "path", "height", "width", "content_hash"]
MEASURED = ("mask_fraction", *lesions.COLUMNS, "content_hash", "height", "width")  # per image, by process_batch


def process_batch(batch: pd.DataFrame, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """Decode, preprocess and hash a batch of manifest rows (image_id, path, mask_rle, height, width).

    The function every worker runs; plain NumPy, no Ray. Masks are the union of the image's RLE
    rows, decoded at native size; `mask_fraction` and the lesion covariates are measured there,
    before resizing.
    """
    out: dict[str, list] = {key: [] for key in ("image_id", "image", "mask", *MEASURED)}
    for row in batch.itertuples(index=False):
        pixels = read_image(row.path)
        height, width = _native_size(row, pixels.shape)
        mask = union_mask(row.mask_rle, height, width, where=f"{row.path} (image {row.image_id})")
        out["image_id"].append(row.image_id)
        out["image"].append(preprocess_image(pixels, cfg))
        out["mask"].append(resize_mask(mask, cfg.image_size))
        out["mask_fraction"].append(float(mask.mean()))
        for key, value in zip(lesions.COLUMNS, lesions.lesion_covariates(mask)):
            out[key].append(value)
        out["content_hash"].append(file_sha256(row.path))
        out["height"].append(height)
        out["width"].append(width)
    return {key: np.stack(values) if key in ("image", "mask") else np.asarray(values)
            for key, values in out.items()}


def pixel_hash_batch(batch: pd.DataFrame) -> dict[str, np.ndarray]:
    """sha256 of the decoded pixels (dtype, shape and values), for `data.dedupe_pixels`."""
    hashes = []
    for path in batch["path"]:
        pixels = np.ascontiguousarray(read_image(path))
        digest = hashlib.sha256(f"{pixels.dtype}{pixels.shape}".encode())
        digest.update(pixels.tobytes())
        hashes.append(digest.hexdigest())
    return {"image_id": batch["image_id"].to_numpy(), "pixel_hash": np.asarray(hashes)}


def union_mask(mask_rle: Any, height: int, width: int, where: str = "") -> np.ndarray:
    """The logical OR of an image's RLE rows (one string or a sequence of strings) at (height, width)."""
    strings = [mask_rle] if isinstance(mask_rle, str) else list(mask_rle)
    mask = np.zeros((height, width), dtype=bool)
    for text in strings:
        try:
            mask |= rle.decode(text, height, width)
        except ValueError as error:
            raise DataError(f"{where}: bad mask RLE: {error}") from None
    return mask


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _native_size(row: Any, shape: tuple[int, int]) -> tuple[int, int]:
    height = shape[0] if pd.isna(row.height) else int(row.height)
    width = shape[1] if pd.isna(row.width) else int(row.width)
    if (height, width) != tuple(shape):
        raise DataError(f"{row.path} (image {row.image_id}): the pixels are {shape[0]}x{shape[1]} but the "
                        f"listing says {height}x{width}; re-export the file or fix the listing")
    return height, width


@dataclass(frozen=True)
class Prepared:
    """The manifest (MANIFEST_COLUMNS, cache order) and the cache arrays, row for row."""

    manifest: pd.DataFrame
    images: np.ndarray  # float16 (N, S, S)
    masks: np.ndarray  # uint8 (N, S, S)
    selection: Selection
    duplicates: pd.DataFrame  # image_id, duplicate_of: images dropped by data.dedupe_pixels


def prepare_data(images: pd.DataFrame, split_cfg: SplitConfig, preprocess_cfg: PreprocessConfig,
                 workers: Workers, dedupe_pixels: bool = False) -> Prepared:
    """Select and split the labelled images, then decode, hash and preprocess the selection."""
    if images.empty:
        raise DataError("no labelled images were found; check data.root and data.labels")
    duplicates = pixel_duplicates(images, workers) if dedupe_pixels else _no_duplicates()
    images = images[~images["image_id"].isin(duplicates["image_id"])]
    selection = plan_selection(*available(images), split_cfg)
    chosen = apply_selection(images, selection, split_cfg.seed)
    print(f"[prepare] selected {len(chosen)} of {len(images)} labelled images: {selection.rule}")
    for note in selection.notes:
        print(f"[prepare] note: {note}")
    columns = map_rows(chosen, process_batch, workers, "preprocess", cfg=preprocess_cfg)
    manifest = chosen.assign(**{key: columns[key] for key in MEASURED})
    manifest = manifest.assign(path=manifest["path"].astype(str))[MANIFEST_COLUMNS]
    return Prepared(manifest.reset_index(drop=True), columns["image"], columns["mask"], selection, duplicates)


def pixel_duplicates(images: pd.DataFrame, workers: Workers) -> pd.DataFrame:
    """Images whose decoded pixels equal an earlier image's (by image_id); the first is kept."""
    ordered = images.sort_values("image_id", kind="stable")
    hashes = pd.DataFrame(map_rows(ordered, pixel_hash_batch, workers, "pixel hashes"))
    first = hashes.groupby("pixel_hash", sort=False)["image_id"].transform("first")
    dropped = hashes[hashes["image_id"] != first]
    return pd.DataFrame({"image_id": dropped["image_id"].to_numpy(), "duplicate_of": first[dropped.index].to_numpy()})


def write_manifest(manifest: pd.DataFrame, path: str | Any) -> None:
    write_atomic(path, lambda tmp: manifest.to_parquet(tmp, index=False))


def cache_index(manifest: pd.DataFrame) -> pd.DataFrame:
    """The cache's index columns (StudyStore.CACHE_INDEX_COLUMNS minus row), in manifest order."""
    return manifest[[c for c in StudyStore.CACHE_INDEX_COLUMNS if c != "row"]]


def _no_duplicates() -> pd.DataFrame:
    return pd.DataFrame({"image_id": pd.Series(dtype=object), "duplicate_of": pd.Series(dtype=object)})
