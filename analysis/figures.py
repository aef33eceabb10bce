"""The study's figures (PNG, matplotlib Agg), models ordered by family, then depth.

Each function takes ready-made tables or arrays and an output path, writes one PNG and returns
its path; none reads the study store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import matplotlib

matplotlib.use("Agg")  # no display on cluster drivers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.paper_values import LABELS  # noqa: E402

DPI = 110
FAMILY_COLOURS = {"vgg": "tab:blue", "resnet": "tab:green", "vit": "tab:orange"}
PAPER_STYLE = {"color": "tab:red", "marker": "x", "linestyle": "none", "markersize": 8}


def label(model: str) -> str:
    return LABELS.get(model, model)


def _save(figure: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


def _colours(table: pd.DataFrame) -> list[str]:
    return [FAMILY_COLOURS.get(f, "tab:grey") for f in table["family"]]


def _error_bars(table: pd.DataFrame, column: str) -> list[np.ndarray]:
    """[below, above] distances from `column` to `column`_lo and `column`_hi."""
    value = table[column].to_numpy(dtype=float)
    return [value - table[f"{column}_lo"].to_numpy(dtype=float), table[f"{column}_hi"].to_numpy(dtype=float) - value]


# ----------------------------------------------------------------------------- Figure 1


def heatmap_grid(backgrounds: Mapping[str, tuple[np.ndarray, np.ndarray]],
                 heatmaps: Mapping[str, Mapping[str, np.ndarray]], image_ids: list[str],
                 models: list[str], path: Path) -> Path:
    """Figure 1: one row per positive test image, the image with its mask outline, then one
    column per model with the heatmap (jet, alpha 0.45) over it and the mask outline in white."""
    columns = ["image"] + models
    figure, axes = plt.subplots(len(image_ids), len(columns), squeeze=False,
                                figsize=(1.7 * len(columns), 1.8 * len(image_ids)))
    for r, image_id in enumerate(image_ids):
        image, mask = backgrounds[image_id]
        for c, column in enumerate(columns):
            ax = axes[r, c]
            extent = (0, image.shape[1], image.shape[0], 0)
            ax.imshow(image, cmap="gray", extent=extent)
            heat = heatmaps.get(column, {}).get(image_id)
            if heat is not None:
                ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1, extent=extent)
            _outline(ax, mask, image.shape)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title("X-ray + mask" if column == "image" else label(column), fontsize=8)
    figure.suptitle("Figure 1: Grad-CAM heatmaps of positive test images (mask outline in white)", fontsize=10)
    return _save(figure, path)


def _outline(ax: plt.Axes, mask: np.ndarray, shape: tuple[int, ...]) -> None:
    """Mask outline in image pixel coordinates (the mask may be stored at another size)."""
    if not mask.any():
        return
    rows = (np.arange(mask.shape[0]) + 0.5) * shape[0] / mask.shape[0]
    cols = (np.arange(mask.shape[1]) + 0.5) * shape[1] / mask.shape[1]
    ax.contour(cols, rows, mask.astype(float), levels=[0.5], colors="white", linewidths=0.8)


# ----------------------------------------------------------------------------- Figure 2


def ehr_figure(ehr: pd.DataFrame, path: Path) -> Path:
    """Figure 2: EHR AUC per model with 95% CI against its chance level and oracle ceiling (log
    scale), the paper's §4.3 values, and the normalised EHR ((ehr - chance) / (oracle - chance))."""
    figure, (raw, norm) = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(ehr) + 4), 4))
    x = np.arange(len(ehr))
    raw.bar(x, ehr["ehr_auc_chance"], color="lightgrey", label="chance (per image, mean)")
    raw.plot(x, ehr["ehr_auc_oracle"], "k_", markersize=18, label="oracle (h = mask)")
    _points(raw, x, ehr, "ehr_auc", "this study (95% CI)")
    paper = ehr["paper_ehr_auc"].to_numpy(dtype=float)
    low, high = ehr["paper_ehr_low"].to_numpy(dtype=float), ehr["paper_ehr_high"].to_numpy(dtype=float)
    raw.errorbar(x + 0.2, paper, yerr=[paper - low, high - paper],
                 label="paper §4.3 (x; bar = range for rough values)", **PAPER_STYLE)
    raw.set_yscale("log")
    raw.set_ylabel("EHR AUC (paper's definition)")
    raw.set_title("EHR AUC: the paper's values sit at the chance level", fontsize=9)
    norm.axhline(0, color="grey", linewidth=1, label="chance")
    norm.axhline(1, color="black", linewidth=1, linestyle="--", label="oracle")
    _points(norm, x, ehr, "ehr_auc_norm", "normalised EHR AUC (95% CI)")
    norm.set_title("EHR AUC normalised between chance (0) and oracle (1)", fontsize=9)
    for ax in (raw, norm):
        ax.set_xticks(x, [label(m) for m in ehr["model"]], rotation=45, ha="right", fontsize=8)
        ax.legend(fontsize=7)
    return _save(figure, path)


def _points(ax: plt.Axes, x: np.ndarray, table: pd.DataFrame, column: str, name: str) -> None:
    values = table[column].to_numpy(dtype=float)
    ax.errorbar(x, values, yerr=_error_bars(table, column), fmt="none", ecolor="black", capsize=3)
    ax.scatter(x, values, c=_colours(table), zorder=3, label=name)


# ----------------------------------------------------------------------------- distributions, depth, sanity


def distribution_figure(trained: pd.DataFrame, models: pd.DataFrame, paper_means: Mapping[str, float],
                        path: Path, metric: str = "diff_gradcam") -> Path:
    """Box plot of `metric` per model (all scored images and seeds), the paper's mean as a red x."""
    present = [m for m in models["model"] if m in set(trained["model"])]
    figure, ax = plt.subplots(figsize=(max(6, 0.9 * len(present) + 2), 4))
    data = [trained.loc[trained["model"] == m, metric].dropna().to_numpy() for m in present]
    boxes = ax.boxplot(data, patch_artist=True, showmeans=True, meanprops={"marker": "o", "markerfacecolor": "white"})
    for patch, colour in zip(boxes["boxes"], _colours(models.set_index("model").loc[present].reset_index())):
        patch.set_facecolor(colour)
        patch.set_alpha(0.5)
    paper = [paper_means.get(m, np.nan) for m in present]
    ax.plot(np.arange(1, len(present) + 1), paper, label="paper Table 2 mean", **PAPER_STYLE)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(np.arange(1, len(present) + 1), [label(m) for m in present], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per model (box: quartiles, o: mean)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(figure, path)


def depth_figure(summary: pd.DataFrame, metrics: list[str], path: Path) -> Path:
    """Metric (mean, 95% CI) against network depth: one row per metric, one column per family,
    rows sharing their y axis. `summary`: model, family, depth and m, m_lo, m_hi per metric m."""
    summary = summary.dropna(subset=["depth"])
    families = list(dict.fromkeys(summary["family"]))
    figure, axes = plt.subplots(len(metrics), len(families), squeeze=False, sharey="row",
                                figsize=(3.2 * len(families), 2.6 * len(metrics)))
    for col, family in enumerate(families):
        part = summary[summary["family"] == family].sort_values("depth", kind="stable")
        x = np.arange(len(part))  # evenly spaced in depth order; the depth is in each tick label
        for row, metric in enumerate(metrics):
            ax = axes[row, col]
            ax.errorbar(x, part[metric], yerr=_error_bars(part, metric), marker="o", capsize=3,
                        color=FAMILY_COLOURS.get(family, "tab:grey"))
            ax.set_xticks(x, [f"{label(m)}\n({d:g})" for m, d in zip(part["model"], part["depth"])], fontsize=7)
            ax.set_xlim(-0.5, len(part) - 0.5)
            ax.set_ylabel(metric if col == 0 else "")
            if row == 0:
                ax.set_title(family, fontsize=9)
    figure.suptitle("Localisation against depth (in brackets: layers or blocks) per family; "
                    "descriptive, 2-4 models each", fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def sanity_figure(sanity: pd.DataFrame, path: Path) -> Path:
    """Trained vs weight-randomised heatmaps: paired bars per model, one panel per metric."""
    sanity = sanity[sanity["copy"] == "full"] if "copy" in sanity else sanity
    metrics = sanity["metric"].unique().tolist()
    width = max(6, 0.8 * sanity["model"].nunique() + 2) * len(metrics) / 1.4
    figure, axes = plt.subplots(1, len(metrics), figsize=(width, 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        part = sanity[sanity["metric"] == metric]
        x = np.arange(len(part))
        ax.bar(x - 0.2, part["trained"], width=0.4, label="trained")
        ax.bar(x + 0.2, part["randomized"], width=0.4, label="weights randomised", color="lightgrey")
        for xi, row in zip(x, part.itertuples()):
            if row.reject:
                ax.annotate("*", (xi, max(row.trained, row.randomized)), ha="center", fontsize=12)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(x, [label(m) for m in part["model"]], rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{metric}: trained vs randomised (* Holm p < alpha)", fontsize=9)
        ax.legend(fontsize=7)
    return _save(figure, path)


# ----------------------------------------------------------------------------- STUDY.md §9


RUNG_STYLE = {"chance": ("lightgrey", "s"), "image_only": ("tab:purple", "D"), "prior": ("tab:red", "D"),
              "randomized": ("grey", "v"), "gradcam": (None, "o"), "oracle": ("black", "s")}


def ladder_figure(ladder: pd.DataFrame, models: pd.DataFrame, path: Path) -> Path:
    """The baseline ladder: one panel per metric, rungs left to right (chance, image-only, prior,
    each model's randomised map, each model's Grad-CAM, oracle) with 95% CIs; the prior's mean as a
    dashed line; degenerate map sets hollow."""
    metrics = list(dict.fromkeys(ladder["metric"]))
    figure, axes = plt.subplots(len(metrics), 1, squeeze=False, figsize=(max(8, 0.45 * _rungs(ladder) + 3),
                                                                         2.4 * len(metrics)))
    family = dict(zip(models["model"], models["family"]))
    for ax, metric in zip(axes[:, 0], metrics):
        part = ladder[ladder["metric"] == metric].reset_index(drop=True)
        x = np.arange(len(part))
        for xi, row in zip(x, part.itertuples()):
            colour, marker = RUNG_STYLE[row.rung]
            colour = colour or FAMILY_COLOURS.get(family.get(row.model), "tab:grey")
            hollow = bool(row.degenerate)
            ax.errorbar(xi, row.mean, yerr=[[row.mean - row.lo], [row.hi - row.mean]] if np.isfinite(row.lo) else None,
                        fmt=marker, color=colour, mfc="white" if hollow else colour, capsize=2, markersize=5)
        prior = part.loc[part["rung"] == "prior", "mean"]
        if len(prior):
            ax.axhline(float(prior.iloc[0]), color="tab:red", linestyle="--", linewidth=0.8)
        ax.set_xticks(x, [_rung_label(r) for r in part.itertuples()], rotation=60, ha="right", fontsize=6)
        ax.set_ylabel(metric, fontsize=8)
    figure.suptitle("Baseline ladder: chance, image-only, location prior (dashed), randomised, Grad-CAM, oracle "
                    "(mean, 95% CI; hollow: degenerate)", fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def _rungs(ladder: pd.DataFrame) -> int:
    return int(ladder.groupby("metric").size().max()) if len(ladder) else 1


def _rung_label(row) -> str:
    names = {"chance": "chance", "image_only": "image-only", "prior": "location prior", "oracle": "oracle"}
    if row.rung in names:
        return names[row.rung]
    return f"{label(row.model)}{' (random)' if row.rung == 'randomized' else ''}"


def layer_sweep_figure(sweep: pd.DataFrame, metrics: list[str], path: Path) -> Path:
    """Each metric (mean, 95% CI) against layer depth, one line per model; the paper's layer
    filled, the others hollow; the resolution-matched layer ringed."""
    figure, axes = plt.subplots(1, len(metrics), squeeze=False, figsize=(3.6 * len(metrics), 3.4))
    for ax, metric in zip(axes[0], metrics):
        for model, part in sweep.groupby("model", sort=False):
            part = part.sort_values("layer_depth")
            colour = FAMILY_COLOURS.get(part["family"].iloc[0], "tab:grey")
            ax.errorbar(part["layer_depth"], part[metric], yerr=_error_bars(part, metric), color=colour,
                        marker=".", capsize=2, linewidth=1, alpha=0.8, label=label(model))
            final = part[part["final_layer"]]
            ax.plot(final["layer_depth"], final[metric], "o", color=colour)
            matched = part[part["matched_layer"]]
            ax.plot(matched["layer_depth"], matched[metric], "o", mfc="none", mec="black", markersize=9)
        ax.set_xlabel("layer depth (share of weight layers run)", fontsize=8)
        ax.set_title(metric, fontsize=9)
    axes[0, -1].legend(fontsize=6, loc="best")
    figure.suptitle("Layer sweep: metric against depth through each network (filled: the paper's layer; "
                    "ringed: the resolution-matched layer)", fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def lesion_size_figure(bins: pd.DataFrame, metrics: list[str], models: pd.DataFrame, path: Path) -> Path:
    """Each metric's mean per lesion-size quartile (x: the quartile's median lesion share, log
    scale), one line per model."""
    figure, axes = plt.subplots(1, len(metrics), squeeze=False, figsize=(3.8 * len(metrics), 3.4))
    family = dict(zip(models["model"], models["family"]))
    for ax, metric in zip(axes[0], metrics):
        for model, part in bins.groupby("model", sort=False, observed=True):
            ax.plot(part["mask_fraction"], part[metric], marker="o", label=label(str(model)),
                    color=FAMILY_COLOURS.get(family.get(str(model)), "tab:grey"), alpha=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("lesion share of the image (quartile median)", fontsize=8)
        ax.set_title(metric, fontsize=9)
    axes[0, -1].legend(fontsize=6)
    figure.suptitle("Localisation against lesion size (valid map sets, paper's layer)", fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def cascade_figure(cascade: pd.DataFrame, models: pd.DataFrame, path: Path) -> Path:
    """The cascade (Adebayo et al. 2018): similarity to the trained map against the units
    re-initialised from the head down, one line per model, one panel per measure; each model's
    pass line (Arun et al. 2021) dashed in its colour; degenerate map sets hollow and faint."""
    measures = list(dict.fromkeys(cascade["measure"]))
    figure, axes = plt.subplots(1, len(measures), squeeze=False, figsize=(4.2 * len(measures), 3.6))
    family = dict(zip(models["model"], models["family"]))
    for ax, measure in zip(axes[0], measures):
        for model, part in cascade[cascade["measure"] == measure].groupby("model", sort=False):
            part = part.sort_values("stages_randomized")
            colour = FAMILY_COLOURS.get(family.get(model), "tab:grey")
            faint = bool(part["degenerate"].iloc[0])
            ax.errorbar(part["stages_randomized"], part["mean"], yerr=_error_bars(part.rename(
                columns={"lo": "mean_lo", "hi": "mean_hi"}), "mean"), marker="o", capsize=2, color=colour,
                mfc="white" if faint else colour, alpha=0.35 if faint else 0.9, label=label(model))
            line = part["pass_line"].iloc[0]
            if np.isfinite(line):
                ax.hlines(line, part["stages_randomized"].min(), part["stages_randomized"].max(), colors=colour,
                          linestyles="dashed", linewidth=0.8, alpha=0.35 if faint else 0.8)
        ax.set_xlabel("units re-initialised, head first (0 = trained)", fontsize=8)
        ax.set_title(f"{measure} to the trained map", fontsize=9)
    axes[0, -1].legend(fontsize=6)
    figure.suptitle("Cascading randomisation: a map that survives its weights' destruction explains the "
                    "architecture, not the training (dashed: pass line)", fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def stability_figure(stability: pd.DataFrame, path: Path, measure: str = "ssim") -> Path:
    """Mean similarity of every pair of runs' maps of the same image, as a matrix."""
    part = stability[stability["measure"] == measure]
    runs = list(dict.fromkeys([(a, s) for a, s in zip(part["model_a"], part["seed_a"])]
                              + [(b, s) for b, s in zip(part["model_b"], part["seed_b"])]))
    index = {run: i for i, run in enumerate(runs)}
    matrix = np.eye(len(runs))
    for row in part.itertuples():
        i, j = index[(row.model_a, row.seed_a)], index[(row.model_b, row.seed_b)]
        matrix[i, j] = matrix[j, i] = row.mean
    figure, ax = plt.subplots(figsize=(1.0 + 0.45 * len(runs), 0.8 + 0.45 * len(runs)))
    image = ax.imshow(matrix, vmin=min(0.0, float(np.nanmin(matrix))), vmax=1, cmap="viridis")
    names = [f"{label(m)} s{s}" for m, s in runs]
    ax.set_xticks(range(len(runs)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(runs)), names, fontsize=7)
    for (i, j), value in np.ndenumerate(matrix):
        if i != j and np.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=5, color="white" if value < 0.5 else "black")
    figure.colorbar(image, ax=ax, fraction=0.046, label=f"mean {measure}")
    ax.set_title(f"Map stability: mean {measure} between runs' maps of the same image", fontsize=9)
    return _save(figure, path)


def figure1_images(trained: pd.DataFrame, count: int = 3) -> list[str]:
    """Positive test images scored by every model: the ones at evenly spaced mask-fraction
    quantiles (25%, 50%, 75% for three), so lesions of typical sizes are shown."""
    per_image = trained.groupby("image_id").agg(models=("model", "nunique"), fraction=("mask_fraction", "first"))
    complete = per_image[per_image["models"] == trained["model"].nunique()].sort_values("fraction")
    if complete.empty:
        return []
    positions = np.linspace(0, len(complete) - 1, count + 2)[1:-1].round().astype(int)
    return list(dict.fromkeys(complete.index[positions]))


def first_seed(trained: pd.DataFrame, model: str) -> Optional[int]:
    seeds = trained.loc[trained["model"] == model, "seed"]
    return int(seeds.min()) if len(seeds) else None
