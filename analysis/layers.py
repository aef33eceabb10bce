"""The layer sweep and the resolution-matched arm (docs/STUDY.md §9): depth without the confound of
map resolution.

The paper compares ResNet maps of 7x7 with VGG and ViT maps of 14x14 at 224 px, so "deeper is
better" and "finer is better" cannot be told apart. `layer_sweep_table` follows each metric
through a network's stages (`layer_depth`: the share of its weight layers run at that layer,
`map_size`: the side of the layer's map); `matched_table` and `matched_statistics` compare the
models at one map size (`matched_layer`: 14x14 at 224 px for all nine).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from analysis import stats, validity

SWEEP_METRICS = {"diff_gradcam": "diff_gradcam", "ehr_auc_norm": "ehr_auc_norm", "auprc": "auprc",
                 "auroc_pixel": "auroc_pixel", "pointing_hit": "pointing_game", "iou_tuned": "iou_tuned",
                 "road_gap": "road_gap"}  # road_gap: NaN at a layer outside faithfulness.layers (docs/STUDY.md §11)
MATCHED_STATS_METRICS = ("diff_gradcam", "auprc")
LAYER_COLUMNS = ["model", "family", "depth", "layer", "layer_depth", "map_size", "final_layer", "matched_layer",
                 "n", "degenerate"]


def layer_sweep_table(trained: pd.DataFrame, models: pd.DataFrame, excluded: pd.DataFrame,
                      alpha: float) -> pd.DataFrame:
    """One row per (model, layer) of the primary method's trained maps, shallow to deep: where the
    layer is, n images and each metric's mean with a 95% CI over images (seed-averaged), and the
    degenerate reason of that layer's map set (or empty)."""
    if trained.empty or "layer_depth" not in trained:
        return pd.DataFrame(columns=LAYER_COLUMNS)
    flags = _flags(excluded)
    rows = []
    keys = ["model", "cam_layer", "layer_depth", "map_size", "final_layer", "matched_layer"]
    for (model, layer, depth, size, final, matched), part in trained.groupby(keys, observed=True, sort=False):
        row: dict[str, Any] = {"model": str(model), "layer": layer, "layer_depth": depth, "map_size": int(size),
                               "final_layer": bool(final), "matched_layer": bool(matched),
                               "n": part["image_id"].nunique(), "degenerate": flags.get((str(model), layer), "")}
        for column, name in SWEEP_METRICS.items():
            if column in part:
                values = part.astype({column: float}).groupby("image_id")[column].mean()
                row[name], row[f"{name}_lo"], row[f"{name}_hi"] = stats.mean_ci(values, alpha)
        rows.append(row)
    table = models.merge(pd.DataFrame(rows), on="model", how="inner")
    return table.sort_values(["model", "layer_depth"], key=_model_order(models), kind="stable").reset_index(drop=True)


def _model_order(models: pd.DataFrame):
    rank = {m: i for i, m in enumerate(models["model"])}
    return lambda column: column.map(rank) if column.name == "model" else column


def _flags(excluded: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(model, layer) -> the degenerate reasons of its map sets, seeds named when there are several."""
    flags: dict[tuple[str, str], list[str]] = {}
    for row in excluded.itertuples():
        flags.setdefault((str(row.model), row.layer), []).append(f"seed {row.seed}: {row.reason}")
    return {key: "; ".join(reasons) for key, reasons in flags.items()}


def matched_rows(trained: pd.DataFrame) -> pd.DataFrame:
    return trained[trained["matched_layer"].astype(bool)] if "matched_layer" in trained else trained.iloc[0:0]


def matched_table(sweep: pd.DataFrame) -> pd.DataFrame:
    """The sweep's rows at each model's resolution-matched layer."""
    return sweep[sweep["matched_layer"]].reset_index(drop=True) if len(sweep) else sweep


def matched_statistics(trained: pd.DataFrame, excluded: pd.DataFrame, alpha: float) -> dict[str, Any]:
    """At one map size: the paper's one-way ANOVA and Tukey over every model, and the full paired
    comparison (`stats.compare_models`) over the valid map sets, per metric."""
    rows = matched_rows(trained)
    if rows.empty or rows["map_size"].nunique() != 1:
        return {}
    valid = validity.without(rows, excluded)
    result: dict[str, Any] = {"map_size": int(rows["map_size"].iloc[0]), "models": sorted(map(str, rows["model"].unique())),
                              "comparisons": {}, "paper_all_models": {}}
    for metric in (m for m in MATCHED_STATS_METRICS if m in rows and rows[m].notna().any()):
        if rows["model"].nunique() >= 2:
            anova, tukey = stats.paper_anova_tukey(rows.dropna(subset=[metric]), metric, alpha=alpha)
            result["paper_all_models"][metric] = {"anova": anova, "tukey": tukey}
        if valid["model"].nunique() >= 2:
            result["comparisons"][metric] = stats.compare_models(valid.dropna(subset=[metric]), metric, alpha=alpha)
    return result


LAYER_VS_FINAL_METRICS = ("auprc", "diff_gradcam")  # threshold-free first, then the paper's
LAYER_VS_FINAL_COLUMNS = ["model", "layer", "final", "metric", "n", "difference", "lo", "hi", "statistic", "p",
                          "p_holm", "verdict"]


def layer_vs_final_table(swept: pd.DataFrame, excluded: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Each valid non-final layer against its model's paper's layer, paired over images
    (seed-averaged per image): mean difference (layer − paper's layer) with its 95% CI, the
    Wilcoxon signed-rank p, Holm over every comparison of that metric, and the verdict
    ("better", "worse", or "no difference shown"). The only source of a per-layer claim."""
    valid = validity.without(swept, excluded)
    if valid.empty or "final_layer" not in valid:
        return pd.DataFrame(columns=LAYER_VS_FINAL_COLUMNS)
    rows = []
    for metric in (m for m in LAYER_VS_FINAL_METRICS if m in valid):
        found = []
        for model, part in valid.groupby("model", observed=True, sort=False):
            per_image = part.astype({metric: float}).pivot_table(index="image_id", columns="cam_layer", values=metric,
                                                                  aggfunc="mean", observed=True)
            finals = part.loc[part["final_layer"].astype(bool), "cam_layer"].unique()
            if len(finals) != 1 or finals[0] not in per_image:
                continue
            final = finals[0]
            for layer in part.sort_values("layer_depth", kind="stable")["cam_layer"].unique():
                if layer == final:
                    continue
                pair = per_image[[layer, final]].dropna()
                difference = (pair[layer] - pair[final]).to_numpy()
                mean, lo, hi = stats.mean_ci(difference, alpha)
                statistic, p = stats.wilcoxon(difference) if len(difference) else (float("nan"), float("nan"))
                found.append({"model": str(model), "layer": layer, "final": final, "metric": metric,
                              "n": len(difference), "difference": mean, "lo": lo, "hi": hi, "statistic": statistic,
                              "p": p})
        if not found:
            continue
        frame = pd.DataFrame(found)
        frame["p_holm"] = stats.holm(frame["p"])
        frame["verdict"] = [("better" if r.difference > 0 else "worse") if r.p_holm < alpha else "no difference shown"
                            for r in frame.itertuples()]
        rows.append(frame)
    return pd.concat(rows, ignore_index=True)[LAYER_VS_FINAL_COLUMNS] if rows else pd.DataFrame(
        columns=LAYER_VS_FINAL_COLUMNS)
