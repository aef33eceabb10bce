"""How alike two heatmaps are (docs/STUDY.md §10): the measures of the randomisation and stability tests.

Each function takes two stacks of maps (B, H, W), compares map i of one with map i of the other,
and returns one float64 per pair:

- `spearman`: Spearman's rank correlation of the pixels (ties get their average rank, as
  `scipy.stats.spearmanr`); NaN when either map is constant (no ranking to correlate).
- `ssim`: the structural similarity index of scikit-image (`structural_similarity` with
  `data_range=1`, its default 7x7 uniform window), as Arun et al. 2021 used it for saliency maps.
- `top_iou`: IoU of the two maps' top-10% pixel sets, each set being the pixels at or above the
  map's ⌈0.1 N⌉-th largest value (ties at that value included, so a flat map's set is every pixel).

Maps are compared as stored (float16 cast to float64).

What each measure needs of one map alone (its centred ranks, its top set, its local means for
SSIM) is computed once per map by `Prepared`, and `compare` pairs two prepared stacks: the
stability analysis compares every map with the maps of every other run, so per-map work done
once per pair would be repeated (runs - 1) times. `similarity` is `compare` of two fresh
`Prepared`; every function equals its reference (scipy, scikit-image) exactly (tests).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import rankdata

from study.maps import SIMILARITY

MEASURES = SIMILARITY  # measure -> the map datasets' column holding it (study.maps)
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
    a, b = _pairs(a, b)
    return _ssim(Prepared(a, ("ssim",)), Prepared(b, ("ssim",)))


# scikit-image's structural_similarity defaults, as Arun et al. used them: a 7x7 uniform window,
# sample covariance, K1 = 0.01, K2 = 0.03, data range 1, the mean over the map less a 3-px border
SSIM_WINDOW, SSIM_K1, SSIM_K2, SSIM_RANGE = 7, 0.01, 0.03, 1.0
_WINDOW = (1, SSIM_WINDOW, SSIM_WINDOW)  # one map at a time: no filtering across the stack
_PAD = (SSIM_WINDOW - 1) // 2
_COV_NORM = SSIM_WINDOW ** 2 / (SSIM_WINDOW ** 2 - 1)
_C1, _C2 = (SSIM_K1 * SSIM_RANGE) ** 2, (SSIM_K2 * SSIM_RANGE) ** 2


class Prepared:
    """A stack of maps (B, H, W) with what each measure needs of one map alone; `take(index)`
    selects maps. `measures` limits the work to the measures that will be asked for."""

    def __init__(self, maps: Any, measures: tuple[str, ...] = tuple(MEASURES)):
        x = np.asarray(maps.detach().cpu().float() if hasattr(maps, "detach") else maps, np.float64)
        if x.ndim != 3:
            raise ValueError(f"similarity: a stack of maps (B, H, W) is needed; got shape {x.shape}")
        self.shape, self.parts = x.shape, {}
        if "spearman" in measures:
            ranks = rankdata(x.reshape(len(x), -1), axis=1)
            ranks = ranks - ranks.mean(axis=1, keepdims=True)
            self.parts["ranks"], self.parts["rank_ss"] = ranks, (ranks * ranks).sum(axis=1)
        if "top10_iou" in measures:
            self.parts["top"] = top_set(x)
        if "ssim" in measures:
            from scipy.ndimage import uniform_filter

            if min(x.shape[1:]) < SSIM_WINDOW:
                raise ValueError(f"ssim: maps of at least {SSIM_WINDOW}x{SSIM_WINDOW} px are needed; got {x.shape[1:]}")
            ux = uniform_filter(x, size=_WINDOW)
            uxx = uniform_filter(x * x, size=_WINDOW)
            # scikit-image's per-map terms, computed as it computes them (so every pair equals it to the bit)
            self.parts.update(x=x, ux=ux, two_ux=2 * ux, ux2=ux ** 2, vx=_COV_NORM * (uxx - ux * ux))

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, index: Any) -> "Prepared":
        taken = object.__new__(Prepared)
        taken.parts = {name: value[index] for name, value in self.parts.items()}
        taken.shape = (len(next(iter(taken.parts.values()))), *self.shape[1:]) if taken.parts else self.shape
        return taken


def _ssim(a: Prepared, b: Prepared) -> np.ndarray:
    """scikit-image's structural_similarity for each pair of maps, term for term and in its order
    of operations; the pointwise terms only where the mean is taken (inside the border)."""
    from scipy.ndimage import uniform_filter

    inner = (slice(None), slice(_PAD, -_PAD), slice(_PAD, -_PAD))
    ux, uy = a.parts["ux"][inner], b.parts["ux"][inner]
    uxy = uniform_filter(a.parts["x"] * b.parts["x"], size=_WINDOW)[inner]
    ux_uy = ux * uy
    vxy = _COV_NORM * (uxy - ux_uy)
    a1 = a.parts["two_ux"][inner] * uy + _C1
    a2 = 2 * vxy + _C2
    b1 = a.parts["ux2"][inner] + b.parts["ux2"][inner] + _C1
    b2 = a.parts["vx"][inner] + b.parts["vx"][inner] + _C2
    index = np.zeros(a.shape)  # laid out as scikit-image's full map, so its cropped mean sums in the same order
    index[inner] = (a1 * a2) / (b1 * b2)
    return np.array([m[_PAD:-_PAD, _PAD:-_PAD].mean(dtype=np.float64) for m in index], np.float64)


def compare(a: Prepared, b: Prepared) -> dict[str, np.ndarray]:
    """Every measure for each pair (a[i], b[i]), keyed by its column name (`MEASURES`)."""
    if a.shape != b.shape:
        raise ValueError(f"similarity: two stacks of maps of one shape (B, H, W) are needed; got {a.shape} and {b.shape}")
    found = {}
    if "ranks" in a.parts:
        scale = np.sqrt(a.parts["rank_ss"] * b.parts["rank_ss"])
        found[MEASURES["spearman"]] = np.divide((a.parts["ranks"] * b.parts["ranks"]).sum(axis=1), scale,
                                                out=np.full(len(a), np.nan), where=scale > 0)
    if "ux" in a.parts:
        found[MEASURES["ssim"]] = _ssim(a, b)
    if "top" in a.parts:
        sa, sb = a.parts["top"], b.parts["top"]
        found[MEASURES["top10_iou"]] = (sa & sb).sum(axis=1) / (sa | sb).sum(axis=1)
    return found


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
    a, b = _pairs(a, b)
    return compare(Prepared(a), Prepared(b))
