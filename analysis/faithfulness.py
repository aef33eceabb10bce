"""Are the maps faithful to the model and robust to noise? (docs/STUDY.md §11): the tables.

- `faithfulness.csv` / `robustness.csv` (`model_table`): per model at the paper's layer, each
  score's mean with its CI: one seed, the t interval over images; several seeds, the hierarchical
  bootstrap (seeds, then images within seeds; `analysis.equivalence.hierarchical_bootstrap`), as
  scores.parquet's model rows. Degenerate map sets stay in with their reason (`degenerate`).
- `faithfulness_pairs.csv` / `robustness_pairs.csv` (`pairs_table`): per valid model, its map
  against each reference, paired over images (seed-averaged over the model's valid seeds): the
  location prior, its own blurred copy, a seeded random map, the image-only map (the controls of
  controls/, scored by the model's classifier) and the weight-randomised twin (sanity/), by
  `road_gap`; the twin by `max_sensitivity`. Mean difference with its 95% t interval, Wilcoxon
  signed-rank p with Holm across models per reference (the machinery of `ladder.beats_prior`),
  the paired TOST p at `statistics.equivalence_margin`, and the verdict (`verdict`).

A study scored before these columns existed has none of them: every table here is then absent,
and the profile (`analysis.profile`) says the dimension was not measured.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import pandas as pd

from analysis import stats
from analysis.equivalence import hierarchical_bootstrap
from analysis.ladder import _image_means, paired_row
from study.maps import CONTROL_SEPARATOR, CONTROLS

FAITHFULNESS_METRICS = ("road_gap", "road_morf", "road_lerf")
ROBUSTNESS_METRICS = ("max_sensitivity", "ssim_perturbed", "sensitivity_kept")
TWIN = "randomized"  # the weight-randomised twin's maps (sanity/, randomization "full") as a reference
# the references each dimension's map is compared with, in the order the tables list them
FAITHFULNESS_REFERENCES = ("prior", "blurred", "random", "image_only", TWIN)
ROBUSTNESS_REFERENCES = (TWIN,)
# which way is better for each per-image score the §11 tables and the depth trend read
HIGHER_IS_BETTER = {"road_gap": True, "max_sensitivity": False, "auprc": True, "diff_gradcam": True,
                    "ssim_to_trained": False}  # ssim_to_trained of a weight-randomised map: lower passes the check
PAIR_COLUMNS = ["model", "reference", "metric", "n", "cam", "reference_mean", "difference", "lo", "hi", "p", "p_holm",
                "p_tost", "margin", "verdict"]

# verdicts (docs/STUDY.md §11): read from the CI and its test, never from a point estimate
YES, WORSE, SAME, UNSURE, NOT_MEASURED = "yes", "no: worse", "no difference", "inconclusive", "not measured"


def measured(rows: Optional[pd.DataFrame], column: str) -> bool:
    """Whether `rows` carry `column` with at least one value (old stores lack it; NaN: not scored)."""
    return rows is not None and len(rows) > 0 and column in rows and bool(rows[column].notna().any())


def verdict(lo: float, hi: float, p_adjusted: float, p_tost: float, alpha: float,
            higher_is_better: bool = True) -> str:
    """A paired difference (map minus reference) read as "is the map better?": YES only when the
    (multiplicity-adjusted) test rejects and the 95% CI lies wholly on the better side of 0; WORSE
    likewise on the other side; SAME when the paired TOST shows the difference within the margin;
    else UNSURE (neither shown: the CI and the margin together say how large a difference went unseen)."""
    significant = bool(np.isfinite(p_adjusted) and p_adjusted < alpha)
    above, below = bool(np.isfinite(lo) and lo > 0), bool(np.isfinite(hi) and hi < 0)
    better, worse = (above, below) if higher_is_better else (below, above)
    if significant and better:
        return YES
    if significant and worse:
        return WORSE
    if np.isfinite(p_tost) and p_tost < alpha:
        return SAME
    return UNSURE


def level_verdict(lo: float, hi: float, line: float, higher_is_better: bool = True) -> str:
    """A level against a fixed line (AUC against 0.5, the ROAD gap against 0): YES when the CI lies
    wholly on the better side, WORSE wholly on the other, else UNSURE."""
    above, below = bool(np.isfinite(lo) and lo > line), bool(np.isfinite(hi) and hi < line)
    better, worse = (above, below) if higher_is_better else (below, above)
    return YES if better else WORSE if worse else UNSURE


def model_interval(part: pd.DataFrame, metric: str, alpha: float, replicates: int,
                   seed: int) -> tuple[float, float, float, str]:
    """(mean, lo, hi, how) of one model's `metric` (one method, one layer): the t interval over
    images with one seed, the hierarchical bootstrap over seeds and images with several, drawn from
    the same stream as scores.parquet's model row (`tables.model_scores`), so both give one CI."""
    values = part.dropna(subset=[metric])
    if values["seed"].nunique() > 1:
        layer = str(values["cam_layer"].iloc[0]) if "cam_layer" in values else ""
        stream = f"{values['model'].astype(str).iloc[0]}|{values['cam_method'].iloc[0]}|{layer}|{metric}"
        groups = [g[metric].astype(float).to_numpy() for _, g in values.groupby("seed")]
        mean, lo, hi = hierarchical_bootstrap(groups, replicates, seed, alpha, stream=stream)
        return mean, lo, hi, f"hierarchical bootstrap (seeds, then images), {replicates} replicates"
    mean, lo, hi = stats.mean_ci(values.groupby("image_id")[metric].mean(), alpha)
    return mean, lo, hi, "t interval over images"


def model_table(trained: pd.DataFrame, models: pd.DataFrame, metrics: tuple[str, ...], alpha: float,
                replicates: int, seed: int) -> pd.DataFrame:
    """Per model (every map set of the paper's layer; `degenerate` is added by the caller): images,
    seeds and each measured metric's mean and CI (`model_interval`). Empty when none is measured."""
    present = [m for m in metrics if measured(trained, m)]
    if not present:
        return pd.DataFrame()
    rows = []
    for model, part in trained.groupby("model", observed=True):
        scored = part.dropna(subset=present, how="all")
        if scored.empty:
            continue
        row = {"model": str(model), "n": int(scored["image_id"].nunique()), "seeds": int(scored["seed"].nunique())}
        for metric in present:
            row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"], how = model_interval(
                scored, metric, alpha, replicates, seed)
        rows.append({**row, "ci_method": how})
    return models.merge(pd.DataFrame(rows), on="model", how="inner") if rows else pd.DataFrame()


def control_rows(controls: pd.DataFrame, method: Optional[str] = None) -> dict[str, pd.DataFrame]:
    """controls/ rows by control (study.maps.CONTROLS), each with `model` the classifier that scored
    it (the part after CONTROL_SEPARATOR); where the controls carry several CAM methods (a blurred
    copy of each), those of `method`."""
    if controls is None or controls.empty:
        return {}
    name, _, model = controls["model"].astype(str).str.partition(CONTROL_SEPARATOR).T.to_numpy()
    rows = controls.assign(control=name, model=model)
    if "final_layer" in rows:  # a layer-free control (prior, random) may leave it null: it belongs to the paper's layer
        rows = rows[rows["final_layer"].astype(object).where(rows["final_layer"].notna(), True).astype(bool)]
    found = {}
    for control in CONTROLS:
        part = rows[rows["control"] == control]
        if method is not None and part["cam_method"].nunique() > 1 and (part["cam_method"] == method).any():
            part = part[part["cam_method"] == method]
        if len(part):
            found[control] = part
    return found


def pairs_table(valid: pd.DataFrame, references: Mapping[str, pd.DataFrame], metric: str, alpha: float,
                margin: float) -> pd.DataFrame:
    """Per reference (in the order given) and valid model: the model's map minus the reference,
    paired over images, each side averaged over the model's valid seeds (`paired_row`), Holm
    across the models of each reference, and the verdict."""
    if not measured(valid, metric):
        return pd.DataFrame(columns=PAIR_COLUMNS)
    seeds = valid[["model", "seed"]].drop_duplicates()
    seeds = seeds.assign(model=seeds["model"].astype(str))
    frames = []
    for name, reference in references.items():
        if not measured(reference, metric):
            continue
        kept = reference.assign(model=reference["model"].astype(str)).merge(seeds, on=["model", "seed"])
        rows = [paired_row(str(model), metric, _image_means(part, metric),
                           _image_means(kept[kept["model"] == str(model)], metric), alpha, margin)
                for model, part in valid.dropna(subset=[metric]).groupby("model", observed=True, sort=True)
                if (kept["model"] == str(model)).any()]
        if rows:
            frames.append(pd.DataFrame(rows).assign(reference=name))
    if not frames:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    for frame in frames:
        frame["p_holm"] = stats.holm(frame["p"])
    table = pd.concat(frames, ignore_index=True).rename(columns={"prior": "reference_mean"})
    better = HIGHER_IS_BETTER.get(metric, True)
    table["margin"] = margin
    table["verdict"] = [verdict(r.lo, r.hi, r.p_holm, r.p_tost, alpha, better) for r in table.itertuples()]
    return table[PAIR_COLUMNS]


def references(valid: pd.DataFrame, controls: pd.DataFrame, twin: pd.DataFrame, method: Optional[str],
               names: tuple[str, ...]) -> dict[str, pd.DataFrame]:
    """The reference rows of each name in `names`: a control's rows, or the twin's (TWIN)."""
    found = {**control_rows(controls, method), TWIN: twin}
    return {name: found[name] for name in names if name in found and len(found[name])}


def not_measured_reason(trained: pd.DataFrame, metric: str) -> str:
    """Why a dimension has no numbers: the column is absent (a study scored before it), or empty."""
    if trained is None or trained.empty:
        return "no scored maps"
    if metric not in trained:
        return f"the map datasets have no {metric} column: they were scored before it existed"
    return f"{metric} is not scored at the paper's layer (the dimension is off in this study's config)"

