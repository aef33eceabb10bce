"""How alike two heatmaps are (STUDY.md §10): the measures of the randomisation and stability tests.

Each function takes two stacks of maps (B, H, W), compares map i of one with map i of the other,
and returns one float64 per pair:

- `spearman`: Spearman's rank correlation of the pixels (ties get their average rank, as
  `scipy.stats.spearmanr`); NaN when either map is constant (no ranking to correlate).
- `ssim`: the structural similarity index of scikit-image (`structural_similarity` with
  `data_range=1`, its default 7x7 uniform window), as Arun et al. 2021 used it for saliency maps.
- `top_iou`: IoU of the two maps' top-10% pixel sets, each set being the pixels at or above the
  map's ⌈0.1 N⌉-th largest value (ties at that value included, so a flat map's set is every pixel).

Maps are compared as stored (float16 cast to float64).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import rankdata

MEASURES = {"spearman": "spearman_to_trained", "ssim": "ssim_to_trained", "top10_iou": "top10_iou_to_trained"}
TOP_SHARE = 0.1


def _pairs(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = (np.asarray(x.detach().cpu().float() if hasattr(x, "detach") else x, np.float64) for x in (a, b))
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"similarity: two stacks of maps of one shape (B, H, W) are needed; got {a.shape} and {b.shape}")
    return a, b


def spearman(a: Any, b: Any) -> np.ndarray:
    a, b = _pairs(a, b)
    ra, rb = (rankdata(x.reshape(len(x), -1), axis=1) for x in (a, b))
    ra, rb = ra - ra.mean(axis=1, keepdims=True), rb - rb.mean(axis=1, keepdims=True)
    scale = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    return np.divide((ra * rb).sum(axis=1), scale, out=np.full(len(a), np.nan), where=scale > 0)


def ssim(a: Any, b: Any) -> np.ndarray:
    from skimage.metrics import structural_similarity

    a, b = _pairs(a, b)
    return np.array([structural_similarity(x, y, data_range=1.0) for x, y in zip(a, b)], np.float64)


def top_set(maps: np.ndarray, share: float = TOP_SHARE) -> np.ndarray:
    """(B, N) bool: each map's pixels at or above its ⌈share N⌉-th largest value."""
    flat = maps.reshape(len(maps), -1)
    k = max(1, math.ceil(share * flat.shape[1]))
    kth = np.partition(flat, flat.shape[1] - k, axis=1)[:, flat.shape[1] - k]
    return flat >= kth[:, None]


def top_iou(a: Any, b: Any, share: float = TOP_SHARE) -> np.ndarray:
    a, b = _pairs(a, b)
    sa, sb = top_set(a, share), top_set(b, share)
    return (sa & sb).sum(axis=1) / (sa | sb).sum(axis=1)


def similarity(a: Any, b: Any) -> dict[str, np.ndarray]:
    """Every measure, keyed by its column name (`MEASURES`)."""
    return {MEASURES["spearman"]: spearman(a, b), MEASURES["ssim"]: ssim(a, b),
            MEASURES["top10_iou"]: top_iou(a, b)}
