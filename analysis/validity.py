"""Degenerate map sets (docs/STUDY.md §8): named, flagged and left out of every comparison.

A map set is one (model, seed, method, layer) of trained-model heatmaps. It is degenerate when
more than half of its maps are all-zero or constant (nothing to localise with), or when its
classifier is not shown to work: the run's test AUC 95% CI lower bound is at most 0.5, so its
maps explain nothing. Degenerate sets stay in the per-model tables, flagged with the reason,
and are left out of every model comparison, quoted chance level, sanity verdict and
conclusion. This module is the one place that decides it; everything else asks `excluded`.
"""

from __future__ import annotations

from typing import Optional

import pandas as pd

from analysis.prose import prose

EXCLUDED_COLUMNS = ["model", "seed", "method", "layer", "reason"]
WORKING_AUC_BOUND = 0.5  # a classifier whose AUC CI lower bound is <= this is not shown to work
MAX_FLAT_SHARE = 0.5  # more than this share of all-zero or constant maps: nothing to localise with


COPY_KEYS = ["randomization", "stages_randomized"]  # which randomised copy (explain.rows.Copy)


def degenerate_sets(cams: pd.DataFrame, test_metrics: pd.DataFrame, randomized: bool = False) -> pd.DataFrame:
    """One row per degenerate map set of the trained (or, with `randomized`, the randomised)
    maps, with every reason that applies joined by "; ". Randomised sets are told apart by their
    copy (COPY_KEYS: the twin, each cascade step, the label-permutation run). The classifier rule
    applies to trained maps only: a randomised copy has no classifier of its own to vouch for."""
    rows = cams[cams["randomized"] == randomized] if len(cams) else cams
    copies = COPY_KEYS if randomized and set(COPY_KEYS) <= set(rows.columns) else []
    columns = EXCLUDED_COLUMNS + copies
    if rows.empty:
        return pd.DataFrame(columns=columns)
    flat = _flat(rows)
    keys = [rows["model"].astype(str), rows["seed"], rows["cam_method"], _layers(rows), *(rows[k] for k in copies)]
    found = []
    for (model, seed, method, name, *copy), part in flat.groupby(keys, sort=False):
        reasons = []
        if part.sum() > MAX_FLAT_SHARE * len(part):
            reasons.append(f"{int(part.sum())} of {len(part)} maps are all-zero or constant")
        classifier = None if randomized else _classifier_problem(test_metrics, model, seed)
        if classifier:
            reasons.append(classifier)
        if reasons:
            found.append({"model": model, "seed": int(seed), "method": method, "layer": name,
                          **dict(zip(copies, copy)), "reason": "; ".join(reasons)})
    return pd.DataFrame(found, columns=columns)


def _flat(rows: pd.DataFrame) -> pd.Series:
    """Per map: all-zero or constant (`cam_constant`; stores scored before it existed have only
    `cam_all_zero`)."""
    if "cam_constant" in rows:
        return rows["cam_constant"].astype(bool)
    if "cam_all_zero" in rows:
        return rows["cam_all_zero"].astype(bool)
    return pd.Series(False, index=rows.index)


def _classifier_problem(test_metrics: pd.DataFrame, model: str, seed: int) -> Optional[str]:
    if test_metrics.empty or "auc_lo" not in test_metrics:
        return None
    run = test_metrics[(test_metrics["model"].astype(str) == model) & (test_metrics["seed"] == seed)]
    if run.empty or not (run["auc_lo"].iloc[0] <= WORKING_AUC_BOUND):
        return None
    auc, low, high = (float(run[c].iloc[0]) for c in ("auc", "auc_lo", "auc_hi"))
    return (f"classifier not shown to work (test AUC {prose(auc)} [{prose(low)}, {prose(high)}], CI lower bound "
            f"<= {WORKING_AUC_BOUND})")


def _layers(rows: pd.DataFrame) -> pd.Series:
    """Each row's layer (stores scored before `cam_layer` existed: one unnamed layer)."""
    return rows["cam_layer"] if "cam_layer" in rows else pd.Series("", index=rows.index)


def _set_keys(rows: pd.DataFrame) -> list[tuple]:
    return list(zip(rows["model"].astype(str), rows["seed"].astype(int), rows["cam_method"], _layers(rows)))


def without(rows: pd.DataFrame, excluded: pd.DataFrame) -> pd.DataFrame:
    """`rows` (CAM rows) minus every row of an excluded (model, seed, method, layer) set."""
    if excluded.empty or rows.empty:
        return rows
    keys = set(zip(excluded["model"], excluded["seed"].astype(int), excluded["method"], excluded["layer"]))
    drop = [key in keys for key in _set_keys(rows)]
    return rows[~pd.Series(drop, index=rows.index)]


def among(excluded: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """The excluded sets that `rows` hold (e.g. the paper's layer only, for the per-model tables)."""
    if excluded.empty or rows.empty:
        return excluded.iloc[0:0]
    present = set(_set_keys(rows))
    keep = [key in present for key in zip(excluded["model"], excluded["seed"].astype(int), excluded["method"],
                                          excluded["layer"])]
    return excluded[keep].reset_index(drop=True)


def flags_by_model(excluded: pd.DataFrame, method: Optional[str], seeds: dict[str, int]) -> pd.DataFrame:
    """model -> the text a per-model table shows: the reason, prefixed by its seeds when the
    model has several (`seeds`: model -> how many seeds were scored)."""
    part = excluded[excluded["method"] == method] if len(excluded) else excluded
    rows = []
    for model, sets in part.groupby("model", sort=False):
        several = seeds.get(model, 1) > 1
        rows.append({"model": model, "degenerate": "; ".join(
            (f"seed {r.seed}: " if several else "") + r.reason for r in sets.itertuples())})
    return pd.DataFrame(rows, columns=["model", "degenerate"])
