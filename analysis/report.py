"""The analyze stage: tables, statistics, figures and one self-contained HTML report.

    analyze(study_dir, config_dict, tracker=None) -> <study>/analysis/report.html

writes `<study>/analysis/` atomically: tables/*.csv, statistics.json, figures/*.png and
report.html (figures embedded as base64, no network, plain CSS). Missing or partial inputs
become a report section. `log_to_mlflow` puts the results on the study's parent run and the
per-run summaries on the child runs.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd
from mlflow.entities import Metric

from analysis import figures, paper_values, stats, tables
from analysis.inputs import StudyInputs, load_study, read_backgrounds, read_heatmaps
from training.atomic import atomic_dir

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
    notes: list[str] = field(default_factory=list)  # figures or analyses that could not be made, and why

    statistics_path = property(lambda self: self.directory / "statistics.json")
    report_path = property(lambda self: self.directory / "report.html")


def analyze(study_dir: str | Path, config: Mapping[str, Any], tracker: Any = None,
            known_models: Optional[Mapping[str, tuple[str, int]]] = None,
            runs: Optional[list[tuple[str, int]]] = None) -> Path:
    """Analyse the study store and return the path of report.html.

    config: the resolved config as a plain dict (`StudyConfig.to_dict()`). tracker: anything
    with `.client` (MlflowClient), `.parent_run()` and `.current_children()` (run key -> run id
    of each run's current attempt), and `.call(fn, *args)` (runs `fn` unless the server is
    unreachable), as orchestrator.tracking.StudyTracker has.
    known_models: model -> (family, depth) for models outside the built-in table.
    runs: the (model, seed) runs to analyse (default: the config's models x seeds).
    """
    inputs = load_study(study_dir, config, known_models, runs)
    final = inputs.root / "analysis"
    with atomic_dir(final) as tmp:
        outputs = build_outputs(inputs, tmp)
        write_report(inputs, outputs)
    outputs = _moved(outputs, tmp, final)
    if tracker is not None:
        tracker.call(lambda: log_to_mlflow(tracker.client, tracker.parent_run(), tracker.current_children(), outputs))
    return outputs.report_path


def _moved(outputs: AnalysisOutputs, old: Path, new: Path) -> AnalysisOutputs:
    outputs.directory = new
    outputs.figures = {name: new / path.relative_to(old) for name, path in outputs.figures.items()}
    return outputs


# ----------------------------------------------------------------------------- computing


def _alpha(config: Mapping[str, Any]) -> float:
    return float((config.get("statistics") or {}).get("alpha", stats.ALPHA))


def _threshold(config: Mapping[str, Any]) -> float:
    return float((config.get("training") or {}).get("threshold", 0.5))


def _ordered(frame: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """`model` as a categorical in plot order, so every analysis lists models the same way."""
    return frame.assign(model=pd.Categorical(frame["model"].astype(str), categories=order))


def build_outputs(inputs: StudyInputs, directory: Path) -> AnalysisOutputs:
    """Every table, statistic and figure, written under `directory` (CSV, JSON, PNG)."""
    alpha, order = _alpha(inputs.config), inputs.model_order
    method = tables.primary_method(inputs.cams)
    trained = _ordered(tables.trained_rows(inputs.cams, method), order) if method else inputs.cams.iloc[0:0]
    outputs = AnalysisOutputs(directory=directory)
    outputs.tables = _tables(inputs, trained, method, alpha)
    outputs.statistics = _statistics(trained, method, alpha, outputs)
    outputs.run_summary = tables.run_summary(trained) if len(trained) else pd.DataFrame()
    outputs.tables.update(_statistics_tables(outputs.statistics))
    outputs.figures = _figures(inputs, trained, outputs, method)
    _write_tables(outputs)
    outputs.statistics_path.write_text(json.dumps(_jsonable(outputs.statistics), indent=1))
    return outputs


def _tables(inputs: StudyInputs, trained: pd.DataFrame, method: Optional[str], alpha: float) -> dict[str, pd.DataFrame]:
    models = inputs.models
    result = {"table1": tables.table1(inputs.test_metrics, models)}
    if len(trained):
        result.update(table2=tables.table2(trained, models),
                      localisation=tables.localisation_table(trained, models, alpha),
                      sanity=tables.sanity_table(inputs.cams, method, models, alpha))
        if "ehr_auc" in trained:
            result["ehr"] = tables.ehr_table(trained, models, alpha)
        if inputs.cams["cam_method"].nunique() > 1:
            result["methods"] = tables.methods_table(inputs.cams, models)
    predictions = _ordered(inputs.predictions, inputs.model_order)
    result["classification_pairs"] = stats.classification_comparisons(predictions, _threshold(inputs.config), alpha)
    return result


def _statistics(trained: pd.DataFrame, method: Optional[str], alpha: float,
                outputs: AnalysisOutputs) -> dict[str, Any]:
    verdict = stats.classification_verdict(outputs.tables["classification_pairs"])
    result: dict[str, Any] = {"alpha": alpha, "cam_method": method, "comparisons": {},
                              "classification_verdict": verdict}
    scored_models = trained["model"].nunique() if len(trained) else 0
    if scored_models < 2:
        outputs.notes.append(f"Model comparisons need CAM scores of at least two models; {scored_models} available.")
        return result
    for metric in (m for m in STATS_METRICS if m in trained and trained[m].notna().any()):
        result["comparisons"][metric] = stats.compare_models(trained.dropna(subset=[metric]), metric, alpha=alpha)
    return result


def _statistics_tables(statistics: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """The pair tables and model estimates of every comparison, for CSV and MLflow."""
    found: dict[str, pd.DataFrame] = {}
    for metric, comparison in statistics["comparisons"].items():
        found[f"{metric}_paper_tukey"] = comparison["paper"]["tukey"]
        found[f"{metric}_mixed_model"] = comparison["mixed_model"]["estimates"]
        found[f"{metric}_block_tukey"] = comparison["block_tukey"]
        found[f"{metric}_wilcoxon_holm"] = comparison["wilcoxon_holm"]
        if "run_level" in comparison:
            found[f"{metric}_run_level_tukey"] = comparison["run_level"]["tukey"]
        if "crossed" in comparison:
            found[f"{metric}_crossed_model"] = comparison["crossed"]["estimates"]
    if "diff_gradcam" in statistics["comparisons"]:
        found["tukey_vs_paper"] = tables.tukey_vs_paper(statistics["comparisons"]["diff_gradcam"])
    return found


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
    found["figure1"] = _figure1(inputs, trained, folder / "figure1_heatmaps.png", method, outputs.notes)
    if "ehr" in outputs.tables:
        found["figure2"] = figures.ehr_figure(outputs.tables["ehr"], folder / "figure2_ehr_auc.png")
    found["distributions"] = figures.distribution_figure(
        trained, inputs.models, dict(zip(paper_values.TABLE2["model"], paper_values.TABLE2["mean"])),
        folder / "diff_gradcam_distributions.png")
    summary = tables.metric_summary(trained, inputs.models, {k: v for k, v in DEPTH_METRICS.items() if k in trained})
    found["depth"] = figures.depth_figure(summary, [v for k, v in DEPTH_METRICS.items() if k in trained],
                                          folder / "metric_vs_depth.png")
    if not outputs.tables["sanity"].empty:
        found["sanity"] = figures.sanity_figure(outputs.tables["sanity"], folder / "sanity_randomized.png")
    return {name: path for name, path in found.items() if path is not None}


def _figure1(inputs: StudyInputs, trained: pd.DataFrame, path: Path, method: Optional[str],
             notes: list[str]) -> Optional[Path]:
    image_ids = figures.figure1_images(trained)
    backgrounds = read_backgrounds(inputs.root, image_ids)
    if not image_ids or len(backgrounds) < len(image_ids):
        notes.append("Figure 1 needs positive test images scored by every model and the preprocessing "
                     "cache data/cache/; " + ("the cache is absent." if image_ids else "no such image."))
        return None
    models = [m for m in inputs.model_order if m in set(trained["model"])]
    heatmaps = {m: read_heatmaps(inputs.root, m, figures.first_seed(trained, m), image_ids, method) for m in models}
    return figures.heatmap_grid(backgrounds, heatmaps, image_ids, models, path)


# ----------------------------------------------------------------------------- MLflow


def log_to_mlflow(client: Any, parent_run_id: str, child_run_ids: Mapping[str, str], outputs: AnalysisOutputs) -> None:
    """Tables (`log_table`), figures, statistics.json and report.html on the parent; the summary
    metrics of each run (diff_gradcam_mean, ehr_auc_mean, ...) on its child."""
    logged = {Path(a.path).name for a in client.list_artifacts(parent_run_id, "analysis/tables")}
    for name, table in outputs.tables.items():
        _log_table(client, parent_run_id, _loggable(table), f"{name}.json", replace=f"{name}.json" in logged)
    for path in outputs.figures.values():
        client.log_artifact(parent_run_id, str(path), "analysis/figures")
    for path in (outputs.statistics_path, outputs.report_path):
        client.log_artifact(parent_run_id, str(path), "analysis")
    _log_metrics(client, parent_run_id, _headline_metrics(outputs.statistics))
    for row in outputs.run_summary.to_dict(orient="records"):
        if row["run_key"] in child_run_ids:
            _log_metrics(client, child_run_ids[row["run_key"]], {k: row[k] for k in tables.RUN_SUMMARY if k in row})


def _log_table(client: Any, run_id: str, table: pd.DataFrame, name: str, replace: bool) -> None:
    """`client.log_table` under analysis/tables/. log_table appends to a table of the same name, so
    a rerun replaces the file instead, in log_table's own format (pandas JSON, orient="split")."""
    if not replace:
        client.log_table(run_id, data=table, artifact_file=f"analysis/tables/{name}")
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        table.to_json(path, orient="split", index=False, date_format="iso")
        client.log_artifact(run_id, str(path), "analysis/tables")


def _loggable(table: pd.DataFrame) -> pd.DataFrame:
    """Categoricals as plain strings (MLflow serialises the table as JSON)."""
    return table.astype({c: str for c in table.columns if isinstance(table[c].dtype, pd.CategoricalDtype)})


def _headline_metrics(statistics: Mapping[str, Any]) -> dict[str, float]:
    found = {}
    for metric, comparison in statistics.get("comparisons", {}).items():
        found[f"{metric}_paper_anova_p"] = comparison["paper"]["anova"]["p"]
        found[f"{metric}_mixed_model_p"] = comparison["mixed_model"]["equal_means"]["p"]
        found[f"{metric}_friedman_p"] = comparison["friedman"]["p"]
        found[f"{metric}_significant_pairs"] = len(comparison["significant_pairs"])
    return found


def _log_metrics(client: Any, run_id: str, metrics: Mapping[str, Any]) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()
             if isinstance(v, (int, float, np.number)) and math.isfinite(float(v))]
    if batch:
        client.log_batch(run_id, metrics=batch)


# ----------------------------------------------------------------------------- the HTML report


CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.5em; }
table { border-collapse: collapse; font-size: .82em; margin: .6em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .6em 1em; margin: 1em 0; }
.missing { background: #fdecea; border-left: 4px solid #d93025; padding: .6em 1em; }
.paper { background: #eef3fb; border-left: 4px solid #4a78c2; padding: .6em 1em; }
.verdict { background: #e8f5e9; border-left: 4px solid #2e7d32; padding: .6em 1em; }
img { max-width: 100%; border: 1px solid #eee; } caption { caption-side: top; text-align: left; color: #555; }
.small { font-size: .85em; color: #555; } pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .8em; }
"""


def write_report(inputs: StudyInputs, outputs: AnalysisOutputs) -> Path:
    """report.html: setup, data, Table 1, Table 2, EHR, statistics, figures, conclusions."""
    sections = [_missing_section(inputs, outputs), _setup_section(inputs), _data_section(inputs),
                _classification_section(outputs), _table2_section(outputs), _ehr_section(outputs),
                _localisation_section(outputs), _statistics_section(outputs), _figures_section(outputs),
                _conclusions_section(inputs, outputs)]
    title = f"camstudy report: {html.escape(str(inputs.config.get('study') or inputs.root.name))}"
    body = "\n".join(s for s in sections if s)
    document = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
                f"<style>{CSS}</style></head><body><h1>{title}</h1>"
                f"<p class='small'>Generated {time.strftime('%Y-%m-%d %H:%M')} from {html.escape(str(inputs.root))}. "
                f"Reproduction of {html.escape(paper_values.CITATION)}.</p>\n{body}</body></html>\n")
    outputs.report_path.write_text(document, encoding="utf-8")
    return outputs.report_path


def _table_html(table: Optional[pd.DataFrame], caption: str, name: Optional[str] = None, digits: int = 4) -> str:
    """An HTML table with its caption; `name` (the CSV's name) becomes the id `table-<name>`."""
    anchor = f" id='table-{name}'" if name else ""
    if table is None or table.empty:
        return f"<p class='note'{anchor}>{html.escape(caption)}: no data.</p>"
    shown = table.drop(columns=[c for c in ("family", "depth") if c in table])
    shown = shown.assign(**{c: shown[c].astype(str).map(figures.label)
                            for c in ("model", "group1", "group2", "model_a", "model_b") if c in shown})
    text = shown.to_html(index=False, na_rep="—", border=0, float_format=lambda v: f"{v:.{digits}g}")
    # to_html starts with '<table border="0" class="dataframe">': the caption follows its first '>'
    return f"<div{anchor}>" + text.replace(">", f"><caption>{html.escape(caption)}</caption>", 1) + "</div>"


def _figure_html(outputs: AnalysisOutputs, name: str, caption: str) -> str:
    path = outputs.figures.get(name)
    if path is None or not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
            f"<figcaption class='small'>{html.escape(caption)}</figcaption></figure>")


def _box(kind: str, text: str) -> str:
    return f"<div class='{kind}'>{text}</div>"


def _missing_section(inputs: StudyInputs, outputs: AnalysisOutputs) -> str:
    items = inputs.missing + outputs.notes
    if not items:
        return ""
    listed = "".join(f"<li>{html.escape(item)}</li>" for item in items)
    return (f"<h2>Missing or incomplete inputs</h2>" +
            _box("missing", f"<p>The results below use only what exists. Left out:</p><ul>{listed}</ul>"))


def _setup_section(inputs: StudyInputs) -> str:
    config = inputs.config
    get = lambda section, key, default="—": (config.get(section) or {}).get(key, default)  # noqa: E731
    rows = [("study", config.get("study", inputs.root.name)), ("data source", get("data", "source")),
            ("models", ", ".join(inputs.model_order)), ("initialisation", get("models", "init")),
            ("seeds", get("training", "seeds")), ("image size", get("preprocess", "image_size")),
            ("recipes", "; ".join(f"{k}: {v.get('optimizer')} lr {v.get('lr')} × {v.get('epochs')} epochs"
                                  for k, v in (config.get("recipes") or {}).items())),
            ("decision threshold", _threshold(config)), ("CAM methods", get("cam", "methods")),
            ("scored images", get("cam", "images")), ("alpha", _alpha(config)),
            ("runs finished", f"{int(inputs.runs['finished'].sum())} of {len(inputs.runs)}")]
    table = pd.DataFrame(rows, columns=["setting", "value"]).astype(str)
    full = html.escape(json.dumps(config, indent=1, default=str))
    return (f"<h2>1. Setup</h2>{_table_html(table, 'Configuration summary')}"
            f"<details><summary>Full resolved configuration</summary><pre>{full}</pre></details>")


def _data_section(inputs: StudyInputs) -> str:
    parts = ["<h2>2. Data</h2>"]
    if inputs.manifest is not None and {"split", "label"} <= set(inputs.manifest.columns):
        counts = pd.crosstab(inputs.manifest["split"], inputs.manifest["label"]).reset_index()
        counts.columns = [str(c) for c in counts.columns]
        parts.append(_table_html(counts, "Images per split and label (1 = pneumothorax)"))
        parts.append(_mask_fraction_html(inputs.manifest))
    if inputs.data_report:
        flat = pd.json_normalize(inputs.data_report, sep=".").T.reset_index()
        flat.columns = ["item", "value"]
        parts.append(_table_html(flat.astype(str), "Data report (data/report.json)"))
    return "".join(parts) if len(parts) > 1 else parts[0] + "<p class='note'>No manifest or data report.</p>"


def _mask_fraction_html(manifest: pd.DataFrame) -> str:
    if "mask_fraction" not in manifest:
        return ""
    positives = manifest[(manifest["label"] == 1) & (manifest["split"] == "test")]["mask_fraction"]
    quantiles = positives.quantile([0.1, 0.25, 0.5, 0.75, 0.9]).rename("mask fraction").reset_index()
    quantiles.columns = ["quantile", "mask fraction"]
    return _table_html(quantiles, f"Lesion size of the {len(positives)} positive test images (share of the image)")


def _classification_section(outputs: AnalysisOutputs) -> str:
    table = tables.merge_intervals(outputs.tables["table1"])
    pairs = outputs.tables["classification_pairs"]
    return ("<h2>3. Classification (Table 1)</h2>"
            + _table_html(table, "Table 1: test accuracy, precision, recall (Wilson 95% CI) and AUC (DeLong 95% CI); "
                                 "several seeds: mean ± SD across seeds. paper_*: the paper's Table 1 (no CIs given).",
                          "table1")
            + _box("verdict", html.escape(outputs.statistics["classification_verdict"]))
            + "<details><summary>All model pairs: paired DeLong and exact McNemar, Holm-corrected per seed</summary>"
            + _table_html(pairs, "Pairwise classification tests", "classification_pairs") + "</details>")


def _table2_section(outputs: AnalysisOutputs) -> str:
    if "table2" not in outputs.tables:
        return "<h2>4. Diff_GradCAM (Table 2)</h2><p class='note'>No CAM scores.</p>"
    return ("<h2>4. Diff_GradCAM (Table 2)</h2>"
            + _table_html(outputs.tables["table2"], "Table 2: mean heat inside minus outside the mask, over every "
                          "scored positive test image (and seed); paper_*: the paper's Table 2.", "table2")
            + _figure_html(outputs, "distributions", "Diff_GradCAM per model; red x: the paper's Table 2 mean."))


def _ehr_section(outputs: AnalysisOutputs) -> str:
    if "ehr" not in outputs.tables:
        return ""
    ehr = outputs.tables["ehr"]
    shown = tables.merge_intervals(ehr.drop(columns=["paper_ehr_source", "paper_ehr_low", "paper_ehr_high"]), 4)
    sources = ehr[["model", "paper_ehr_auc", "paper_ehr_exact", "paper_ehr_source"]].dropna(subset=["paper_ehr_auc"])
    return ("<h2>5. EHR AUC with chance level and oracle</h2>" + _box("note", _chance_text(ehr))
            + _table_html(shown, "EHR AUC per model (mean, 95% CI over images), its chance level (a heatmap that "
                                 "ignores the lesion), oracle (heatmap = mask) and normalised score "
                                 "(ehr - chance) / (oracle - chance); *_inputiba: the original EHR of "
                                 "Zhang et al. 2021.",
                          "ehr")
            + _figure_html(outputs, "figure2", "Figure 2: EHR AUC per model with chance and oracle; "
                                               "paper values in red.")
            + "<details><summary>Where the paper's EHR values come from</summary>"
            + _table_html(sources, "Paper EHR AUC values (§4.3 text; exact = False: given only roughly)")
            + "</details>")


def _chance_text(ehr: pd.DataFrame) -> str:
    text = ("<p><b>Read EHR AUC against its chance level.</b> A heatmap that ignores the lesion scores about the "
            "lesion's share f of the image. The paper's values (0.0145–0.0319) are the chance level of lesions "
            "covering 1.5–3.2% of the image, so by themselves they do not show localisation.")
    fraction, chance = ehr["mask_fraction"].mean(), ehr["ehr_auc_chance"].mean()
    if np.isfinite(fraction) and np.isfinite(chance) and chance > 0:
        low, high = ehr["ehr_auc"].min(), ehr["ehr_auc"].max()
        text += (f" Here the scored lesions cover {fraction:.2%} of the image on average, the chance level is "
                 f"{chance:.4f}, and the models score {low:.4f}–{high:.4f} "
                 f"({low / chance:.2g}–{high / chance:.2g}× chance).")
    return text + " The normalised score puts chance at 0 and the oracle at 1.</p>"


def _localisation_section(outputs: AnalysisOutputs) -> str:
    if "localisation" not in outputs.tables:
        return ""
    parts = ["<h2>6. Energy, pointing game, IoU</h2>",
             _table_html(tables.merge_intervals(outputs.tables["localisation"]),
                         "Energy inside the mask, pointing-game hit rate, IoU of the Otsu-thresholded heatmap "
                         "(mean, 95% CI over images); cam_all_zero: heatmaps that are exactly zero (kept, counted).",
                         "localisation")]
    if "methods" in outputs.tables:
        parts.append(_table_html(outputs.tables["methods"], "Means per CAM method", "methods"))
    return "".join(parts)


def _statistics_section(outputs: AnalysisOutputs) -> str:
    comparisons = outputs.statistics["comparisons"]
    if not comparisons:
        return "<h2>7. Statistics</h2><p class='note'>Not enough models with CAM scores to compare.</p>"
    parts = ["<h2>7. Statistics</h2>"]
    for metric, comparison in comparisons.items():
        body = _paper_analysis_html(metric, comparison, outputs) + _our_analysis_html(metric, comparison)
        parts.append(body if metric == "diff_gradcam" else
                     f"<details><summary>The same analyses for {metric}</summary>{body}</details>")
    return "".join(parts)


def _paper_analysis_html(metric: str, comparison: dict[str, Any], outputs: AnalysisOutputs) -> str:
    anova = comparison["paper"]["anova"]
    checks = anova["assumptions"]
    published = (f"; the paper reports p &lt; {paper_values.ANOVA_P_BELOW} for Diff_GradCAM"
                 if metric == "diff_gradcam" else "")
    text = (f"<p><b>The paper's analysis</b> (one-way ANOVA and Tukey HSD, every score an independent sample"
            f"{published}). {html.escape(anova['verdict'])} {html.escape(comparison['paper']['note'])} "
            f"Checks: Shapiro p = {checks['shapiro_p']:.2g}, Levene p = {checks['levene_p']:.2g}.</p>")
    claims = outputs.tables.get("tukey_vs_paper") if metric == "diff_gradcam" else None
    return (f"<h3>7.1 {metric}: the paper's analysis (for comparison only)</h3>" + _box("paper", text)
            + _table_html(comparison["paper"]["tukey"],
                          f"Tukey HSD on {metric} (paper's method; meandiff = group2 − group1)",
                          f"{metric}_paper_tukey")
            + (_table_html(claims, "The paper's Tukey claims (§4.3) beside this study", "tukey_vs_paper")
               if claims is not None else ""))


def _our_analysis_html(metric: str, comparison: dict[str, Any]) -> str:
    mm, fried = comparison["mixed_model"], comparison["friedman"]
    variance = mm["variance"]
    parts = [f"<h3>7.2 {metric}: paired analysis (images as subjects)</h3>",
             _box("verdict", "<b>Verdict.</b> " + html.escape(comparison["verdict"])),
             _table_html(mm["estimates"], f"Mixed model {mm['formula']}: model means (95% CI). Variance between images "
                                          f"{variance['image']:.4g}, residual {variance['residual']:.4g}.",
                         f"{metric}_mixed_model"),
             _table_html(comparison["block_tukey"], "Block Tukey (two-way error term), all pairs",
                         f"{metric}_block_tukey"),
             _table_html(comparison["wilcoxon_holm"], "Paired Wilcoxon signed-rank, Holm-corrected",
                         f"{metric}_wilcoxon_holm"),
             f"<p>Friedman χ²({fried['df']}) = {fried['statistic']:.3f}, p = {fried['p']:.3g}, "
             f"Kendall's W = {fried['kendall_w']:.3f} over {fried['n']} complete images "
             f"({comparison['images_dropped']} images not scored by every model left out).</p>"]
    parts.append(_seeds_html(metric, comparison))
    return "".join(parts)


def _seeds_html(metric: str, comparison: dict[str, Any]) -> str:
    parts = []
    if "crossed" in comparison:
        crossed = comparison["crossed"]
        v, effect = crossed["variance"], crossed["model_effect"]
        note = crossed.get("statsmodels_vc", {}).get("note", "")
        parts.append(_table_html(crossed["estimates"], f"Crossed model {crossed['formula']} ({crossed['method']}): "
                                 f"variance image {v['image']:.4g}, run (seed) {v['run']:.4g}, "
                                 f"residual {v['residual']:.4g}; "
                                 f"model effect F({effect['df_model']}, {effect['df_run']}) = {effect['F']:.3f}, "
                                 f"p = {effect['p']:.3g}. {note}", f"{metric}_crossed_model"))
    if "run_level" in comparison:
        level = comparison["run_level"]
        parts.append(_table_html(level["tukey"], f"Run-level Tukey HSD on per-run means (the run is the unit; "
                                 f"ANOVA p = {level['anova']['p']:.3g}; seed SD {level['seed_sd']:.3g} vs SD between "
                                 f"model means {level['between_model_sd']:.3g})", f"{metric}_run_level_tukey"))
    return ("<h3>7.3 Seeds</h3>" + "".join(parts)) if parts else ""


def _figures_section(outputs: AnalysisOutputs) -> str:
    parts = [_figure_html(outputs, "figure1", "Figure 1: positive test images (rows) with each model's heatmap "
                                              "(jet) and the mask outline (white); first seed of each model."),
             _figure_html(outputs, "depth", "Metric against depth per family (mean, 95% CI over images)."),
             _figure_html(outputs, "sanity", "Sanity check: trained vs weight-randomised heatmaps.")]
    sanity = outputs.tables.get("sanity")
    if sanity is not None and not sanity.empty:
        parts.append(_table_html(sanity, "Trained vs randomised (paired Wilcoxon over images, Holm over models)",
                                 "sanity"))
    return "<h2>8. Figures</h2>" + "".join(p for p in parts if p)


# ----------------------------------------------------------------------------- conclusions


def _conclusions_section(inputs: StudyInputs, outputs: AnalysisOutputs) -> str:
    items = conclusions(inputs, outputs)
    return "<h2>9. Conclusions the numbers support</h2><ul>" + "".join(
        f"<li>{html.escape(item)}</li>" for item in items) + "</ul>"


def conclusions(inputs: StudyInputs, outputs: AnalysisOutputs) -> list[str]:
    """Plain sentences generated from the results, each hedged by its statistics."""
    found = [_classification_conclusion(outputs)]
    comparison = outputs.statistics["comparisons"].get("diff_gradcam")
    if comparison is not None:
        found += [_localisation_conclusion(comparison), _family_conclusion(comparison, inputs.models),
                  _paper_claims_conclusion(outputs)]
    if "ehr" in outputs.tables:
        found.append(_ehr_conclusion(outputs.tables["ehr"]))
    if "sanity" in outputs.tables and not outputs.tables["sanity"].empty:
        found.append(_sanity_conclusion(outputs.tables["sanity"]))
    if inputs.missing:
        found.append(f"{len(inputs.missing)} expected input(s) are missing (see the first section); "
                     "these conclusions cover only the runs that finished.")
    return [f for f in found if f]


def _classification_conclusion(outputs: AnalysisOutputs) -> str:
    table1 = outputs.tables["table1"]
    if table1.empty:
        return "No finished run has test metrics: no classification conclusion."
    best = table1.loc[table1["auc"].idxmax()]
    return (f"Test AUC ranges {table1['auc'].min():.3f}–{table1['auc'].max():.3f} "
            f"(highest: {figures.label(best['model'])}). " + outputs.statistics["classification_verdict"])


def _localisation_conclusion(comparison: dict[str, Any]) -> str:
    estimates = comparison["mixed_model"]["estimates"]
    top = estimates.loc[estimates["estimate"].idxmax()]
    pairs = [_pair_label(p) for p in comparison["significant_pairs"]]
    tail = (f"{len(pairs)} pair(s) differ significantly ({comparison['trusted_basis']}): " + ", ".join(pairs) + "."
            if pairs else f"no model differs significantly from another ({comparison['trusted_basis']}).")
    return (f"Diff_GradCAM is highest for {figures.label(top['model'])} (mixed-model mean {top['estimate']:.3f}); "
            f"after multiple-comparison correction {tail}")


def _pair_label(pair: str) -> str:
    return " vs ".join(figures.label(m) for m in pair.split(" vs "))


def _family_conclusion(comparison: dict[str, Any], models: pd.DataFrame) -> str:
    estimates = comparison["mixed_model"]["estimates"].merge(models, on="model")
    families = estimates.groupby("family", sort=False)["estimate"].mean()
    if len(families) < 2:
        return ""
    ranked = ", ".join(f"{f} {v:.3f}" for f, v in families.sort_values(ascending=False).items())
    significant = set(comparison["significant_pairs"])
    trends = [_depth_text(part, significant) for _, part in estimates.groupby("family", sort=False) if len(part) > 1]
    return (f"Mean Diff_GradCAM by family: {ranked} (descriptive; the tests compare models, not families). "
            + " ".join(trends))


def _depth_text(part: pd.DataFrame, significant: set[str]) -> str:
    """Estimates in depth order and whether any pair inside the family differs significantly."""
    part = part.sort_values("depth", kind="stable")
    chain = " → ".join(f"{figures.label(r.model)} {r.estimate:.3f}" for r in part.itertuples())
    names = set(part["model"])
    inside = [p for p in significant if set(p.split(" vs ")) <= names]
    verdict = (f"significant: {', '.join(_pair_label(p) for p in inside)}" if inside
               else "no pair inside the family differs significantly")
    return f"By depth within {part['family'].iloc[0]}: {chain} ({verdict})."


def _ehr_conclusion(ehr: pd.DataFrame) -> str:
    if not {"ehr_auc_norm", "ehr_auc_chance"} <= set(ehr.columns):
        return ""
    above = int((ehr["ehr_auc_norm_lo"] > 0).sum())
    return (f"EHR AUC: {above} of {len(ehr)} models localise above chance (normalised EHR CI above 0); raw EHR "
            f"values near the chance level {ehr['ehr_auc_chance'].mean():.4f} must not be read as localisation "
            "quality.")


def _sanity_conclusion(sanity: pd.DataFrame) -> str:
    part = sanity[sanity["metric"] == "diff_gradcam"]
    passed = part[part["reject"] & (part["difference"] > 0)]["model"].map(figures.label).tolist()
    failed = [figures.label(m) for m in part["model"] if figures.label(m) not in passed]
    return (f"Sanity check: trained heatmaps beat weight-randomised ones (Holm) for {len(passed)} of {len(part)} models"
            + (f"; not for {', '.join(failed)}, whose heatmaps may reflect the architecture more than the "
               "learned weights." if failed else "."))


def _paper_claims_conclusion(outputs: AnalysisOutputs) -> str:
    claims = outputs.tables.get("tukey_vs_paper")
    if claims is None or claims.empty:
        return ""
    return (f"Of the paper's {len(claims)} pairwise Tukey claims that this study can check, "
            f"{int(claims['agrees'].sum())} agree with the trusted paired result.")
