"""Are the maps themselves reliable? (STUDY.md §10): the cascade, its pass line, and stability.

- **Cascade** (`cascade_table`): the similarity (Spearman, SSIM, top-10% IoU; `explain.similarity`)
  of each cascade step's map to the trained map of the same image, mean and 95% CI over images
  per (model, step). Step 0 is the untouched copy (similarity 1 unless the copy was not restored).
- **Pass line** (`pass_lines`, Arun et al. 2021): the mean similarity of trained maps of
  `sanity.pass_line_pairs` random pairs of different images (seeded; the same pairs for every
  model). A randomised map passes the sanity check when it is shown to be less similar to the
  trained map than two unrelated images' maps are: the CI's upper bound lies below the line.
  Arun et al. define it for SSIM; the same construction is given for every measure.
- **Stability** (`stability_table`): for every pair of runs, the similarity of their maps of the
  same image over the images both scored: repeatability (one architecture, two seeds) and
  reproducibility (two architectures).

Every comparison reads the maps as stored (the paper's layer, the primary CAM method).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from analysis import stats
from analysis.inputs import read_heatmaps
from explain.similarity import MEASURES, similarity

CASCADE_COLUMNS = ["model", "stages_randomized", "randomized_from", "measure", "n", "mean", "lo", "hi", "pass_line",
                   "passes", "degenerate"]
STABILITY_COLUMNS = ["model_a", "seed_a", "model_b", "seed_b", "kind", "measure", "n", "mean", "lo", "hi"]
PAIR_SEED = 0  # the pass line's image pairs: the same for every model and every rerun


def pass_lines(study_dir: str | Path, trained: pd.DataFrame, method: str, pairs: int) -> pd.DataFrame:
    """model -> mean similarity (per measure) of its trained maps of `pairs` random pairs of
    different images (its first seed; the images every model scored, so all use the same pairs)."""
    common = sorted(set.intersection(*(set(part["image_id"]) for _, part in trained.groupby("model", observed=True))))
    if len(common) < 2:
        return pd.DataFrame(columns=["model", *MEASURES])
    rng = np.random.default_rng(PAIR_SEED)
    first = rng.integers(0, len(common), pairs)
    second = (first + rng.integers(1, len(common), pairs)) % len(common)  # never the same image
    rows = []
    for model, part in trained.groupby("model", observed=True, sort=False):
        maps = read_heatmaps(study_dir, str(model), int(part["seed"].min()), common, method)
        a = np.stack([maps[common[i]] for i in first])
        b = np.stack([maps[common[j]] for j in second])
        found = similarity(a, b)
        rows.append({"model": str(model), **{m: float(np.nanmean(found[c])) for m, c in MEASURES.items()}})
    return pd.DataFrame(rows)


def cascade_table(sanity: pd.DataFrame, lines: pd.DataFrame, flags: dict[str, str],
                  alpha: float = stats.ALPHA) -> pd.DataFrame:
    """One row per (model, cascade step, measure): mean and CI over images (seed-averaged), the
    pass line and whether the step is shown to lie below it."""
    rows = sanity[sanity["randomization"] == "cascade"] if "randomization" in sanity else sanity.iloc[0:0]
    if rows.empty:
        return pd.DataFrame(columns=CASCADE_COLUMNS)
    line = lines.set_index("model") if len(lines) else pd.DataFrame()
    found = []
    keys = ["model", "stages_randomized", "randomized_from"]
    for (model, step, unit), part in rows.groupby(keys, observed=True, sort=False):
        for measure, column in MEASURES.items():
            values = part.groupby("image_id")[column].mean()
            mean, lo, hi = stats.mean_ci(values, alpha)
            level = float(line.loc[str(model), measure]) if str(model) in line.index else math.nan
            found.append({"model": str(model), "stages_randomized": int(step), "randomized_from": unit,
                          "measure": measure, "n": int(values.notna().sum()), "mean": mean, "lo": lo, "hi": hi,
                          "pass_line": level, "passes": bool(hi < level) if np.isfinite(hi) and np.isfinite(level)
                          else False, "degenerate": flags.get(str(model), "")})
    return pd.DataFrame(found, columns=CASCADE_COLUMNS).sort_values(["model", "measure", "stages_randomized"],
                                                                     kind="stable").reset_index(drop=True)


def cascade_verdicts(cascade: pd.DataFrame) -> pd.DataFrame:
    """Per valid model: the SSIM of the fully randomised step against the pass line, and the
    first step whose SSIM is shown below it (None: never)."""
    ssim = cascade[(cascade["measure"] == "ssim") & (cascade["degenerate"] == "")]
    rows = []
    for model, part in ssim.groupby("model", sort=False):
        part = part.sort_values("stages_randomized")
        passing = part[part["passes"]]
        last = part.iloc[-1]
        rows.append({"model": model, "full_ssim": last["mean"], "full_lo": last["lo"], "full_hi": last["hi"],
                     "pass_line": last["pass_line"], "passes": bool(last["passes"]),
                     "first_step_below": int(passing["stages_randomized"].iloc[0]) if len(passing) else None,
                     "first_unit_below": passing["randomized_from"].iloc[0] if len(passing) else None})
    return pd.DataFrame(rows)


def stability_table(study_dir: str | Path, trained: pd.DataFrame, method: str,
                    alpha: float = stats.ALPHA) -> pd.DataFrame:
    """Every pair of runs (model, seed) of `trained` (the paper's layer, one method): the mean
    similarity of their maps of the same image, over the images both scored, with its CI."""
    runs = trained[["model", "seed"]].drop_duplicates().astype({"model": str}).itertuples(index=False)
    images = {(m, int(s)): sorted(trained.loc[(trained["model"].astype(str) == m) & (trained["seed"] == s), "image_id"])
              for m, s in runs}
    maps = {run: read_heatmaps(study_dir, run[0], run[1], ids, method) for run, ids in images.items()}
    found = []
    for a, b in itertools.combinations(sorted(maps, key=_order(trained)), 2):
        common = sorted(set(maps[a]) & set(maps[b]))
        if not common:
            continue
        values = similarity(np.stack([maps[a][i] for i in common]), np.stack([maps[b][i] for i in common]))
        kind = "repeatability" if a[0] == b[0] else "reproducibility"
        for measure, column in MEASURES.items():
            mean, lo, hi = stats.mean_ci(values[column], alpha)
            found.append({"model_a": a[0], "seed_a": a[1], "model_b": b[0], "seed_b": b[1], "kind": kind,
                          "measure": measure, "n": int(np.isfinite(values[column]).sum()), "mean": mean, "lo": lo,
                          "hi": hi})
    return pd.DataFrame(found, columns=STABILITY_COLUMNS)


def _order(trained: pd.DataFrame):
    order = {str(m): i for i, m in enumerate(stats.levels(trained["model"]))}
    return lambda run: (order.get(run[0], len(order)), run[1])


def stability_summary(stability: pd.DataFrame, measure: str = "ssim") -> Optional[dict[str, Any]]:
    """Mean repeatability (same architecture, different seeds) beside mean reproducibility (two
    architectures) for one measure (None for a kind without pairs); None without any pair."""
    part = stability[stability["measure"] == measure]
    if part.empty:
        return None
    kinds = part.groupby("kind")["mean"].mean()
    return {"measure": measure, **{kind: float(kinds[kind]) if kind in kinds.index else None
                                   for kind in ("repeatability", "reproducibility")},
            "pairs": {k: int(v) for k, v in part.groupby("kind").size().items()}}
