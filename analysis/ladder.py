"""The baseline ladder (docs/STUDY.md §9): every metric from chance to the oracle on one axis.

    chance -> image-only -> location prior -> each model's weight-randomised map -> each model's
    Grad-CAM -> oracle (h = M)

Chance and the oracle are analytic per image (below); the image-only map and the prior are the
`baselines/` rows; the models' rows are the paper's layer (`final_layer`) of the primary CAM
method. Every rung is a mean over images with a 95% t-interval (per-image scores averaged over
seeds first). For each valid model `beats_prior` asks the decisive question for lesions of a few
percent of the image: does its map beat a map that only knows where lesions usually are, paired
over the same images (mean difference with its CI, Wilcoxon signed-rank p, Holm across models)?
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from analysis import stats

# The ladder's metrics and their chance level: a constant, "f" (|M| / |image| at the scoring size:
# the expected score of a map that ignores M, and exactly the score of a constant map), or None
# where no analytic chance exists. Every oracle (h = M) scores 1, except the paper's EHR AUC,
# whose oracle is 1 - (1 - f) / (2n) (its `ehr_auc_oracle` column).
F = "mask_fraction_scored"
CHANCE: dict[str, Any] = {"diff_gradcam": 0.0, "ehr_auc": F, "auprc": F, "auroc_pixel": 0.5, "energy_in_mask": F,
                          "pointing_hit": F, "iou_tuned": None}
RUNGS = ("chance", "image_only", "prior", "randomized", "gradcam", "oracle")
LADDER_COLUMNS = ["metric", "rung", "model", "n", "mean", "lo", "hi", "degenerate"]
PRIOR_COLUMNS = ["model", "metric", "n", "cam", "prior", "difference", "lo", "hi", "p", "p_holm", "p_tost",
                 "beats_prior", "verdict"]
# docs/STUDY.md §11: ROAD's rungs are per model (every control is scored by the model's classifier), in
# order from no information to the model's own map; chance and oracle have no analytic ROAD value
ROAD_RUNGS = ("random", "image_only", "prior", "blurred", "randomized", "gradcam")
ROAD_METRIC = "road_gap"


def metrics_present(rows: pd.DataFrame, baselines: pd.DataFrame) -> list[str]:
    """The ladder metrics these rows carry (stores scored before a metric existed lack it)."""
    needed = {F, "ehr_auc_oracle"}
    if not needed <= set(rows.columns):
        return []
    return [m for m in CHANCE if m in rows and (baselines.empty or m in baselines)]


def chance_level(metric: str, per_image: pd.DataFrame) -> Optional[pd.Series]:
    level = CHANCE[metric]
    if level is None:
        return None
    return per_image[F] if level == F else pd.Series(float(level), index=per_image.index)


def oracle_level(metric: str, per_image: pd.DataFrame) -> pd.Series:
    return per_image["ehr_auc_oracle"] if metric == "ehr_auc" else pd.Series(1.0, index=per_image.index)


def _image_means(rows: pd.DataFrame, metric: str) -> pd.Series:
    return rows.astype({metric: float}).groupby("image_id")[metric].mean()


def _rung(metric: str, rung: str, model: str, values: pd.Series, alpha: float, degenerate: str = "") -> dict:
    mean, lo, hi = stats.mean_ci(values, alpha)
    return {"metric": metric, "rung": rung, "model": model, "n": int(np.isfinite(values.to_numpy(float)).sum()),
            "mean": mean, "lo": lo, "hi": hi, "degenerate": degenerate}


def ladder_table(trained: pd.DataFrame, randomized: pd.DataFrame, baselines: pd.DataFrame, flags: dict[str, str],
                 alpha: float) -> pd.DataFrame:
    """One row per (metric, rung, model): `trained` and `randomized` are the primary method's
    paper-layer rows (every model; `flags` names the degenerate ones), `baselines` the baselines/
    rows. Chance and oracle are taken over the images the baselines scored (all positive test
    images), or the models' images when there are no baselines."""
    images = baselines if len(baselines) else trained
    per_image = images.drop_duplicates("image_id").set_index("image_id")
    rows = []
    for metric in metrics_present(trained, baselines):
        chance = chance_level(metric, per_image)
        if chance is not None:
            rows.append(_rung(metric, "chance", "", chance, alpha))
        for name in ("image_only", "prior"):
            part = baselines[baselines["model"] == name] if len(baselines) else baselines
            if len(part):
                rows.append(_rung(metric, name, "", _image_means(part, metric), alpha))
        for rung, frame in (("randomized", randomized), ("gradcam", trained)):
            for model, part in frame.groupby("model", observed=True, sort=False):
                rows.append(_rung(metric, rung, str(model), _image_means(part, metric), alpha,
                                  flags.get(str(model), "") if rung == "gradcam" else ""))
        rows.append(_rung(metric, "oracle", "", oracle_level(metric, per_image), alpha))
    return pd.DataFrame(rows, columns=LADDER_COLUMNS)


def beats_prior(valid: pd.DataFrame, baselines: pd.DataFrame, alpha: float,
                margin: Optional[float] = None) -> pd.DataFrame:
    """Per valid model and ladder metric: CAM minus location prior, paired over the images both
    scored (mean difference, 95% t-interval, Wilcoxon signed-rank p, Holm across models, and the
    paired TOST p at `margin` where one is given)."""
    prior = baselines[baselines["model"] == "prior"] if len(baselines) else baselines
    if prior.empty or valid.empty:
        return pd.DataFrame(columns=PRIOR_COLUMNS)
    frames = []
    for metric in metrics_present(valid, prior):
        reference = _image_means(prior, metric)
        rows = [paired_row(str(model), metric, _image_means(part, metric), reference, alpha, margin)
                for model, part in valid.groupby("model", observed=True, sort=False)]
        frame = pd.DataFrame(rows)
        frame["p_holm"] = stats.holm(frame["p"])
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    significant = table["p_holm"] < alpha
    table["beats_prior"] = significant & (table["difference"] > 0)
    table["verdict"] = np.select([table["beats_prior"], significant & (table["difference"] < 0)],
                                 ["beats the prior", "below the prior"], "not distinguishable from the prior")
    return table[PRIOR_COLUMNS]


def paired_row(model: str, metric: str, cam: pd.Series, prior: pd.Series, alpha: float,
               margin: Optional[float] = None) -> dict:
    """A model's per-image scores against a reference's (indexed by image), over the images both
    scored: mean difference with its t interval, Wilcoxon signed-rank p, paired TOST p at `margin`."""
    from analysis.equivalence import tost_paired

    both = pd.concat([cam.rename("cam"), prior.rename("prior")], axis=1, join="inner").dropna()
    difference = (both["cam"] - both["prior"]).to_numpy()
    mean, lo, hi = stats.mean_ci(difference, alpha)
    p = stats.wilcoxon(difference)[1] if len(difference) else math.nan
    p_tost = tost_paired(both["cam"], both["prior"], margin) if margin is not None and len(both) >= 3 else math.nan
    return {"model": model, "metric": metric, "n": len(both), "cam": float(both["cam"].mean()) if len(both) else math.nan,
            "prior": float(both["prior"].mean()) if len(both) else math.nan, "difference": mean, "lo": lo, "hi": hi,
            "p": p, "p_tost": p_tost}


def road_ladder(trained: pd.DataFrame, randomized: pd.DataFrame, controls: Mapping[str, pd.DataFrame],
                flags: dict[str, str], alpha: float) -> pd.DataFrame:
    """The ROAD rungs (docs/STUDY.md §11) per model, in ROAD_RUNGS order: each control's `road_gap`
    (`controls`: control name -> rows whose `model` is the classifier that scored them), the
    weight-randomised twin's and the model's own; mean and 95% CI over images (seed-averaged)."""
    frames = {**controls, "randomized": randomized, "gradcam": trained}
    rows = []
    for model in stats.levels(trained["model"]) if len(trained) else []:
        for rung in ROAD_RUNGS:
            frame = frames.get(rung)
            part = frame[frame["model"].astype(str) == str(model)] if frame is not None and len(frame) else None
            if part is None or part.empty or ROAD_METRIC not in part or part[ROAD_METRIC].isna().all():
                continue
            rows.append(_rung(ROAD_METRIC, rung, str(model), _image_means(part, ROAD_METRIC), alpha,
                              flags.get(str(model), "")))
    return pd.DataFrame(rows, columns=LADDER_COLUMNS)
