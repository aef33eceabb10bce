"""Localisation metrics: heatmaps h (B, H, W) in [0, 1] against masks M (B, H, W) (docs/STUDY.md §5).

Every function takes numpy arrays or torch tensors and returns one float64 per image.

Implementation: each image's heat is sorted once, as its IEEE bit pattern (non-negative floats
order like their bits, and unsigned integers sort faster than floats), and so, apart, is the heat
of its pixels in M (usually a few percent of them). Every set {h >= t} is a suffix of both
orders, found by `searchsorted`, so its pixel count and mask count are exact: `ehr_auc` equals
the naive loop over thresholds, including pixels that lie exactly on a threshold. Heat sums are
needed only over the image, M and InputIBA's sets; one float64 `reduceat` over the batch's
sorted heat (and one over its heat in M) gives them. The thresholds that depend on the heat
(InputIBA's quantiles, read off the sorted order, and Otsu's, from the counts at its bin edges)
take a second search. float32 maps (and anything that converts to float32 exactly) are compared
as float32 against float64 thresholds exactly as numpy does; float64 maps keep float64.
(Binning pixels and counting them with `bincount` instead was measured slower: with AVX-512 the
sort costs about as much as one of the several scatter passes that needs.)

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
`auprc` (average precision of h ranking the pixels of M, ties grouped as scikit-learn's
`average_precision_score`) is NaN for an empty M, 1 for a full M and f for a constant h;
`auroc_pixel` (Mann-Whitney, ties count 1/2, as `roc_auc_score`) is NaN for an empty or full M
and 0.5 for a constant h. `mask_fraction_scored` is f at the scoring resolution: the expected
`auprc`, `energy_in_mask` and `pointing_hit` of a map that ignores M (the caller's
`mask_fraction` is measured at native resolution).
NaN values are never dropped here; the caller counts them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from study import maps

# MetricsConfig field names (study/config.py) and their defaults (docs/STUDY.md §5, §9).
_DEFAULTS = {"ehr_thresholds": 100, "inputiba_min_heat": 0.1, "inputiba_quantiles": 10,
             "inputiba_cap": 0.99, "tuning_steps": 20}
_OTSU_BINS = 256  # skimage.filters.threshold_otsu's default

COLUMNS = maps.METRICS  # what score_batch computes per map: columns of every map dataset (study.maps)
IOU_CURVE = maps.IOU_CURVE  # score_batch's (B, K) IoU of {h >= t_k} at the tuning thresholds: not stored


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

def _codes(t: Any, dtype: np.dtype, strict: Any = False) -> np.ndarray:
    """Bits of the smallest `dtype` value >= t (> t where strict), for float64 t >= 0: h >= t iff
    bits(h) >= that. strict: a bool, or one per threshold (broadcast against t)."""
    t = np.asarray(t, np.float64)
    c = np.abs(t.astype(dtype))  # abs: -0.0 -> +0.0
    short = np.where(strict, c <= t, c < t)
    c = np.where(short, np.nextafter(c, dtype.type(np.inf)), c)
    return np.ascontiguousarray(c).view(_uint(dtype))


class _Sums(NamedTuple):
    """Pixel counts of {h >= t} and of its part in M, per image and threshold: (B, K) each."""

    count: np.ndarray
    n_mask: np.ndarray


class _Sorted:
    """Each image's heat in ascending order, and apart the heat of its pixels in M, sorted.

    Heat is held as its bit pattern: non-negative IEEE floats order like their bits, and unsigned
    integers sort faster than floats.
    """

    def __init__(self, h: np.ndarray, m: np.ndarray):
        self.dtype, self.pixels = h.dtype, h.shape[1]
        bits = h.view(_uint(h.dtype))
        self.heat = np.sort(bits, axis=1)
        inside = np.flatnonzero(m)  # by image, then pixel
        self.mask_end = np.searchsorted(inside, np.arange(1, len(h) + 1) * self.pixels)
        self.mask_count = np.diff(self.mask_end, prepend=0)
        self.mask_start = self.mask_end - self.mask_count
        self.inside = bits.ravel()[inside]  # one segment per image, sorted below
        for a, b in zip(self.mask_start, self.mask_end):
            self.inside[a:b].sort()

    @property
    def mask_fraction(self) -> np.ndarray:
        return self.mask_count / self.pixels

    def values(self, i: np.ndarray) -> np.ndarray:
        """Heat (float64) at sorted positions i (B, K), all < pixels."""
        return np.take_along_axis(self.heat, i, axis=1).view(self.dtype).astype(np.float64)

    @property
    def lowest(self) -> np.ndarray:
        return self.values(np.zeros((len(self.heat), 1), np.intp))[:, 0]

    @property
    def highest(self) -> np.ndarray:
        return self.values(np.full((len(self.heat), 1), self.pixels - 1))[:, 0]

    def first_at_least(self, t: Any, strict: Any = False) -> np.ndarray:
        """For thresholds t (B, K) or (K,) float64: each image's sorted position (B, K) of its
        first pixel with h >= t (> t where strict)."""
        c = np.broadcast_to(_codes(t, self.dtype, strict), (len(self.heat), np.shape(t)[-1]))
        return np.stack([np.searchsorted(x, q) for x, q in zip(self.heat, c)])

    def first_in_mask_at_least(self, t: Any, strict: Any = False) -> np.ndarray:
        """`first_at_least` among each image's pixels in M."""
        c = np.broadcast_to(_codes(t, self.dtype, strict), (len(self.heat), np.shape(t)[-1]))
        return np.stack([np.searchsorted(self.inside[a:b], q)
                         for a, b, q in zip(self.mask_start, self.mask_end, c)])

    def counts(self, i: np.ndarray, i_mask: np.ndarray) -> _Sums:
        """Counts from sorted positions (`first_at_least`, `first_in_mask_at_least`) on."""
        return _Sums(self.pixels - i, self.mask_count[:, None] - i_mask)

    def at_least(self, t: Any, strict: Any = False) -> _Sums:
        """Counts of {h >= t} ({h > t} where strict) and of its part in M."""
        return self.counts(self.first_at_least(t, strict), self.first_in_mask_at_least(t, strict))

    def heat_from(self, i: np.ndarray, i_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Heat sums (float64) from sorted positions i (B, K) on, over all pixels, and from
        i_mask on over those in M. Each row's positions start at 0 and do not decrease."""
        heat = self.heat.ravel().view(self.dtype)
        return (_suffix_sums(heat, i + self.pixels * np.arange(len(i))[:, None]),
                _suffix_sums(self.inside.view(self.dtype), i_mask + self.mask_start[:, None]))


def _suffix_sums(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums (float64) of x from flat positions `starts` (B, K) to the end of their row, where row b
    of x runs from starts[b, 0] to starts[b + 1, 0] (the last to the end of x)."""
    flat = starts.ravel()
    inner = flat < len(x)  # the others start at the end of x: empty
    s = flat[inner]
    pieces = np.zeros(flat.shape)
    if len(s):
        # one reduceat: the pieces between consecutive starts, the last of each row ending where
        # the next row starts; reduceat gives x[s_k] for an empty piece
        p = np.add.reduceat(x, s, dtype=np.float64)
        p[:-1][s[1:] == s[:-1]] = 0.0
        pieces[inner] = p
    return np.cumsum(pieces.reshape(starts.shape)[:, ::-1], axis=1)[:, ::-1]  # from the top down


def _sorted(h: Any, m: Any) -> _Sorted:
    return _Sorted(*_inputs(h, m))


def _divide(a: Any, b: Any) -> np.ndarray:
    """a / b with x/0 -> NaN, without warnings."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    return np.divide(a, b, out=np.full(a.shape, np.nan), where=b != 0)


# ---------------------------------------------------------------- metrics

def _totals(r: _Sorted) -> tuple[np.ndarray, np.ndarray]:
    """Heat sums (B,) over the image and over M."""
    start = np.zeros((len(r.heat), 1), np.intp)
    return tuple(x[:, 0] for x in r.heat_from(start, start))


def _diff_gradcam(r: _Sorted, heat: np.ndarray, inside: np.ndarray) -> np.ndarray:
    n_in = r.mask_count
    return _divide(inside, n_in) - _divide(heat - inside, r.pixels - n_in)


def diff_gradcam(h: Any, m: Any) -> np.ndarray:
    """mean(h inside M) - mean(h outside M) (the paper's metric); NaN when M is empty or full."""
    r = _sorted(h, m)
    return _diff_gradcam(r, *_totals(r))


def _energy_in_mask(heat: np.ndarray, inside: np.ndarray) -> np.ndarray:
    return _divide(inside, heat)


def energy_in_mask(h: Any, m: Any) -> np.ndarray:
    """Sum of h over M / sum of h; NaN for an all-zero h."""
    return _energy_in_mask(*_totals(_sorted(h, m)))


def _ehr_thresholds(n: int) -> np.ndarray:
    return np.arange(n + 1) / n  # t_k = k/n in float64


def _ehr_curves(s: _Sums, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    r = _sorted(h, m)
    return tuple(_ehr_auc(c, n) for c in _ehr_curves(r.at_least(_ehr_thresholds(n)), r.mask_fraction))


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


def _quantiles(r: _Sorted, start: np.ndarray, q: np.ndarray) -> np.ndarray:
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


def _inputiba_thresholds(r: _Sorted, n_kept: np.ndarray, min_heat: float, quantiles: int,
                         cap: float) -> np.ndarray:
    """InputIBA's thresholds (B, Q + 1), non-decreasing; n_kept (B,): |{h >= min_heat}|."""
    start = np.where(n_kept > 0, r.pixels - n_kept, 0)  # no kept heat: any valid tail; zeroed later
    q = np.linspace(0.0, 1.0, quantiles + 1)  # InputIBA: np.linspace(0, 1.0, 11)
    t = np.minimum(_quantiles(r, start, q), cap * r.highest[:, None])
    # InputIBA zeroes heat < min_heat before thresholding: its sets are {h >= max(t, min_heat)}
    return np.maximum(t, min_heat)


def _inputiba_curves(s: _Sums, heat: np.ndarray, heat_mask: np.ndarray, f: np.ndarray,
                     kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """s, heat, heat_mask (B, Q + 1): counts and heat sums of InputIBA's sets and of their parts
    in M; kept (B,): rows with heat >= min_heat."""
    count = np.maximum(s.count, 1)  # >= 1 on kept rows: t <= cap * max(h) <= max(h)
    ratio = heat_mask / count
    chance = f[:, None] * heat / count
    return ratio * kept[:, None], chance * kept[:, None]


def _inputiba_auc(curve: np.ndarray) -> np.ndarray:
    return np.trapezoid(curve, x=np.linspace(0.0, 1.0, curve.shape[1]), axis=1)


def _inputiba_oracle(nonempty: np.ndarray, quantiles: int) -> np.ndarray:
    return _inputiba_auc(np.ones((len(nonempty), quantiles + 1)) * nonempty[:, None])


def _inputiba(h: Any, m: Any, min_heat: float, quantiles: int,
              cap: float) -> tuple[np.ndarray, np.ndarray]:
    r = _sorted(h, m)
    n_kept = r.pixels - r.first_at_least(np.array([min_heat]))[:, 0]
    t = _inputiba_thresholds(r, n_kept, min_heat, quantiles, cap)
    i = r.first_at_least(t), r.first_in_mask_at_least(t)
    zero = np.zeros((len(n_kept), 1), np.intp)  # heat_from starts each row at 0
    heat, heat_mask = (x[:, 1:] for x in r.heat_from(*(np.hstack([zero, x]) for x in i)))
    curves = _inputiba_curves(r.counts(*i), heat, heat_mask, r.mask_fraction, n_kept > 0)
    return tuple(_inputiba_auc(c) for c in curves)


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


def _pointing_hit(top: _Sums, highest: np.ndarray) -> np.ndarray:
    """top: counts of {h >= max(h)}, the maximal pixels."""
    hit = top.n_mask[:, 0] / top.count[:, 0]
    return np.where(highest > 0, hit, np.nan)


def pointing_hit(h: Any, m: Any) -> np.ndarray:
    """Pointing game: is the argmax of h in M? Ties: the fraction of the maximal pixels that lie
    in M, i.e. the expected hit when ties are broken uniformly at random (0 or 1 for a unique
    maximum). NaN for an all-zero h."""
    r = _sorted(h, m)
    return _pointing_hit(r.at_least(r.highest[:, None]), r.highest)


def _otsu_edges(r: _Sorted) -> np.ndarray:
    """np.histogram's 256 bin edges over each image's [min, max] (float64, as np.linspace)."""
    lo, hi = r.lowest[:, None], r.highest[:, None]
    edges = np.arange(_OTSU_BINS + 1.0)[None, :] * ((hi - lo) / _OTSU_BINS) + lo
    edges[:, -1:] = hi
    return edges


def _otsu_thresholds(edges: np.ndarray, at_edges: np.ndarray) -> np.ndarray:
    """skimage.filters.threshold_otsu's algorithm: 256 bins over [min, max] (float64 edges, as
    np.histogram), threshold at the centre of the bin maximising the between-class variance.
    A constant image returns its value, so nothing lies above the threshold.
    at_edges: |{h >= edge}| for every edge."""
    count = at_edges.astype(np.float64)
    hist = count[:, :-1] - count[:, 1:]
    hist[:, -1] += count[:, -1]  # np.histogram's last bin is closed
    centres = (edges[:, :-1] + edges[:, 1:]) / 2
    w1, w2 = np.cumsum(hist, axis=1), np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 only on constant rows, replaced
        mean1 = np.cumsum(hist * centres, axis=1) / w1
        mean2 = (np.cumsum((hist * centres)[:, ::-1], axis=1) / w2[:, ::-1])[:, ::-1]
    between = w1[:, :-1] * w2[:, 1:] * (mean1[:, :-1] - mean2[:, 1:]) ** 2
    # bins 0 and 255 hold min and max, so w1, w2 > 0 and `between` is finite on other rows
    best = np.take_along_axis(centres, np.argmax(between, axis=1)[:, None], axis=1)[:, 0]
    lo, hi = edges[:, 0], edges[:, -1]
    return np.where(hi > lo, best, lo)


def _otsu(r: _Sorted) -> np.ndarray:
    edges = _otsu_edges(r)
    return _otsu_thresholds(edges, r.pixels - r.first_at_least(edges))


def otsu_threshold(h: Any) -> np.ndarray:
    """Per-image Otsu threshold of h (B, H, W) (see `_otsu_thresholds`)."""
    h = _heat(h)
    return _otsu(_sorted(h, np.zeros(h.shape, bool)))


def _iou_otsu(fg: _Sums, mask_count: np.ndarray) -> np.ndarray:
    """fg: counts of {h > Otsu threshold}."""
    both = fg.n_mask[:, 0]
    return _divide(both, fg.count[:, 0] + mask_count - both)


def iou_otsu(h: Any, m: Any) -> np.ndarray:
    """IoU of {h > Otsu threshold of h} with M; NaN when both are empty."""
    r = _sorted(h, m)
    return _iou_otsu(r.at_least(_otsu(r)[:, None], strict=True), r.mask_count)


def _pixel_ranking(r: _Sorted) -> tuple[np.ndarray, np.ndarray]:
    """(auprc, auroc_pixel) per image, exact with ties, from each mask pixel's place in the image's
    sorted heat: AP = mean over p in M of |{h >= h_p} ∩ M| / |{h >= h_p}| (scikit-learn's
    step-wise AP, each tie group counted once at its own precision); AUROC by the rank sum."""
    ap, auroc = np.full(len(r.heat), np.nan), np.full(len(r.heat), np.nan)
    for b, (start, end) in enumerate(zip(r.mask_start, r.mask_end)):
        x, p = r.inside[start:end], end - start  # the heat (bits) of M's pixels, ascending
        if p == 0:
            continue
        below = np.searchsorted(r.heat[b], x, "left")  # pixels with h < h_p
        at_most = np.searchsorted(r.heat[b], x, "right")  # pixels with h <= h_p
        ap[b] = np.mean((p - np.searchsorted(x, x, "left")) / (r.pixels - below))
        if p < r.pixels:  # sum over M of (negatives below + half the tied negatives) = this
            auroc[b] = (0.5 * (below.sum() + at_most.sum()) - 0.5 * p * p) / (p * (r.pixels - p))
    return ap, auroc


def auprc(h: Any, m: Any) -> np.ndarray:
    """Pixel average precision of h against M (chance: f); NaN for an empty M."""
    return _pixel_ranking(_sorted(h, m))[0]


def auroc_pixel(h: Any, m: Any) -> np.ndarray:
    """Pixel ROC AUC of h against M (chance: 0.5); NaN for an empty or full M."""
    return _pixel_ranking(_sorted(h, m))[1]


def tuning_thresholds(steps: int = 20) -> np.ndarray:
    """The thresholds an IoU threshold is tuned over: k/steps, k = 1..steps-1 (float64)."""
    return np.arange(1, steps) / steps


def _iou_curve(s: _Sums, mask_count: np.ndarray) -> np.ndarray:
    """IoU of {h >= t_k} with M, (B, K); NaN where both are empty."""
    return _divide(s.n_mask, s.count + mask_count[:, None] - s.n_mask)


def iou_curve(h: Any, m: Any, steps: int = 20) -> np.ndarray:
    """IoU of {h >= t} with M at every tuning threshold (B, steps - 1)."""
    r = _sorted(h, m)
    return _iou_curve(r.at_least(tuning_thresholds(steps)), r.mask_count)


# ---------------------------------------------------------------- all columns at once

def _config(cfg: Any) -> dict[str, Any]:
    return {k: v if cfg is None else getattr(cfg, k, v) for k, v in _DEFAULTS.items()}


class _BatchSets(NamedTuple):
    """The sets `score_batch` reads off the sorted heat, per image (rows)."""

    ehr: _Sums              # {h >= k/n}, k = 0..n
    top: _Sums              # {h >= max(h)}: the maximal pixels
    tuning: _Sums           # {h >= k/steps}, k = 1..steps-1 (the tuned-threshold grid)
    kept: np.ndarray        # (B,) bool: some heat >= InputIBA's min_heat
    inputiba: _Sums         # InputIBA's sets {h >= t_q}
    foreground: _Sums       # {h > Otsu threshold}
    heat: np.ndarray        # heat sums: column 0 over the image, then over InputIBA's sets
    heat_mask: np.ndarray   # the same over their parts in M


def _batch_sets(r: _Sorted, c: dict[str, Any]) -> _BatchSets:
    """Two rounds of searches: first the thresholds known from the heat's range (EHR's k/n, the
    maximum, min_heat, Otsu's bin edges, which need no mask counts), then those computed from
    the first round (InputIBA's quantiles of the kept heat, Otsu's threshold)."""
    n, min_heat, quantiles, rows = c["ehr_thresholds"], c["inputiba_min_heat"], c["inputiba_quantiles"], len(r.heat)
    edges, grid = _otsu_edges(r), tuning_thresholds(c["tuning_steps"])
    known = np.hstack([np.broadcast_to(_ehr_thresholds(n), (rows, n + 1)), r.highest[:, None],
                       np.full((rows, 1), min_heat), np.broadcast_to(grid, (rows, len(grid)))])
    width = known.shape[1]
    i = r.first_at_least(np.hstack([known, edges]))
    s = r.counts(i[:, :width], r.first_in_mask_at_least(known))
    n_kept = s.count[:, n + 2]
    t = np.hstack([_inputiba_thresholds(r, n_kept, min_heat, quantiles, c["inputiba_cap"]),
                   _otsu_thresholds(edges, r.pixels - i[:, width:])[:, None]])
    strict = np.arange(t.shape[1]) == quantiles + 1  # Otsu's foreground is h > t
    i, i_mask = r.first_at_least(t, strict), r.first_in_mask_at_least(t, strict)
    zero = np.zeros((rows, 1), np.intp)  # heat sums from position 0: the totals
    heat, heat_mask = r.heat_from(np.hstack([zero, i[:, :-1]]), np.hstack([zero, i_mask[:, :-1]]))
    return _BatchSets(ehr=_Sums(*(x[:, :n + 1] for x in s)), top=_Sums(*(x[:, n + 1:n + 2] for x in s)),
                      tuning=_Sums(*(x[:, n + 3:] for x in s)), kept=n_kept > 0, inputiba=r.counts(i[:, :-1], i_mask[:, :-1]),
                      foreground=r.counts(i[:, -1:], i_mask[:, -1:]), heat=heat, heat_mask=heat_mask)


def score_batch(h: Any, m: Any, cfg: Any = None) -> dict[str, np.ndarray]:
    """Every column of COLUMNS for a batch: float64 arrays (B,), `cam_all_zero` bool (B,); and
    IOU_CURVE, the (B, K) IoU at the tuning thresholds that `explain.tuning` picks one of.

    cfg: a MetricsConfig (ehr_thresholds, inputiba_min_heat, inputiba_quantiles, inputiba_cap,
    tuning_steps) or None for the docs/STUDY.md defaults. f = |M| / |image| (the EHR chance level's scale) is the
    caller's `mask_fraction` column; at the scoring resolution it is `mask_fraction(m)`.
    """
    c, r = _config(cfg), _sorted(h, m)
    n, f, sets = c["ehr_thresholds"], r.mask_fraction, _batch_sets(r, c)
    ehr, ehr_chance = (_ehr_auc(x, n) for x in _ehr_curves(sets.ehr, f))
    iba, iba_chance = (_inputiba_auc(x) for x in _inputiba_curves(
        sets.inputiba, sets.heat[:, 1:], sets.heat_mask[:, 1:], f, sets.kept))
    ehr_oracle = _ehr_oracle(f, n)
    iba_oracle = _inputiba_oracle(r.mask_count > 0, c["inputiba_quantiles"])
    heat, heat_mask, highest = sets.heat[:, 0], sets.heat_mask[:, 0], r.highest
    ap, auroc = _pixel_ranking(r)
    return {
        "diff_gradcam": _diff_gradcam(r, heat, heat_mask),
        "ehr_auc": ehr, "ehr_auc_chance": ehr_chance, "ehr_auc_oracle": ehr_oracle,
        "ehr_auc_norm": normalised(ehr, ehr_chance, ehr_oracle),
        "ehr_auc_inputiba": iba, "ehr_auc_inputiba_chance": iba_chance,
        "ehr_auc_inputiba_oracle": iba_oracle,
        "ehr_auc_inputiba_norm": normalised(iba, iba_chance, iba_oracle),
        "energy_in_mask": _energy_in_mask(heat, heat_mask),
        "pointing_hit": _pointing_hit(sets.top, highest),
        "iou_otsu": _iou_otsu(sets.foreground, r.mask_count),
        "auprc": ap, "auroc_pixel": auroc,
        "mask_fraction_scored": f,  # the chance level of auprc, energy_in_mask and pointing_hit
        "cam_all_zero": highest == 0,
        IOU_CURVE: _iou_curve(sets.tuning, r.mask_count),
    }
