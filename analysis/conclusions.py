"""The report's conclusions: plain sentences derived from the computed tables and statistics.

Every sentence is about the valid map sets only (docs/STUDY.md §8): a degenerate set is named once, in
the note before the list, and in no conclusion. No sentence ranks models whose CIs overlap.
Each sentence that states a result is one function of the tables (tests/analysis/test_conclusions.py flips
each one by flipping its data), and every number in a sentence is written by `prose`, one
rounding rule, so a sentence never disagrees with its table."""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from analysis import figures, paper_values
from analysis.compute import AnalysisOutputs
from analysis.inputs import StudyInputs
from analysis.profile import answer_lines
from analysis.prose import interval, prose  # noqa: F401 (interval: also for report.py)

# ----------------------------------------------------------------------------- conclusions


def conclusions_section(inputs: StudyInputs, outputs: AnalysisOutputs) -> str:
    items = conclusions(inputs, outputs)
    left_out = excluded_sentence(outputs, where="above")
    note = f"<p class='note'>{html.escape(left_out)}</p>" if left_out else ""
    return "<h2 id='conclusions'>14. Conclusions the numbers support</h2>" + note + "<ul>" + "".join(
        f"<li>{html.escape(item)}</li>" for item in items) + "</ul>"


def excluded_sentence(outputs: AnalysisOutputs, where: str = "below") -> str:
    """The degenerate map sets of the paper's layer, each with its reason, in one sentence, and how
    many more the other layers hold ("" when there is none). `where`: where the report's table of
    them stands from the sentence ("below" from the summary, "above" from the conclusions)."""
    if outputs.excluded.empty:
        return ""
    primary = outputs.excluded_primary
    sets = [f"{figures.label(r.model)} (seed {r.seed}, {r.method}): {r.reason}" for r in primary.itertuples()]
    others = len(outputs.excluded) - len(primary)
    tail = (f" {others} further degenerate map set(s) at other layers are listed in the table {where} and in "
            "statistics.json." if others else "")
    head = ("Left out of every comparison, chance level, sanity verdict and conclusion as degenerate map sets "
            "(docs/STUDY.md §8): " + "; ".join(sets) + "." if sets else "")
    return (head + tail).strip()


def _valid(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a per-model table whose map set is not degenerate."""
    return table[table["degenerate"] == ""] if "degenerate" in table else table


def conclusions(inputs: StudyInputs, outputs: AnalysisOutputs) -> list[str]:
    """Plain sentences generated from the results, each hedged by its statistics."""
    threshold, alpha = inputs.config.training.threshold, inputs.config.statistics.alpha
    found = [_classification_conclusion(outputs), _separation_sentence(outputs, threshold, alpha)]
    comparison = outputs.statistics["comparisons"].get("diff_gradcam")
    if comparison is not None:
        found += [_localisation_conclusion(comparison), _family_conclusion(comparison, inputs.models),
                  _paper_claims_conclusion(outputs)]
    if "ehr" in outputs.tables:
        found.append(_ehr_conclusion(outputs.tables["ehr"]))
    if "sanity" in outputs.tables and not outputs.tables["sanity"].empty:
        found.append(_sanity_conclusion(outputs.tables["sanity"]))
    found += [_prior_conclusion(outputs), _layer_conclusion(outputs), _matched_conclusion(outputs),
              _covariate_conclusion(outputs, inputs.config.statistics.alpha),
              _cascade_conclusion(outputs), _stability_conclusion(outputs), _equivalence_conclusion(outputs)]
    if inputs.missing:
        found.append(f"{len(inputs.missing)} expected input(s) are missing (see the first section); "
                     "these conclusions cover only the runs that finished.")
    return [f for f in found if f]


def _classification_conclusion(outputs: AnalysisOutputs) -> str:
    table1 = outputs.tables["table1"]
    if table1.empty:
        return "No finished run has test metrics: no classification conclusion."
    table1 = _valid(table1)
    if table1.empty:
        return ""
    ranks = int((table1["auc_lo"] > 0.5).sum()) if "auc_lo" in table1 else 0
    return (f"Test AUC of the classifiers whose maps are analysed ranges {prose(table1['auc'].min())}–"
            f"{prose(table1['auc'].max())}; {ranks} of {len(table1)} rank positives above negatives beyond chance "
            "(AUC CI above 0.5), which says nothing of their calls at the decision threshold (next sentence).")


ONE_CLASS = 0.1  # sensitivity or specificity below this: the classifier calls (almost) every image one class


def separation(table1: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Per model: ranks (AUC CI above 0.5) and separates (accuracy at the threshold shown above
    0.5: its CI, or with several seeds mean − z SD/√seeds, z the normal quantile at 1 − alpha/2), and whether it calls (almost)
    every image one class (sensitivity or specificity below ONE_CLASS)."""
    rows = []
    for row in table1.to_dict(orient="records"):
        accuracy_lo = row.get("accuracy_lo", np.nan)
        if not np.isfinite(accuracy_lo) and row.get("seeds", 1) > 1:
            z = scipy_stats.norm.ppf(1 - alpha / 2)
            accuracy_lo = row["accuracy"] - z * row.get("accuracy_sd", np.nan) / np.sqrt(row["seeds"])
        rows.append({"model": row["model"], "ranks": bool(row.get("auc_lo", np.nan) > 0.5),
                     "separates": bool(accuracy_lo > 0.5),
                     "one_class": bool(min(row.get("recall", np.nan), row.get("specificity", np.nan)) < ONE_CLASS),
                     "accuracy": row.get("accuracy"), "recall": row.get("recall"),
                     "specificity": row.get("specificity")})
    return pd.DataFrame(rows, columns=["model", "ranks", "separates", "one_class", "accuracy", "recall",
                                       "specificity"])


def _separation_sentence(outputs: AnalysisOutputs, threshold: float, alpha: float) -> str:
    """Which classifiers separate the classes at the decision threshold, and which rank but do not."""
    table1 = _valid(outputs.tables["table1"])
    if table1.empty or "accuracy" not in table1:
        return ""
    found = separation(table1, alpha)
    rates = lambda r: (f"accuracy {prose(r.accuracy)}, sensitivity {prose(r.recall)}, "  # noqa: E731
                       f"specificity {prose(r.specificity)}")
    separating = [f"{figures.label(r.model)} ({rates(r)})" for r in found.itertuples() if r.separates]
    ranking_only = [f"{figures.label(r.model)} ({rates(r)}" + ("; it calls (almost) every image one class)"
                                                              if r.one_class else ")")
                    for r in found.itertuples() if r.ranks and not r.separates]
    text = (f"At the decision threshold {prose(threshold)}, {len(separating)} of {len(found)} classifiers separate the "
            "classes (accuracy CI above 0.5)" + (f": {', '.join(separating)}" if separating else ""))
    if ranking_only:
        text += f"; {', '.join(ranking_only)} rank but do not separate at that threshold"
    return text + "."


def _localisation_conclusion(comparison: dict[str, Any]) -> str:
    estimates = comparison["mixed_model"]["estimates"].sort_values("estimate", ascending=False)
    top, runner_up = estimates.iloc[0], estimates.iloc[1]
    if top["lower"] > estimates["upper"].iloc[1:].max():
        lead = (f"Diff_GradCAM is highest for {figures.label(top['model'])} (mixed-model mean {prose(top['estimate'])} "
                f"[{prose(top['lower'])}, {prose(top['upper'])}], its CI clear of every other model's)")
    else:
        lead = (f"No model's Diff_GradCAM stands out as highest: the mixed-model CIs of the top models overlap "
                f"({figures.label(top['model'])} {prose(top['estimate'])} [{prose(top['lower'])}, {prose(top['upper'])}], "
                f"{figures.label(runner_up['model'])} {prose(runner_up['estimate'])} "
                f"[{prose(runner_up['lower'])}, {prose(runner_up['upper'])}])")
    pairs = [_pair_label(p) for p in comparison["significant_pairs"]]
    tail = (f"{len(pairs)} pair(s) differ significantly ({comparison['trusted_basis']}): " + ", ".join(pairs) + "."
            if pairs else f"no model differs significantly from another ({comparison['trusted_basis']}).")
    return f"{lead}; after multiple-comparison correction {tail}"


def _pair_label(pair: str) -> str:
    return " vs ".join(figures.label(m) for m in pair.split(" vs "))


def _family_conclusion(comparison: dict[str, Any], models: pd.DataFrame) -> str:
    estimates = comparison["mixed_model"]["estimates"].merge(models, on="model")
    families = estimates.groupby("family", sort=False)["estimate"].mean()
    if len(families) < 2:
        return ""
    ranked = ", ".join(f"{f} {prose(v)}" for f, v in families.sort_values(ascending=False).items())
    significant = set(comparison["significant_pairs"])
    trends = [_depth_text(part, significant) for _, part in estimates.groupby("family", sort=False) if len(part) > 1]
    return (f"Mean Diff_GradCAM by family: {ranked} (descriptive; the tests compare models, not families). "
            + " ".join(trends))


def _depth_text(part: pd.DataFrame, significant: set[str]) -> str:
    """Estimates in depth order and whether any pair inside the family differs significantly."""
    part = part.sort_values("depth", kind="stable")
    chain = " → ".join(f"{figures.label(r.model)} {prose(r.estimate)}" for r in part.itertuples())
    names = set(part["model"])
    inside = [p for p in significant if set(p.split(" vs ")) <= names]
    verdict = (f"significant: {', '.join(_pair_label(p) for p in inside)}" if inside
               else "no pair inside the family differs significantly")
    return f"By depth within {part['family'].iloc[0]}: {chain} ({verdict})."


def _ehr_conclusion(ehr: pd.DataFrame) -> str:
    ehr = _valid(ehr)
    if ehr.empty or not {"ehr_auc_norm", "ehr_auc_chance"} <= set(ehr.columns):
        return ""
    above = int((ehr["ehr_auc_norm_lo"] > 0).sum())
    return (f"EHR AUC: {above} of {len(ehr)} valid map sets localise above chance (normalised EHR CI above 0); "
            f"raw EHR values near their chance level (mean {prose(ehr['ehr_auc_chance'].mean())} over these sets) must "
            "not be read as localisation quality.")


def _sanity_conclusion(sanity: pd.DataFrame) -> str:
    """Per sanity copy (the weight-randomised twin; the label-permutation run), in both
    directions: the valid map sets (compute.py leaves the others out) whose trained maps score
    higher (Holm), those whose randomised copy scores higher, and those with no difference shown."""
    sentences = []
    for copy, words in (("full", "weight-randomised copies'"), ("labels", "a model's trained on permuted labels")):
        part = sanity[(sanity["metric"] == "diff_gradcam") & (_copy(sanity) == copy)]
        if part.empty:
            continue
        higher = part[part["reject"] & (part["difference"] > 0)]
        lower = part[part["reject"] & (part["difference"] < 0)]
        neither = part[~part["reject"]]
        text = (f"trained maps score higher Diff_GradCAM than their {words} for {len(higher)} of {len(part)} models"
                + (f" ({', '.join(figures.label(m) for m in higher['model'])})" if len(higher) else ""))
        if len(lower):
            text += "; the randomised copy scores higher for " + ", ".join(
                f"{figures.label(r.model)} (difference {prose(r.difference)}, Holm p = {prose(r.p_adj)})"
                for r in lower.itertuples())
        if len(neither):
            text += "; no difference shown for " + ", ".join(figures.label(m) for m in neither["model"])
        sentences.append(text)
    if not sentences:
        return ""
    return ("Sanity check (paired over images, Holm): " + "; ".join(sentences) + ". A model whose maps do not beat a "
            "randomised copy's may show the architecture more than what it learned.")


def _copy(sanity: pd.DataFrame) -> pd.Series:
    return sanity["copy"] if "copy" in sanity else pd.Series("full", index=sanity.index)


def _paper_claims_conclusion(outputs: AnalysisOutputs) -> str:
    claims = outputs.tables.get("tukey_vs_paper")
    if claims is None or claims.empty:
        return ""
    return (f"Of the paper's {len(claims)} pairwise Tukey claims that this study can check, "
            f"{int(claims['agrees'].sum())} agree with the trusted paired result.")


# ----------------------------------------------------------------------------- the summary (report top)


def summary_items(inputs: StudyInputs, outputs: AnalysisOutputs) -> list[str]:
    """The report's first screen: the answer to the paper's question per dimension (from profile.csv
    and depth_trend.csv only), what ran, which classifiers work, which map sets localise above
    chance, the sanity verdict, where the paper's claims hold or fail, what was left out."""
    answers = (answer_lines(outputs.tables.get("profile"), outputs.tables.get("depth_trend"))
               if outputs.statistics.get("cam_method") else [])
    items = [*answers, _what_ran(inputs, outputs), _classifiers_summary(outputs),
             _separation_sentence(outputs, inputs.config.training.threshold, inputs.config.statistics.alpha),
             _localisation_summary(outputs),
             _sanity_summary(outputs), _cascade_conclusion(outputs), _stability_conclusion(outputs),
             _layer_conclusion(outputs), _paper_summary(outputs), excluded_sentence(outputs, where="below")]
    if inputs.missing or outputs.notes:
        items.append(f"{len(inputs.missing) + len(outputs.notes)} expected input(s) or analyses are missing; "
                     "see 'Missing or incomplete inputs'.")
    return [item for item in items if item]


def _what_ran(inputs: StudyInputs, outputs: AnalysisOutputs) -> str:
    config, runs = inputs.config, inputs.runs
    seeds = config.training.seeds
    scored = outputs.tables.get("table2")
    images = int(scored["n"].max()) if scored is not None and not scored.empty else 0
    method = outputs.statistics.get("cam_method") or "no CAM method"
    section_11 = [f"{what} on up to {int(table['n'].max())} of them" for what, table in
                  (("faithfulness (ROAD)", outputs.tables.get("faithfulness")),
                   ("robustness", outputs.tables.get("robustness")))
                  if table is not None and not table.empty and table["n"].max() > 0]
    return (f"What ran: {len(inputs.model_order)} model(s) × {len(seeds)} seed(s), {int(runs['finished'].sum())} of "
            f"{len(runs)} runs finished; {method} heatmaps scored on up to {images} positive test images per run"
            + (f" ({', '.join(section_11)})" if section_11 else "")
            + f" ({config.data.source} data, {config.preprocess.image_size} px).")


def _classifiers_summary(outputs: AnalysisOutputs) -> str:
    table1 = outputs.tables["table1"]
    if table1.empty or "auc_lo" not in table1:
        return "Classifiers: no test metrics."
    rows = list(table1.itertuples(index=False))
    working = [r for r in rows if r.auc_lo > 0.5]
    failing = [r for r in rows if not r.auc_lo > 0.5]
    text = "Classifiers that rank above chance (test AUC 95% CI above 0.5): " + (
        ", ".join(f"{figures.label(r.model)} {interval(r._asdict(), 'auc')}" for r in working) if working else "none")
    if failing:
        text += "; not shown to: " + ", ".join(f"{figures.label(r.model)} {interval(r._asdict(), 'auc')}"
                                               for r in failing)
    return text + "."


def _localisation_summary(outputs: AnalysisOutputs) -> str:
    ehr = outputs.tables.get("ehr")
    if ehr is None or ehr.empty or "ehr_auc_norm_lo" not in ehr:
        return ""
    valid = _valid(ehr)
    above = [r for r in valid.to_dict(orient="records") if r["ehr_auc_norm_lo"] > 0]
    listed = ", ".join(f"{figures.label(r['model'])} {interval(r, 'ehr_auc_norm')}" for r in above)
    prior = _prior_conclusion(outputs) or ("No location-prior baseline was scored (baselines.enabled is off), so "
                                           "'above chance' is not shown to be 'above where lesions usually are'.")
    return (f"Localisation: {len(above)} of {len(valid)} valid map sets localise above chance (normalised EHR AUC, "
            f"95% CI above 0{': ' + listed if listed else ''}). " + prior)


PRIOR_SUMMARY_METRICS = {"auprc": "pixel AUPRC", "diff_gradcam": "Diff_GradCAM"}  # threshold-free, then the paper's


def _prior_conclusion(outputs: AnalysisOutputs) -> str:
    """Which valid map sets beat the location prior, paired over images (Holm), per summary metric."""
    prior = outputs.tables.get("beats_prior")
    if prior is None or prior.empty:
        return ""
    parts = []
    for metric, name in ((m, n) for m, n in PRIOR_SUMMARY_METRICS.items() if m in set(prior["metric"])):
        part = prior[prior["metric"] == metric]
        winners = [f"{figures.label(r.model)} ({prose(r.difference)} [{prose(r.lo)}, {prose(r.hi)}])"
                   for r in part.itertuples() if r.beats_prior]
        below = [figures.label(r.model) for r in part.itertuples() if r.verdict == "below the prior"]
        parts.append(f"by {name}, {len(winners)} of {len(part)} beat it" + (f": {', '.join(winners)}" if winners else "")
                     + (f"; {', '.join(below)} score below it" if below else ""))
    return ("Against the location prior (the mean training mask; paired over images, Holm): " + "; ".join(parts)
            + ". A map that does not beat the prior shows no image-specific localisation.")


def _layer_conclusion(outputs: AnalysisOutputs) -> str:
    """Per-layer claims, only as the paired test against the paper's layer makes them
    (`layers.layer_vs_final_table`), for its first metric (threshold-free AUPRC)."""
    table = outputs.tables.get("layer_vs_final")
    if table is None or table.empty:
        return ""
    metric = table["metric"].iloc[0]
    part = table[table["metric"] == metric]
    names = {"auprc": "pixel AUPRC", "diff_gradcam": "Diff_GradCAM"}
    shown = part[part["verdict"] != "no difference shown"]
    described = lambda rows: ", ".join(f"{figures.label(r.model)} {r.layer} ({prose(r.difference)} "  # noqa: E731
                                       f"[{prose(r.lo)}, {prose(r.hi)}])" for r in rows.itertuples())
    text = (f"Layers against the paper's layer ({names.get(metric, metric)}, paired over images, Holm over "
            f"{len(part)} comparisons): {len(shown)} differ")
    for verdict in ("better", "worse"):
        rows = part[part["verdict"] == verdict]
        if len(rows):
            text += f"; {verdict} than the paper's layer: {described(rows)}"
    unchanged = [figures.label(m) for m, rows in part.groupby("model", sort=False)
                 if (rows["verdict"] == "no difference shown").all()]
    if unchanged:
        text += f"; no layer of {', '.join(unchanged)} differs from its paper's layer"
    return text + "."


def _matched_conclusion(outputs: AnalysisOutputs) -> str:
    matched = outputs.statistics.get("resolution_matched") or {}
    comparison = matched.get("comparisons", {}).get("diff_gradcam")
    if comparison is None:
        return ""
    pairs = [_pair_label(p) for p in comparison["significant_pairs"]]
    return (f"At one map size ({matched['map_size']}×{matched['map_size']}, every model's resolution-matched layer) "
            + (f"{len(pairs)} pair(s) differ in Diff_GradCAM ({comparison['trusted_basis']}): {', '.join(pairs)}."
               if pairs else f"no pair of models differs in Diff_GradCAM ({comparison['trusted_basis']}).")
            + " Differences seen only at the paper's layers may come from map resolution, not depth.")


def _cascade_conclusion(outputs: AnalysisOutputs) -> str:
    """The fully randomised step against the pass line, then each cascade step by step: which
    fall below the line and stay below, which climb back (not monotone), which never fall."""
    verdicts = outputs.statistics.get("cascade") or []
    if not verdicts:
        return ""
    passing = [v for v in verdicts if v["passes"]]
    failing = [figures.label(v["model"]) for v in verdicts if not v["passes"]]
    text = (f"Cascading randomisation: for {len(passing)} of {len(verdicts)} valid map sets the fully randomised map is "
            "shown to be less similar (SSIM) to the trained map than two unrelated images' maps are (Arun et al.'s pass "
            "line)" + (f"; not for {', '.join(failing)}, whose maps survive the destruction of their weights" if failing
                       else ""))
    monotone = [figures.label(v["model"]) for v in verdicts if v.get("monotone")]
    climbing = [f"{figures.label(v['model'])} (below from step {v['first_step_below']}, not shown below again at "
                f"step{'s' if len(v['back_above']) > 1 else ''} {', '.join(map(str, v['back_above']))}, SSIM up to "
                f"{prose(v['back_above_max_ssim'])})" for v in verdicts if v.get("back_above")]
    never = [figures.label(v["model"]) for v in verdicts if v.get("first_step_below") is None]
    if monotone:
        text += f". Step by step, {', '.join(monotone)} fall below the line and stay below"
    if climbing:
        text += (". " if not monotone else "; ") + "not monotone: " + "; ".join(climbing)
    if never:
        text += (". " if not (monotone or climbing) else "; ") + f"no step of {', '.join(never)} is shown below it"
    return text + "."


def _stability_conclusion(outputs: AnalysisOutputs) -> str:
    summary = outputs.statistics.get("stability")
    if not summary:
        return ""
    across, within = summary["reproducibility"], summary["repeatability"]
    if within is None:
        return (f"Map stability: two architectures' maps of the same image have mean SSIM {prose(across)}; with one seed "
                "per architecture the seed-to-seed agreement is unmeasured, so an architecture difference cannot be "
                "told from a seed difference (run with --seeds 0,1,2).")
    text = f"Map stability (mean SSIM of two runs' maps of the same image): {prose(within)} between seeds of one architecture"
    if across is None:
        return text + "."
    return (text + f", {prose(across)} between architectures"
            + (" — seeds disagree about as much as architectures do, so architecture differences in these maps are "
               "not larger than seed-to-seed variation" if within - across < 0.05 else "") + ".")


def _equivalence_conclusion(outputs: AnalysisOutputs) -> str:
    table = outputs.tables.get("diff_gradcam_equivalence")
    if table is None or table.empty:
        return ""
    open_pairs = table[~table["significant"]]
    if open_pairs.empty:
        return ""
    equivalent = int(open_pairs["equivalent"].sum())
    return (f"Of {len(open_pairs)} model pairs that do not differ in Diff_GradCAM, {equivalent} are shown equivalent "
            f"within ±{prose(table['margin'].iloc[0])} (TOST); the other {len(open_pairs) - equivalent} are inconclusive, "
            f"with differences up to {prose(open_pairs['mde'].max())} detectable at the configured power — "
            "'no significant difference' is not 'no difference'.")


def _covariate_conclusion(outputs: AnalysisOutputs, alpha: float) -> str:
    table = outputs.tables.get("covariates")
    if table is None or table.empty:
        return ""
    significant = table[table["p"] < alpha]
    if significant.empty:
        return ("No lesion covariate (size, regions, elongation) or the predicted probability has a significant effect "
                "in the mixed models of " + ", ".join(dict.fromkeys(table["metric"])) + ".")
    effects = [f"{r.term} on {r.metric} ({prose(r.estimate)} [{prose(r.lower)}, {prose(r.upper)}])" for r in significant.itertuples()]
    return "Lesion covariates with a significant effect (mixed model, images as random effect): " + "; ".join(effects) + "."


def _sanity_summary(outputs: AnalysisOutputs) -> str:
    sanity = outputs.tables.get("sanity")
    if sanity is None or sanity.empty:
        return ""
    return _sanity_conclusion(sanity)


def _paper_summary(outputs: AnalysisOutputs) -> str:
    claims = outputs.tables.get("tukey_vs_paper")
    parts = []
    if claims is not None and not claims.empty:
        parts.append(f"{int(claims['agrees'].sum())} of the paper's {len(claims)} checkable pairwise Tukey claims "
                     "agree with the trusted paired result (pairs with a degenerate set cannot be checked)")
    every = outputs.statistics.get("paper_all_models", {}).get("diff_gradcam")
    if every is not None:
        parts.append(f"the paper's one-way ANOVA over every model gives p = {prose(every['anova']['p'])}")
    if "ehr" in outputs.tables:
        quoted = [value.value for value in paper_values.EHR_AUC.values()]
        parts.append(f"its EHR AUC values ({prose(min(quoted))}–{prose(max(quoted))}) sit at the chance level of "
                     "lesions of that size, so they cannot show localisation")
    return ("The paper's claims: " + "; ".join(parts) + ".") if parts else ""
