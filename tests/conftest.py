"""Shared fixtures: keep this file small, tests own their helpers."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_SIZE = 32
TINY_SPLITS = {"train": 96, "val": 32, "test": 32}


def make_tiny_cache(path, seed: int = 0) -> None:
    """A preprocessing cache of 32x32 z-scored noise; positives carry a bright disc (the "lesion"),
    so a ResNet-18 from scratch separates the classes within three short epochs."""
    from training.cache import write_cache

    rng = np.random.default_rng(seed)
    split = np.concatenate([[name] * n for name, n in TINY_SPLITS.items()])
    labels = np.arange(len(split)) % 2
    images = rng.normal(0, 1, (len(split), TINY_SIZE, TINY_SIZE)).astype(np.float32)
    masks = np.zeros(images.shape, np.uint8)
    rows, cols = np.mgrid[:TINY_SIZE, :TINY_SIZE]
    for i in np.flatnonzero(labels):
        centre = rng.integers(TINY_SIZE // 4, 3 * TINY_SIZE // 4, 2)
        disc = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= (TINY_SIZE / 6) ** 2
        images[i][disc] += 3.0
        masks[i][disc] = 1
    index = pd.DataFrame({"image_id": [f"img{i:03d}" for i in range(len(split))], "split": split,
                          "label": labels, "mask_fraction": masks.mean(axis=(1, 2))})
    write_cache(path, index, images, masks)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """The tiny cache, built once per session (the training-loop and DDP tests share it)."""
    path = tmp_path_factory.mktemp("cache") / "cache"
    make_tiny_cache(path)
    return path


@pytest.fixture(scope="session")
def stage2_labels() -> Path:
    """The real SIIM-ACR stage-2 label file (12,954 rows), skipped where it is not checked out."""
    path = SHARED_DATA / "siim-acr-stage2-train-rle.csv.gz"
    if not path.is_file():
        pytest.skip(f"real label file {path} absent (it lives in the shared data folder)")
    return path
