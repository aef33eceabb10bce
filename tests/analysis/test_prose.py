"""analysis.prose: the one rounding rule of every number a generated sentence states."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis.prose import interval, prose


@pytest.mark.parametrize("value, text", [
    (0.123456, "0.123"), (0.0004567, "0.000457"), (12.345, "12.3"), (1234.5, "1.23e+03"),
    (7, "7"), (-0.98765, "-0.988"), (np.float32(0.5), "0.5"), (np.int64(3), "3"), (0.0, "0"),
])
def test_three_significant_digits(value, text):
    assert prose(value) == text


@pytest.mark.parametrize("value", [None, math.nan, np.nan, math.inf, -math.inf, np.float64("nan")])
def test_undefined_numbers_read_n_a(value):
    assert prose(value) == "n/a"


def test_interval_of_a_row_in_dict_and_series_form():
    row = {"auc": 0.91234, "auc_lo": 0.8766, "auc_hi": 0.95432, "other": 1.0}
    assert interval(row, "auc") == "0.912 [0.877, 0.954]"
    assert interval(pd.Series(row), "auc") == "0.912 [0.877, 0.954]"
    assert interval({"auc": 0.9, "auc_lo": math.nan, "auc_hi": None}, "auc") == "0.9 [n/a, n/a]"

