"""Faithfulness (ROAD, deletion/insertion) and robustness (max-sensitivity) of maps: docs/STUDY.md §11.

The computational core only: plain NumPy/SciPy/PyTorch, no Ray, no store. Maps are taken as
stored (§4: min-max normalised, at the preprocessed image size, float16), images in the
preprocessed scale (B, C, H, W); the study's grey images are passed with C = 1 and expanded to
the model's channels by `prepare` (`training.loop.prepare_input`), so an imputation or a
perturbation is a grey one, as the model always sees.

ROAD (Rong et al., ICML 2022) in two parts, so that a pipeline can run the part that needs no
model as a CPU stage beside the GPU model actors (docs/ARCHITECTURE.md, performance principles):

- `impute(images, maps, steps, mode, seed)` -> perturbed images (B, S, 2, C, H, W) float32:
  for each step k (percent of the pixels removed) and each order (0 = MoRF, the k% most relevant
  pixels removed; 1 = LeRF, the k% least relevant), the image with those pixels replaced.
  `mode`: `road`, noisy linear imputation, the same linear system as pytorch-grad-cam's
  `metrics.road.NoisyLinearImputer` (each removed pixel the weighted mean of its in-image
  8 neighbours, 1/6 for edge neighbours and 1/12 for corners, weights renormalised at the image
  border, one sparse system for all removed pixels) plus Gaussian noise of sd `noise` (0.01);
  `blur`, the pixel of a Gaussian-blurred copy of the image (sigma `blur_sigma` px, 11 taps at
  the default 5, as Petsiuk et al.'s RISE code); `zero`, 0 (the image mean in the z-scored
  preprocessed scale): deletion/insertion (Petsiuk et al. 2018) through the same loop.
- `road_scores(model, perturbed, probability, batch_size)` -> per-step probabilities
  `morf`/`lerf` (B, S) and per map `road_morf` = mean_k p_k(MoRF), `road_lerf` = mean_k
  p_k(LeRF), `road_gap` = road_lerf - road_morf; every B x S x 2 forward pass in batches of
  `batch_size` under `torch.inference_mode`.

Which pixels a step removes. Each map ranks its pixels by value, highest first; ties are broken
by a random order of the pixels drawn from (`seed`, the image's key), so every map of one image
(the CAM, its blur, the prior, the random map, a randomised model's map) breaks ties the same way.
Step k removes the first n_k pixels of that order (MoRF) or the last n_k (LeRF), with
n_k = N - ceil((1 - k/100)(N - 1)) (N pixels): exactly the count pytorch-grad-cam removes from a
map without ties, as `removal_counts` computes it with numpy's percentile.

Relation to pytorch-grad-cam 1.5.7 (`perturbation_confidence.RemoveMostRelevantFirst`): its
`ROADMostRelevantFirst(percentile=p)` keeps the pixels below numpy's p-th percentile of the map
and imputes the rest, i.e. it removes the top (100 - p)%: its percentile p is our step
k = 100 - p (the average over p = 10..90 is the average over k = 10..90 either way).
`ROADLeastRelevantFirst(p)` does the same on 1 - map. It has no tie-breaking: every pixel tied at
the threshold is removed, so a flat region at the threshold (a CAM's zeros, a constant map) makes
it remove more than k% (all pixels of a constant map: a singular system); ours removes exactly
n_k, choosing among tied pixels by the image's random order. On a map whose values are distinct
(and whose 1 - map in float32 is too) both remove the same sets, and with the noise at 0 both give
the same images (tests: to float32 rounding) and probabilities (to 1e-5). The noise itself is not
pytorch-grad-cam's draw (it takes `torch.randn_like` from the global generator per call): ours
is one field per (seed, image key, step, order), the same for every map of the image.

Speed: the system is assembled vectorised (pytorch-grad-cam fills a `lil_matrix` per offset,
which costs as much as its solve) and its unknowns are numbered in a geometric nested-dissection
order of the pixel grid, factorised by SuperLU without further column ordering and in symmetric
mode (the matrix is symmetric and, negated, positive definite whenever a pixel is known), about
2x less work than `spsolve`'s COLAMD on these grids; and one forward per perturbed image, where
pytorch-grad-cam's metric also re-scores the unperturbed batch at each call (`bench/faithfulness.py`).

Also here: `blurred` (the blurred-map control: Gaussian, sigma = half a map cell, min-max
renormalised), `random_maps` (the seeded random-map control) and `max_sensitivity` (Yeh et al.
2019, with `ssim_perturbed`). The default steps, imputations and perturbation settings are the
config's (`study.config`), stated there once. The explain stage runs these per map
(`explain.road`).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import splu
from torch import nn

from study.config import IMPUTATIONS, SENSITIVITY_N, SENSITIVITY_RADIUS
from study.config import ROAD_STEPS as STEPS  # the config's defaults: `faithfulness.steps`, `robustness.*`

NOISE_SD = 0.01  # ROAD's noise, absolute, in the preprocessed scale
BLUR_SIGMA = 5.0  # px; `blur` imputation (Petsiuk et al.: an 11-tap Gaussian of sigma 5)
MORF, LERF = 0, 1  # the order axis of `impute`'s output

# pytorch-grad-cam's `neighbors_weights`, in its order (the border renormalisation subtracts the
# weights of outside neighbours in this order, so the diagonal is the same float to the bit)
NEIGHBOURS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
              ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))

# what each seeded draw is for, so that the streams of one (seed, image) never coincide
_TIES, _NOISE, _SENSITIVITY, _RANDOM_MAP = 1, 2, 3, 4

Probability = Callable[[torch.Tensor], torch.Tensor]
ExplainFn = Callable[[nn.Module, torch.Tensor], Any]


# ---------------------------------------------------------------- shared small pieces

def positive_probability(logits: torch.Tensor) -> torch.Tensor:
    """The pneumothorax probability (B,) from logits: softmax class 1 of two logits, as the study
    scores its test split (`training.loop.evaluate`); the sigmoid of a single logit."""
    logits = logits.float()
    if logits.ndim == 1 or logits.shape[-1] == 1:
        return torch.sigmoid(logits.reshape(len(logits)))
    return torch.softmax(logits, dim=-1)[:, 1]


def key_int(key: Any) -> int:
    """A non-negative int for an image key (its id, or its position in the batch): ints as they
    are, anything else by a stable hash of its text (not Python's salted `hash`)."""
    if isinstance(key, (int, np.integer)) and int(key) >= 0:
        return int(key)
    return int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8).digest(), "little")


def _rng(seed: int, purpose: int, key: Any) -> np.random.Generator:
    return np.random.default_rng([int(seed), purpose, key_int(key)])


def _keys(keys: Optional[Sequence[Any]], b: int) -> list:
    if keys is None:
        return list(range(b))
    keys = list(keys)
    if len(keys) != b:
        raise ValueError(f"keys: one per image is needed; got {len(keys)} for {b} images")
    return keys


def _numpy(x: Any, dtype=np.float32) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        x = x.numpy()
    return np.asarray(x, dtype)


def _stack(maps: Any) -> np.ndarray:
    """Maps as float64 (B, H, W), exactly the stored values (float16 is exact in float64)."""
    m = _numpy(maps, np.float64)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"maps must be (B, H, W); got shape {m.shape}")
    return m


def _stored(maps: np.ndarray, stored_dtype: Optional[Any]) -> np.ndarray:
    return maps if stored_dtype is None else maps.astype(stored_dtype).astype(np.float64)


def min_max(maps: np.ndarray) -> np.ndarray:
    """Per-map (x - min) / (max - min) in float64; a constant map becomes all 0 (as the CAMs)."""
    low = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - low
    return np.divide(maps - low, span, out=np.zeros_like(maps, dtype=np.float64), where=span > 0)


# ---------------------------------------------------------------- which pixels each step removes

def removal_counts(n_pixels: int, steps: Sequence[float] = STEPS) -> np.ndarray:
    """Pixels removed at each step: those pytorch-grad-cam removes from a map of `n_pixels`
    distinct values at its percentile 100 - k, i.e. the values at or above numpy's (linear)
    percentile: N - ceil((1 - k/100)(N - 1))."""
    steps = np.asarray(steps, np.float64)
    if steps.ndim != 1 or len(steps) == 0 or np.any(steps <= 0) or np.any(steps >= 100):
        raise ValueError(f"faithfulness steps must be percentages in (0, 100); got {steps.tolist()}")
    at = np.percentile(np.arange(n_pixels, dtype=np.float64), 100 - steps)
    return (n_pixels - np.ceil(at)).astype(np.int64)


def tie_order(shape: tuple[int, int], seed: int, key: Any) -> np.ndarray:
    """(H*W,) the image's random rank of each pixel, used to break ties in every map of it."""
    return _rng(seed, _TIES, key).permutation(shape[0] * shape[1])


def ranks(maps: Any, seed: int = 0, keys: Optional[Sequence[Any]] = None) -> np.ndarray:
    """(B, H*W) int: each pixel's position in its map's order, most relevant first (value
    descending, ties by the image's `tie_order`)."""
    m = _stack(maps)
    b, h, w = m.shape
    keys = _keys(keys, b)
    ties = np.stack([tie_order((h, w), seed, k) for k in keys]) if b else np.zeros((0, h * w), np.int64)
    order = np.lexsort((ties, -m.reshape(b, -1)), axis=-1)
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(h * w)[None].repeat(b, 0), axis=-1)
    return position


def removal_masks(maps: Any, steps: Sequence[float] = STEPS, seed: int = 0,
                  keys: Optional[Sequence[Any]] = None) -> np.ndarray:
    """(B, S, 2, H, W) bool, True where a pixel is removed: [:, s, MORF] the n_k most relevant,
    [:, s, LERF] the n_k least relevant."""
    m = _stack(maps)
    b, h, w = m.shape
    position = ranks(m, seed, keys).reshape(b, 1, h, w)
    counts = removal_counts(h * w, steps).reshape(1, -1, 1, 1)
    return np.stack([position < counts, position >= h * w - counts], axis=2)


# ---------------------------------------------------------------- imputation (CPU, no model)

@lru_cache(maxsize=8)
def nested_dissection(h: int, w: int, leaf: int = 4) -> np.ndarray:
    """Flat pixel indices of an h x w grid in a geometric nested-dissection order: the two halves
    on either side of a middle row (or column) first, each ordered the same way, the separating
    line last; blocks of at most leaf x leaf pixels in raster order. An 8-neighbour grid is cut
    by a line one pixel wide, so eliminating in this order keeps SuperLU's fill near the grid's
    optimum (O(n log n)); the removed pixels of a step keep this order among themselves."""
    out: list[np.ndarray] = []
    stack = [(0, h, 0, w, False)]
    while stack:  # iterative: an explicit stack, children pushed so that they come out in order
        r0, r1, c0, c1, separator = stack.pop()
        if r1 <= r0 or c1 <= c0:
            continue
        if separator or (r1 - r0) * (c1 - c0) <= leaf * leaf:
            rr, cc = np.mgrid[r0:r1, c0:c1]
            out.append((rr * w + cc).ravel())
            continue
        if r1 - r0 >= c1 - c0:
            m = (r0 + r1) // 2
            parts = [(r0, m, c0, c1, False), (m + 1, r1, c0, c1, False), (m, m + 1, c0, c1, True)]
        else:
            m = (c0 + c1) // 2
            parts = [(r0, r1, c0, m, False), (r0, r1, m + 1, c1, False), (r0, r1, m, m + 1, True)]
        stack.extend(reversed(parts))
    order = np.concatenate(out)
    order.setflags(write=False)
    return order


def linear_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """NoisyLinearImputer's noise-free solution: image (C, H, W), removed (H, W) bool -> float64
    (C, H, W) with every removed pixel the weighted mean of its in-image neighbours (known or
    imputed), by one sparse solve with one right-hand side per channel."""
    c, h, w = image.shape
    flat = np.asarray(image, np.float64).reshape(c, -1)
    removed_flat = np.asarray(removed, bool).reshape(-1)
    out = flat.copy()
    order = nested_dissection(h, w)
    unknown = order[removed_flat[order]]  # the removed pixels, numbered in nested-dissection order
    n = len(unknown)
    if n == 0:
        return out.reshape(c, h, w)
    if n == h * w:
        raise ValueError("linear imputation: every pixel is removed, nothing to impute from")
    number = np.full(h * w, -1, np.int64)
    number[unknown] = np.arange(n)
    r, col = np.divmod(unknown, w)
    weight_sum = np.ones(n)
    rows, cols, values = [np.arange(n)], [np.arange(n)], []
    rhs = np.zeros((n, c))
    for (dr, dc), weight in NEIGHBOURS:
        rr, cc = r + dr, col + dc
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        weight_sum[~inside] -= weight
        at = np.flatnonzero(inside)
        neighbour = rr[at] * w + cc[at]
        free = removed_flat[neighbour]
        rows.append(at[free])
        cols.append(number[neighbour[free]])
        values.append(np.full(int(free.sum()), weight))
        rhs[at[~free]] -= weight * flat[:, neighbour[~free]].T
    system = csc_matrix((np.concatenate([-weight_sum, *values]), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(n, n))
    lu = splu(system, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    out[:, unknown] = lu.solve(rhs).T
    return out.reshape(c, h, w)


def impute(images: Any, maps: Any, steps: Sequence[float] = STEPS, mode: str = "road", seed: int = 0,
           keys: Optional[Sequence[Any]] = None, noise: float = NOISE_SD,
           blur_sigma: float = BLUR_SIGMA) -> np.ndarray:
    """Perturbed images (B, S, 2, C, H, W) float32 for images (B, C, H, W) and their maps
    (B, H, W), as stored: [:, s, MORF] with the step's most relevant pixels replaced, [:, s, LERF]
    the least relevant. No model; CPU (SciPy).

    keys: one per image (its id), for the tie order and the noise; default its position in the
    batch (then a result depends on the batch it came in). Every map of one image gets the same
    tie order and the same noise fields."""
    if mode not in IMPUTATIONS:
        raise ValueError(f"faithfulness imputation: unknown mode {mode!r}; use one of {', '.join(IMPUTATIONS)}")
    x = _numpy(images)
    m = _stack(maps)
    if x.ndim != 4 or x.shape[0] != m.shape[0] or x.shape[2:] != m.shape[1:]:
        raise ValueError(f"impute: images (B, C, H, W) and maps (B, H, W) of one size are needed; "
                         f"got {x.shape} and {m.shape}")
    b, c, h, w = x.shape
    keys = _keys(keys, b)
    removed = removal_masks(m, steps, seed, keys)  # (B, S, 2, H, W)
    s = removed.shape[1]
    out = np.empty((b, s, 2, c, h, w), np.float32)
    for i in range(b):
        if mode == "blur":  # radius 5 px at sigma 5: the 11-tap kernel of Petsiuk et al.'s code
            fill = gaussian_filter(x[i].astype(np.float64), sigma=(0, blur_sigma, blur_sigma), truncate=1.0)
        elif mode == "road" and noise:
            fields = _rng(seed, _NOISE, keys[i]).standard_normal((s, 2, c, h, w))
        for j in range(s):
            for order in (MORF, LERF):
                gone = removed[i, j, order]
                if mode == "road":
                    filled = linear_imputation(x[i], gone)
                    if noise:
                        filled[:, gone] += noise * fields[j, order][:, gone]
                    out[i, j, order] = filled
                else:
                    out[i, j, order] = x[i]
                    out[i, j, order][:, gone] = 0.0 if mode == "zero" else fill[:, gone]
    return out


# ---------------------------------------------------------------- model forward passes

def _device(model: nn.Module, device: Optional[Any]) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def probabilities(model: nn.Module, images: Any, probability: Probability = positive_probability,
                  batch_size: int = 256, device: Optional[Any] = None,
                  prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> np.ndarray:
    """probability(model(prepare(x))) for images (N, C, H, W), in batches, float64 (N,).
    The model is used as given (call `.eval()` first)."""
    device = _device(model, device)
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    found = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            chunk = x[start:start + batch_size].to(device, torch.float32, non_blocking=True)
            found.append(probability(model(prepare(chunk) if prepare else chunk)).float().cpu())
    return torch.cat(found).numpy().astype(np.float64) if found else np.zeros(0)


def road_scores(model: nn.Module, perturbed: Any, probability: Probability = positive_probability,
                batch_size: int = 256, device: Optional[Any] = None,
                prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                images: Any = None) -> dict[str, np.ndarray]:
    """The model's probabilities on `impute`'s output (B, S, 2, C, H, W), all B x S x 2 images in
    batches of `batch_size`: `morf`, `lerf` (B, S) (p_k per step), `road_morf`, `road_lerf`,
    `road_gap` (B,). With `images` (B, C, H, W), also `probability` (B,) of the unperturbed images."""
    p = perturbed if isinstance(perturbed, torch.Tensor) else np.asarray(perturbed)
    if p.ndim != 6 or p.shape[2] != 2:
        raise ValueError(f"road_scores: perturbed images (B, S, 2, C, H, W) are needed; got {tuple(p.shape)}")
    b, s = p.shape[:2]
    found = probabilities(model, p.reshape(b * s * 2, *p.shape[3:]), probability, batch_size, device, prepare)
    found = found.reshape(b, s, 2)
    morf, lerf = found[:, :, MORF], found[:, :, LERF]
    scores = {"morf": morf, "lerf": lerf, "road_morf": morf.mean(axis=1), "road_lerf": lerf.mean(axis=1)}
    scores["road_gap"] = scores["road_lerf"] - scores["road_morf"]
    if images is not None:
        scores["probability"] = probabilities(model, images, probability, batch_size, device, prepare)
    return scores


def road(model: nn.Module, images: Any, maps: Any, steps: Sequence[float] = STEPS, mode: str = "road",
         seed: int = 0, keys: Optional[Sequence[Any]] = None, noise: float = NOISE_SD,
         probability: Probability = positive_probability, batch_size: int = 256,
         device: Optional[Any] = None, prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
         ) -> dict[str, np.ndarray]:
    """`impute` then `road_scores`, in one process (a pipeline runs them as two stages)."""
    perturbed = impute(images, maps, steps, mode, seed, keys, noise)
    return road_scores(model, perturbed, probability, batch_size, device, prepare)


# ---------------------------------------------------------------- the blurred-map control

def cell_size(image_size: int, feature_side: int) -> float:
    """A map cell's side in pixels at the preprocessed size: the CAM's native resolution."""
    return image_size / feature_side


def blurred(maps: Any, cell_px: float, sigma_cells: float = 0.5, stored_dtype: Optional[Any] = np.float16,
            mode: str = "reflect") -> np.ndarray:
    """The blurred-map control (B, H, W) float32: each map as stored (rounded to `stored_dtype`
    first, a no-op for maps read back from the store), blurred by
    `scipy.ndimage.gaussian_filter` with sigma = sigma_cells x cell_px pixels (default half a map
    cell; its default 4-sigma truncation, `mode` at the border), then min-max renormalised to
    [0, 1] like every stored map (a constant result is all 0). A single (H, W) map gives (1, H, W)."""
    m = _stored(_stack(maps), stored_dtype)
    sigma = sigma_cells * cell_px
    smooth = gaussian_filter(m, sigma=(0, sigma, sigma), mode=mode)
    return min_max(smooth).astype(np.float32)


# ---------------------------------------------------------------- the random-map control

def random_maps(shape: tuple[int, int], seed: int, keys: Sequence[Any]) -> np.ndarray:
    """The seeded uniform random-map control (B, H, W) float32, one per image key, drawn from
    (seed, key): the same map for an image in every run. Min-max normalised like every stored map."""
    maps = np.stack([_rng(seed, _RANDOM_MAP, key).random(shape) for key in keys]) if len(keys) else \
        np.zeros((0, *shape))
    return min_max(maps).astype(np.float32)


# ---------------------------------------------------------------- robustness: max-sensitivity

def perturbations(shape: tuple[int, ...], n: int, radius: float, seed: int, key: Any) -> np.ndarray:
    """(n, *shape) float32 uniform in [-radius, radius]: the image's n perturbations, drawn
    from (seed, image key), so every map set of one image is tested with the same ones."""
    return _rng(seed, _SENSITIVITY, key).uniform(-radius, radius, size=(n, *shape)).astype(np.float32)


def _as_stored(maps: Any, normalise: bool, stored_dtype: Optional[Any]) -> np.ndarray:
    m = _stack(maps)
    return _stored(min_max(m) if normalise else m, stored_dtype)


def max_sensitivity(explain_fn: ExplainFn, model: nn.Module, images: Any, maps: Any = None,
                    n: int = SENSITIVITY_N, radius: Any = None, seed: int = 0,
                    probability: Probability = positive_probability, threshold: float = 0.5,
                    keys: Optional[Sequence[Any]] = None, relative_radius: float = SENSITIVITY_RADIUS,
                    prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                    normalise: bool = False, stored_dtype: Optional[Any] = np.float16,
                    predicted: Any = None, with_probability: bool = False) -> dict[str, np.ndarray]:
    """Max-sensitivity (Yeh et al. 2019) of each image's map (B,), and `ssim_perturbed`.

    explain_fn(model, x) -> maps (B', H, W) for images x (B', C, H, W): any CAM method plugs in
    (it gets the perturbed images as given here and prepares them itself). images: (B, C, H, W)
    in the preprocessed scale. maps: h(x) as stored; None computes it with `explain_fn`.
    radius: absolute (a float, or one per image); None -> `relative_radius` x each image's
    intensity range (max - min). The predicted class is probability(model(prepare(x))) >= threshold;
    `predicted` (B,) gives it when the caller has it from its own forward (the CAM of x).
    with_probability: explain_fn returns (maps, probability (B',)) from the maps' own forward, so
    the class of x + d costs no forward of its own (the maps of a perturbation whose class changed
    are computed and dropped); the result is the same.

    For each of the image's n `perturbations` d, kept only when the class of x + d is the class of
    x: s = ||h(x+d) - h(x)||_2 / ||h(x)||_2 and the SSIM of h(x+d) to h(x)
    (`explain.similarity`, scikit-image's); h(x+d) as stored (rounded to `stored_dtype`; min-max
    normalised first when `normalise`, for an explain_fn that returns raw maps).
    Returns `max_sensitivity` (max s; NaN when no perturbation is kept or h(x) is all 0),
    `ssim_perturbed` (mean SSIM; NaN when none is kept) and `sensitivity_kept` (int, kept count).
    """
    from explain.similarity import MEASURES, Prepared, compare  # SSIM exactly as scikit-image

    device = _device(model, None)
    x = images.detach().float().cpu() if isinstance(images, torch.Tensor) else torch.from_numpy(_numpy(images))
    b = len(x)
    keys = _keys(keys, b)
    if radius is None:
        flat = x.reshape(b, -1)
        radii = (relative_radius * (flat.amax(1) - flat.amin(1))).double().numpy()
    else:
        radii = np.broadcast_to(np.asarray(radius, np.float64), (b,))

    def explained(images: torch.Tensor) -> tuple[Any, Optional[np.ndarray]]:
        """(maps, the images' class, or None when explain_fn does not give the probability)."""
        found = explain_fn(model, images.to(device))
        if not with_probability:
            return found, None
        heat, p = found
        return heat, _numpy(p).astype(np.float64) >= threshold

    own, computed = None, maps is None
    if computed:
        maps, own = explained(x)
    reference = _as_stored(maps, normalise and computed, stored_dtype)
    if reference.shape != (b, *x.shape[2:]):
        raise ValueError(f"max_sensitivity: maps (B, H, W) of the images' size are needed; got {reference.shape}")
    reference_norm = np.sqrt((reference ** 2).sum(axis=(1, 2)))
    prepared = Prepared(reference, ("ssim",))
    if predicted is None:
        predicted = own if own is not None else \
            probabilities(model, x, probability, device=device, prepare=prepare) >= threshold
    predicted = np.asarray(_numpy(predicted), bool).reshape(b)
    noise = np.stack([perturbations(tuple(x.shape[1:]), n, float(r), seed, k) for r, k in zip(radii, keys)]) \
        if b else np.zeros((0, n, *x.shape[1:]), np.float32)
    worst = np.full(b, -np.inf)
    ssim_sum = np.zeros(b)
    kept = np.zeros(b, np.int64)
    for j in range(n):
        moved = x + torch.from_numpy(noise[:, j])
        if with_probability:  # the maps of every x + d, and their classes from the same forward
            h, moved_class = explained(moved)
            index = np.flatnonzero(moved_class == predicted)
            h = _as_stored(_numpy(h, np.float64)[index], normalise, stored_dtype)
        else:  # the classes first, then the maps of the kept ones only
            same = (probabilities(model, moved, probability, device=device, prepare=prepare) >= threshold) == predicted
            index = np.flatnonzero(same)
            h = _as_stored(explain_fn(model, moved[torch.from_numpy(index)].to(device)), normalise, stored_dtype) \
                if len(index) else None
        if len(index) == 0:
            continue
        diff = np.sqrt(((h - reference[index]) ** 2).sum(axis=(1, 2)))
        worst[index] = np.maximum(worst[index], diff)
        ssim_sum[index] += compare(Prepared(h, ("ssim",)), prepared.take(index))[MEASURES["ssim"]]
        kept[index] += 1
    defined = (kept > 0) & (reference_norm > 0)
    sensitivity = np.where(defined, worst / np.where(defined, reference_norm, 1.0), np.nan)
    ssim_mean = np.where(kept > 0, ssim_sum / np.maximum(kept, 1), np.nan)
    return {"max_sensitivity": sensitivity, "ssim_perturbed": ssim_mean, "sensitivity_kept": kept}
