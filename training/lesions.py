"""Lesion covariates of a mask (docs/STUDY.md §9): how many regions, how elongated.

Measured on the union mask at native resolution in the prepare stage (a thin crescent that
nearest-neighbour resizing breaks apart would otherwise count as several regions), stored in the
manifest and the cache index, and carried onto every scored map row.

- `n_regions`: 8-connected components of the mask.
- `elongation`: per region, sqrt(λ_max / λ_min) of the covariance of its pixel coordinates, each
  pixel taken as a unit square (1/12 added to both variances), so a k × 1 line has elongation k
  and an a × b rectangle a / b; the image's value is the area-weighted mean over its regions
  (NaN for an empty mask).
"""

from __future__ import annotations

import cv2
import numpy as np

COLUMNS = ("n_regions", "elongation")
PIXEL_VARIANCE = 1.0 / 12.0  # the variance of a coordinate spread uniformly over one pixel


def lesion_covariates(mask: np.ndarray) -> tuple[int, float]:
    """(n_regions, elongation) of a 2-D boolean mask."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    count, labels = cv2.connectedComponents(mask, connectivity=8)
    regions = count - 1  # label 0 is the background
    if regions == 0:
        return 0, float("nan")
    rows, cols = np.nonzero(mask)
    label = labels[rows, cols] - 1
    area = np.bincount(label, minlength=regions).astype(np.float64)
    moments = [np.bincount(label, weights=w, minlength=regions) for w in (rows, cols, rows * rows, cols * cols,
                                                                             rows * cols)]
    mean_r, mean_c = moments[0] / area, moments[1] / area
    var_r = moments[2] / area - mean_r ** 2 + PIXEL_VARIANCE
    var_c = moments[3] / area - mean_c ** 2 + PIXEL_VARIANCE
    cov = moments[4] / area - mean_r * mean_c
    half_gap = np.sqrt(((var_r - var_c) / 2) ** 2 + cov ** 2)
    major, minor = (var_r + var_c) / 2 + half_gap, (var_r + var_c) / 2 - half_gap
    ratio = np.sqrt(major / np.maximum(minor, PIXEL_VARIANCE))  # minor >= 1/12 up to rounding
    return int(regions), float(np.sum(ratio * area) / area.sum())
