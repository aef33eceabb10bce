"""Classification metrics with confidence intervals (docs/STUDY.md §6).

Proportions (accuracy, precision, recall, specificity) get Wilson score intervals and paired
accuracies the exact McNemar test, both from statsmodels; the AUC gets DeLong's variance, computed
with the fast midrank algorithm of Sun & Xu (IEEE SPL 2014), which is what R's pROC uses. Checked
against pROC on its own `aSAH` data (tests/training/test_classification.py).
Labels are 0/1 with 1 = positive (pneumothorax); scores are larger for "more positive".
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

from study.config import StatisticsConfig

# the run's test-set intervals are made when it finishes, at the config's default level (a study's
# statistics.alpha applies to the analysis, which recomputes what it reports)
ALPHA = StatisticsConfig.alpha


def wilson_ci(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (statsmodels `proportion_confint`),
    clipped to [0, 1]; (nan, nan) when n == 0."""
    if n == 0:
        return math.nan, math.nan
    lo, hi = proportion_confint(k, n, alpha=alpha, method="wilson")
    return max(0.0, float(lo)), min(1.0, float(hi))


def auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count 1/2); nan unless both classes occur."""
    positives, negatives = _split(labels, scores)
    if len(positives) == 0 or len(negatives) == 0:
        return math.nan
    value, _, _ = _delong_components(positives[None], negatives[None])
    return float(value[0])


def delong_ci(labels: Any, scores: Any, alpha: float = ALPHA) -> tuple[float, float, float]:
    """(auc, lo, hi): the normal interval with DeLong's variance, clipped to [0, 1] as pROC does."""
    positives, negatives = _split(labels, scores)
    if len(positives) < 2 or len(negatives) < 2:
        return auc(labels, scores), math.nan, math.nan
    value, v10, v01 = _delong_components(positives[None], negatives[None])
    variance = np.var(v10, ddof=1) / v10.shape[1] + np.var(v01, ddof=1) / v01.shape[1]
    half = stats.norm.ppf(1 - alpha / 2) * math.sqrt(variance)
    return float(value[0]), max(0.0, value[0] - half), min(1.0, value[0] + half)


def delong_paired(labels: Any, scores_a: Any, scores_b: Any) -> tuple[float, float]:
    """DeLong's test for two correlated AUCs on the same cases: (z, two-sided p); z > 0 when a > b.

    Written out here because no maintained Python library holds DeLong's test (checked against pROC).
    """
    pos_a, neg_a = _split(labels, scores_a)
    pos_b, neg_b = _split(labels, scores_b)
    values, v10, v01 = _delong_components(np.stack([pos_a, pos_b]), np.stack([neg_a, neg_b]))
    covariance = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    if variance <= 0:  # identical scores (or a degenerate case): no evidence of a difference
        return 0.0, 1.0
    z = (values[0] - values[1]) / math.sqrt(variance)
    return float(z), float(2 * stats.norm.sf(abs(z)))


def mcnemar_exact(correct_a: Any, correct_b: Any) -> tuple[int, int, float]:
    """Exact McNemar test for paired accuracies (statsmodels `mcnemar(exact=True)`): (b, c,
    two-sided p), b = a right & b wrong; p = 1 when no pair is discordant."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return only_a, only_b, 1.0
    table = [[int(np.sum(a & b)), only_a], [only_b, int(np.sum(~a & ~b))]]
    return only_a, only_b, float(mcnemar(table, exact=True).pvalue)


def classification_report(labels: Any, probabilities: Any, threshold: float,
                          alpha: float = ALPHA) -> dict[str, float | int]:
    """Counts, accuracy/precision/recall/specificity (Wilson) and AUC (DeLong), each with lo/hi.

    A case is predicted positive when its probability is >= threshold (the study's
    `training.threshold`: the caller passes it). Undefined values (e.g. precision with no
    predicted positives) are nan.
    """
    y = np.asarray(labels).astype(int)
    p = np.asarray(probabilities, dtype=np.float64)
    predicted = p >= threshold
    tp = int(np.sum(predicted & (y == 1)))
    fp = int(np.sum(predicted & (y == 0)))
    tn = int(np.sum(~predicted & (y == 0)))
    fn = int(np.sum(~predicted & (y == 1)))
    report: dict[str, float | int] = {"n": len(y), "n_positive": int(np.sum(y == 1)), "threshold": threshold,
                                      "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for name, k, n in (("accuracy", tp + tn, len(y)), ("precision", tp, tp + fp),
                       ("recall", tp, tp + fn), ("specificity", tn, tn + fp)):
        report[name] = k / n if n else math.nan
        report[f"{name}_lo"], report[f"{name}_hi"] = wilson_ci(k, n, alpha)
    report["auc"], report["auc_lo"], report["auc_hi"] = delong_ci(y, p, alpha)
    return report


def _split(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be 1-D and the same length")
    return s[y == 1], s[y == 0]


def _delong_components(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sun & Xu's fast DeLong: AUCs (k,), and structural components V10 (k, m), V01 (k, n).

    positives: (k, m) scores of the m positive cases under k classifiers; negatives: (k, n).
    """
    m, n = positives.shape[1], negatives.shape[1]
    tx = stats.rankdata(positives, axis=1)  # midranks within positives
    ty = stats.rankdata(negatives, axis=1)
    tz = stats.rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return aucs, v10, v01
