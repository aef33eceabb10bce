"""The analysis computed: every table, statistic and figure of the study, written as CSV, JSON and PNG
under the analysis folder (`build_outputs`). No HTML here: `analysis.html` renders what this computes."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from analysis import (
    covariates,
    equivalence,
    faithfulness,
    figures,
    ladder,
    layers,
    paper_values,
    profile,
    reliability,
    stats,
    tables,
    validity,
)
from analysis.inputs import PARAMETERS, StudyInputs, read_backgrounds, read_heatmaps

STATS_METRICS = ["diff_gradcam", "ehr_auc", "ehr_auc_norm"]  # full model comparison for each
DEPTH_METRICS = {"diff_gradcam": "diff_gradcam", "ehr_auc_norm": "ehr_auc_norm", "pointing_hit": "pointing_game"}


@dataclass
class AnalysisOutputs:
    """What analyze wrote: tables (also as CSV), the statistics (JSON), figure and report paths."""

    directory: Path
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    run_summary: pd.DataFrame = field(default_factory=pd.DataFrame)
    excluded: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=validity.EXCLUDED_COLUMNS))
    excluded_primary: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=validity.EXCLUDED_COLUMNS))
    notes: list[str] = field(default_factory=list)  # figures or analyses that could not be made, and why

    statistics_path = property(lambda self: self.directory / "statistics.json")
    report_path = property(lambda self: self.directory / "report.html")
    scores_path = property(lambda self: self.directory / "scores.parquet")


# ----------------------------------------------------------------------------- computing


def _ordered(frame: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """`model` as a categorical in plot order, so every analysis lists models the same way."""
    return frame.assign(model=pd.Categorical(frame["model"].astype(str), categories=order))


def build_outputs(inputs: StudyInputs, directory: Path) -> AnalysisOutputs:
    """Every table, statistic and figure, written under `directory` (CSV, JSON, PNG).

    The paper's tables and comparisons read the paper's layer (`final_layer`) of the primary CAM
    method (`trained`); the layer sweep and the resolution-matched arm read every layer
    (`swept`). Degenerate map sets (`analysis.validity`, one per model, seed, method and layer)
    stay in the per-model tables with their reason and are left out of every comparison, chance
    level, sanity verdict and conclusion: `valid`."""
    alpha, order = inputs.config.statistics.alpha, inputs.model_order
    method = tables.primary_method(inputs.cams)
    cams = _ordered(inputs.cams, order) if len(inputs.cams) else inputs.cams
    primary = tables.final_layer_rows(cams)
    trained = tables.trained_rows(primary, method) if method else cams.iloc[0:0]
    swept = tables.trained_rows(cams, method) if method else cams.iloc[0:0]
    outputs = AnalysisOutputs(directory=directory)
    outputs.excluded = validity.degenerate_sets(inputs.cams, inputs.test_metrics)
    outputs.excluded_primary = validity.among(outputs.excluded, trained)  # the paper's layer, primary method
    valid = validity.without(trained, outputs.excluded)
    outputs.tables = _tables(inputs, primary, trained, valid, method, alpha, outputs.excluded)
    outputs.tables.update(_beyond_tables(inputs, primary, trained, swept, valid, method, alpha, outputs.excluded))
    outputs.statistics = _statistics(trained, valid, method, alpha, outputs)
    outputs.statistics["resolution_matched"] = layers.matched_statistics(swept, outputs.excluded, alpha)
    outputs.tables.update(_reliability_tables(inputs, primary, valid, method, alpha, outputs))
    outputs.tables.update(_faithfulness_tables(inputs, primary, trained, valid, method, alpha, outputs))
    outputs.run_summary = tables.run_summary(trained, outputs.excluded) if len(trained) else pd.DataFrame()
    outputs.tables.update(_statistics_tables(outputs.statistics))
    outputs.figures = _figures(inputs, trained, outputs, method)
    _write_tables(outputs)
    _scores(inputs, swept, alpha).to_parquet(outputs.scores_path, index=False)
    outputs.statistics_path.write_text(json.dumps(_jsonable(outputs.statistics), indent=1))
    return outputs


def model_flags(trained: pd.DataFrame, method: Optional[str], excluded: pd.DataFrame) -> pd.DataFrame:
    """model -> the degenerate reason of its paper-layer map set(s) (docs/STUDY.md §8), for per-model tables."""
    seeds = trained.groupby("model", observed=True)["seed"].nunique().to_dict() if len(trained) else {}
    return validity.flags_by_model(validity.among(excluded, trained), method, {str(m): n for m, n in seeds.items()})


def _tables(inputs: StudyInputs, primary: pd.DataFrame, trained: pd.DataFrame, valid: pd.DataFrame,
            method: Optional[str], alpha: float, excluded: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per-model tables over every map set of the paper's layer, each with a `degenerate` column
    (the reason, or empty); the sanity comparison over the valid sets only."""
    models = inputs.models
    flags = model_flags(trained, method, excluded)
    result = {"table1": tables.table1(inputs.test_metrics, models, inputs.predictions,
                                      inputs.config.training.threshold, alpha)}
    if len(trained):
        result.update(table2=tables.table2(trained, models),
                      localisation=tables.localisation_table(trained, models, alpha),
                      sanity=tables.sanity_table(validity.without(primary, excluded), method, models, alpha))
        if "ehr_auc" in trained:
            result["ehr"] = tables.ehr_table(trained, models, alpha)
        if primary["cam_method"].nunique() > 1:
            result["methods"] = tables.methods_table(primary, models)
    for name in ("table1", "table2", "localisation", "ehr"):
        if name in result:
            result[name] = tables.with_flags(result[name], flags)
    if "localisation" in result and "auprc" in trained:
        result["threshold_free"] = tables.with_flags(tables.threshold_free_table(trained, models, alpha), flags)
    predictions = _ordered(inputs.predictions, inputs.model_order)
    result["classification_pairs"] = stats.classification_comparisons(predictions, inputs.config.training.threshold,
                                                                      alpha)
    return result


def _beyond_tables(inputs: StudyInputs, primary: pd.DataFrame, trained: pd.DataFrame, swept: pd.DataFrame,
                   valid: pd.DataFrame, method: Optional[str], alpha: float,
                   excluded: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """docs/STUDY.md §9: the baseline ladder and the prior test, the layer sweep and the
    resolution-matched arm, the lesion covariates."""
    if trained.empty:
        return {}
    flagged = model_flags(trained, method, excluded)
    flags = dict(zip(flagged["model"], flagged["degenerate"]))
    randomized = tables.copy_rows(primary[primary["cam_method"] == method], "full")
    found = {"ladder": ladder.ladder_table(trained, randomized, inputs.baselines, flags, alpha),
             "beats_prior": ladder.beats_prior(valid, inputs.baselines, alpha, inputs.config.statistics.equivalence_margin)}
    if swept["cam_layer"].nunique() > trained["cam_layer"].nunique():  # cam.layers asked for more than `final`
        found["layer_sweep"] = layers.layer_sweep_table(swept, inputs.models, validity.among(excluded, swept), alpha)
        found["layer_vs_final"] = layers.layer_vs_final_table(swept, excluded, alpha)
        matched = layers.matched_table(found["layer_sweep"])
        if matched["model"].nunique() == swept["model"].nunique():
            found["resolution_matched"] = matched
    terms = [covariates.covariate_model(valid, metric, alpha) for metric in covariates.COVARIATE_METRICS]
    found["covariates"] = pd.concat([t for t in terms if len(t)] or [terms[0]], ignore_index=True)
    return {name: table for name, table in found.items() if len(table)}  # an empty table says nothing


def _reliability_tables(inputs: StudyInputs, primary: pd.DataFrame, valid: pd.DataFrame, method: Optional[str],
                        alpha: float, outputs: AnalysisOutputs) -> dict[str, pd.DataFrame]:
    """docs/STUDY.md §10 over the valid map sets of the paper's layer: the cascade against its pass
    line, run-to-run stability, and per compared metric equivalence and power."""
    if valid.empty or method is None:
        return {}
    settings = inputs.config.statistics
    found: dict[str, pd.DataFrame] = {}
    cascade_rows = tables.copy_rows(primary[primary["cam_method"] == method], "cascade")
    if len(cascade_rows):
        lines = reliability.pass_lines(inputs.store, valid, method, inputs.config.sanity.pass_line_pairs)
        flags = model_flags(tables.trained_rows(primary, method), method, outputs.excluded)
        found["cascade"] = reliability.cascade_table(cascade_rows, lines, dict(zip(flags["model"], flags["degenerate"])),
                                                     alpha)
        outputs.statistics["cascade"] = reliability.cascade_verdicts(found["cascade"]).to_dict(orient="records")
    if valid[["model", "seed"]].drop_duplicates().shape[0] >= 2:
        found["stability"] = reliability.stability_table(inputs.store, valid, method, alpha)
        outputs.statistics["stability"] = reliability.stability_summary(found["stability"])
    margin, power = settings.equivalence_margin, settings.power
    for metric, comparison in outputs.statistics["comparisons"].items():
        found[f"{metric}_equivalence"] = equivalence.equivalence_table(valid.dropna(subset=[metric]), metric, comparison,
                                                                       margin, alpha, power)
    return {name: table for name, table in found.items() if len(table)}


def _faithfulness_tables(inputs: StudyInputs, primary: pd.DataFrame, trained: pd.DataFrame, valid: pd.DataFrame,
                         method: Optional[str], alpha: float, outputs: AnalysisOutputs) -> dict[str, pd.DataFrame]:
    """docs/STUDY.md §11: faithfulness and robustness per model and against their references, the
    ROAD rungs of the ladder, the reliability profile and the depth trend. A study scored before
    these columns existed gets the profile and the trend with the new dimensions "not measured"."""
    if trained.empty or method is None:
        return {}
    settings = inputs.config.statistics
    margin, replicates, seed = settings.equivalence_margin, settings.bootstrap_replicates, settings.bootstrap_seed
    flagged = model_flags(trained, method, outputs.excluded)
    twin = tables.copy_rows(primary[primary["cam_method"] == method], "full")
    found: dict[str, pd.DataFrame] = {}
    for name, metrics, names, metric in (
            ("faithfulness", faithfulness.FAITHFULNESS_METRICS, faithfulness.FAITHFULNESS_REFERENCES, "road_gap"),
            ("robustness", faithfulness.ROBUSTNESS_METRICS, faithfulness.ROBUSTNESS_REFERENCES, "max_sensitivity")):
        table = faithfulness.model_table(trained, inputs.models, metrics, alpha, replicates, seed)
        if len(table):
            found[name] = tables.with_flags(table, flagged)
            references = faithfulness.references(valid, inputs.controls, twin, method, names)
            found[f"{name}_pairs"] = faithfulness.pairs_table(valid, references, metric, alpha, margin)
    if faithfulness.measured(trained, ladder.ROAD_METRIC) and "ladder" in outputs.tables:
        road = ladder.road_ladder(trained, twin, faithfulness.control_rows(inputs.controls, method),
                                  dict(zip(flagged["model"], flagged["degenerate"])), alpha)
        outputs.tables["ladder"] = pd.concat([outputs.tables["ladder"], road], ignore_index=True)
    found["profile"] = profile.profile_table(valid, {**outputs.tables, **found}, outputs.statistics.get("cascade"),
                                             alpha, replicates, seed, inputs.config.training.threshold, margin)
    valid_twin = twin.merge(valid[["model", "seed"]].drop_duplicates(), on=["model", "seed"])
    found["depth_trend"] = profile.depth_trend_table(valid, valid_twin, inputs.models,
                                                     {**PARAMETERS, **_extra_parameters(inputs)}, alpha, margin)
    return {name: table for name, table in found.items() if len(table)}


def _extra_parameters(inputs: StudyInputs) -> dict[str, Optional[float]]:
    """Models outside the built-in registry have no stated parameter count (no trend point)."""
    return {str(m): None for m in inputs.model_order if m not in PARAMETERS}


def _statistics(trained: pd.DataFrame, valid: pd.DataFrame, method: Optional[str], alpha: float,
                outputs: AnalysisOutputs) -> dict[str, Any]:
    """Every comparison over the valid map sets; beside it, the paper's own analysis (one-way
    ANOVA and Tukey) over every model as the paper did it; the excluded sets with reasons."""
    verdict = stats.classification_verdict(outputs.tables["classification_pairs"])
    result: dict[str, Any] = {"alpha": alpha, "cam_method": method, "comparisons": {},
                              "paper_all_models": {}, "classification_verdict": verdict,
                              "excluded": outputs.excluded.to_dict(orient="records")}
    for metric in (m for m in STATS_METRICS if m in trained and trained[m].notna().any()):
        if trained["model"].nunique() >= 2:
            anova, tukey = stats.paper_anova_tukey(trained.dropna(subset=[metric]), metric, alpha=alpha)
            result["paper_all_models"][metric] = {"anova": anova, "tukey": tukey}
    scored_models = valid["model"].nunique() if len(valid) else 0
    if scored_models < 2:
        outputs.notes.append(f"Model comparisons need valid CAM scores of at least two models; {scored_models} "
                             f"available ({len(outputs.excluded)} degenerate map set(s) left out).")
        return result
    for metric in (m for m in STATS_METRICS if m in valid and valid[m].notna().any()):
        result["comparisons"][metric] = stats.compare_models(valid.dropna(subset=[metric]), metric, alpha=alpha)
    return result


def _statistics_tables(statistics: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """The pair tables and model estimates of every comparison, for CSV and MLflow."""
    found: dict[str, pd.DataFrame] = {}
    for metric, comparison in statistics["comparisons"].items():
        if statistics["excluded"]:  # else it equals the paper's analysis over every model below
            found[f"{metric}_paper_tukey_valid"] = comparison["paper"]["tukey"]
        found[f"{metric}_mixed_model"] = comparison["mixed_model"]["estimates"]
        found[f"{metric}_block_tukey"] = comparison["block_tukey"]
        found[f"{metric}_wilcoxon_holm"] = comparison["wilcoxon_holm"]
        if "run_level" in comparison:
            found[f"{metric}_run_level_tukey"] = comparison["run_level"]["tukey"]
        if "crossed" in comparison:
            found[f"{metric}_crossed_model"] = comparison["crossed"]["estimates"]
    for metric, paper in statistics["paper_all_models"].items():
        found[f"{metric}_paper_tukey"] = paper["tukey"]  # every model, degenerate sets included, as the paper did
    if "diff_gradcam" in statistics["comparisons"]:
        found["tukey_vs_paper"] = tables.tukey_vs_paper(statistics["comparisons"]["diff_gradcam"])
    matched = statistics.get("resolution_matched") or {}
    for metric, paper in matched.get("paper_all_models", {}).items():
        found[f"resolution_matched_{metric}_paper_tukey"] = paper["tukey"]
    for metric, comparison in matched.get("comparisons", {}).items():
        found[f"resolution_matched_{metric}_block_tukey"] = comparison["block_tukey"]
    if len(statistics["excluded"]):
        found["excluded"] = pd.DataFrame(statistics["excluded"])
    return found


def _scores(inputs: StudyInputs, swept: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """scores.parquet: every map set of every run (t intervals over images), and the trained map
    sets per model (hierarchical bootstrap over seeds and images)."""
    scores = tables.scores_table(inputs.cams, inputs.test_metrics, alpha, inputs.baselines, inputs.controls)
    if swept.empty:
        return scores
    settings = inputs.config.statistics
    models_level = tables.model_scores(swept, alpha, settings.bootstrap_replicates, settings.bootstrap_seed)
    return pd.concat([scores, models_level], ignore_index=True).astype({"seed": "Int64"})


def _write_tables(outputs: AnalysisOutputs) -> None:
    folder = outputs.directory / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in outputs.tables.items():
        table.to_csv(folder / f"{name}.csv", index=False)
    if not outputs.run_summary.empty:
        outputs.run_summary.to_csv(folder / "run_summary.csv", index=False)


def _jsonable(value: Any) -> Any:
    """Plain JSON: DataFrames as records, numpy scalars as Python numbers, nan/inf as null."""
    if isinstance(value, pd.DataFrame):
        return _jsonable(value.astype(object).to_dict(orient="records"))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return value if value is None or isinstance(value, str) else str(value)


# ----------------------------------------------------------------------------- figures


def _figures(inputs: StudyInputs, trained: pd.DataFrame, outputs: AnalysisOutputs,
             method: Optional[str]) -> dict[str, Path]:
    folder, found = outputs.directory / "figures", {}
    if trained.empty:
        outputs.notes.append("No CAM scores: no localisation figures.")
        return found
    flagged = set(model_flags(trained, method, outputs.excluded)["model"])
    degenerate = [m for m in inputs.model_order if m in flagged]  # drawn hollow and grey, or named as left out
    found["figure1"] = _figure1(inputs, trained, folder / "figure1_heatmaps.png", method, outputs.notes, degenerate)
    if "ehr" in outputs.tables:
        found["figure2"] = figures.ehr_figure(outputs.tables["ehr"], folder / "figure2_ehr_auc.png")
    found["distributions"] = figures.distribution_figure(
        trained, inputs.models, dict(zip(paper_values.TABLE2["model"], paper_values.TABLE2["mean"])),
        folder / "diff_gradcam_distributions.png", degenerate=degenerate)
    summary = tables.metric_summary(trained, inputs.models, {k: v for k, v in DEPTH_METRICS.items() if k in trained},
                                    inputs.config.statistics.alpha)
    found["depth"] = figures.depth_figure(summary, [v for k, v in DEPTH_METRICS.items() if k in trained],
                                          folder / "metric_vs_depth.png", degenerate)
    if not outputs.tables["sanity"].empty:
        found["sanity"] = figures.sanity_figure(outputs.tables["sanity"], folder / "sanity_randomized.png", degenerate)
    found.update(_beyond_figures(inputs, trained, outputs, folder, degenerate))
    if len(outputs.tables.get("cascade", ())):
        found["cascade"] = figures.cascade_figure(outputs.tables["cascade"], inputs.models, folder / "cascade.png")
    if len(outputs.tables.get("profile", ())):
        found["profile"] = figures.profile_figure(outputs.tables["profile"], profile.KEY_QUESTION, inputs.models,
                                                  folder / "profile.png", degenerate)
    if len(outputs.tables.get("stability", ())):
        found["stability"] = figures.stability_figure(outputs.tables["stability"], folder / "stability.png",
                                                      degenerate=degenerate)
    return {name: path for name, path in found.items() if path is not None}


def _beyond_figures(inputs: StudyInputs, trained: pd.DataFrame, outputs: AnalysisOutputs,
                    folder: Path, degenerate: list[str]) -> dict[str, Path]:
    """The ladder, the layer sweep and metric against lesion size (docs/STUDY.md §9)."""
    found: dict[str, Path] = {}
    rungs = outputs.tables.get("ladder", pd.DataFrame(columns=["metric"]))
    road = rungs["metric"] == ladder.ROAD_METRIC  # ROAD's rungs are per model: a figure of their own
    if (~road).any():
        found["ladder"] = figures.ladder_figure(rungs[~road], inputs.models, folder / "ladder.png")
    if road.any():
        found["ladder_road"] = figures.ladder_figure(
            rungs[road], inputs.models, folder / "ladder_road.png",
            "ROAD ladder: each model's map and its controls, scored by its classifier (mean, 95% CI; hollow grey: "
            "degenerate)")
    sweep = outputs.tables.get("layer_sweep")
    if sweep is not None and len(sweep):
        shown = [name for name in ("diff_gradcam", "auprc", "pointing_game") if name in sweep]
        found["layer_sweep"] = figures.layer_sweep_figure(sweep, shown, folder / "layer_sweep.png")
    valid = validity.without(trained, outputs.excluded)
    metrics = [m for m in covariates.COVARIATE_METRICS if m in valid]
    bins = covariates.size_bins(valid, metrics)
    if len(bins):
        found["lesion_size"] = figures.lesion_size_figure(bins, metrics, inputs.models, folder / "lesion_size.png",
                                                          degenerate)
    return found


def _figure1(inputs: StudyInputs, trained: pd.DataFrame, path: Path, method: Optional[str],
             notes: list[str], degenerate: list[str]) -> Optional[Path]:
    image_ids = figures.figure1_images(trained)
    backgrounds = read_backgrounds(inputs.store, image_ids)
    if not image_ids or len(backgrounds) < len(image_ids):
        notes.append("Figure 1 needs positive test images scored by every model and the preprocessing "
                     "cache data/cache/; " + ("the cache is absent." if image_ids else "no such image."))
        return None
    models = [m for m in inputs.model_order if m in set(trained["model"])]
    heatmaps = {m: read_heatmaps(inputs.store, m, figures.first_seed(trained, m), image_ids, method) for m in models}
    return figures.heatmap_grid(backgrounds, heatmaps, image_ids, models, path, degenerate)


