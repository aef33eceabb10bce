"""report.html: one self-contained page (figures embedded as base64, no network, plain CSS)
rendering what `analysis.compute` wrote; the conclusions come from `analysis.conclusions`."""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Collection, Optional

import numpy as np
import pandas as pd

from analysis import figures, paper_values, tables
from analysis.compute import AnalysisOutputs
from analysis.conclusions import conclusions_section, summary_items
from analysis.inputs import StudyInputs
from study.config import TuningRecord

# ----------------------------------------------------------------------------- the HTML report


# The column is as wide as the figures are drawn for (figures.REPORT_COLUMN_PX): at 1:1 their text
# is never below figures.MIN_TEXT_PT. Prose may break anywhere to fit a phone; a table never breaks
# inside a word or a number (it scrolls in its own box instead), so its columns are at least one
# word wide and a number is never split over two lines.
CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; max-width: %(column)dpx; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; max-width: 100%%; }
table { border-collapse: collapse; font-size: .82em; margin: 0 0 1.2em; overflow-wrap: normal; word-break: normal; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
td.num { white-space: nowrap; font-variant-numeric: tabular-nums; }
td.text { text-align: left; } .word { white-space: nowrap; }
td.prose { min-width: 14em; }
tr.degenerate td { color: #666; }
.degenerate-mark { font-size: .85em; font-style: italic; border: 1px solid #999; border-radius: 3px;
                   padding: 0 .25em; margin-left: .3em; white-space: nowrap; }
.caption { font-size: .82em; color: #555; margin: .6em 0 .2em; }
.paper-only .caption { border-left: 4px solid #4a78c2; padding-left: .5em; }
details.table > summary { cursor: pointer; margin: .4em 0; }
.summary { background: #f4f8f4; border: 1px solid #cfe3cf; padding: .4em 1.2em; }
.summary li { margin: .3em 0; } nav.toc { columns: 2 16em; font-size: .9em; } nav.toc a { text-decoration: none; }
figure { margin: 1em 0; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.5em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .6em 1em; margin: 1em 0; }
.missing { background: #fdecea; border-left: 4px solid #d93025; padding: .6em 1em; }
.paper { background: #eef3fb; border-left: 4px solid #4a78c2; padding: .6em 1em; }
.verdict { background: #e8f5e9; border-left: 4px solid #2e7d32; padding: .6em 1em; }
img { max-width: 100%%; height: auto; border: 1px solid #eee; }
.small { font-size: .85em; color: #555; } pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .8em; }
""" % {"column": figures.REPORT_COLUMN_PX}
COLLAPSE_ROWS = 40  # a longer table is folded under a one-line summary: the page stays short enough to read
MODEL_COLUMNS = ("model", "group1", "group2", "model_a", "model_b")
PAPER_ONLY = "Comparison with the paper only"
PROSE_CHARS = 24  # a longer text cell (a reason, a verdict) gets a reading width, not one word per line
_NUMBER = r"[-+−]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?%?|nan|-?inf|—"
# a number, or one with its interval or SD as merge_intervals writes it: "0.51 [0.43, 0.59]", "0.8 ± 0.02"
NUMERIC_CELL = re.compile(rf"(?:{_NUMBER})(?: \[(?:{_NUMBER}), (?:{_NUMBER})\]| ± (?:{_NUMBER}))?", re.IGNORECASE)


def write_report(inputs: StudyInputs, outputs: AnalysisOutputs) -> Path:
    """report.html: setup, data, Table 1, Table 2, EHR, statistics, figures, conclusions."""
    sections = [summary_section(inputs, outputs), _missing_section(inputs, outputs), _setup_section(inputs),
                _data_section(inputs),
                _classification_section(outputs), _table2_section(outputs), _ehr_section(outputs),
                _localisation_section(outputs), _threshold_free_section(outputs), _ladder_section(outputs),
                _layers_section(outputs), _covariates_section(outputs), _reliability_section(outputs),
                _profile_section(outputs), _statistics_section(outputs),
                _figures_section(outputs), conclusions_section(inputs, outputs)]
    title = f"camstudy report: {html.escape(inputs.config.study)}"
    body = "\n".join(s for s in sections if s)
    body = body.replace("<!--toc-->", _toc(body), 1)
    document = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
                "<meta name='viewport' content='width=device-width, initial-scale=1'><title>{title}</title>"
                f"<style>{CSS}</style></head><body><h1>{title}</h1>"
                f"<p class='small'>Generated {time.strftime('%Y-%m-%d %H:%M')} from {html.escape(str(inputs.root))}. "
                f"Reproduction of {html.escape(paper_values.CITATION)}.</p>\n{body}</body></html>\n")
    outputs.report_path.write_text(document, encoding="utf-8")
    return outputs.report_path


def summary_section(inputs: StudyInputs, outputs: AnalysisOutputs) -> str:
    """One screen first: what ran, which classifiers work, which map sets localise, the sanity
    verdict, the paper's claims; then the table of contents."""
    excluded = ("" if outputs.excluded.empty else _table_html(
        outputs.excluded, "Degenerate map sets (docs/STUDY.md §8): kept in the per-model tables with this reason, left "
                          "out of every comparison, chance level, sanity verdict and conclusion", "excluded",
        degenerate=set(outputs.excluded["model"])))
    items = "".join(f"<li>{_linked(html.escape(item), 'table below', 'table-excluded' if excluded else None)}</li>"
                    for item in summary_items(inputs, outputs))
    return (f"<h2 id='summary'>Summary</h2><div class='summary'><ul>{items}</ul></div>{excluded}"
            "<h2 id='contents'>Contents</h2><!--toc-->")


def _linked(text: str, words: str, anchor: Optional[str]) -> str:
    """`text` (HTML) with "the <words>" made a link to `anchor`: a reader jumps to what a sentence
    points at instead of searching for it."""
    return text.replace(f"the {words}", f"<a href='#{anchor}'>the {words}</a>") if anchor else text


def _degenerate_models(table: Optional[pd.DataFrame]) -> set[str]:
    """The models a table flags in its `degenerate` column (the reason, or empty)."""
    if table is None or "degenerate" not in table:
        return set()
    return set(table.loc[figures.degenerate_rows(table), "model"].astype(str))


def _toc(body: str) -> str:
    headings = re.findall(r"<h2 id='([^']+)'>(.*?)</h2>", body)
    links = "".join(f"<li><a href='#{anchor}'>{title}</a></li>" for anchor, title in headings
                    if anchor not in ("summary", "contents"))
    return f"<nav class='toc'><ul>{links}</ul></nav>"


def _table_html(table: Optional[pd.DataFrame], caption: str, name: Optional[str] = None, digits: int = 4,
                summary: Optional[str] = None, degenerate: Collection[str] = (), paper_only: bool = False) -> str:
    """An HTML table with its caption, in a box that scrolls sideways (the page never gets wider
    than the window); `name` (the CSV's name) becomes the id `table-<name>`. Numeric cells never
    wrap. Degenerate map sets are marked: the rows the table's own `degenerate` column flags, and
    every cell naming a model in `degenerate`. Longer than COLLAPSE_ROWS rows, given a `summary`,
    or `paper_only` (the paper's analysis: headed as a comparison, not a finding of this study),
    it is folded into a closed <details> under one line saying what it holds and how many rows."""
    anchor = f" id='table-{name}'" if name else ""
    if table is None or table.empty:
        return f"<p class='note'{anchor}>{html.escape(caption)}: no data.</p>"
    shown = table.drop(columns=[c for c in ("family", "depth") if c in table])
    flagged = figures.degenerate_rows(shown) if "degenerate" in shown else np.zeros(len(shown), dtype=bool)
    rows = "".join(_row_html(row, shown.columns, bool(flag), set(degenerate), digits)
                   for row, flag in zip(shown.itertuples(index=False), flagged))
    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in shown.columns)
    title = (f"<b>{PAPER_ONLY}</b> (not a finding of this study): " if paper_only else "") + html.escape(caption)
    # the caption sits above the scroll box, not in the table: it wraps to the window, not to the table's width
    text = (f"<p class='caption'>{title}</p><div class='scroll'><table>"
            f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>")
    kind = "table paper-only" if paper_only else "table"
    if summary is None and not paper_only and len(shown) <= COLLAPSE_ROWS:
        return f"<div class='{kind}'{anchor}>{text}</div>"
    line = f"{summary or _first_clause(caption)} ({len(shown)} rows)"
    if paper_only:
        line = f"{PAPER_ONLY}: {line}"
    return f"<details class='{kind}'{anchor}><summary>{html.escape(line)}</summary>{text}</details>"


def _first_clause(caption: str) -> str:
    """A caption's head, before its first parenthesis: what the table holds, in one line."""
    return caption.split(" (")[0]


def _row_html(row: tuple, columns: pd.Index, flagged: bool, degenerate: set[str], digits: int) -> str:
    """One <tr>: model names as labels, marked when their map set is degenerate (the row's own
    flag marks its `model` cell); numbers, with their intervals, in cells that never wrap."""
    cells, marked_row = [], False
    for column, value in zip(columns, row):
        text = _cell_text(value, digits)
        marked = column in MODEL_COLUMNS and ((flagged and column == "model") or str(value) in degenerate)
        if column in MODEL_COLUMNS:
            text = figures.label(str(value))
        kind = "num" if NUMERIC_CELL.fullmatch(text) else "text prose" if len(text) > PROSE_CHARS else "text"
        body = (html.escape(text) if kind == "num" else _unbroken_words(text)) + (
            "<span class='degenerate-mark'>degenerate</span>" if marked else "")
        marked_row |= marked
        cells.append(f"<td class='{kind}'>{body}</td>")
    return ("<tr class='degenerate'>" if marked_row else "<tr>") + "".join(cells) + "</tr>"


def _unbroken_words(text: str) -> str:
    """`text` escaped, each hyphenated word ("all-zero") in a span that does not wrap: a browser
    may break after any hyphen, which on a phone splits a word over two lines."""
    return re.sub(r"\S*\w-\w\S*", lambda word: f"<span class='word'>{word.group(0)}</span>", html.escape(text))


def _cell_text(value: Any, digits: int) -> str:
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "—"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}g}"
    return str(value)


def _figure_html(outputs: AnalysisOutputs, name: str, caption: str) -> str:
    path = outputs.figures.get(name)
    if path is None or not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure id='figure-{name}'><img alt='{html.escape(caption)}' data-file='{html.escape(path.name)}' "
            f"src='data:image/png;base64,{data}'>"
            f"<figcaption class='small'>{html.escape(caption)}</figcaption></figure>")


def _box(kind: str, text: str) -> str:
    return f"<div class='{kind}'>{text}</div>"


def _missing_section(inputs: StudyInputs, outputs: AnalysisOutputs) -> str:
    items = inputs.missing + outputs.notes
    if not items:
        return ""
    listed = "".join(f"<li>{html.escape(item)}</li>" for item in items)
    return (f"<h2 id='missing'>Missing or incomplete inputs</h2>" +
            _box("missing", f"<p>The results below use only what exists. Left out:</p><ul>{listed}</ul>"))


def _setup_section(inputs: StudyInputs) -> str:
    config = inputs.config
    rows = [("study", config.study), ("data source", config.data.source),
            ("models", ", ".join(inputs.model_order)), ("initialisation", config.models.init),
            ("seeds", list(config.training.seeds)), ("image size", config.preprocess.image_size),
            ("recipes", "; ".join(f"{k}: {v.optimizer} lr {v.lr} × {v.epochs} epochs"
                                  for k, v in config.recipes.items())),
            ("recipe tuning", _tuning_text(config.tuning)),
            ("decision threshold", config.training.threshold), ("CAM methods", list(config.cam.methods)),
            ("scored images", config.cam.images), ("alpha", config.statistics.alpha),
            ("runs finished", f"{int(inputs.runs['finished'].sum())} of {len(inputs.runs)}")]
    table = pd.DataFrame(rows, columns=["setting", "value"]).astype(str)
    full = html.escape(json.dumps(config.to_dict(), indent=1, default=str))
    return (f"<h2 id='setup'>1. Setup</h2>{_table_html(table, 'Configuration summary')}"
            f"<details><summary>Full resolved configuration</summary><pre>{full}</pre></details>")


def _tuning_text(tuning: TuningRecord) -> str:
    """Whether the recipes were tuned, and how (the `tuning` record `camstudy tune` writes)."""
    if not tuning.families:
        return "none: the recipes are as configured (one fixed recipe per family, not tuned per architecture)"
    nan = float("nan")
    tuned = "; ".join(f"{family} on {model} (best validation AUC "
                      f"{tuning.outcomes[family].best_val_auc if family in tuning.outcomes else nan:.3f})"
                      for family, model in tuning.families.items())
    return f"{tuned}. {tuning.method} Recipe file: {tuning.file}."


def _data_section(inputs: StudyInputs) -> str:
    parts = ["<h2 id='data'>2. Data</h2>"]
    if inputs.manifest is not None and {"split", "label"} <= set(inputs.manifest.columns):
        counts = pd.crosstab(inputs.manifest["split"], inputs.manifest["label"]).reset_index()
        counts.columns = [str(c) for c in counts.columns]
        parts.append(_table_html(counts, "Images per split and label (1 = pneumothorax)"))
        parts.append(_mask_fraction_html(inputs.manifest))
    if inputs.data_report:
        rows = [(key.replace("_", " ").replace(".", ": "), _readable(value))
                for key, value in pd.json_normalize(inputs.data_report, sep=".").iloc[0].items()
                if not key.startswith("counts.")]  # the counts are the table above
        parts.append(_table_html(pd.DataFrame(rows, columns=["item", "value"]), "Data report (data/report.json)"))
    return "".join(parts) if len(parts) > 1 else parts[0] + "<p class='note'>No manifest or data report.</p>"


def _readable(value: Any) -> str:
    """A data-report value for a reader: numbers to 4 significant digits, lists as a count and
    their first items."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "none"
        head = ", ".join(str(v) for v in value[:3])
        return head + (f" ... ({len(value)} in all)" if len(value) > 3 else "")
    return str(value)


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
    return ("<h2 id='classification'>3. Classification (Table 1)</h2>"
            + _table_html(table, "Table 1: test accuracy, precision, recall (Wilson 95% CI) and AUC (DeLong 95% CI); "
                                 "several seeds: mean ± SD across seeds. paper_*: the paper's Table 1 (no CIs given).",
                          "table1")
            + _box("verdict", html.escape(outputs.statistics["classification_verdict"]))
            + _table_html(pairs, "Pairwise classification tests", "classification_pairs",
                          summary="All model pairs: paired DeLong and exact McNemar, Holm-corrected per seed",
                          degenerate=_degenerate_models(outputs.tables["table1"])))


def _table2_section(outputs: AnalysisOutputs) -> str:
    if "table2" not in outputs.tables:
        return "<h2 id='table2'>4. Diff_GradCAM (Table 2)</h2><p class='note'>No CAM scores.</p>"
    return ("<h2 id='table2'>4. Diff_GradCAM (Table 2)</h2>"
            + _table_html(outputs.tables["table2"], "Table 2: mean heat inside minus outside the mask, over every "
                          "scored positive test image (and seed); paper_*: the paper's Table 2.", "table2")
            + _figure_html(outputs, "distributions", "Diff_GradCAM per model; red x: the paper's Table 2 mean."))


def _ehr_section(outputs: AnalysisOutputs) -> str:
    if "ehr" not in outputs.tables:
        return ""
    ehr = outputs.tables["ehr"]
    shown = tables.merge_intervals(ehr.drop(columns=["paper_ehr_source", "paper_ehr_low", "paper_ehr_high"]), 4)
    sources = ehr[["model", "paper_ehr_auc", "paper_ehr_exact", "paper_ehr_source"]].dropna(subset=["paper_ehr_auc"])
    return ("<h2 id='ehr'>5. EHR AUC with chance level and oracle</h2>" + _box("note", _chance_text(ehr))
            + _table_html(shown, "EHR AUC per model (mean, 95% CI over images), its chance level (a heatmap that "
                                 "ignores the lesion), oracle (heatmap = mask) and normalised score "
                                 "(ehr - chance) / (oracle - chance); *_inputiba: the original EHR of "
                                 "Zhang et al. 2021.",
                          "ehr")
            + _figure_html(outputs, "figure2", "Figure 2: EHR AUC per model with chance and oracle; "
                                               "paper values in red.")
            + _table_html(sources, "Paper EHR AUC values (§4.3 text; exact = False: given only roughly)",
                          summary="Where the paper's EHR values come from", degenerate=_degenerate_models(ehr)))


def _chance_text(ehr: pd.DataFrame) -> str:
    text = ("<p><b>Read EHR AUC against its chance level.</b> A heatmap that ignores the lesion scores about the "
            "lesion's share f of the image. The paper's values (0.0145–0.0319) are the chance level of lesions "
            "covering 1.5–3.2% of the image, so by themselves they do not show localisation.")
    valid = ehr[ehr["degenerate"] == ""] if "degenerate" in ehr else ehr
    fraction, chance = valid["mask_fraction"].mean(), valid["ehr_auc_chance"].mean()
    if len(valid) and np.isfinite(fraction) and np.isfinite(chance) and chance > 0:
        low, high = valid["ehr_auc"].min(), valid["ehr_auc"].max()
        left_out = len(ehr) - len(valid)
        text += (f" Here the scored lesions cover {fraction:.2%} of the image on average, the chance level "
                 f"(mean over the {len(valid)} valid map sets) is {chance:.4f}, and those sets score "
                 f"{low:.4f}–{high:.4f} ({low / chance:.2g}–{high / chance:.2g}× chance)"
                 + (f"; {left_out} degenerate set(s) are left out of these numbers." if left_out else "."))
    return text + " The normalised score puts chance at 0 and the oracle at 1.</p>"


def _localisation_section(outputs: AnalysisOutputs) -> str:
    if "localisation" not in outputs.tables:
        return ""
    parts = ["<h2 id='localisation'>6. Energy, pointing game, IoU</h2>",
             _table_html(tables.merge_intervals(outputs.tables["localisation"]),
                         "Energy inside the mask, pointing-game hit rate, IoU of the Otsu-thresholded heatmap "
                         "(mean, 95% CI over images); cam_all_zero: heatmaps that are exactly zero (kept, counted).",
                         "localisation")]
    if "methods" in outputs.tables:
        parts.append(_table_html(outputs.tables["methods"], "Means per CAM method", "methods"))
    return "".join(parts)


def _threshold_free_section(outputs: AnalysisOutputs) -> str:
    table = outputs.tables.get("threshold_free")
    if table is None or table.empty:
        return ""
    anchor = paper_values.ARUN_AUPRC
    text = (f"<p>Pixel AUPRC ranks every pixel by its heat against the mask: its chance level is the lesion's share "
            f"f of the image (here {table['auprc_chance'].mean():.4f} on average), its oracle 1. Pixel AUROC has chance "
            f"0.5. {html.escape(anchor['source'])}: eight saliency methods {anchor['saliency_low']}–"
            f"{anchor['saliency_high']}, a U-Net trained on the masks {anchor['unet']}. IoU and hit use each map "
            f"set's threshold tuned on the validation positives (CheXlocalize's protocol; thresholds and images in "
            f"cams/&lt;run&gt;/_tuning.json); a hit is IoU ≥ the configured hit_iou.</p>")
    return ("<h2 id='threshold-free'>7. Threshold-free and tuned-threshold metrics</h2>" + _box("note", text)
            + _table_html(tables.merge_intervals(table), "AUPRC, pixel AUROC, IoU and hit at the tuned threshold "
                          "(mean, 95% CI over images); arun_*: Arun et al. 2021 on SIIM-ACR", "threshold_free"))


def _ladder_section(outputs: AnalysisOutputs) -> str:
    ladder, prior = outputs.tables.get("ladder"), outputs.tables.get("beats_prior")
    if ladder is None or ladder.empty:
        return ""
    text = ("<p>Each metric from chance to the oracle on one axis. The <b>location prior</b> is the mean training "
            "mask: a map that knows where lesions usually are and nothing about this image. A Grad-CAM that does not "
            "beat it shows no image-specific localisation, however far above chance it is.</p>")
    return ("<h2 id='ladder'>8. Baseline ladder: chance, image-only, prior, randomised, Grad-CAM, oracle</h2>"
            + _box("note", text)
            + _figure_html(outputs, "ladder", "The ladder per metric (mean, 95% CI over images; hollow: degenerate "
                                              "map set; dashed: the location prior).")
            + _table_html(prior, "Grad-CAM minus the location prior, paired over images (valid map sets; Wilcoxon "
                                 "signed-rank, Holm across models per metric)", "beats_prior")
            + _table_html(ladder, "The ladder (mean, 95% CI over images)", "ladder", summary="Every rung as a table"))


def _layers_section(outputs: AnalysisOutputs) -> str:
    sweep = outputs.tables.get("layer_sweep")
    if sweep is None or sweep.empty:
        return ""
    parts = ["<h2 id='layers'>9. Layer sweep and the resolution-matched comparison</h2>",
             _box("note", "<p>The paper compares ResNet maps of 7×7 with VGG and ViT maps of 14×14 (at 224 px), so "
                          "depth is confounded with map resolution. The sweep follows each metric through a network's "
                          "stages; the resolution-matched arm compares every model at one map size.</p>"),
             _figure_html(outputs, "layer_sweep", "Metric against layer depth per model (large dot: the paper's "
                                                  "layer; ringed: the resolution-matched layer; grey and hollow: "
                                                  "degenerate)."),
             _table_html(tables.merge_intervals(sweep), "Every layer of every model (mean, 95% CI over images)",
                         "layer_sweep")]
    versus = outputs.tables.get("layer_vs_final")
    if versus is not None and len(versus):  # the only basis of a per-layer claim
        parts.append(_table_html(versus, "Each layer against its model's paper's layer, paired over images (mean "
                                         "difference layer − paper's layer, 95% CI; Wilcoxon signed-rank, Holm over "
                                         "the comparisons of each metric)", "layer_vs_final"))
    matched = outputs.tables.get("resolution_matched")
    stats_matched = outputs.statistics.get("resolution_matched") or {}
    if matched is not None and len(matched):
        parts.append(_table_html(tables.merge_intervals(matched), f"Every model at one map size "
                                 f"({stats_matched.get('map_size', '?')}×{stats_matched.get('map_size', '?')})",
                                 "resolution_matched"))
        for metric, comparison in stats_matched.get("comparisons", {}).items():
            parts.append(_box("verdict", f"<b>{html.escape(metric)} at one map size.</b> "
                                         + html.escape(comparison["verdict"])))
            parts.append(_table_html(comparison["block_tukey"], f"Block Tukey on {metric} at one map size (valid "
                                     "map sets, images paired)", f"resolution_matched_{metric}_block_tukey"))
        for metric, paper in stats_matched.get("paper_all_models", {}).items():
            parts.append(_table_html(paper["tukey"], f"the paper's analysis on {metric} at one map size, every "
                                                     f"model, degenerate map sets included (one-way ANOVA p = "
                                                     f"{paper['anova']['p']:.3g}, Tukey)",
                                     f"resolution_matched_{metric}_paper_tukey",
                                     degenerate=_degenerate_models(matched), paper_only=True))
    return "".join(parts)


def _covariates_section(outputs: AnalysisOutputs) -> str:
    table = outputs.tables.get("covariates")
    if table is None or table.empty:
        return ""
    return ("<h2 id='covariates'>10. Lesion covariates</h2>"
            + _box("note", "<p>A mixed model of each metric on the model and the lesion (size, regions, elongation) and "
                           "the predicted probability, images as random effect, over the valid map sets of the paper's "
                           "layer: does localisation depend on the lesion more than on the architecture?</p>")
            + _table_html(table, "Covariate effects (estimate per unit, Wald 95% CI, p)", "covariates")
            + _figure_html(outputs, "lesion_size", "Metric per lesion-size quartile, one line per model."))


def _reliability_section(outputs: AnalysisOutputs) -> str:
    cascade, stability = outputs.tables.get("cascade"), outputs.tables.get("stability")
    if (cascade is None or cascade.empty) and (stability is None or stability.empty):
        return ""
    parts = ["<h2 id='reliability'>11. Are the maps themselves reliable?</h2>"]
    if cascade is not None and len(cascade):
        parts += [_box("note", "<p>Cascading randomisation (Adebayo et al. 2018): the trained network is re-initialised "
                               "from the head down, one stage at a time, and the paper's layer read after each step. A map "
                               "that stays similar to the trained map after its weights are destroyed shows the "
                               "architecture, not what was learned. Pass line (Arun et al. 2021): the mean similarity of "
                               "the trained maps of random pairs of different images; a step passes when its CI lies "
                               "below it.</p>"),
                  _figure_html(outputs, "cascade", "Similarity to the trained map per cascade step (mean, 95% CI)."),
                  _table_html(cascade, "Cascade: similarity to the trained map per step and measure", "cascade")]
    if stability is not None and len(stability):
        parts += [_figure_html(outputs, "stability", "Mean SSIM between the maps two runs give the same image."),
                  _table_html(stability, "Stability: every pair of runs over the images both scored (repeatability: "
                                         "same architecture, another seed; reproducibility: another architecture)",
                              "stability")]
    return "".join(parts)


def _profile_section(outputs: AnalysisOutputs) -> str:
    """docs/STUDY.md §11: faithfulness and robustness with their references, the profile, the trend."""
    found = {name: outputs.tables.get(name) for name in ("faithfulness", "faithfulness_pairs", "robustness",
                                                         "robustness_pairs", "profile", "depth_trend")}
    if all(table is None or table.empty for table in found.values()):
        return ""
    margin = next((float(t["margin"].iloc[0]) for t in (found["depth_trend"], found["faithfulness_pairs"])
                   if t is not None and len(t) and "margin" in t), math.nan)
    text = ("<p>Faithfulness (ROAD, Rong et al. 2022): the classifier's probability as the pixels a map ranks highest "
            "are removed (MoRF) against the lowest (LeRF); the gap LeRF − MoRF is above 0 when the map ranks pixels by "
            "what the classifier uses. ROAD favours smooth maps, so each map is also set against its own blurred copy, "
            "the location prior, a random map, the image-only map and the weight-randomised twin, each scored by the "
            "same classifier. Robustness (max-sensitivity, Yeh et al. 2019): how far a map moves under small "
            "perturbations that keep the prediction (lower is more robust). A verdict is 'yes' only when the "
            "Holm-adjusted test rejects and the 95% CI lies on the better side of its line; 'no difference' needs "
            f"the paired TOST at ±{html.escape(_cell_text(margin, 3))}; anything else is 'inconclusive'.</p>")
    parts = ["<h2 id='profile'>11b. Faithfulness, robustness and the reliability profile</h2>", _box("note", text)]
    for name, caption in (("faithfulness", "Faithfulness per model at the paper's layer (ROAD; mean, 95% CI)"),
                          ("faithfulness_pairs", "Each map against its references by ROAD gap, paired over images "
                                                 "(map − reference; Wilcoxon, Holm across models per reference; TOST)"),
                          ("robustness", "Robustness per model at the paper's layer (mean, 95% CI)"),
                          ("robustness_pairs", "Each map against its weight-randomised twin by max-sensitivity, paired "
                                               "over images (map − twin; lower is more robust)")):
        table = found[name]
        if table is not None and len(table):
            shown = tables.merge_intervals(table) if name in ("faithfulness", "robustness") else table
            parts.append(_table_html(shown, caption, name))
    parts += [_figure_html(outputs, "ladder_road", "ROAD gap of each model's map and of its controls (mean, 95% CI).")]
    if found["profile"] is not None and len(found["profile"]):
        parts += [_figure_html(outputs, "profile", "The reliability profile: per dimension, each valid map set's "
                                                   "estimate with its 95% CI against its line (dashed)."),
                  _table_html(found["profile"], "Reliability profile: per valid map set and dimension, the "
                                                "estimate, its 95% CI, the line its verdict reads it against, and the "
                                                "verdict", "profile", summary="The profile as a table")]
    if found["depth_trend"] is not None and len(found["depth_trend"]):
        parts.append(_table_html(found["depth_trend"], "Depth trend: per family, the slope of each per-image score on "
                                 "log10 parameter count (score units per decade of parameters), images as random "
                                 "effect (and runs, with >= 2 seeds), 95% CI; TOST where the slope is not significant",
                                 "depth_trend"))
    return "".join(p for p in parts if p)


def _statistics_section(outputs: AnalysisOutputs) -> str:
    comparisons = outputs.statistics["comparisons"]
    if not comparisons:
        return "<h2 id='statistics'>12. Statistics</h2><p class='note'>Not enough models with CAM scores to compare.</p>"
    parts = ["<h2 id='statistics'>12. Statistics</h2>"]
    for metric, comparison in comparisons.items():
        body = _paper_analysis_html(metric, comparison, outputs) + _our_analysis_html(metric, comparison, outputs)
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
    every = outputs.statistics["paper_all_models"].get(metric)
    as_published = ("" if every is None or outputs.excluded.empty else _table_html(
        every["tukey"], f"Tukey HSD on {metric} over every model, degenerate map sets included, as the paper did it "
                        f"(one-way ANOVA p = {every['anova']['p']:.3g}; meandiff = group2 − group1)",
        f"{metric}_paper_tukey", degenerate=set(outputs.excluded_primary["model"].astype(str)), paper_only=True))
    return (f"<h3>12.1 {metric}: the paper's analysis (for comparison only)</h3>" + _box("paper", text)
            + as_published
            + _table_html(comparison["paper"]["tukey"],
                          f"Tukey HSD on {metric}, the paper's method over the valid map sets "
                          f"(meandiff = group2 − group1)",
                          f"{metric}_paper_tukey_valid" if as_published else f"{metric}_paper_tukey")
            + (_table_html(claims, "The paper's Tukey claims (§4.3) beside this study", "tukey_vs_paper",
                           degenerate=set(outputs.excluded_primary["model"].astype(str)))
               if claims is not None else ""))


def _our_analysis_html(metric: str, comparison: dict[str, Any], outputs: AnalysisOutputs) -> str:
    mm, fried = comparison["mixed_model"], comparison["friedman"]
    variance = mm["variance"]
    parts = [f"<h3>12.2 {metric}: paired analysis (images as subjects)</h3>",
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
             f"({comparison['images_dropped']} images not scored by every model left out).</p>",
             _equivalence_html(metric, outputs)]
    parts.append(_seeds_html(metric, comparison))
    return "".join(parts)


def _equivalence_html(metric: str, outputs: AnalysisOutputs) -> str:
    table = outputs.tables.get(f"{metric}_equivalence")
    if table is None or table.empty:
        return ""
    margin = table["margin"].iloc[0]
    return _table_html(table, f"Equivalence and power on {metric}: TOST at ±{margin:g} for every pair the trusted "
                              f"analysis does not separate; mde: the difference a paired t-test over these images "
                              f"detects with the configured power", f"{metric}_equivalence")


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
    return ("<h3>12.3 Seeds</h3>" + "".join(parts)) if parts else ""


def _figures_section(outputs: AnalysisOutputs) -> str:
    parts = [_figure_html(outputs, "figure1", "Figure 1: positive test images (rows) with each model's heatmap "
                                              "(jet) and the mask outline (white); first seed of each model."),
             _figure_html(outputs, "depth", "Metric against depth per family (mean, 95% CI over images)."),
             _figure_html(outputs, "sanity", "Sanity check: trained vs weight-randomised heatmaps.")]
    sanity = outputs.tables.get("sanity")
    if sanity is not None and not sanity.empty:
        parts.append(_table_html(sanity, "Trained vs randomised (paired Wilcoxon over images, Holm over models)",
                                 "sanity"))
    return "<h2 id='figures'>13. Figures</h2>" + "".join(p for p in parts if p)


