"""Localisation metrics (explain/metrics.py) against hand-computed cases and naive loops."""

import numpy as np
import pytest
import torch

from explain import metrics as M
from study.config import MetricsConfig

NAN = float("nan")


# ---------------------------------------------------------------- naive references

def naive_ehr(h, m, n=100):
    """docs/STUDY.md §5 literally: a loop over t_k = k/n, compared in float64."""
    h = h.astype(np.float64)
    r = []
    for t in np.arange(n + 1) / n:
        s = h >= t
        r.append((s & m).sum() / s.sum() if s.any() else 0.0)
    return np.trapezoid(r, dx=1.0 / n)


def naive_inputiba(h, m, min_heat=0.1, quantiles=10, cap=0.99):
    """InputIBA's EffectiveHeatRatios.evaluate, on float64, with the empty-kept case as 0."""
    heat = h.astype(np.float64).copy()
    poi = heat >= min_heat
    if not poi.any():
        return 0.0
    heat[~poi] = 0.0
    qs = np.linspace(0, 1.0, quantiles + 1)
    ratios = []
    for q in qs:
        t = min(np.quantile(heat[poi], q), heat.max() * cap)
        b = heat >= t
        ratios.append(heat[b & m].sum() / b.sum())
    return np.trapezoid(ratios, qs)


def naive_otsu(h):
    """skimage.filters.threshold_otsu's algorithm on float64 input."""
    h = h.astype(np.float64).ravel()
    if np.all(h == h[0]):
        return h[0]
    hist, edges = np.histogram(h, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w1, w2 = np.cumsum(hist), np.cumsum(hist[::-1])[::-1]
    mean1 = np.cumsum(hist * centres) / w1
    mean2 = (np.cumsum((hist * centres)[::-1]) / w2[::-1])[::-1]
    return centres[np.argmax(w1[:-1] * w2[1:] * (mean1[:-1] - mean2[1:]) ** 2)]


def naive_auprc(h, m):
    """Average precision as scikit-learn defines it: the distinct heat values from the top down as
    thresholds, AP = sum over them of (recall step) x (precision there)."""
    h, m = h.astype(np.float64).ravel(), m.ravel()
    if not m.any():
        return NAN
    ap, recall_before = 0.0, 0.0
    for t in np.unique(h)[::-1]:
        chosen = h >= t
        recall = (chosen & m).sum() / m.sum()
        ap += (recall - recall_before) * (chosen & m).sum() / chosen.sum()
        recall_before = recall
    return ap


def naive_auroc(h, m):
    """Probability that a random mask pixel outranks a random other pixel, ties counting 1/2."""
    h, m = h.astype(np.float64).ravel(), m.ravel()
    if m.all() or not m.any():
        return NAN
    inside, outside = h[m][:, None], h[~m][None, :]
    return ((inside > outside).sum() + 0.5 * (inside == outside).sum()) / (inside.size * outside.size)


def naive_iou_curve(h, m, steps=20):
    """IoU of {h >= k/steps} with M, k = 1..steps-1, one threshold at a time."""
    h = h.astype(np.float64)
    return [((h >= t) & m).sum() / ((h >= t) | m).sum() if ((h >= t) | m).any() else NAN
            for t in np.arange(1, steps) / steps]


def naive_row(h, m):
    """Every other metric, one image at a time."""
    h = h.astype(np.float64)
    fg = h > naive_otsu(h)
    top = h == h.max()
    return {
        "diff_gradcam": h[m].mean() - h[~m].mean() if 0 < m.sum() < m.size else NAN,
        "energy_in_mask": h[m].sum() / h.sum() if h.any() else NAN,
        "pointing_hit": (top & m).sum() / top.sum() if h.any() else NAN,
        "iou_otsu": (fg & m).sum() / (fg | m).sum() if (fg | m).any() else NAN,
        "auprc": naive_auprc(h, m), "auroc_pixel": naive_auroc(h, m), "mask_fraction_scored": m.mean(),
    }


def random_batch(rng, b=6, size=24, float64=False):
    """Heatmaps with many values exactly on thresholds k/100, on k/8, ties, zeros and ones."""
    dtype = np.float64 if float64 else np.float32
    kinds = [rng.random((size, size)),
             rng.integers(0, 101, (size, size)) / 100,  # exactly k/100 in float64
             rng.integers(0, 9, (size, size)) / 8,  # exact in float32 too
             np.where(rng.random((size, size)) < 0.5, 0.0, rng.random((size, size))),
             np.clip(rng.normal(0.5, 0.4, (size, size)), 0, 1),
             rng.integers(0, 3, (size, size)) / 2]
    h = np.stack([kinds[i % len(kinds)] for i in range(b)]).astype(dtype)
    m = rng.random((b, size, size)) < rng.uniform(0.02, 0.6, (b, 1, 1))
    return h, m


# ---------------------------------------------------------------- hand-computed cases

H2 = np.array([[[1.0, 0.5], [0.25, 0.0]]], np.float32)
M2 = np.array([[[True, False], [False, False]]])


def test_hand_computed_2x2():
    assert M.diff_gradcam(H2, M2)[0] == pytest.approx(1 - 0.75 / 3)
    assert M.energy_in_mask(H2, M2)[0] == pytest.approx(1 / 1.75)
    assert M.pointing_hit(H2, M2)[0] == 1.0
    # n = 4: t = 0, .25, .5, .75, 1 -> r = 1/4, 1/3, 1/2, 1, 1
    ehr = 0.25 * (0.125 + 1 / 3 + 1 / 2 + 1 + 0.5)
    assert M.ehr_auc(H2, M2, n=4)[0] == pytest.approx(ehr)
    assert M.ehr_auc_chance(H2, M2, n=4)[0] == pytest.approx(0.25)  # f at every t: max(h) = 1
    assert M.ehr_auc_oracle(M2, n=4)[0] == pytest.approx(0.90625)  # 1 - (1 - f)/(2n)
    assert M.normalised(ehr, 0.25, 0.90625) == pytest.approx(5 / 9)
    # InputIBA, q = 0, .5, 1: kept {1, .5, .25}; t = .25, .5, min(1, .99) -> r = 1/3, 1/2, 1
    assert M.ehr_auc_inputiba(H2, M2, quantiles=2)[0] == pytest.approx(0.5 * (1 / 6 + 1 / 2 + 1 / 2))
    chance = 0.5 * (0.25 * 1.75 / 3 / 2 + 0.25 * 1.5 / 2 + 0.25 / 2)  # f * mean heat above t
    assert M.ehr_auc_inputiba_chance(H2, M2, quantiles=2)[0] == pytest.approx(chance)
    assert M.ehr_auc_inputiba_oracle(M2, quantiles=2)[0] == pytest.approx(1.0)
    # Otsu: {0, .25, .5} | {1} maximises w1 w2 (m1 - m2)^2; threshold = centre of bin 128
    assert M.otsu_threshold(H2)[0] == pytest.approx(128.5 / 256)
    assert M.iou_otsu(H2, M2)[0] == 1.0
    assert M.iou_otsu(H2, np.array([[[False, True], [False, False]]]))[0] == 0.0


def test_hand_computed_3x3():
    h = np.array([[[0.0, 0.2, 0.4], [0.6, 0.8, 1.0], [1.0, 0.2, 0.0]]])
    m = np.array([[[0, 0, 0], [0, 1, 1], [0, 0, 0]]], bool)
    assert M.diff_gradcam(h, m)[0] == pytest.approx(0.9 - 2.4 / 7)
    assert M.energy_in_mask(h, m)[0] == pytest.approx(1.8 / 4.2)
    assert M.pointing_hit(h, m)[0] == pytest.approx(0.5)  # two pixels at 1.0, one in M
    # n = 2: t = 0 (all 9: 2/9), .5 (.6 .8 1 1: 2/4), 1 (1 1: 1/2)
    assert M.ehr_auc(h, m, n=2)[0] == pytest.approx(0.5 * (1 / 9 + 0.5 + 0.25))
    assert M.ehr_auc_chance(h, m, n=2)[0] == pytest.approx(2 / 9)


def test_pointing_ties_and_unique_max():
    h = np.array([[[1.0, 1.0], [0.0, 0.0]], [[0.3, 0.9], [0.9, 0.9]]], np.float32)
    m = np.array([[[1, 0], [0, 0]], [[1, 0], [0, 0]]], bool)
    np.testing.assert_array_equal(M.pointing_hit(h, m), [0.5, 0.0])


# ---------------------------------------------------------------- edge cases

def test_empty_mask():
    h = np.array([[[0.9, 0.2], [0.4, 0.0]]], np.float32)
    m = np.zeros_like(h, bool)
    s = M.score_batch(h, m, MetricsConfig(ehr_thresholds=4, inputiba_quantiles=2))
    assert np.isnan(s["diff_gradcam"][0])
    for k in ("ehr_auc", "ehr_auc_chance", "ehr_auc_oracle", "ehr_auc_inputiba",
              "ehr_auc_inputiba_chance", "ehr_auc_inputiba_oracle", "energy_in_mask",
              "pointing_hit", "iou_otsu"):
        assert s[k][0] == 0.0, k
    assert np.isnan(s["ehr_auc_norm"][0]) and np.isnan(s["ehr_auc_inputiba_norm"][0])


def test_mask_covers_everything():
    h = np.array([[[0.9, 0.2], [0.4, 0.0]]], np.float32)
    s = M.score_batch(h, np.ones_like(h, bool))
    assert np.isnan(s["diff_gradcam"][0])
    assert s["energy_in_mask"][0] == 1.0 and s["pointing_hit"][0] == 1.0
    assert s["ehr_auc"][0] == pytest.approx(s["ehr_auc_chance"][0])
    assert s["ehr_auc_norm"][0] == pytest.approx(0.0)
    assert s["ehr_auc_inputiba_norm"][0] == pytest.approx(0.0)


def test_all_zero_heatmap():
    h = np.zeros((1, 4, 4), np.float32)
    m = np.zeros((1, 4, 4), bool)
    m[0, :2, :2] = True  # f = 1/4
    s = M.score_batch(h, m, MetricsConfig(ehr_thresholds=10))
    assert s["cam_all_zero"][0]
    assert np.isnan(s["energy_in_mask"][0]) and np.isnan(s["pointing_hit"][0])
    assert s["diff_gradcam"][0] == 0.0
    assert s["ehr_auc"][0] == pytest.approx(0.25 / 20)  # only t = 0 non-empty: f/(2n)
    assert s["ehr_auc_chance"][0] == pytest.approx(0.25 / 20)
    assert s["ehr_auc_norm"][0] == pytest.approx(0.0)
    assert s["ehr_auc_inputiba"][0] == 0.0 and s["ehr_auc_inputiba_chance"][0] == 0.0
    assert s["ehr_auc_inputiba_norm"][0] == 0.0
    assert s["iou_otsu"][0] == 0.0


def test_empty_threshold_sets_give_zero_ratio():
    # max(h) = 0.3: every t > 0.3 has an empty set, r = 0 there
    h = np.full((1, 3, 3), 0.3)
    m = np.zeros((1, 3, 3), bool)
    m[0, 0, 0] = True
    n = 10
    expected = np.trapezoid([1 / 9] * 4 + [0.0] * 7, dx=0.1)
    assert M.ehr_auc(h, m, n)[0] == pytest.approx(expected)


def test_oracle_and_constant_map():
    rng = np.random.default_rng(1)
    m = rng.random((4, 16, 16)) < np.array([0.03, 0.2, 0.5, 0.9])[:, None, None]
    h = m.astype(np.float32)
    s = M.score_batch(h, m)
    np.testing.assert_allclose(s["ehr_auc"], s["ehr_auc_oracle"], rtol=0, atol=1e-15)
    np.testing.assert_allclose(s["ehr_auc_oracle"], 1 - (1 - m.mean(axis=(1, 2))) / 200)
    np.testing.assert_allclose(s["ehr_auc_norm"], 1.0)
    np.testing.assert_allclose(s["ehr_auc_inputiba"], 1.0)
    np.testing.assert_allclose(s["ehr_auc_inputiba_norm"], 1.0)
    for c in (1.0, 0.55, 0.2):  # a constant map is uninformative: ehr = chance
        s = M.score_batch(np.full(m.shape, c, np.float32), m)
        np.testing.assert_allclose(s["ehr_auc"], s["ehr_auc_chance"], rtol=1e-12)
        np.testing.assert_allclose(s["ehr_auc_inputiba"], s["ehr_auc_inputiba_chance"], rtol=1e-12)
        np.testing.assert_allclose(s["ehr_auc_norm"], 0.0, atol=1e-12)
    s = M.score_batch(np.ones(m.shape, np.float32), m)
    np.testing.assert_allclose(s["ehr_auc_chance"], m.mean(axis=(1, 2)))  # constant 1: f


def test_chance_is_the_permutation_expectation():
    rng = np.random.default_rng(2)
    h = rng.random((1, 12, 12)) ** 3
    m = np.zeros((1, 12, 12), bool)
    m[0, 2:6, 3:9] = True
    perms = np.stack([rng.permutation(h.ravel()).reshape(h.shape[1:]) for _ in range(4000)])
    mm = np.broadcast_to(m, perms.shape)
    assert M.ehr_auc(perms, mm).mean() == pytest.approx(M.ehr_auc_chance(h, m)[0], rel=0.02)
    assert M.ehr_auc_inputiba(perms, mm).mean() == pytest.approx(
        M.ehr_auc_inputiba_chance(h, m)[0], rel=0.02)


# ---------------------------------------------------------------- vectorised = naive

@pytest.mark.parametrize("float64", [False, True])
@pytest.mark.parametrize("n", [100, 7])
def test_ehr_equals_naive_loop_exactly(float64, n):
    rng = np.random.default_rng(3)
    h, m = random_batch(rng, b=12, float64=float64)
    expected = [naive_ehr(a, b, n) for a, b in zip(h, m)]
    np.testing.assert_array_equal(M.ehr_auc(h, m, n), expected)


@pytest.mark.parametrize("float64", [False, True])
def test_inputiba_equals_original(float64):
    rng = np.random.default_rng(4)
    h, m = random_batch(rng, b=12, float64=float64)
    h[5] = 0.05  # nothing kept
    for min_heat, quantiles in ((0.1, 10), (0.0, 4), (0.5, 7)):
        expected = [naive_inputiba(a, b, min_heat, quantiles) for a, b in zip(h, m)]
        got = M.ehr_auc_inputiba(h, m, min_heat=min_heat, quantiles=quantiles)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_other_metrics_equal_naive():
    rng = np.random.default_rng(5)
    h, m = random_batch(rng, b=12)
    h[3] = 0.0
    m[4] = False
    m[5] = True
    s = M.score_batch(h, m)
    for b in range(len(h)):
        for k, v in naive_row(h[b], m[b]).items():
            np.testing.assert_allclose(s[k][b], v, rtol=1e-12, atol=1e-15, err_msg=f"{k}[{b}]")
    np.testing.assert_array_equal(M.otsu_threshold(h), [naive_otsu(a) for a in h])


def test_score_batch_matches_functions_and_config():
    rng = np.random.default_rng(6)
    h, m = random_batch(rng, b=5)
    cfg = MetricsConfig(ehr_thresholds=20, inputiba_min_heat=0.2, inputiba_quantiles=5,
                        inputiba_cap=0.95)
    s = M.score_batch(torch.from_numpy(h), torch.from_numpy(m), cfg)
    assert set(s) == {*M.COLUMNS, M.IOU_CURVE}
    assert all(s[k].shape == (5,) for k in M.COLUMNS) and s[M.IOU_CURVE].shape == (5, 19)
    iba = dict(min_heat=0.2, quantiles=5, cap=0.95)
    for k, v in {
        "diff_gradcam": M.diff_gradcam(h, m), "ehr_auc": M.ehr_auc(h, m, 20),
        "ehr_auc_chance": M.ehr_auc_chance(h, m, 20), "ehr_auc_oracle": M.ehr_auc_oracle(m, 20),
        "ehr_auc_inputiba": M.ehr_auc_inputiba(h, m, **iba),
        "ehr_auc_inputiba_chance": M.ehr_auc_inputiba_chance(h, m, **iba),
        "ehr_auc_inputiba_oracle": M.ehr_auc_inputiba_oracle(m, 5),
        "energy_in_mask": M.energy_in_mask(h, m), "pointing_hit": M.pointing_hit(h, m),
        "iou_otsu": M.iou_otsu(h, m), "auprc": M.auprc(h, m), "auroc_pixel": M.auroc_pixel(h, m),
        M.IOU_CURVE: M.iou_curve(h, m),
    }.items():
        np.testing.assert_array_equal(s[k], v, err_msg=k)
    np.testing.assert_array_equal(
        s["ehr_auc_norm"], M.normalised(s["ehr_auc"], s["ehr_auc_chance"], s["ehr_auc_oracle"]))


def test_torch_low_precision_and_negative_zero():
    rng = np.random.default_rng(7)
    h, m = random_batch(rng, b=3)
    for low in (torch.float16, torch.bfloat16):  # scored as their exact float32 values
        t = torch.from_numpy(h).to(low)
        got = M.score_batch(t, torch.from_numpy(m).to(torch.uint8))
        ref = M.score_batch(t.float().numpy(), m)
        for k in M.COLUMNS:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    z = h.copy()
    z[:, 0, 0] = -0.0  # its sign bit must not sort it above 1.0
    np.testing.assert_array_equal(M.ehr_auc(z, m), M.ehr_auc(np.abs(z), m))


def test_bad_inputs_raise():
    h = np.zeros((1, 2, 2), np.float32)
    m = np.zeros((1, 2, 2), bool)
    with pytest.raises(ValueError, match="one shape"):
        M.score_batch(h, m[:, :1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.score_batch(h + 1.5, m)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.score_batch(h - 0.1, m)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.score_batch(np.full((1, 2, 2), np.nan, np.float32), m)
    with pytest.raises(ValueError, match="0/1"):
        M.score_batch(h, np.full((1, 2, 2), 0.5))


# ---------------------------------------------------------------- values on the thresholds

def test_float32_values_on_ehr_thresholds_and_one():
    """float32(k/n) lies just below or above the float64 threshold k/n; 1.0 is the last one."""
    rng = np.random.default_rng(8)
    for n in (100, 7, 20):
        k = rng.integers(0, n + 1, (6, 16, 16))
        k[:, 0, 0] = n  # h = 1
        h = (k / n).astype(np.float32)
        m = rng.random(h.shape) < 0.3
        assert np.any(h != k / n)  # float32 rounding puts these on one side of k/n
        expected = [naive_ehr(a, b, n) for a, b in zip(h, m)]
        np.testing.assert_array_equal(M.ehr_auc(h, m, n), expected)
        s = M.score_batch(h, m, MetricsConfig(ehr_thresholds=n))
        np.testing.assert_array_equal(s["ehr_auc"], expected)


def test_pixels_on_otsu_edges_and_centres():
    """Pixels on a bin edge count in the upper bin; pixels on the threshold (a bin centre) are
    not in {h > t}."""
    rng = np.random.default_rng(9)
    lo, hi = 0.125, 0.875  # dyadic: the edges (even j) and centres (odd j) below are exact
    j = np.concatenate([np.arange(513), rng.integers(0, 513, 63)])  # every edge and centre
    h = (np.arange(513.0)[np.stack([rng.permutation(j) for _ in range(4)])] * ((hi - lo) / 512)
         + lo).reshape(4, 24, 24)
    m = rng.random(h.shape) < 0.4
    t = M.otsu_threshold(h)
    np.testing.assert_array_equal(t, [naive_otsu(a) for a in h])
    assert all(np.any(a == x) for a, x in zip(h, t))  # pixels lie on the thresholds
    for iou in (M.iou_otsu(h, m), M.score_batch(h, m)["iou_otsu"]):
        np.testing.assert_array_equal(iou, [naive_row(a, b)["iou_otsu"] for a, b in zip(h, m)])


def test_inputiba_quantiles_on_pixel_values():
    """21 kept values: most quantiles q = k/10 are pixel values (with ties), the others a hair
    above one ((n - 1) q is not always integral in float64); 12 kept values: between them."""
    rng = np.random.default_rng(10)
    h = np.zeros((4, 3, 7), np.float32)
    h[:2] = rng.choice(np.array([0.1, 0.25, 0.25, 0.5, 0.75, 1.0], np.float32), (2, 3, 7))
    h[2:] = 0.05
    h[2].flat[:12] = rng.choice(np.array([0.125, 0.5, 0.5, 0.625], np.float32), 12)
    h[3].flat[:12] = np.linspace(0.1, 1.0, 12, dtype=np.float32)
    m = rng.random(h.shape) < 0.5
    qs = np.linspace(0, 1, 11)
    on_values = [np.isin(np.quantile(a[a >= 0.1].astype(np.float64), qs), a).sum() for a in h[:2]]
    assert min(on_values) >= 8
    for got in (M.ehr_auc_inputiba(h, m), M.score_batch(h, m)["ehr_auc_inputiba"]):
        np.testing.assert_allclose(got, [naive_inputiba(a, b) for a, b in zip(h, m)],
                                   rtol=1e-12, atol=1e-15)


def test_batch_mixing_empty_full_and_single_pixel_masks():
    """Each image scores as it does alone, whatever its batch-mates' masks and heat hold."""
    rng = np.random.default_rng(11)
    h, _ = random_batch(rng, b=7)
    m = np.zeros(h.shape, bool)
    m[1] = True
    m[3, 2, 5] = True
    m[4, :3] = True
    m[6, 5:9, 5:9] = True  # images 0, 2 and 5 have empty masks
    h[2] = 0.05  # no kept heat in the middle of the batch ...
    h[6] *= 0.09  # ... and in the last image
    s = M.score_batch(h, m)
    for b in range(len(h)):
        alone = M.score_batch(h[b:b + 1], m[b:b + 1])
        for k in M.COLUMNS:
            np.testing.assert_array_equal(s[k][b], alone[k][0], err_msg=f"{k}[{b}]")
        for k, v in naive_row(h[b], m[b]).items():
            np.testing.assert_allclose(s[k][b], v, rtol=1e-12, atol=1e-15, err_msg=f"{k}[{b}]")
        assert s["ehr_auc"][b] == naive_ehr(h[b], m[b])
        assert s["ehr_auc_inputiba"][b] == pytest.approx(naive_inputiba(h[b], m[b]),
                                                         rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------- threshold-free and tuned-threshold metrics (docs/STUDY.md §9)

@pytest.mark.parametrize("float64", [False, True])
def test_auprc_and_auroc_equal_naive_definitions_with_ties(float64):
    rng = np.random.default_rng(12)
    h, m = random_batch(rng, b=12, float64=float64)  # ties: k/100, k/8, halves, zeros
    for b in range(len(h)):
        assert M.auprc(h, m)[b] == pytest.approx(naive_auprc(h[b], m[b]), rel=1e-12, abs=1e-15)
        assert M.auroc_pixel(h, m)[b] == pytest.approx(naive_auroc(h[b], m[b]), rel=1e-12, abs=1e-15)


def test_auprc_and_auroc_equal_scikit_learn():
    """An independent, maintained implementation of both (tie-aware step AP, Mann-Whitney AUC)."""
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn (installed with grad-cam) is absent")
    rng = np.random.default_rng(13)
    h, m = random_batch(rng, b=6, size=40)
    for b in range(len(h)):
        assert M.auprc(h, m)[b] == pytest.approx(metrics.average_precision_score(m[b].ravel(), h[b].ravel()),
                                                 rel=1e-12)
        assert M.auroc_pixel(h, m)[b] == pytest.approx(metrics.roc_auc_score(m[b].ravel(), h[b].ravel()),
                                                       rel=1e-12)


def test_auprc_and_auroc_edge_cases():
    m = np.zeros((4, 5, 5), bool)
    m[0, 1:3, 1:4] = True  # f = 6/25
    m[1] = True
    m[3, 0, 0] = True
    h = np.zeros((4, 5, 5), np.float32)
    h[3] = 0.4  # constant, one mask pixel
    s = M.score_batch(h, m)
    assert s["auprc"][0] == pytest.approx(6 / 25) and s["auroc_pixel"][0] == 0.5  # all-zero map: chance
    assert s["auprc"][1] == 1.0 and np.isnan(s["auroc_pixel"][1])  # full mask
    assert np.isnan(s["auprc"][2]) and np.isnan(s["auroc_pixel"][2])  # empty mask
    assert s["auprc"][3] == pytest.approx(1 / 25) and s["auroc_pixel"][3] == 0.5  # constant map
    np.testing.assert_array_equal(s["mask_fraction_scored"], m.mean(axis=(1, 2)))
    oracle = M.score_batch(m[[0, 3]].astype(np.float32), m[[0, 3]])
    np.testing.assert_array_equal(oracle["auprc"], 1.0)
    np.testing.assert_array_equal(oracle["auroc_pixel"], 1.0)


def test_iou_curve_equals_naive_thresholding():
    rng = np.random.default_rng(14)
    h, m = random_batch(rng, b=10)
    h[2] = 0.0
    m[3] = False
    for steps in (20, 7):
        got = M.score_batch(h, m, MetricsConfig(tuning_steps=steps))[M.IOU_CURVE]
        np.testing.assert_allclose(got, [naive_iou_curve(a, b, steps) for a, b in zip(h, m)], rtol=0, atol=1e-15)
    assert M.tuning_thresholds(20)[0] == 0.05 and len(M.tuning_thresholds(20)) == 19
