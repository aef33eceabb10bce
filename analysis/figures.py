"""The study's figures (PNG, matplotlib Agg), models ordered by family, then depth.

Each function takes ready-made tables or arrays and an output path, writes one PNG and returns
its path; none reads the study store. Every figure fits the report's column at 1:1 (no text
below MIN_TEXT_PT) and draws degenerate map sets (docs/STUDY.md §8) hollow, grey and named so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection, Iterable, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on cluster drivers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis.paper_values import LABELS  # noqa: E402

DPI = 110
# The report shows figures in a column of REPORT_COLUMN_PX (analysis/html.py: body max-width) and
# scales wider PNGs down, text with them. At most FIGURE_WIDTH_IN wide (bbox_inches="tight" adds its
# 0.1 in pad each side) a PNG is shown at 1:1 in any window of at least the column's width, where
# the smallest text, MIN_TEXT_PT, is 8 pt x 110/72 = 12 px; it stays >= 9 px down to a 3/4 scale.
REPORT_COLUMN_PX = 1150
FIGURE_WIDTH_IN = 10.0
MIN_TEXT_PT = 8
STYLE = {"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "xtick.labelsize": MIN_TEXT_PT,
         "ytick.labelsize": MIN_TEXT_PT, "legend.fontsize": MIN_TEXT_PT, "legend.title_fontsize": MIN_TEXT_PT,
         "figure.titlesize": 10, "figure.labelsize": 9}
FAMILY_COLOURS = {"vgg": "tab:blue", "resnet": "tab:green", "vit": "tab:orange"}
PAPER_STYLE = {"color": "tab:red", "marker": "x", "linestyle": "none", "markersize": 8}
# docs/STUDY.md §8: a degenerate map set is drawn hollow and grey and named so in every figure, so
# that an all-zero set never reads as a valid one
DEGENERATE_COLOUR = "grey"
DEGENERATE = "degenerate"
DEGENERATE_LEGEND = f"{DEGENERATE} map set (left out of comparisons)"


def label(model: str) -> str:
    return LABELS.get(model, model)


def model_label(model: str, degenerate: bool = False, separator: str = " ") -> str:
    """The model's name, with "(degenerate)" when its map set is degenerate."""
    return f"{label(model)}{separator}({DEGENERATE})" if degenerate else label(model)


def _figure(rows: int = 1, columns: int = 1, width: float = FIGURE_WIDTH_IN, height: float = 4.0,
            **kwargs) -> tuple[plt.Figure, np.ndarray]:
    """A constrained-layout figure (titles and labels never overlap) at most FIGURE_WIDTH_IN wide."""
    return plt.subplots(rows, columns, squeeze=False, figsize=(min(width, FIGURE_WIDTH_IN), height),
                        layout="constrained", **kwargs)


def _styled(function):
    """Every text a figure function creates takes its size from STYLE (none below MIN_TEXT_PT)."""
    return plt.rc_context(STYLE)(function)


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


def degenerate_rows(table: pd.DataFrame, degenerate: Collection[str] = ()) -> np.ndarray:
    """Per row: is its map set degenerate? From the table's own `degenerate` column (the reason, or
    empty) where it has one, else from the models named in `degenerate`."""
    if "degenerate" in table:
        return table["degenerate"].fillna("").astype(str).ne("").to_numpy()
    return table["model"].astype(str).isin(set(degenerate)).to_numpy()


def _markers(ax: plt.Axes, x: Sequence[float], y: Sequence[float], colours: Sequence[str], flagged: np.ndarray,
             label_valid: Optional[str] = None, **style) -> None:
    """Filled markers in each row's colour; degenerate rows hollow and grey."""
    x, y, flagged = np.asarray(x, dtype=float), np.asarray(y, dtype=float), np.asarray(flagged, dtype=bool)
    colours = np.asarray(list(colours), dtype=object)
    if (~flagged).any():
        ax.scatter(x[~flagged], y[~flagged], c=list(colours[~flagged]), zorder=3, label=label_valid, **style)
    if flagged.any():
        ax.scatter(x[flagged], y[flagged], facecolors="none", edgecolors=DEGENERATE_COLOUR, linewidths=1.5, zorder=3,
                   label=DEGENERATE_LEGEND, **style)


def _grey_degenerate_ticks(labels: Iterable[plt.Text]) -> None:
    for text in labels:
        if DEGENERATE in text.get_text():
            text.set_color(DEGENERATE_COLOUR)


def _left_out(figure: plt.Figure, degenerate: Collection[str]) -> None:
    """A figure drawn over the valid map sets only names the degenerate ones it leaves out."""
    if degenerate:
        figure.supxlabel(f"Not shown ({DEGENERATE} map sets, left out of comparisons): "
                         + ", ".join(label(m) for m in degenerate), color=DEGENERATE_COLOUR)


# ----------------------------------------------------------------------------- Figure 1


@_styled
def heatmap_grid(backgrounds: Mapping[str, tuple[np.ndarray, np.ndarray]],
                 heatmaps: Mapping[str, Mapping[str, np.ndarray]], image_ids: list[str],
                 models: list[str], path: Path, degenerate: Collection[str] = ()) -> Path:
    """Figure 1: one row per positive test image, the image with its mask outline, then one
    column per model with the heatmap (jet, alpha 0.45) over it and the mask outline in white;
    a degenerate map set's column titled so, in grey."""
    columns = ["image"] + models
    cell = min(1.7, FIGURE_WIDTH_IN / len(columns))
    figure, axes = _figure(len(image_ids), len(columns), width=cell * len(columns),
                           height=cell * len(image_ids) + 0.9)
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
                flagged = column in degenerate
                ax.set_title("X-ray + mask" if column == "image" else model_label(column, flagged, "\n"),
                             color=DEGENERATE_COLOUR if flagged else "black")
    figure.suptitle("Figure 1: Grad-CAM heatmaps of positive test images (mask outline in white)")
    return _save(figure, path)


def _outline(ax: plt.Axes, mask: np.ndarray, shape: tuple[int, ...]) -> None:
    """Mask outline in image pixel coordinates (the mask may be stored at another size)."""
    if not mask.any():
        return
    rows = (np.arange(mask.shape[0]) + 0.5) * shape[0] / mask.shape[0]
    cols = (np.arange(mask.shape[1]) + 0.5) * shape[1] / mask.shape[1]
    ax.contour(cols, rows, mask.astype(float), levels=[0.5], colors="white", linewidths=0.8)


# ----------------------------------------------------------------------------- Figure 2


@_styled
def ehr_figure(ehr: pd.DataFrame, path: Path) -> Path:
    """Figure 2: EHR AUC per model with 95% CI against its chance level and oracle ceiling (log
    scale), the paper's §4.3 values, and the normalised EHR ((ehr - chance) / (oracle - chance));
    degenerate map sets (the table's `degenerate` column) hollow and grey."""
    figure, ((raw, norm),) = _figure(1, 2, width=1.3 * len(ehr) + 4, height=4.6)
    x = np.arange(len(ehr))
    flagged = degenerate_rows(ehr)
    raw.bar(x, ehr["ehr_auc_chance"], color="lightgrey", label="chance (per image, mean)")
    raw.plot(x, ehr["ehr_auc_oracle"], "k_", markersize=18, label="oracle (h = mask)")
    _points(raw, x, ehr, "ehr_auc", "this study (95% CI)", flagged)
    paper = ehr["paper_ehr_auc"].to_numpy(dtype=float)
    low, high = ehr["paper_ehr_low"].to_numpy(dtype=float), ehr["paper_ehr_high"].to_numpy(dtype=float)
    raw.errorbar(x + 0.2, paper, yerr=[paper - low, high - paper],
                 label="paper §4.3 (bar: range of rough values)", **PAPER_STYLE)
    raw.set_yscale("log")
    raw.set_ylabel("EHR AUC (paper's definition)")
    raw.set_title("EHR AUC: the paper's values sit at chance")
    norm.axhline(0, color="grey", linewidth=1, label="chance")
    norm.axhline(1, color="black", linewidth=1, linestyle="--", label="oracle")
    _points(norm, x, ehr, "ehr_auc_norm", "normalised EHR AUC (95% CI)", flagged)
    norm.set_title("Normalised: chance 0, oracle 1")
    for ax in (raw, norm):
        ax.set_xticks(x, [model_label(m, f) for m, f in zip(ehr["model"], flagged)], rotation=45, ha="right")
        _grey_degenerate_ticks(ax.get_xticklabels())
        ax.legend(loc="best", framealpha=0.9)
    return _save(figure, path)


def _points(ax: plt.Axes, x: np.ndarray, table: pd.DataFrame, column: str, name: str, flagged: np.ndarray) -> None:
    values = table[column].to_numpy(dtype=float)
    ax.errorbar(x, values, yerr=_error_bars(table, column), fmt="none", ecolor="black", capsize=3)
    _markers(ax, x, values, _colours(table), flagged, label_valid=name)


# ----------------------------------------------------------------------------- distributions, depth, sanity


@_styled
def distribution_figure(trained: pd.DataFrame, models: pd.DataFrame, paper_means: Mapping[str, float],
                        path: Path, metric: str = "diff_gradcam", degenerate: Collection[str] = ()) -> Path:
    """Box plot of `metric` per model (all scored images and seeds), the paper's mean as a red x;
    a degenerate map set's box hollow, grey and dashed."""
    present = [m for m in models["model"] if m in set(trained["model"])]
    figure, ((ax,),) = _figure(width=0.9 * len(present) + 2, height=4.4)
    data = [trained.loc[trained["model"] == m, metric].dropna().to_numpy() for m in present]
    boxes = ax.boxplot(data, patch_artist=True, showmeans=True, meanprops={"marker": "o", "markerfacecolor": "white"})
    colours = _colours(models.set_index("model").loc[present].reset_index())
    for model, patch, median, mean, colour in zip(present, boxes["boxes"], boxes["medians"], boxes["means"], colours):
        if model in degenerate:
            patch.set(facecolor="none", edgecolor=DEGENERATE_COLOUR, linestyle="--")
            median.set_color(DEGENERATE_COLOUR)
            mean.set(markeredgecolor=DEGENERATE_COLOUR)
        else:
            patch.set(facecolor=colour, alpha=0.5)
    paper = [paper_means.get(m, np.nan) for m in present]
    ax.plot(np.arange(1, len(present) + 1), paper, label="paper Table 2 mean", **PAPER_STYLE)
    if any(m in degenerate for m in present):
        ax.add_patch(Rectangle((0, 0), 0, 0, facecolor="none", edgecolor=DEGENERATE_COLOUR, linestyle="--",
                               label=DEGENERATE_LEGEND))  # a legend entry only
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(np.arange(1, len(present) + 1), [model_label(m, m in degenerate) for m in present],
                  rotation=45, ha="right")
    _grey_degenerate_ticks(ax.get_xticklabels())
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per model (box: quartiles, o: mean)")
    ax.legend(loc="best")
    return _save(figure, path)


@_styled
def depth_figure(summary: pd.DataFrame, metrics: list[str], path: Path, degenerate: Collection[str] = ()) -> Path:
    """Metric (mean, 95% CI) against network depth: one row per metric, one column per family,
    rows sharing their y axis; degenerate map sets hollow and grey. `summary`: model, family,
    depth and m, m_lo, m_hi per metric m."""
    summary = summary.dropna(subset=["depth"])
    families = list(dict.fromkeys(summary["family"]))
    figure, axes = _figure(len(metrics), len(families), width=3.2 * len(families), height=2.3 * len(metrics) + 0.4,
                           sharey="row")
    for col, family in enumerate(families):
        part = summary[summary["family"] == family].sort_values("depth", kind="stable")
        x = np.arange(len(part))  # evenly spaced in depth order; the depth is in each tick label
        flagged = degenerate_rows(part, degenerate)
        colour = FAMILY_COLOURS.get(family, "tab:grey")
        for row, metric in enumerate(metrics):
            ax = axes[row, col]
            bars = _error_bars(part, metric)
            # the line joins the valid map sets only: a degenerate one is no point of the trend
            ax.errorbar(x[~flagged], part[metric][~flagged], yerr=[b[~flagged] for b in bars], capsize=3, color=colour)
            ax.errorbar(x[flagged], part[metric][flagged], yerr=[b[flagged] for b in bars], capsize=3, fmt="none",
                        ecolor=DEGENERATE_COLOUR)
            _markers(ax, x, part[metric], [colour] * len(part), flagged)
            ax.set_xticks(x, [model_label(m, f, "\n") + f"\n({d:g})" for m, d, f in
                              zip(part["model"], part["depth"], flagged)])
            _grey_degenerate_ticks(ax.get_xticklabels())
            ax.set_xlim(-0.5, len(part) - 0.5)
            ax.set_ylabel(metric if col == 0 else "")
            if row == 0:
                ax.set_title(family)
    figure.suptitle("Localisation against depth per family (in brackets: layers or blocks); "
                    "descriptive, 2-4 models each")
    return _save(figure, path)


@_styled
def sanity_figure(sanity: pd.DataFrame, path: Path, degenerate: Collection[str] = ()) -> Path:
    """Trained vs weight-randomised heatmaps: paired bars per model, one panel per metric, over the
    valid map sets (the degenerate ones named below the panels)."""
    sanity = sanity[sanity["copy"] == "full"] if "copy" in sanity else sanity
    metrics = sanity["metric"].unique().tolist()
    figure, axes = _figure(1, len(metrics), width=(0.8 * sanity["model"].nunique() + 2) * len(metrics) / 1.4,
                           height=4.0)
    for ax, metric in zip(axes[0], metrics):
        part = sanity[sanity["metric"] == metric]
        x = np.arange(len(part))
        ax.bar(x - 0.2, part["trained"], width=0.4, label="trained")
        ax.bar(x + 0.2, part["randomized"], width=0.4, label="weights randomised", color="lightgrey")
        for xi, row in zip(x, part.itertuples()):
            if row.reject:
                ax.annotate("*", (xi, max(row.trained, row.randomized)), ha="center", fontsize=12)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(x, [label(m) for m in part["model"]], rotation=45, ha="right")
        ax.set_title(metric)
    axes[0, 0].legend(loc="best")
    figure.suptitle("Trained vs weight-randomised maps (*: Holm p < alpha)")
    _left_out(figure, degenerate)
    return _save(figure, path)


# ----------------------------------------------------------------------------- docs/STUDY.md §9


RUNG_STYLE = {"chance": ("lightgrey", "s"), "image_only": ("tab:purple", "D"), "prior": ("tab:red", "D"),
              "randomized": ("grey", "v"), "gradcam": (None, "o"), "oracle": ("black", "s"),
              "random": ("lightgrey", "s"), "blurred": ("tab:cyan", "P")}


@_styled
def ladder_figure(ladder: pd.DataFrame, models: pd.DataFrame, path: Path, title: Optional[str] = None) -> Path:
    """The baseline ladder: one panel per metric, side by side, rungs bottom to top (chance,
    image-only, prior, each model's randomised map, each model's Grad-CAM, oracle) with 95% CIs,
    one rung per row shared by every panel; the prior's mean as a dashed line; degenerate map sets
    hollow, grey and named so."""
    metrics = list(dict.fromkeys(ladder["metric"]))
    rungs = list(dict.fromkeys(zip(ladder["rung"], ladder["model"])))  # every metric's rungs, in order
    position = {rung: i for i, rung in enumerate(rungs)}
    flagged = dict(zip(zip(ladder["rung"], ladder["model"]), degenerate_rows(ladder)))
    figure, axes = _figure(1, len(metrics), width=1.6 + 1.25 * len(metrics), height=0.2 * len(rungs) + 1.2,
                           sharey=True)
    family = dict(zip(models["model"], models["family"]))
    for ax, metric in zip(axes[0], metrics):
        part = ladder[ladder["metric"] == metric]
        for row in part.itertuples():
            colour, marker = RUNG_STYLE[row.rung]
            colour = colour or FAMILY_COLOURS.get(family.get(row.model), "tab:grey")
            hollow = flagged[(row.rung, row.model)]
            ax.errorbar(row.mean, position[(row.rung, row.model)],
                        xerr=[[row.mean - row.lo], [row.hi - row.mean]] if np.isfinite(row.lo) else None,
                        fmt=marker, color=DEGENERATE_COLOUR if hollow else colour, mfc="none" if hollow else colour,
                        capsize=2, markersize=5)
        prior = part.loc[(part["rung"] == "prior") & (part["model"] == ""), "mean"]  # one prior for every model
        if len(prior):
            ax.axvline(float(prior.iloc[0]), color="tab:red", linestyle="--", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(3))
        ax.set_title(metric)
    axes[0, 0].set_yticks(range(len(rungs)), [_rung_label(rung, model, flagged[(rung, model)])
                                              for rung, model in rungs])
    _grey_degenerate_ticks(axes[0, 0].get_yticklabels())
    axes[0, 0].set_ylim(-0.7, len(rungs) - 0.3)
    figure.suptitle(title or "Baseline ladder (mean, 95% CI; dashed: the location prior; hollow grey: degenerate)")
    return _save(figure, path)


def _rung_label(rung: str, model: str, degenerate: bool) -> str:
    """A model-free rung by its name; a model's rung by the model, and the control it is (ROAD's
    controls are scored by each model's classifier, so they are the model's rungs)."""
    names = {"chance": "chance", "image_only": "image-only", "prior": "location prior", "oracle": "oracle",
             "random": "random map", "blurred": "blurred map", "randomized": "weights randomised"}
    if not model:
        return names.get(rung, rung)
    return f"{model_label(model, degenerate)}{f' ({names[rung]})' if rung in names else ''}"


def _figure_legend(figure: plt.Figure, axes: Iterable[plt.Axes]) -> None:
    """One legend for every panel, below them (per-panel legends would cover the lines)."""
    found: dict[str, object] = {}
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            found.setdefault(text, handle)
    if found:
        figure.legend(list(found.values()), list(found), loc="outside lower center", ncols=min(5, len(found)))


@_styled
def layer_sweep_figure(sweep: pd.DataFrame, metrics: list[str], path: Path) -> Path:
    """Each metric (mean, 95% CI) against layer depth, one line per model; the paper's layer
    filled, the others small; the resolution-matched layer ringed; degenerate layers' map sets
    (the table's `degenerate` column) hollow and grey, their model named so."""
    figure, axes = _figure(1, len(metrics), width=3.6 * len(metrics), height=3.4 + 0.25 * sweep["model"].nunique() / 5)
    for ax, metric in zip(axes[0], metrics):
        for model, part in sweep.groupby("model", sort=False, observed=True):
            part = part.sort_values("layer_depth")
            flagged = degenerate_rows(part)
            colour = DEGENERATE_COLOUR if flagged.all() else FAMILY_COLOURS.get(part["family"].iloc[0], "tab:grey")
            ax.errorbar(part["layer_depth"], part[metric], yerr=_error_bars(part, metric), color=colour, marker=".",
                        capsize=2, linewidth=1, alpha=0.8, linestyle="--" if flagged.all() else "-",
                        label=model_label(str(model), flagged.any()))
            final = part["final_layer"].astype(bool).to_numpy()
            _markers(ax, part["layer_depth"][final], part[metric][final], [colour] * int(final.sum()), flagged[final])
            matched = part[part["matched_layer"].astype(bool)]
            ax.plot(matched["layer_depth"], matched[metric], "o", mfc="none", mec="black", markersize=9)
        ax.set_xlabel("layer depth (share of weight layers run)")
        ax.set_title(metric)
    _figure_legend(figure, axes[0])
    figure.suptitle("Layer sweep: metric against depth through each network\n(large dot: the paper's layer; "
                    "ringed: the resolution-matched layer)")
    return _save(figure, path)


@_styled
def lesion_size_figure(bins: pd.DataFrame, metrics: list[str], models: pd.DataFrame, path: Path,
                       degenerate: Collection[str] = ()) -> Path:
    """Each metric's mean per lesion-size quartile (x: the quartile's median lesion share, log
    scale), one line per model, over the valid map sets (the degenerate ones named)."""
    figure, axes = _figure(1, len(metrics), width=3.8 * len(metrics), height=3.8)
    family = dict(zip(models["model"], models["family"]))
    for ax, metric in zip(axes[0], metrics):
        for model, part in bins.groupby("model", sort=False, observed=True):
            ax.plot(part["mask_fraction"], part[metric], marker="o", label=label(str(model)),
                    color=FAMILY_COLOURS.get(family.get(str(model)), "tab:grey"), alpha=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("lesion share of the image (quartile median)")
        ax.set_title(metric)
    _figure_legend(figure, axes[0])
    figure.suptitle("Localisation against lesion size (valid map sets, paper's layer)")
    _left_out(figure, degenerate)
    return _save(figure, path)


@_styled
def cascade_figure(cascade: pd.DataFrame, models: pd.DataFrame, path: Path) -> Path:
    """The cascade (Adebayo et al. 2018): similarity to the trained map against the units
    re-initialised from the head down, one line per model, one panel per measure; each model's
    pass line (Arun et al. 2021) dashed in its colour; degenerate map sets hollow, grey and faint."""
    measures = list(dict.fromkeys(cascade["measure"]))
    figure, axes = _figure(1, len(measures), width=4.2 * len(measures), height=4.0)
    family = dict(zip(models["model"], models["family"]))
    for ax, measure in zip(axes[0], measures):
        for model, part in cascade[cascade["measure"] == measure].groupby("model", sort=False):
            part = part.sort_values("stages_randomized")
            faint = bool(degenerate_rows(part).any())
            colour = DEGENERATE_COLOUR if faint else FAMILY_COLOURS.get(family.get(model), "tab:grey")
            ax.errorbar(part["stages_randomized"], part["mean"], yerr=_error_bars(part.rename(
                columns={"lo": "mean_lo", "hi": "mean_hi"}), "mean"), marker="o", capsize=2, color=colour,
                mfc="none" if faint else colour, alpha=0.5 if faint else 0.9, label=model_label(model, faint))
            line = part["pass_line"].iloc[0]
            if np.isfinite(line):
                ax.hlines(line, part["stages_randomized"].min(), part["stages_randomized"].max(), colors=colour,
                          linestyles="dashed", linewidth=0.8, alpha=0.35 if faint else 0.8)
        ax.set_xlabel("units re-initialised, head first (0 = trained)")
        ax.set_title(f"{measure} to the trained map")
    _figure_legend(figure, axes[0])
    figure.suptitle("Cascading randomisation: a map that survives its weights' destruction shows the "
                    "architecture,\nnot the training (dashed: pass line)")
    return _save(figure, path)


# profile verdicts (analysis.faithfulness) as markers: filled = yes, x = worse, square = no difference
VERDICT_MARKERS = {"yes": ("o", True), "no: worse": ("X", True), "no difference": ("s", False),
                   "inconclusive": ("o", False)}


@_styled
def profile_figure(profile: pd.DataFrame, questions: Mapping[str, str], models: pd.DataFrame, path: Path,
                   degenerate: Collection[str] = ()) -> Optional[Path]:
    """The reliability profile: one panel per dimension (its key question, `questions`: dimension ->
    question), each valid map set's estimate with its 95% CI, the line it is read against (0 for a
    paired difference, the pass line for the cascade and stability) dashed, and the verdict as the
    marker (filled: yes; X: worse; square: no difference; hollow: inconclusive); the degenerate
    map sets, left out of the profile, named below."""
    shown = [(d, q) for d, q in questions.items()
             if ((profile["dimension"] == d) & (profile["question"] == q) & profile["estimate"].notna()).any()]
    if not shown:
        return None
    order = [m for m in models["model"] if m in set(profile["model"])]
    family = dict(zip(models["model"], models["family"]))
    figure, axes = _figure(1, len(shown), width=1.8 + 2.0 * len(shown), height=1.2 + 0.3 * len(order), sharey=True)
    for ax, (dimension, question) in zip(axes[0], shown):
        part = profile[(profile["dimension"] == dimension) & (profile["question"] == question)].set_index("model")
        for y, model in enumerate(order):
            if model not in part.index or not np.isfinite(part.loc[model, "estimate"]):
                continue
            row = part.loc[model]
            marker, filled = VERDICT_MARKERS.get(str(row["verdict"]).split(",")[0], ("o", False))
            colour = FAMILY_COLOURS.get(family.get(model), "tab:grey")
            ax.errorbar(row["estimate"], y, xerr=[[row["estimate"] - row["lo"]], [row["hi"] - row["estimate"]]]
                        if np.isfinite(row["lo"]) else None, fmt=marker, color=colour,
                        mfc=colour if filled else "none", capsize=2, markersize=6)
        for y, model in enumerate(order):  # each map set's own line (a pass line is per model)
            if model in part.index and np.isfinite(part.loc[model, "line"]):
                ax.vlines(part.loc[model, "line"], y - 0.4, y + 0.4, colors="black", linestyles="dashed",
                          linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(3))
        ax.set_title(f"{dimension}\n{question}")
    axes[0, 0].set_yticks(range(len(order)), [label(m) for m in order])
    axes[0, 0].set_ylim(-0.7, len(order) - 0.3)
    axes[0, 0].invert_yaxis()
    figure.suptitle("Reliability profile (valid map sets; estimate, 95% CI; filled: yes, X: worse, square: "
                    "no difference, hollow: inconclusive)")
    _left_out(figure, degenerate)
    return _save(figure, path)


@_styled
def stability_figure(stability: pd.DataFrame, path: Path, measure: str = "ssim",
                     degenerate: Collection[str] = ()) -> Path:
    """Mean similarity of every pair of runs' maps of the same image, as a matrix, over the valid
    map sets (the degenerate ones named); each cell's value written where it fits."""
    part = stability[stability["measure"] == measure]
    runs = list(dict.fromkeys([(a, s) for a, s in zip(part["model_a"], part["seed_a"])]
                              + [(b, s) for b, s in zip(part["model_b"], part["seed_b"])]))
    index = {run: i for i, run in enumerate(runs)}
    matrix = np.eye(len(runs))
    for row in part.itertuples():
        i, j = index[(row.model_a, row.seed_a)], index[(row.model_b, row.seed_b)]
        matrix[i, j] = matrix[j, i] = row.mean
    cell = min(0.5, (FIGURE_WIDTH_IN - 2.5) / max(len(runs), 1))
    figure, ((ax,),) = _figure(width=2.5 + cell * len(runs), height=2.2 + cell * len(runs))
    image = ax.imshow(matrix, vmin=min(0.0, float(np.nanmin(matrix))), vmax=1, cmap="viridis")
    names = [f"{label(m)} s{s}" for m, s in runs]
    ax.set_xticks(range(len(runs)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(runs)), names)
    if cell >= 0.4:  # "0.83" at MIN_TEXT_PT needs about 0.3 in
        for (i, j), value in np.ndenumerate(matrix):
            if i != j and np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.5 else "black")
    figure.colorbar(image, ax=ax, fraction=0.046, label=f"mean {measure}")
    ax.set_title(f"Map stability: mean {measure} between\ntwo runs' maps of the same image")
    _left_out(figure, degenerate)
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
