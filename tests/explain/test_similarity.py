"""Map similarity measures (explain/similarity.py) against scipy, scikit-image and naive sets."""

import math

import numpy as np
import pytest
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

from explain import similarity as S


def maps(seed=0, b=5, size=20):
    rng = np.random.default_rng(seed)
    a = rng.random((b, size, size))
    a[1] = np.round(a[1] * 4) / 4  # ties
    a[2] = 0.0  # constant
    b_ = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    return a.astype(np.float16), b_.astype(np.float16)


def test_spearman_equals_scipy_with_ties_and_nan_for_a_constant_map():
    a, b = maps()
    got = S.spearman(a, b)
    for i in range(len(a)):
        expected = spearmanr(a[i].ravel().astype(float), b[i].ravel().astype(float)).statistic
        if i == 2:
            assert math.isnan(got[i])
        else:
            assert got[i] == pytest.approx(expected, rel=1e-12)


def test_ssim_is_scikit_images():
    a, b = maps(1)
    expected = [structural_similarity(x.astype(float), y.astype(float), data_range=1.0) for x, y in zip(a, b)]
    np.testing.assert_allclose(S.ssim(a, b), expected, rtol=0, atol=0)


def test_top10_iou_against_a_naive_set_and_self_similarity_is_one():
    a, b = maps(2)
    for i in range(len(a)):
        flat_a, flat_b = a[i].ravel().astype(float), b[i].ravel().astype(float)
        k = math.ceil(0.1 * flat_a.size)
        set_a = flat_a >= np.sort(flat_a)[::-1][k - 1]
        set_b = flat_b >= np.sort(flat_b)[::-1][k - 1]
        assert S.top_iou(a, b)[i] == pytest.approx((set_a & set_b).sum() / (set_a | set_b).sum())
    assert S.top_set(a)[2].all()  # a flat map: every pixel ties at its top value
    same = S.similarity(a, a)
    np.testing.assert_array_equal(same["ssim_to_trained"], 1.0)
    np.testing.assert_array_equal(same["top10_iou_to_trained"], 1.0)
    assert np.isnan(same["spearman_to_trained"][2]) and np.allclose(np.delete(same["spearman_to_trained"], 2), 1.0)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="one shape"):
        S.spearman(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


def test_prepared_pairs_equal_each_function_and_take_selects_maps():
    a, b = maps(3, b=6, size=24)
    pa_, pb = S.Prepared(a), S.Prepared(b)
    found = S.compare(pa_.take([4, 1]), pb.take([4, 1]))
    np.testing.assert_array_equal(found["ssim_to_trained"], S.ssim(a[[4, 1]], b[[4, 1]]))
    np.testing.assert_array_equal(found["spearman_to_trained"], S.spearman(a[[4, 1]], b[[4, 1]]))
    np.testing.assert_array_equal(found["top10_iou_to_trained"], S.top_iou(a[[4, 1]], b[[4, 1]]))
    with pytest.raises(ValueError, match="one shape"):
        S.compare(pa_.take([0]), pb.take([0, 1]))
