"""The study's tables (docs/STUDY.md §7), each beside the paper's published value where there is one.

Tables are numeric DataFrames (written as CSV); `merge_intervals` turns `x`, `x_lo`, `x_hi`,
`x_sd` columns into one readable column for the HTML report. Localisation tables use trained
heatmaps only; the weight-randomised copies go to `sanity_table`. With several seeds, per-image
scores are averaged over seeds before a CI is taken, so the CI is over images, not runs.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import pandas as pd

from analysis import paper_values, stats, validity
from analysis.inputs import PRIMARY_CAM_METHOD
from training.classification import classification_report
from study.store import run_key

CLASSIFICATION_METRICS = ["accuracy", "precision", "recall", "specificity", "auc"]
EHR_VARIANTS = ["ehr_auc", "ehr_auc_inputiba"]
RUN_SUMMARY = {"diff_gradcam_mean": "diff_gradcam", "ehr_auc_mean": "ehr_auc", "ehr_auc_norm_mean": "ehr_auc_norm",
               "pointing_game": "pointing_hit", "energy_in_mask_mean": "energy_in_mask", "iou_otsu_mean": "iou_otsu",
               "auprc_mean": "auprc", "auroc_pixel_mean": "auroc_pixel", "iou_tuned_mean": "iou_tuned",
               "hit_tuned_rate": "hit_tuned"}
# docs/STUDY.md §11: per-run means logged under their own MLflow prefix (name -> column)
RUN_SUMMARY_DIMENSIONS = {
    "faithfulness": {"road_gap_mean": "road_gap", "road_morf_mean": "road_morf", "road_lerf_mean": "road_lerf"},
    "robustness": {"max_sensitivity_mean": "max_sensitivity", "ssim_perturbed_mean": "ssim_perturbed",
                   "sensitivity_kept_mean": "sensitivity_kept"}}


def primary_method(cams: pd.DataFrame) -> Optional[str]:
    """Grad-CAM when it was computed, else the first method present (None without CAMs)."""
    methods = cams["cam_method"].dropna().unique().tolist() if "cam_method" in cams else []
    if PRIMARY_CAM_METHOD in methods:
        return PRIMARY_CAM_METHOD
    return sorted(methods)[0] if methods else None


def trained_rows(cams: pd.DataFrame, method: Optional[str]) -> pd.DataFrame:
    return cams[(~cams["randomized"]) & (cams["cam_method"] == method)]


def final_layer_rows(cams: pd.DataFrame) -> pd.DataFrame:
    """The rows of the paper's target layer (docs/STUDY.md §3); a store scored before the layer sweep
    has only that layer."""
    return cams[cams["final_layer"].astype(bool)] if "final_layer" in cams else cams


def _by_model(models: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    """Rows keyed by model, with family and depth, in the models' plot order."""
    table = pd.DataFrame(rows)
    if table.empty:
        return models.iloc[0:0].copy()
    return models.merge(table, on="model", how="inner")


def _image_level(rows: pd.DataFrame, metric: str) -> pd.Series:
    """Per-image score of one model, averaged over seeds."""
    return rows.groupby("image_id")[metric].mean()


# ----------------------------------------------------------------------------- Table 1


def table1(test_metrics: pd.DataFrame, models: pd.DataFrame, predictions: Optional[pd.DataFrame] = None,
           threshold: Optional[float] = None, alpha: Optional[float] = None) -> pd.DataFrame:
    """Accuracy, precision, recall, AUC per model: one seed with its CI (x_lo, x_hi); several
    seeds as mean and SD across seeds (x_sd). paper_x: Table 1 of the paper.

    A run's test_metrics.json holds intervals made when it finished, at the default level; given
    its `predictions`, the `threshold` and `alpha`, a one-seed row's intervals are made again at
    the study's `statistics.alpha` (Wilson, DeLong: the same functions), so every interval of the
    report is at one level."""
    rows = [_table1_row(model, part, _run_predictions(predictions, model, part), threshold, alpha)
            for model, part in test_metrics.groupby("model", observed=True)]
    table = _by_model(models, rows)
    paper = paper_values.TABLE1.rename(columns={m: f"paper_{m}" for m in CLASSIFICATION_METRICS})
    return table.merge(paper, on="model", how="left") if not table.empty else table


def _run_predictions(predictions: Optional[pd.DataFrame], model: str, part: pd.DataFrame) -> Optional[pd.DataFrame]:
    """The one run's test predictions when the model has one seed and they are at hand."""
    if predictions is None or len(part) != 1:
        return None
    run = predictions[(predictions["model"] == model) & (predictions["seed"] == part["seed"].iloc[0])]
    return run if len(run) else None


def _table1_row(model: str, part: pd.DataFrame, predictions: Optional[pd.DataFrame], threshold: Optional[float],
                alpha: Optional[float]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model, "seeds": len(part)}
    single = len(part) == 1
    remade = (classification_report(predictions["label"], predictions["probability"], threshold, alpha)
              if predictions is not None and threshold is not None and alpha is not None else None)
    for metric in CLASSIFICATION_METRICS:
        values = part[metric] if metric in part else pd.Series(dtype=float)
        row[metric] = values.mean()
        for end in ("lo", "hi"):
            column = f"{metric}_{end}"
            recorded = part[column].iloc[0] if single and column in part else math.nan
            row[column] = remade[column] if remade is not None else recorded
        row[f"{metric}_sd"] = values.std(ddof=1) if len(part) > 1 else math.nan
    return row


# ----------------------------------------------------------------------------- Table 2


def table2(trained: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """Diff_GradCAM mean/std/min/max per model over every scored (image, seed), the SD of the
    per-run means when there are several seeds, and the paper's Table 2."""
    rows = []
    for model, part in trained.groupby("model", observed=True):
        values = part["diff_gradcam"]
        run_means = part.groupby("seed")["diff_gradcam"].mean()
        rows.append({"model": model, "n": len(values), "seeds": len(run_means), "mean": values.mean(),
                     "std": values.std(ddof=1), "min": values.min(), "max": values.max(),
                     "seed_sd": run_means.std(ddof=1) if len(run_means) > 1 else math.nan})
    table = _by_model(models, rows)
    paper = paper_values.TABLE2.rename(columns={c: f"paper_{c}" for c in ("mean", "std", "min", "max")})
    return table.merge(paper, on="model", how="left") if not table.empty else table


# ----------------------------------------------------------------------------- EHR


def ehr_table(trained: pd.DataFrame, models: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Both EHR variants per model: mean with 95% CI, chance, oracle, normalised (with CI), the
    ratio to chance, and the paper's EHR AUC (§4.3 text; paper_ehr_exact False = given roughly)."""
    rows = [_ehr_row(model, part, alpha) for model, part in trained.groupby("model", observed=True)]
    table = _by_model(models, rows)
    return table.merge(paper_values.ehr_table(), on="model", how="left") if not table.empty else table


def _ehr_row(model: str, part: pd.DataFrame, alpha: float) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model, "n": part["image_id"].nunique(),
                           "mask_fraction": part.drop_duplicates("image_id")["mask_fraction"].mean()
                           if "mask_fraction" in part else math.nan}
    for variant in (v for v in EHR_VARIANTS if v in part):
        row[variant], row[f"{variant}_lo"], row[f"{variant}_hi"] = stats.mean_ci(_image_level(part, variant), alpha)
        for suffix in ("chance", "oracle"):
            column = f"{variant}_{suffix}"
            row[column] = part[column].mean() if column in part else math.nan
        norm = f"{variant}_norm"
        row[norm], row[f"{norm}_lo"], row[f"{norm}_hi"] = (stats.mean_ci(_image_level(part, norm), alpha)
                                                          if norm in part else (math.nan,) * 3)
        chance = row[f"{variant}_chance"]
        row[f"{variant}_over_chance"] = row[variant] / chance if chance else math.nan
    return row


# ----------------------------------------------------------------------------- other localisation metrics


def metric_summary(trained: pd.DataFrame, models: pd.DataFrame, metrics: dict[str, str],
                   alpha: float) -> pd.DataFrame:
    """Per model: n images and, for each `metrics` entry (column -> name), the mean with a 95% CI
    over images (seed-averaged). Boolean columns (pointing_hit) become rates."""
    rows = []
    for model, part in trained.groupby("model", observed=True):
        row: dict[str, Any] = {"model": model, "n": part["image_id"].nunique()}
        for column, name in metrics.items():
            if column in part:
                values = _image_level(part.assign(**{column: part[column].astype(float)}), column)
                row[name], row[f"{name}_lo"], row[f"{name}_hi"] = stats.mean_ci(values, alpha)
        rows.append(row)
    return _by_model(models, rows)


def localisation_table(trained: pd.DataFrame, models: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Energy inside the mask, pointing-game hit rate and Otsu IoU (mean, 95% CI over images),
    and the number of all-zero heatmaps."""
    table = metric_summary(trained, models, {"energy_in_mask": "energy_in_mask", "pointing_hit": "pointing_game",
                                             "iou_otsu": "iou_otsu"}, alpha)
    if "cam_all_zero" in trained and not table.empty:
        zeros = trained.groupby("model", observed=True)["cam_all_zero"].sum().astype(int).rename("cam_all_zero")
        table = table.merge(zeros, left_on="model", right_index=True, how="left")
    return table


THRESHOLD_FREE = {"auprc": "auprc", "auroc_pixel": "auroc_pixel", "iou_tuned": "iou_tuned", "hit_tuned": "hit_tuned"}


def threshold_free_table(trained: pd.DataFrame, models: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Pixel AUPRC (chance f) and pixel AUROC (chance 0.5), and IoU and hit at the threshold tuned
    on validation positives (mean, 95% CI over images), with the mean chance level of AUPRC and
    Arun et al. 2021's SIIM-ACR range beside them."""
    present = {k: v for k, v in THRESHOLD_FREE.items() if k in trained}
    table = metric_summary(trained, models, present, alpha)
    if table.empty:
        return table
    by_model = trained.groupby("model", observed=True)
    chance = by_model["mask_fraction_scored"].mean().rename("auprc_chance")
    table = table.merge(chance, left_on="model", right_index=True, how="left")
    if "tuned_threshold" in trained:  # one per map set: the mean over seeds, no CI
        threshold = by_model["tuned_threshold"].mean().rename("tuned_threshold")
        table = table.merge(threshold, left_on="model", right_index=True, how="left")
    anchor = paper_values.ARUN_AUPRC
    return table.assign(arun_saliency_low=anchor["saliency_low"], arun_saliency_high=anchor["saliency_high"],
                        arun_unet=anchor["unet"])


def methods_table(cams: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """Mean of the main metrics per model and CAM method (trained heatmaps)."""
    trained = cams[~cams["randomized"]]
    metrics = [m for m in ("diff_gradcam", "ehr_auc", "ehr_auc_norm", "pointing_hit") if m in trained]
    summary = trained.astype({"pointing_hit": float}) if "pointing_hit" in trained else trained
    summary = summary.groupby(["model", "cam_method"], observed=True)[metrics].mean().reset_index()
    return models.merge(summary, on="model", how="inner")


def randomization_of(rows: pd.DataFrame) -> pd.Series:
    """Which copy made each row: "none" (trained), "full", "cascade" or "labels" (stores scored
    before the cascade: the randomised rows are the full twin)."""
    if "randomization" in rows:
        return rows["randomization"]
    return rows["randomized"].map({False: "none", True: "full"})


def copy_rows(rows: pd.DataFrame, *copies: str) -> pd.DataFrame:
    """The rows made by the named copies."""
    return rows[randomization_of(rows).isin(copies)]


SANITY_COPIES = {"full": "weights randomised", "labels": "trained on permuted labels"}


def sanity_table(cams: pd.DataFrame, method: Optional[str], models: pd.DataFrame,
                 alpha: float) -> pd.DataFrame:
    """Trained vs each sanity copy that exists (Adebayo et al. 2018: the fully weight-randomised
    twin; the label-permutation run), per model and metric: means, difference, paired Wilcoxon p
    with Holm over models."""
    rows = cams[cams["cam_method"] == method]
    frames = []
    for copy in SANITY_COPIES:
        pair = copy_rows(rows, "none", copy)
        frames += [stats.sanity_comparisons(pair, metric, alpha=alpha).assign(metric=metric, copy=copy)
                   for metric in ("diff_gradcam", "ehr_auc_norm") if metric in rows]
    frames = [f for f in frames if not f.empty]
    columns = ["model", "family", "depth", "copy", "metric", "trained", "randomized", "difference", "n", "p", "p_adj",
               "reject"]
    if not frames:
        return pd.DataFrame(columns=columns)
    return models.merge(pd.concat(frames, ignore_index=True), on="model", how="inner")[columns]


def run_summary(trained: pd.DataFrame, excluded: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """One row per run: run_key, model, seed, the summary metrics logged to its MLflow child run,
    and `degenerate` (the reason its primary map set is left out of comparisons, or empty)."""
    reasons = {} if excluded is None or excluded.empty else {
        (str(r.model), int(r.seed)): r.reason for r in excluded.itertuples()
        if r.method in set(trained["cam_method"])}
    rows = []
    for (model, seed), part in trained.groupby(["model", "seed"], observed=True):
        row = {"run_key": run_key(model, int(seed)), "model": model, "seed": seed, "n_images": len(part),
               "degenerate": reasons.get((str(model), int(seed)), "")}
        row.update({name: float(part[column].astype(float).mean())
                    for name, column in RUN_SUMMARY.items() if column in part})
        row.update({name: float(part[column].astype(float).mean()) for columns in RUN_SUMMARY_DIMENSIONS.values()
                    for name, column in columns.items() if column in part and part[column].notna().any()})
        rows.append(row)
    return pd.DataFrame(rows)


def with_flags(table: pd.DataFrame, flags: pd.DataFrame) -> pd.DataFrame:
    """`table` with a `degenerate` column after `model`: why the model's map set is left out of
    comparisons (docs/STUDY.md §8), or empty."""
    if table.empty:
        return table.assign(degenerate=pd.Series(dtype=str))
    merged = table.merge(flags, on="model", how="left")
    merged["degenerate"] = merged["degenerate"].fillna("")
    columns = list(table.columns)
    at = columns.index("model") + 1
    return merged[columns[:at] + ["degenerate"] + columns[at:]]


SCORE_METRICS = ["diff_gradcam", "ehr_auc", "ehr_auc_chance", "ehr_auc_norm", "ehr_auc_inputiba",
                 "ehr_auc_inputiba_norm", "energy_in_mask", "pointing_hit", "iou_otsu", "auprc", "auroc_pixel",
                 "mask_fraction_scored", "iou_tuned", "hit_tuned", "tuned_threshold",
                 "road_gap", "road_morf", "road_lerf", "max_sensitivity", "ssim_perturbed"]  # §11: where measured


def scores_table(cams: pd.DataFrame, test_metrics: pd.DataFrame, alpha: float,
                 baselines: Optional[pd.DataFrame] = None, controls: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """analysis/scores.parquet: one row per (model, seed, method, layer, set = trained | randomized |
    baseline, randomization, stages_randomized) with n, each metric's mean and 95% CI over images
    (pointing_hit and hit_tuned as rates), and the degenerate flag with its reason: the table a
    reader would otherwise build from cams/, sanity/, baselines/ and controls/ by hand. Baselines
    have no seed (null) and no classifier; controls (set "control") have their run's seed."""
    if cams.empty:
        return pd.DataFrame(columns=["model", "seed", "method", "layer", "set", "n", "degenerate", "reason"])
    copy = randomization_of(cams)
    steps = cams["stages_randomized"] if "stages_randomized" in cams else pd.Series(0, index=cams.index)
    flagged = pd.concat([validity.degenerate_sets(cams, test_metrics, randomized=flag) for flag in (False, True)],
                        ignore_index=True)
    reason = {(r["model"], int(r["seed"]), r["method"], r["layer"], r.get("randomization", "none") or "none",
               int(r.get("stages_randomized", 0) or 0)): r["reason"]
              for r in flagged.astype(object).where(flagged.notna(), None).to_dict(orient="records")}
    layer = cams["cam_layer"] if "cam_layer" in cams else pd.Series("", index=cams.index)
    keys = [cams["model"].astype(str), cams["seed"], cams["cam_method"], layer, copy, steps]
    rows = []
    for (model, seed, method, name, kind, step), part in cams.groupby(keys, sort=True):
        why = reason.get((model, int(seed), method, name, kind, int(step)), "")
        rows.append({**_score_row(part, alpha, level="run", model=model, seed=int(seed), method=method, layer=name,
                                  set="trained" if kind == "none" else "randomized", randomization=kind,
                                  stages_randomized=int(step)),
                     "degenerate": bool(why), "reason": why})
    for model, part in (baselines.groupby("model", sort=False) if baselines is not None and len(baselines) else ()):
        rows.append({**_score_row(part, alpha, level="run", model=model, seed=None, method=part["cam_method"].iloc[0],
                                  layer="", set="baseline", randomization="none", stages_randomized=0),
                     "degenerate": False, "reason": ""})
    for (model, seed, method), part in (controls.groupby([controls["model"].astype(str), "seed", "cam_method"])
                                        if controls is not None and len(controls) else ()):
        layer = part["cam_layer"].iloc[0] if "cam_layer" in part else ""
        rows.append({**_score_row(part, alpha, level="run", model=model, seed=int(seed), method=method, layer=layer,
                                  set="control", randomization="none", stages_randomized=0),
                     "degenerate": False, "reason": ""})  # a control (docs/STUDY.md §11): f"{control}@{model}"
    return pd.DataFrame(rows).astype({"seed": "Int64"})


BOOTSTRAP_METRICS = ["diff_gradcam", "ehr_auc_norm", "auprc", "auroc_pixel", "energy_in_mask", "pointing_hit",
                     "iou_tuned", "road_gap", "max_sensitivity"]


def model_scores(trained: pd.DataFrame, alpha: float, replicates: int, seed: int) -> pd.DataFrame:
    """Model-level rows of scores.parquet (`level` "model", `seed` null): per (model, method,
    layer) of the trained maps, each of BOOTSTRAP_METRICS' mean over every image of every seed,
    with the percentile CI of the hierarchical bootstrap (seeds, then images within seeds;
    `analysis.equivalence.hierarchical_bootstrap`), its replicate count and seed recorded."""
    from analysis.equivalence import hierarchical_bootstrap

    layer = trained["cam_layer"] if "cam_layer" in trained else pd.Series("", index=trained.index)
    rows = []
    for (model, method, name), part in trained.groupby([trained["model"].astype(str), trained["cam_method"], layer],
                                                       sort=True):
        row: dict[str, Any] = {"level": "model", "model": model, "seed": None, "method": method, "layer": name,
                               "set": "trained", "randomization": "none", "stages_randomized": 0,
                               "n": len(part), "seeds": part["seed"].nunique(),
                               "ci_method": f"hierarchical bootstrap (seeds, then images within seeds), {replicates} "
                                            f"replicates, percentile, seed {seed}"}
        for metric in (m for m in BOOTSTRAP_METRICS if m in part):
            groups = [g[metric].astype(float).to_numpy() for _, g in part.groupby("seed")]
            row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"] = hierarchical_bootstrap(
                groups, replicates, seed, alpha, stream=f"{model}|{method}|{name}|{metric}")
        rows.append(row)
    return pd.DataFrame(rows)


def _score_row(part: pd.DataFrame, alpha: float, **keys: Any) -> dict[str, Any]:
    row: dict[str, Any] = {**keys, "n": len(part), "ci_method": "t interval over images"}
    for metric in (m for m in SCORE_METRICS if m in part):
        row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"] = stats.mean_ci(part[metric].astype(float), alpha)
    return row


# ----------------------------------------------------------------------------- paper comparisons


def tukey_vs_paper(comparison: dict[str, Any]) -> pd.DataFrame:
    """The paper's Tukey claims (§4.3) beside this study's result for the same pair: the paper's
    method (one-way Tukey) and the trusted paired/run-level result."""
    paper_method = comparison["paper"]["tukey"]
    ours = {stats.pair_key(a, b): bool(r)
            for a, b, r in paper_method[["group1", "group2", "reject"]].itertuples(index=False)}
    trusted = {stats.pair_key(*p.split(" vs ")) for p in comparison["significant_pairs"]}
    claims = paper_values.TUKEY_CLAIMS
    keys = [stats.pair_key(a, b) for a, b in zip(claims["model_a"], claims["model_b"])]
    table = claims.assign(ours_paper_method=[ours.get(k) for k in keys],
                          ours_trusted=[k in trusted if k in ours else None for k in keys])
    table = table[table["ours_paper_method"].notna()]
    agree = table["paper_significant"] == table["ours_trusted"]
    return table.assign(agrees=agree)[["model_a", "model_b", "paper_significant", "ours_paper_method",
                                       "ours_trusted", "agrees", "source"]]


# ----------------------------------------------------------------------------- display


def merge_intervals(frame: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """One column per quantity: "v [lo, hi]" where x_lo/x_hi exist, "v ± sd" where x_sd exists."""
    out = frame.copy()
    bases = [c for c in frame.columns if f"{c}_lo" in frame.columns or f"{c}_sd" in frame.columns]
    for base in bases:
        out[base] = [_interval_text(frame.loc[i], base, digits) for i in frame.index]
        out = out.drop(columns=[c for c in (f"{base}_lo", f"{base}_hi", f"{base}_sd") if c in out])
    return out


def _interval_text(row: pd.Series, base: str, digits: int) -> str:
    value = row[base]
    if not _finite(value):
        return "—"
    text = f"{value:.{digits}f}"
    if _finite(row.get(f"{base}_lo")) and _finite(row.get(f"{base}_hi")):
        return f"{text} [{row[f'{base}_lo']:.{digits}f}, {row[f'{base}_hi']:.{digits}f}]"
    if _finite(row.get(f"{base}_sd")):
        return f"{text} ± {row[f'{base}_sd']:.{digits}f}"
    return text


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(float(value))
