"""Classification metrics against published references: pROC on its aSAH data, Wilson by hand."""

import math

import numpy as np
import pandas as pd
import pytest

from tests.conftest import SHARED_DATA
from training.classification import (auc, classification_report, delong_ci, delong_paired, mcnemar_exact,
                                     wilson_ci)


@pytest.fixture(scope="module")
def asah():
    path = SHARED_DATA / "aSAH.csv"
    if not path.is_file():
        pytest.skip(f"{path} absent (it lives in the shared data folder)")
    data = pd.read_csv(path)
    return (data["outcome"] == "Poor").astype(int).to_numpy(), data


# pROC 1.18, tests/testthat/test-ci.auc.R and test-roc.test.R (roc(aSAH$outcome, aSAH$x), DeLong).
# ndka's interval is 0.5012-0.7227 there (not 0.5061-0.7179, which no DeLong computation gives).
@pytest.mark.parametrize("column, expected", [
    ("s100b", (0.7313685636856369, 0.6301182117616226, 0.8326189156096511)),
    ("wfns", (0.8236788617886179, 0.7485348878194529, 0.8988228357577830)),
    ("ndka", (0.611957994579946, 0.501244999271703, 0.722670989888189)),
])
def test_delong_ci_matches_proc(asah, column, expected):
    labels, data = asah
    assert delong_ci(labels, data[column]) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("a, b, z, p", [
    ("wfns", "s100b", 2.20898359144091, 0.0271757822291882),
    ("wfns", "ndka", 2.79777591868904, 0.00514557970691098),
    ("ndka", "s100b", -1.39077002573558, 0.164295175223054),
])
def test_delong_paired_matches_proc_roc_test(asah, a, b, z, p):
    labels, data = asah
    assert delong_paired(labels, data[a], data[b]) == pytest.approx((z, p), abs=1e-9)
    assert delong_paired(labels, data[b], data[a]) == pytest.approx((-z, p), abs=1e-9)


def test_delong_paired_of_identical_scores_is_null(asah):
    labels, data = asah
    assert delong_paired(labels, data["wfns"], data["wfns"]) == (0.0, 1.0)


def test_auc_counts_ties_as_half():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    assert math.isnan(auc([1, 1], [0.2, 0.3]))


def test_wilson_against_a_hand_computed_case():
    # k=8, n=10, z=1.959964: centre = (0.8 + z^2/20) / (1 + z^2/10) = 0.71674;
    # half = z/(1 + z^2/10) * sqrt(0.8*0.2/10 + z^2/400) = 0.22658  ->  [0.49016, 0.94332]
    lo, hi = wilson_ci(8, 10)
    assert (lo, hi) == pytest.approx((0.4901624715, 0.9433178485), abs=1e-9)
    assert wilson_ci(0, 10)[0] == 0.0 and wilson_ci(10, 10)[1] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in wilson_ci(0, 0))


def test_classification_report_counts_and_intervals():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    probabilities = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.2, 0.1, 0.4, 0.05, 0.5])
    report = classification_report(labels, probabilities, threshold=0.5)
    assert (report["tp"], report["fp"], report["tn"], report["fn"]) == (3, 2, 4, 1)
    assert report["accuracy"] == 0.7 and report["precision"] == 0.6 and report["recall"] == 0.75
    assert (report["accuracy_lo"], report["accuracy_hi"]) == pytest.approx(wilson_ci(7, 10))
    assert report["auc"] == pytest.approx(auc(labels, probabilities))
    for name in ("accuracy", "precision", "recall", "specificity", "auc"):
        assert report[f"{name}_lo"] <= report[name] <= report[f"{name}_hi"]
    assert math.isnan(classification_report([0, 1], [0.1, 0.2], threshold=0.9)["precision"])


def test_mcnemar_exact():
    correct_a = [1] * 10 + [1] * 8 + [0] * 2
    correct_b = [1] * 10 + [0] * 8 + [1] * 2
    only_a, only_b, p = mcnemar_exact(correct_a, correct_b)
    assert (only_a, only_b) == (8, 2)
    assert p == pytest.approx(0.109375)  # 2 * P(X <= 2), X ~ Binomial(10, 1/2) = 2 * 56/1024
