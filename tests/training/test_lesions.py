"""training.lesions: the lesion covariates (regions, elongation) on masks with known answers."""

import math

import numpy as np
import pytest

from training.lesions import COLUMNS, lesion_covariates


def canvas(size: int = 32) -> np.ndarray:
    return np.zeros((size, size), bool)


def test_an_empty_mask_has_no_regions_and_no_elongation():
    regions, elongation = lesion_covariates(canvas())
    assert regions == 0 and math.isnan(elongation)
    assert COLUMNS == ("n_regions", "elongation")


@pytest.mark.parametrize("length", [1, 2, 7, 20])
def test_a_k_by_1_line_has_elongation_k(length):
    mask = canvas()
    mask[5, 3:3 + length] = True
    assert lesion_covariates(mask) == (1, pytest.approx(length))
    assert lesion_covariates(mask.T) == (1, pytest.approx(length))  # a non-contiguous view, turned 90°


@pytest.mark.parametrize("rows, cols", [(3, 12), (10, 5), (4, 4)])
def test_an_a_by_b_rectangle_has_elongation_a_over_b(rows, cols):
    mask = canvas()
    mask[2:2 + rows, 6:6 + cols] = True
    assert lesion_covariates(mask.astype(np.uint8)) == (1, pytest.approx(max(rows, cols) / min(rows, cols)))


def test_regions_are_8_connected_and_elongation_is_area_weighted():
    mask = canvas()
    for i in range(5):
        mask[10 + i, 10 + i] = True  # a diagonal: one region through corners
    assert lesion_covariates(mask)[0] == 1
    mask = canvas()
    mask[1, 1:7] = True  # a 6 x 1 line: area 6, elongation 6
    mask[20:22, 20:22] = True  # a 2 x 2 square: area 4, elongation 1
    assert lesion_covariates(mask) == (2, pytest.approx((6 * 6 + 4 * 1) / 10))


def test_a_disc_is_round_and_the_answer_does_not_depend_on_position():
    rows, cols = np.mgrid[:64, :64]
    disc = (rows - 30) ** 2 + (cols - 25) ** 2 <= 12 ** 2
    regions, elongation = lesion_covariates(disc)
    assert regions == 1 and elongation == pytest.approx(1.0, abs=0.02)
    assert lesion_covariates(np.roll(disc, (7, 11), axis=(0, 1))) == (1, pytest.approx(elongation))
