"""The analyze stage: tables, statistics, figures and one self-contained HTML report.

    analyze(study_dir, config_dict, tracker=None) -> <study>/analysis/report.html

writes `<study>/analysis/` atomically: tables/*.csv, statistics.json, figures/*.png and
report.html (figures embedded as base64, no network, plain CSS). Missing or partial inputs
become a report section. `log_to_mlflow` puts the results on the study's parent run and the
per-run summaries on the child runs.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd
from mlflow.entities import Metric, RunTag

from analysis import tables
from analysis.inputs import load_study
from analysis.compute import AnalysisOutputs, build_outputs
from analysis.conclusions import interval, prose, summary_items
from analysis.html import write_report
from training.atomic import atomic_dir
from training.contract import flatten, run_key


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
        overview = runs_overview(inputs, outputs)
        description = parent_description(inputs, outputs, overview)
        tracker.call(lambda: log_to_mlflow(tracker.client, tracker.parent_run(), tracker.current_children(), outputs,
                                           config, overview=overview, description=description))
    return outputs.report_path


def _moved(outputs: AnalysisOutputs, old: Path, new: Path) -> AnalysisOutputs:
    outputs.directory = new
    outputs.figures = {name: new / path.relative_to(old) for name, path in outputs.figures.items()}
    return outputs


# ----------------------------------------------------------------------------- MLflow


NOTE_TAG = "mlflow.note.content"  # the run's description in MLflow's UI (markdown)


def runs_overview(inputs: Any, outputs: AnalysisOutputs) -> pd.DataFrame:
    """One row per finished trained run, what a reader compares them on: the test AUC with its
    CI, the calls at the decision threshold, the mean pixel AUPRC of its maps, whether its model
    beats the location prior (AUPRC, paired, Holm) and whether its map set is degenerate (why)."""
    summary = outputs.run_summary.set_index(["model", "seed"]) if len(outputs.run_summary) else pd.DataFrame()
    prior = outputs.tables.get("beats_prior")
    beats = {} if prior is None or prior.empty else {
        r.model: r.verdict for r in prior[prior["metric"] == "auprc"].itertuples()}
    rows = []
    for metrics in inputs.test_metrics.to_dict(orient="records"):
        key = (metrics["model"], metrics["seed"])
        run = summary.loc[key].to_dict() if len(summary) and key in summary.index else {}
        rows.append({"run": run_key(metrics["model"], int(metrics["seed"])), "model": metrics["model"],
                     "seed": int(metrics["seed"]),
                     "AUC [95% CI]": interval(metrics, "auc") if "auc_lo" in metrics else prose(metrics.get("auc")),
                     "accuracy": prose(metrics.get("accuracy")), "sensitivity": prose(metrics.get("recall")),
                     "specificity": prose(metrics.get("specificity")), "AUPRC": prose(run.get("auprc_mean")),
                     "vs location prior (AUPRC)": beats.get(metrics["model"], "not tested"),
                     "degenerate": run.get("degenerate") or "no"})
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame) -> str:
    cells = lambda values: "| " + " | ".join(str(v).replace("|", "/") for v in values) + " |"  # noqa: E731
    return "\n".join([cells(table.columns), cells(["---"] * len(table.columns)),
                      *(cells(row) for row in table.itertuples(index=False))])


def parent_description(inputs: Any, outputs: AnalysisOutputs, overview: pd.DataFrame) -> str:
    """The parent run's description: the report's summary, then the runs table."""
    threshold = (inputs.config.get("training") or {}).get("threshold", 0.5)
    return ("\n".join(f"- {item}" for item in summary_items(inputs, outputs))
            + f"\n\n**Runs** (accuracy, sensitivity and specificity at the threshold {threshold}; the full "
              f"report: `{outputs.report_path}`)\n\n" + markdown_table(overview.drop(columns=["model", "seed"])))


def child_description(params: Mapping[str, str], degenerate: str) -> str:
    return (f"{params.get('model', '?')}, seed {params.get('seed', '?')}; recipe: {params.get('optimizer', '?')}, "
            f"lr {params.get('lr', '?')}, {params.get('epochs', '?')} epoch(s); map set at the paper's layer: "
            + (f"degenerate ({degenerate}), left out of every comparison" if degenerate else "valid"))


def log_to_mlflow(client: Any, parent_run_id: str, child_run_ids: Mapping[str, str], outputs: AnalysisOutputs,
                  config: Optional[Mapping[str, Any]] = None, overview: Optional[pd.DataFrame] = None,
                  description: Optional[str] = None) -> None:
    """Tables (`log_table`), figures, statistics.json, scores.parquet and report.html on the
    parent, with the study's settings as `camstudy.config.*` tags (tags, not params: a study's
    settings may change between commands, and MLflow params cannot); the summary metrics of each
    run (cam/diff_gradcam_mean, ...) and its degenerate flag on its child."""
    logged = {Path(a.path).name for a in client.list_artifacts(parent_run_id, "analysis/tables")}
    if description is not None:
        client.set_tag(parent_run_id, NOTE_TAG, description)
    if overview is not None:
        _log_table(client, parent_run_id, overview, "runs.json", replace="runs.json" in logged)
    for name, table in outputs.tables.items():
        _log_table(client, parent_run_id, _loggable(table), f"{name}.json", replace=f"{name}.json" in logged)
    for path in outputs.figures.values():
        client.log_artifact(parent_run_id, str(path), "analysis/figures")
    for path in (outputs.statistics_path, outputs.report_path, outputs.scores_path):
        client.log_artifact(parent_run_id, str(path), "analysis")
    _log_metrics(client, parent_run_id, _headline_metrics(outputs.statistics))
    if config is not None:
        settings = flatten(config)
        client.log_batch(parent_run_id, tags=[RunTag(f"camstudy.config.{k}", str(v)[:5000])
                                              for k, v in settings.items()])
    for row in outputs.run_summary.to_dict(orient="records"):
        if row["run_key"] in child_run_ids:
            child = child_run_ids[row["run_key"]]
            _log_metrics(client, child, {f"cam/{k}": row[k] for k in tables.RUN_SUMMARY if k in row})
            # STUDY.md §8: a degenerate map set is flagged where a reader compares runs
            _log_metrics(client, child, {"cam/degenerate": float(bool(row["degenerate"]))})
            client.set_tag(child, "camstudy.degenerate", row["degenerate"] or "false")
            client.set_tag(child, NOTE_TAG, child_description(client.get_run(child).data.params, row["degenerate"]))


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
        found[f"stats/{metric}_paper_anova_p"] = comparison["paper"]["anova"]["p"]
        found[f"stats/{metric}_mixed_model_p"] = comparison["mixed_model"]["equal_means"]["p"]
        found[f"stats/{metric}_friedman_p"] = comparison["friedman"]["p"]
        found[f"stats/{metric}_significant_pairs"] = len(comparison["significant_pairs"])
    found["stats/excluded_map_sets"] = len(statistics.get("excluded", []))
    return found


def _log_metrics(client: Any, run_id: str, metrics: Mapping[str, Any]) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()
             if isinstance(v, (int, float, np.number)) and math.isfinite(float(v))]
    if batch:
        client.log_batch(run_id, metrics=batch)


