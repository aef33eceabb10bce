"""Localisation metrics: heatmaps h (B, H, W) in [0, 1] against masks M (B, H, W) (STUDY.md §5).

Every function takes numpy arrays or torch tensors and returns one float64 per image.

Implementation: each image's pixels are sorted once by heat, the mask bit carried in the sort
key (heat bits << 1 | mask bit; for non-negative IEEE floats the bit pattern orders like the
value, and every float32 in [0, 1] has bits < 2**30, so the key fits in uint32). Every threshold
set {h >= t} is then a suffix of that order, found by `searchsorted` on the keys; its pixel
count, mask count, heat sum and in-mask heat sum come from one segment-sum pass per image over
all the thresholds that the metrics need. Counts are exact, so `ehr_auc` equals the naive loop
over thresholds, including pixels that lie exactly on a threshold. float32 maps (and anything
that converts to float32 exactly) are compared as float32 against float64 thresholds exactly
as numpy does; float64 maps keep float64.

Conventions (0/0 is NaN; otherwise a metric follows its formula):
- empty M: `diff_gradcam` NaN (no mean inside); `ehr_auc`, its chance and oracle 0 (r = 0 at
  every threshold), normalised NaN; `ehr_auc_inputiba`, its chance and oracle 0, normalised
  NaN; `energy_in_mask` 0, `pointing_hit` 0, `iou_otsu` 0 (NaN if the Otsu set is empty too).
- M covers the image: `diff_gradcam` NaN (no mean outside); each EHR equals its chance, so the
  normalised scores are 0; energy 1; pointing 1.
- all-zero h (an all-zero CAM, flagged in `cam_all_zero`): `energy_in_mask` and `pointing_hit`
  NaN (no heat, no maximum); `diff_gradcam` 0; `ehr_auc` = f/(2n) (only t = 0 is non-empty) =
  its chance, normalised 0; `ehr_auc_inputiba` 0 (no heat >= 0.1) = its chance, normalised 0;
  `iou_otsu` 0.
NaN values are never dropped here; the caller counts them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

# MetricsConfig field names (orchestrator/config.py) and their defaults (STUDY.md §5).
_DEFAULTS = {"ehr_thresholds": 100, "inputiba_min_heat": 0.1, "inputiba_quantiles": 10,
             "inputiba_cap": 0.99}
_OTSU_BINS = 256  # skimage.filters.threshold_otsu's default

COLUMNS = ("diff_gradcam", "ehr_auc", "ehr_auc_chance", "ehr_auc_oracle",
           "ehr_auc_norm", "ehr_auc_inputiba", "ehr_auc_inputiba_chance",
           "ehr_auc_inputiba_oracle", "ehr_auc_inputiba_norm", "energy_in_mask", "pointing_hit",
           "iou_otsu", "cam_all_zero")


# ---------------------------------------------------------------- input

def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor; bfloat16 has no numpy dtype
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() and x.element_size() < 4 else x
        return x.numpy()
    return np.asarray(x)


def _uint(dtype: np.dtype) -> type:
    return np.uint64 if dtype == np.float64 else np.uint32


def _one_bits(dtype: np.dtype) -> int:
    return int(np.array(1.0, dtype).view(_uint(dtype)))


def _heat(h: Any) -> np.ndarray:
    h = np.ascontiguousarray(_to_numpy(h))
    if h.dtype != np.float64:
        h = h.astype(np.float32, copy=False)  # exact for float16, bool and 0/1 integers
    if h.size and h.view(_uint(h.dtype)).max() > _one_bits(h.dtype):
        h = h + h.dtype.type(0.0)  # -0.0 has the sign bit set; -0.0 + 0.0 = +0.0
        if h.view(_uint(h.dtype)).max() > _one_bits(h.dtype):  # negative, > 1 or NaN
            raise ValueError("metrics: heatmaps must be finite and in [0, 1] "
                             "(min-max normalise them first)")
    return h


def _mask(m: Any) -> np.ndarray:
    m = np.ascontiguousarray(_to_numpy(m))
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise ValueError("metrics: masks must be boolean or 0/1; got other values "
                             "(threshold a resized mask before scoring)")
        m = m.astype(bool)
    return m


def _inputs(h: Any, m: Any) -> tuple[np.ndarray, np.ndarray]:
    h, m = _heat(h), _mask(m)
    if h.ndim != 3 or h.shape != m.shape:
        raise ValueError(f"metrics: heatmaps and masks must both be (B, H, W) of one shape; "
                         f"got {h.shape} and {m.shape}")
    if h.size == 0:
        raise ValueError(f"metrics: nothing to score in a batch of shape {h.shape}")
    return h.reshape(len(h), -1), m.reshape(len(m), -1)


# ---------------------------------------------------------------- the sorted pass

def _threshold_keys(t: Any, dtype: np.dtype, strict: bool = False) -> np.ndarray:
    """Smallest sort key of a `dtype` value >= t (> t if strict), for float64 t >= 0."""
    t = np.asarray(t, np.float64)
    c = np.abs(t.astype(dtype))  # abs: -0.0 -> +0.0
    short = (c <= t) if strict else (c < t)
    c = np.where(short, np.nextafter(c, dtype.type(np.inf)), c)
    return c.view(_uint(dtype)) << 1


class _Suffix(NamedTuple):
    """Sums over the pixels from a sorted position to the end, i.e. over {h >= t}: (B, K) each."""

    count: np.ndarray
    n_mask: np.ndarray
    heat: np.ndarray
    heat_mask: np.ndarray


def _suffix_sums(x: np.ndarray, pad: int = 1) -> np.ndarray:
    """out[j] = sum of x[j:] in float64, followed by `pad` zeros (empty suffixes)."""
    return np.append(np.cumsum(x[::-1], dtype=np.float64)[::-1], np.zeros(pad))


class _Ranked:
    """One image per row, pixels in ascending heat order (keys: heat bits << 1 | mask bit)."""

    def __init__(self, h: np.ndarray, m: np.ndarray):
        self.dtype = h.dtype
        keys = h.view(_uint(h.dtype)) << 1
        keys |= m
        keys.sort(axis=1)
        self.keys, self.pixels = keys, keys.shape[1]
        self.mask_count = np.count_nonzero(m, axis=1)

    @property
    def mask_fraction(self) -> np.ndarray:
        return self.mask_count / self.pixels

    def first_at_least(self, t: np.ndarray, strict: bool = False) -> np.ndarray:
        """t (B, K) or (K,) float64 -> (B, K) index of the first pixel with h >= t (h > t)."""
        tk = np.broadcast_to(_threshold_keys(t, self.dtype, strict), (len(self.keys), np.shape(t)[-1]))
        return np.stack([np.searchsorted(k, q) for k, q in zip(self.keys, tk)])

    def values(self, i: np.ndarray) -> np.ndarray:
        """Heat (float64) at sorted positions i (B, K), all < pixels."""
        return (np.take_along_axis(self.keys, i, axis=1) >> 1).view(self.dtype).astype(np.float64)

    def suffix(self, i: np.ndarray) -> _Suffix:
        """Sums over each row's pixels from sorted position i (B, K) on, in one pass per row."""
        sums = np.zeros((3,) + i.shape)  # mask count, heat, heat in mask
        for b, row in enumerate(i):
            u, inverse = np.unique(row, return_inverse=True)
            starts = u[u < self.pixels]
            if len(starts) == 0:
                continue
            keys = self.keys[b]
            bit, value = keys & 1, keys >> 1
            segments = [np.add.reduceat(bit, starts, dtype=keys.dtype),
                        np.add.reduceat(value.view(self.dtype), starts, dtype=np.float64)]
            value *= bit  # heat bits outside M -> 0, i.e. +0.0
            segments.append(np.add.reduceat(value.view(self.dtype), starts, dtype=np.float64))
            for j, seg in enumerate(segments):
                sums[j, b] = _suffix_sums(seg, pad=len(u) - len(starts))[inverse]
        return _Suffix(self.pixels - i, *sums)

    def suffixes(self, *queries: np.ndarray) -> list[_Suffix]:
        """`suffix` of several (B, K_j) position sets, in one pass."""
        sizes = np.cumsum([q.shape[1] for q in queries])[:-1]
        s = self.suffix(np.concatenate(queries, axis=1))
        return [_Suffix(*parts) for parts in zip(*(np.split(x, sizes, axis=1) for x in s))]


def _rank(h: Any, m: Any) -> _Ranked:
    return _Ranked(*_inputs(h, m))


def _divide(a: Any, b: Any) -> np.ndarray:
    """a / b with x/0 -> NaN, without warnings."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    return np.divide(a, b, out=np.full(a.shape, np.nan), where=b != 0)


# ---------------------------------------------------------------- queries and metrics

def _totals_query(r: _Ranked) -> np.ndarray:
    return np.zeros((len(r.keys), 1), np.intp)


def _diff_gradcam(total: _Suffix) -> np.ndarray:
    inside, heat, n_in, pixels = total.heat_mask[:, 0], total.heat[:, 0], total.n_mask[:, 0], total.count[:, 0]
    return _divide(inside, n_in) - _divide(heat - inside, pixels - n_in)


def diff_gradcam(h: Any, m: Any) -> np.ndarray:
    """mean(h inside M) - mean(h outside M) (the paper's metric); NaN when M is empty or full."""
    r = _rank(h, m)
    return _diff_gradcam(r.suffix(_totals_query(r)))


def _energy_in_mask(total: _Suffix) -> np.ndarray:
    return _divide(total.heat_mask[:, 0], total.heat[:, 0])


def energy_in_mask(h: Any, m: Any) -> np.ndarray:
    """Sum of h over M / sum of h; NaN for an all-zero h."""
    r = _rank(h, m)
    return _energy_in_mask(r.suffix(_totals_query(r)))


def _ehr_query(r: _Ranked, n: int) -> np.ndarray:
    return r.first_at_least(np.arange(n + 1) / n)  # t_k = k/n in float64


def _ehr_curves(s: _Suffix, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """r(t_k) = |{h>=t_k} ∩ M| / |{h>=t_k}| (0 if empty), and its chance curve f·[{h>=t_k} ≠ ∅]."""
    ratio = np.where(s.count > 0, s.n_mask / np.maximum(s.count, 1), 0.0)
    return ratio, np.where(s.count > 0, f[:, None], 0.0)


def _ehr_auc(curve: np.ndarray, n: int) -> np.ndarray:
    return np.trapezoid(curve, dx=1.0 / n, axis=1)


def _ehr_oracle(f: np.ndarray, n: int) -> np.ndarray:
    # h = M: {h >= 0} is the image (r = f), {h >= t > 0} is M (r = 1); empty M: r = 0.
    curve = np.where(f[:, None] > 0, 1.0, 0.0) * np.ones((len(f), n + 1))
    curve[:, 0] = f
    return _ehr_auc(curve, n)


def _ehr(h: Any, m: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    r = _rank(h, m)
    return tuple(_ehr_auc(c, n) for c in _ehr_curves(r.suffix(_ehr_query(r, n)), r.mask_fraction))


def ehr_auc(h: Any, m: Any, n: int = 100) -> np.ndarray:
    """The paper's EHR AUC: trapezoid over t_k = k/n, k = 0..n, of r(t) = |{h>=t} ∩ M| / |{h>=t}|,
    r = 0 where {h >= t} is empty."""
    return _ehr(h, m, n)[0]


def ehr_auc_chance(h: Any, m: Any, n: int = 100) -> np.ndarray:
    """Expected `ehr_auc` of h with its pixels randomly permuted (a map that ignores M).

    Under a random permutation E|{h>=t} ∩ M| = f |{h>=t}| with f = |M|/|image|, so E r(t) = f
    wherever {h>=t} is non-empty. A map that reaches 1 (e.g. a constant 1) gives exactly f; a
    Grad-CAM map, whose max is 1/(1 + 1e-7) < 1, gives f (1 - 1/(2n)); a constant map c gives
    its own `ehr_auc`.
    """
    return _ehr(h, m, n)[1]


def ehr_auc_oracle(m: Any, n: int = 100) -> np.ndarray:
    """`ehr_auc` of h = M: 1 - (1 - f)/(2n); 0 for an empty mask."""
    return _ehr_oracle(mask_fraction(m), n)


def _quantiles(r: _Ranked, start: np.ndarray, q: np.ndarray) -> np.ndarray:
    """np.quantile(method='linear') of each row's sorted tail heat[b, start[b]:], in float64."""
    n = r.pixels - start[:, None]  # (B, 1), >= 1
    virtual = (n - 1) * q[None, :]
    lo = np.floor(virtual)
    above = virtual >= n - 1
    gamma = virtual - np.where(above, -1.0, lo)  # as numpy; unused where above (a == b)
    a = r.values(np.where(above, n - 1, lo).astype(np.intp) + start[:, None])
    b = r.values(np.where(above, n - 1, lo + 1).astype(np.intp) + start[:, None])
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)  # numpy's _lerp


def _inputiba_query(r: _Ranked, min_heat: float, quantiles: int,
                    cap: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions of {h >= t_q} (B, Q + 1) and which rows have heat >= min_heat (B,)."""
    start = r.first_at_least(np.array([min_heat]))[:, 0]
    kept = start < r.pixels
    start = np.where(kept, start, 0)  # rows without kept heat: any valid tail; zeroed later
    q = np.linspace(0.0, 1.0, quantiles + 1)  # InputIBA: np.linspace(0, 1.0, 11)
    t = np.minimum(_quantiles(r, start, q), cap * r.values(np.full((len(start), 1), r.pixels - 1)))
    # InputIBA zeroes heat < min_heat before thresholding: its sets are {h >= max(t, min_heat)}
    return r.first_at_least(np.maximum(t, min_heat)), kept


def _inputiba_curves(s: _Suffix, f: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    count = np.maximum(s.count, 1)  # >= 1 on kept rows: t <= cap * max(h) <= max(h)
    ratio = s.heat_mask / count
    chance = f[:, None] * s.heat / count
    return ratio * kept[:, None], chance * kept[:, None]


def _inputiba_auc(curve: np.ndarray) -> np.ndarray:
    return np.trapezoid(curve, x=np.linspace(0.0, 1.0, curve.shape[1]), axis=1)


def _inputiba_oracle(nonempty: np.ndarray, quantiles: int) -> np.ndarray:
    return _inputiba_auc(np.ones((len(nonempty), quantiles + 1)) * nonempty[:, None])


def _inputiba(h: Any, m: Any, min_heat: float, quantiles: int,
              cap: float) -> tuple[np.ndarray, np.ndarray]:
    r = _rank(h, m)
    i, kept = _inputiba_query(r, min_heat, quantiles, cap)
    return tuple(_inputiba_auc(c) for c in _inputiba_curves(r.suffix(i), r.mask_fraction, kept))


def ehr_auc_inputiba(h: Any, m: Any, min_heat: float = 0.1, quantiles: int = 10,
                     cap: float = 0.99) -> np.ndarray:
    """EHR AUC as defined by InputIBA (Zhang et al., NeurIPS 2021, `EffectiveHeatRatios`).

    Heat below `min_heat` is dropped; the thresholds t_q are the linear quantiles
    q = 0, 1/Q, .., 1 of the kept heat values (in float64), each capped at cap * max(h);
    r_q = (sum of h over {h >= t_q} ∩ M) / |{h >= t_q}|; AUC by the trapezoid over q.
    No kept heat (max(h) < min_heat, e.g. an all-zero CAM): 0, where InputIBA's code fails.
    InputIBA divides by |{h >= t}| + 1e-8; that set is never empty, so the epsilon is left out.
    """
    return _inputiba(h, m, min_heat, quantiles, cap)[0]


def ehr_auc_inputiba_chance(h: Any, m: Any, min_heat: float = 0.1, quantiles: int = 10,
                            cap: float = 0.99) -> np.ndarray:
    """Expected `ehr_auc_inputiba` of h with its pixels randomly permuted.

    The thresholds depend only on h's histogram; under a permutation each pixel's heat lands in
    M with probability f, so E r_q = f * mean(h over {h >= t_q}).
    """
    return _inputiba(h, m, min_heat, quantiles, cap)[1]


def ehr_auc_inputiba_oracle(m: Any, quantiles: int = 10) -> np.ndarray:
    """`ehr_auc_inputiba` of h = M: every t_q = cap, the set is M, r_q = 1: AUC 1 (0 if M empty)."""
    m = _mask(m)
    return _inputiba_oracle(m.reshape(len(m), -1).any(axis=1), quantiles)


def mask_fraction(m: Any) -> np.ndarray:
    """f = |M| / |image| per image."""
    m = _mask(m)
    return m.reshape(len(m), -1).mean(axis=1)


def normalised(score: Any, chance: Any, oracle: Any) -> np.ndarray:
    """(score - chance) / (oracle - chance): 0 at chance, 1 at the oracle; NaN if they coincide."""
    chance = np.asarray(chance, np.float64)
    return _divide(np.asarray(score, np.float64) - chance, np.asarray(oracle, np.float64) - chance)


def _top_query(r: _Ranked) -> np.ndarray:
    return r.first_at_least(r.values(np.full((len(r.keys), 1), r.pixels - 1)))  # first max pixel


def _pointing_hit(top: _Suffix) -> np.ndarray:
    hit = top.n_mask[:, 0] / top.count[:, 0]
    return np.where(top.heat[:, 0] > 0, hit, np.nan)


def pointing_hit(h: Any, m: Any) -> np.ndarray:
    """Pointing game: is the argmax of h in M? Ties: the fraction of the maximal pixels that lie
    in M, i.e. the expected hit when ties are broken uniformly at random (0 or 1 for a unique
    maximum). NaN for an all-zero h."""
    r = _rank(h, m)
    return _pointing_hit(r.suffix(_top_query(r)))


def _otsu_thresholds(r: _Ranked) -> np.ndarray:
    """skimage.filters.threshold_otsu's algorithm: 256 bins over [min, max] (float64 edges, as
    np.histogram), threshold at the centre of the bin maximising the between-class variance.
    A constant image returns its value, so nothing lies above the threshold."""
    ends = r.values(np.array([[0, r.pixels - 1]] * len(r.keys)))
    lo, hi = ends[:, :1], ends[:, 1:]
    edges = np.arange(_OTSU_BINS + 1.0)[None, :] * ((hi - lo) / _OTSU_BINS) + lo  # np.linspace
    edges[:, -1:] = hi
    i = r.first_at_least(edges)
    hist = np.diff(i, axis=1).astype(np.float64)
    hist[:, -1] += r.pixels - i[:, -1]  # np.histogram's last bin is closed
    centres = (edges[:, :-1] + edges[:, 1:]) / 2
    w1, w2 = np.cumsum(hist, axis=1), np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 only on constant rows, replaced
        mean1 = np.cumsum(hist * centres, axis=1) / w1
        mean2 = (np.cumsum((hist * centres)[:, ::-1], axis=1) / w2[:, ::-1])[:, ::-1]
    between = w1[:, :-1] * w2[:, 1:] * (mean1[:, :-1] - mean2[:, 1:]) ** 2
    # bins 0 and 255 hold min and max, so w1, w2 > 0 and `between` is finite on other rows
    best = np.take_along_axis(centres, np.argmax(between, axis=1)[:, None], axis=1)
    return np.where(hi > lo, best, lo)[:, 0]


def otsu_threshold(h: Any) -> np.ndarray:
    """Per-image Otsu threshold of h (B, H, W) (see `_otsu_thresholds`)."""
    h = _heat(h)
    return _otsu_thresholds(_rank(h, np.zeros(h.shape, bool)))


def _otsu_query(r: _Ranked) -> np.ndarray:
    return r.first_at_least(_otsu_thresholds(r)[:, None], strict=True)  # foreground: h > t


def _iou_otsu(fg: _Suffix, mask_count: np.ndarray) -> np.ndarray:
    both = fg.n_mask[:, 0]
    return _divide(both, fg.count[:, 0] + mask_count - both)


def iou_otsu(h: Any, m: Any) -> np.ndarray:
    """IoU of {h > Otsu threshold of h} with M; NaN when both are empty."""
    r = _rank(h, m)
    return _iou_otsu(r.suffix(_otsu_query(r)), r.mask_count)


# ---------------------------------------------------------------- all columns at once

def _config(cfg: Any) -> dict[str, Any]:
    return {k: v if cfg is None else getattr(cfg, k, v) for k, v in _DEFAULTS.items()}


def score_batch(h: Any, m: Any, cfg: Any = None) -> dict[str, np.ndarray]:
    """Every column of COLUMNS for a batch: float64 arrays (B,), `cam_all_zero` bool (B,).

    cfg: a MetricsConfig (ehr_thresholds, inputiba_min_heat, inputiba_quantiles, inputiba_cap)
    or None for the STUDY.md defaults. f = |M| / |image| (the EHR chance level's scale) is the
    caller's `mask_fraction` column; at the scoring resolution it is `mask_fraction(m)`.
    """
    c, r = _config(cfg), _rank(h, m)
    n, f = c["ehr_thresholds"], r.mask_fraction
    i_iba, kept = _inputiba_query(r, c["inputiba_min_heat"], c["inputiba_quantiles"], c["inputiba_cap"])
    total, s_ehr, s_iba, top, fg = r.suffixes(
        _totals_query(r), _ehr_query(r, n), i_iba, _top_query(r), _otsu_query(r))
    ehr, ehr_chance = (_ehr_auc(x, n) for x in _ehr_curves(s_ehr, f))
    iba, iba_chance = (_inputiba_auc(x) for x in _inputiba_curves(s_iba, f, kept))
    ehr_oracle = _ehr_oracle(f, n)
    iba_oracle = _inputiba_oracle(r.mask_count > 0, c["inputiba_quantiles"])
    return {
        "diff_gradcam": _diff_gradcam(total),
        "ehr_auc": ehr, "ehr_auc_chance": ehr_chance, "ehr_auc_oracle": ehr_oracle,
        "ehr_auc_norm": normalised(ehr, ehr_chance, ehr_oracle),
        "ehr_auc_inputiba": iba, "ehr_auc_inputiba_chance": iba_chance,
        "ehr_auc_inputiba_oracle": iba_oracle,
        "ehr_auc_inputiba_norm": normalised(iba, iba_chance, iba_oracle),
        "energy_in_mask": _energy_in_mask(total),
        "pointing_hit": _pointing_hit(top),
        "iou_otsu": _iou_otsu(fg, r.mask_count),
        "cam_all_zero": top.heat[:, 0] == 0,
    }
