"""Equivalence, power and model-level bootstrap CIs (docs/STUDY.md §10).

"No significant difference" is not "the same". For every pair of models that the trusted
paired analysis does not separate, `equivalence_table` runs the paired two one-sided tests
(TOST, statsmodels `ttost_paired`) at the declared margin (`statistics.equivalence_margin`, in
the metric's units): equivalent when both one-sided nulls are rejected. For every pair it states
the minimum detectable difference: the mean paired difference a two-sided paired t-test over
these images would detect with the configured power (statsmodels `TTestPower.solve_power`
gives the standardised effect; times the SD of the paired differences). A pair that is neither
different nor equivalent is inconclusive, and its MDE says how large a difference went unseen.

`hierarchical_bootstrap` gives a model's mean its percentile CI by resampling what varies: the
training runs (seeds), then the images within each drawn run (Saravanan et al. 2020's
hierarchical bootstrap). No maintained library offers a two-level bootstrap over unequal groups
(scipy.stats.bootstrap resamples one level), so it is written here, vectorised and seeded.
"""

from __future__ import annotations

import itertools
import math
import zlib
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired

from analysis import stats

EQUIVALENCE_COLUMNS = ["group1", "group2", "n", "meandiff", "margin", "significant", "p_tost", "equivalent", "mde",
                       "verdict"]


def tost_paired(x: Sequence[float], y: Sequence[float], margin: float) -> float:
    """p of the paired TOST that mean(x - y) lies within (-margin, margin) (the larger of the
    two one-sided p values)."""
    return float(ttost_paired(np.asarray(x, float), np.asarray(y, float), -margin, margin)[0])


def tost_estimate(estimate: float, se: float, margin: float, df: float = math.inf) -> float:
    """p of the two one-sided tests that an estimate with standard error `se` (t on `df` degrees of
    freedom; normal when infinite) lies within (-margin, margin): equivalence when p < alpha."""
    if not (np.isfinite(estimate) and np.isfinite(se) and se > 0):
        return math.nan
    distribution = scipy_stats.norm if not np.isfinite(df) else scipy_stats.t(df)
    return float(max(distribution.sf((estimate + margin) / se), distribution.cdf((estimate - margin) / se)))


def minimum_detectable_difference(differences: Sequence[float], alpha: float, power: float) -> float:
    """The mean paired difference a two-sided paired t-test over these n pairs detects with
    `power` at `alpha`: the standardised effect from statsmodels, times the SD of the differences."""
    d = np.asarray(differences, float)
    d = d[np.isfinite(d)]
    if len(d) < 3 or not d.std(ddof=1) > 0:
        return math.nan
    effect = TTestPower().solve_power(effect_size=None, nobs=len(d), alpha=alpha, power=power,
                                      alternative="two-sided")
    return float(effect * d.std(ddof=1))


def equivalence_table(valid: pd.DataFrame, metric: str, comparison: dict[str, Any], margin: float,
                      alpha: float, power: float) -> pd.DataFrame:
    """Every pair of valid models on `metric`, paired over complete images (seed-averaged):
    whether the trusted analysis separates them, the TOST p at `margin` for those it does not,
    and the MDE for all."""
    wide = stats.complete_blocks(valid, metric)
    significant = {stats.pair_key(*pair.split(" vs ")) for pair in comparison.get("significant_pairs", [])}
    rows = []
    for a, b in itertools.combinations(wide.columns, 2):
        differ = stats.pair_key(a, b) in significant
        difference = (wide[b] - wide[a]).to_numpy()
        p = math.nan if differ or len(difference) < 3 else tost_paired(wide[b], wide[a], margin)
        equivalent = bool(p < alpha) if np.isfinite(p) else False
        rows.append({"group1": a, "group2": b, "n": len(difference), "meandiff": float(difference.mean()),
                     "margin": margin, "significant": differ, "p_tost": p, "equivalent": equivalent,
                     "mde": minimum_detectable_difference(difference, alpha, power),
                     "verdict": "differ" if differ else "equivalent" if equivalent else "inconclusive"})
    return pd.DataFrame(rows, columns=EQUIVALENCE_COLUMNS)


def hierarchical_bootstrap(groups: Sequence[np.ndarray], replicates: int, seed: int, alpha: float,
                           stream: str = "") -> tuple[float, float, float]:
    """(mean, lo, hi): the mean over every value of every group, and its percentile interval from
    `replicates` two-level resamples (groups with replacement, then each drawn group's values
    with replacement). `stream` names the quantity, so each gets its own reproducible draws."""
    groups = [np.asarray(g, float)[np.isfinite(np.asarray(g, float))] for g in groups]
    groups = [g for g in groups if len(g)]
    if not groups:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng([seed, zlib.crc32(stream.encode())])
    drawn = rng.integers(0, len(groups), (replicates, len(groups)))  # which group fills each slot
    total, count = np.zeros(replicates), np.zeros(replicates)
    for g, values in enumerate(groups):
        slots = np.flatnonzero(drawn.ravel() == g) // len(groups)  # the replicate of each draw of g
        if len(slots):
            picks = rng.integers(0, len(values), (len(slots), len(values)))
            np.add.at(total, slots, values[picks].sum(axis=1))
            np.add.at(count, slots, len(values))
    estimates = total / count
    mean = float(np.mean(np.concatenate(groups)))
    lo, hi = np.quantile(estimates, [alpha / 2, 1 - alpha / 2])
    return mean, float(lo), float(hi)
