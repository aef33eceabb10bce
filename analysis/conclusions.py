"""The report's conclusions: plain sentences derived from the computed tables and statistics."""

from __future__ import annotations

import html
from typing import Any

import pandas as pd

from analysis import figures
from analysis.inputs import StudyInputs
from analysis.compute import AnalysisOutputs


# ----------------------------------------------------------------------------- conclusions


def conclusions_section(inputs: StudyInputs, outputs: AnalysisOutputs) -> str:
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
