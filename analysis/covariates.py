"""Lesion covariates (docs/STUDY.md §9): does localisation depend on the lesion more than on the model?

`covariate_model` fits `score ~ C(model) + log10(f) + n_regions + log(elongation) + probability
+ (1 | image)` (statsmodels MixedLM, REML, images as groups) on the valid map sets of the paper's
layer: the covariates' effects are estimated beside the model effects, within images. f is the
lesion's share of the image at native resolution, n_regions its connected components, elongation
its area-weighted axis ratio (training.lesions), probability the model's predicted probability.
`size_bins` gives each model's mean score per lesion-size quartile for the figure (Saporta et al.
2022: smaller, more complex lesions localise worse).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats as scipy_stats

TERMS = {"log10_mask_fraction": "log10 of the lesion's share of the image",
         "n_regions": "connected regions of the mask",
         "log_elongation": "log of the area-weighted major/minor axis ratio",
         "probability": "predicted probability of pneumothorax"}
COVARIATE_METRICS = ("diff_gradcam", "auprc")
TERM_COLUMNS = ["metric", "term", "meaning", "estimate", "se", "lower", "upper", "p", "n", "images"]
MIN_IMAGES = 8  # fewer images cannot separate four covariates from the model effects


def design(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The model's columns: y, model, image and the covariates (rows lacking one left out)."""
    frame = pd.DataFrame({"y": rows[metric].astype(float), "model": rows["model"].astype(str),
                          "image": rows["image_id"].astype(str),
                          "log10_mask_fraction": np.log10(rows["mask_fraction"].astype(float).where(lambda f: f > 0)),
                          "n_regions": rows["n_regions"].astype(float),
                          "log_elongation": np.log(rows["elongation"].astype(float)),
                          "probability": rows["probability"].astype(float)})
    return frame.replace([np.inf, -np.inf], np.nan).dropna().reset_index(drop=True)


def covariate_model(rows: pd.DataFrame, metric: str, alpha: float) -> pd.DataFrame:
    """One row per covariate term (estimate, SE, Wald CI and p) of the mixed model on `metric`;
    empty when too few images or a covariate does not vary (the note says which)."""
    needed = {"mask_fraction", "n_regions", "elongation", "probability", metric}
    if not needed <= set(rows.columns):
        return pd.DataFrame(columns=TERM_COLUMNS)
    data = design(rows, metric)
    terms = [t for t in TERMS if data[t].nunique() > 1]
    if data["image"].nunique() < MIN_IMAGES or not terms:
        return pd.DataFrame(columns=TERM_COLUMNS)
    model_term = "C(model) + " if data["model"].nunique() > 1 else ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence notes: the fit's own flag is reported instead
        fit = smf.mixedlm(f"y ~ {model_term}{' + '.join(terms)}", data, groups=data["image"]).fit(reml=True)
    z = scipy_stats.norm.ppf(1 - alpha / 2)
    out = []
    for term in terms:
        estimate, se = float(fit.fe_params[term]), float(fit.bse_fe[term])
        out.append({"metric": metric, "term": term, "meaning": TERMS[term], "estimate": estimate, "se": se,
                    "lower": estimate - z * se, "upper": estimate + z * se,
                    "p": float(2 * scipy_stats.norm.sf(abs(estimate / se))) if se > 0 else math.nan,
                    "n": len(data), "images": data["image"].nunique()})
    return pd.DataFrame(out, columns=TERM_COLUMNS)


def size_bins(rows: pd.DataFrame, metrics: list[str], bins: int = 4) -> pd.DataFrame:
    """Per model and lesion-size quantile bin (over the scored images): the bin's median lesion
    share and each metric's mean over the bin's images (seed-averaged)."""
    if rows.empty or "mask_fraction" not in rows:
        return pd.DataFrame(columns=["model", "size_bin", "mask_fraction", *metrics])
    per_image = rows.drop_duplicates("image_id").set_index("image_id")["mask_fraction"]
    count = min(bins, per_image.nunique())
    if count < 2:
        return pd.DataFrame(columns=["model", "size_bin", "mask_fraction", *metrics])
    bin_of = pd.qcut(per_image.rank(method="first"), count, labels=False)
    scored = rows.assign(size_bin=rows["image_id"].map(bin_of))
    means = (scored.astype({m: float for m in metrics}).groupby(["model", "size_bin", "image_id"], observed=True)[metrics]
             .mean().groupby(["model", "size_bin"], observed=True).mean().reset_index())
    centres = per_image.groupby(bin_of).median().rename("mask_fraction")
    return means.merge(centres, left_on="size_bin", right_index=True)[["model", "size_bin", "mask_fraction", *metrics]]
