"""The reliability profile and the depth trend (docs/STUDY.md §11): the paper's question, "is
Grad-CAM more reliable for deeper networks?", answered dimension by dimension.

- `profile_table` (profile.csv): per valid map set (model at the paper's layer, over its valid
  seeds) one row per dimension and measure, each with an estimate, its CI and a verdict read from
  that CI (`analysis.faithfulness.verdict`, `level_verdict`): classification (test AUC; accuracy,
  sensitivity and specificity at the threshold, from Table 1), localisation (pixel AUPRC; beats
  the location prior?), faithfulness (ROAD gap above 0? beats the prior? beats its blur?),
  randomisation (the cascade's fully randomised step against the pass line), robustness
  (max-sensitivity; more robust than the weight-randomised twin?), stability (seed repeatability,
  with >= 2 seeds). A dimension the study did not measure is one row saying so.
- `depth_trend_table` (depth_trend.csv): per family and per-image score, the slope on log10
  parameter count (`analysis.stats.slope_mixed_model`) with CI and p, and where the slope is not
  significant the TOST at `statistics.equivalence_margin`, in score units per decade of
  parameters. A family with fewer than two valid models, or a dimension not measured, is a row
  saying why there is no slope.
- `answer_lines`: the summary's opening, one line per dimension, from these two tables only.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from analysis import stats
from analysis.equivalence import tost_estimate
from scipy import stats as scipy_stats

from analysis.faithfulness import (HIGHER_IS_BETTER, NOT_MEASURED, TWIN, UNSURE, YES, level_verdict, measured,
                                   model_interval, not_measured_reason, verdict)
from analysis.prose import prose
from study.models import FAMILY_ORDER

PROFILE_COLUMNS = ["model", "dimension", "measure", "estimate", "lo", "hi", "line", "question", "verdict", "basis"]
DIMENSIONS = ("classification", "localisation", "faithfulness", "randomisation", "robustness", "stability")
# the question of each dimension whose "yes" the summary counts
KEY_QUESTION = {"classification": "accuracy above 0.5 at the threshold?", "localisation": "beats the location prior?",
                "faithfulness": "beats its blurred copy?", "randomisation": "below the pass line?",
                "robustness": "more robust than its weight-randomised twin?",
                "stability": "seeds agree beyond unrelated images?"}
DESCRIPTIVE = "descriptive"  # a measure shown for reading, with no line to test against


def _row(model: str, dimension: str, measure: str, estimate: float, lo: float, hi: float, question: str,
         answer: str, basis: str, line: float = math.nan) -> dict[str, Any]:
    """One profile row; `line`: what the verdict reads the CI against (NaN: a descriptive row)."""
    return {"model": model, "dimension": dimension, "measure": measure, "estimate": estimate, "lo": lo, "hi": hi,
            "line": line, "question": question, "verdict": answer, "basis": basis}


def _missing(model: str, dimension: str, why: str) -> dict[str, Any]:
    return _row(model, dimension, "", math.nan, math.nan, math.nan, KEY_QUESTION[dimension], NOT_MEASURED, why)


def profile_table(valid: pd.DataFrame, found: Mapping[str, pd.DataFrame], cascade: Optional[list[dict]],
                  alpha: float, replicates: int, seed: int, threshold: float, margin: float) -> pd.DataFrame:
    """One row per (valid model, dimension, measure). `valid`: the trained rows of the paper's layer
    and primary method without the degenerate sets; `found`: the computed tables (table1,
    beats_prior, faithfulness_pairs, robustness_pairs, cascade, stability); `cascade`: the
    cascade verdicts (statistics.json); `margin`: the equivalence margin of the paired TOSTs."""
    if valid.empty:
        return pd.DataFrame(columns=PROFILE_COLUMNS)
    several = valid[["model", "seed"]].drop_duplicates().groupby("model", observed=True).size()
    rows: list[dict] = []
    for model, part in valid.groupby("model", observed=True, sort=True):
        model = str(model)
        interval = lambda metric: model_interval(part, metric, alpha, replicates, seed)  # noqa: E731
        rows += _classification(model, found.get("table1"), threshold, alpha)
        pair = lambda *args, **kwargs: _pair(model, *args, alpha=alpha, margin=margin, **kwargs)  # noqa: E731
        rows += _localisation(model, part, found.get("beats_prior"), interval, pair)
        rows += _faithfulness(model, part, found.get("faithfulness_pairs"), interval, pair)
        rows += _randomisation(model, cascade)
        rows += _robustness(model, part, found.get("robustness_pairs"), interval, pair)
        rows += _stability(model, int(several.get(model, 1)), found.get("stability"), found.get("cascade"))
    return pd.DataFrame(rows, columns=PROFILE_COLUMNS)


def table1_interval(row: Mapping[str, Any], metric: str, alpha: float) -> tuple[float, float, float]:
    """A Table 1 quantity with its CI: the run's own interval with one seed; with several, mean ± z
    SD/sqrt(seeds) (z the normal quantile at 1 - alpha/2; Table 1 keeps the seeds' SD)."""
    value, lo, hi = (float(row.get(c, math.nan)) for c in (metric, f"{metric}_lo", f"{metric}_hi"))
    if not (np.isfinite(lo) and np.isfinite(hi)) and row.get("seeds", 1) > 1:
        half = scipy_stats.norm.ppf(1 - alpha / 2) * float(row.get(f"{metric}_sd", math.nan)) / math.sqrt(row["seeds"])
        lo, hi = value - half, value + half
    return value, lo, hi


def _classification(model: str, table1: Optional[pd.DataFrame], threshold: float, alpha: float) -> list[dict]:
    rows = table1[table1["model"].astype(str) == model] if table1 is not None and len(table1) else None
    if rows is None or rows.empty or "auc" not in rows:
        return [_missing(model, "classification", "no test metrics")]
    row = rows.iloc[0].to_dict()
    found = []
    # a valid map set's AUC CI is above 0.5 by definition (docs/STUDY.md §8): the calls at the threshold are the question
    for metric, measure, question in (("auc", "test AUC", "test AUC above 0.5?"),
                                      ("accuracy", f"accuracy at {prose(threshold)}", KEY_QUESTION["classification"]),
                                      ("recall", f"sensitivity at {prose(threshold)}", ""),
                                      ("specificity", f"specificity at {prose(threshold)}", "")):
        value, lo, hi = table1_interval(row, metric, alpha)
        answer = level_verdict(lo, hi, 0.5) if question else DESCRIPTIVE
        basis = ("Table 1: Wilson (proportions) or DeLong (AUC) CI" if row.get("seeds", 1) <= 1 else
                 f"Table 1 over {row['seeds']} seeds: mean ± z SD/√seeds")
        found.append(_row(model, "classification", measure, value, lo, hi, question, answer, basis,
                          0.5 if question else math.nan))
    return found


def _pair(model: str, dimension: str, measure: str, pairs: Optional[pd.DataFrame], chosen_by: Mapping[str, str],
          question: str, alpha: float, margin: float) -> Optional[dict]:
    """The profile row of one paired comparison, read from its pair table (`chosen_by`: column ->
    value picking the row; None: not in it), its verdict by `analysis.faithfulness.verdict`."""
    if pairs is None or pairs.empty:
        return None
    chosen = pairs["model"].astype(str) == model
    for column, value in chosen_by.items():
        chosen &= pairs[column] == value
    if not chosen.any():
        return None
    r = pairs[chosen].iloc[0]
    return _row(model, dimension, measure, r["difference"], r["lo"], r["hi"], question,
                verdict(r["lo"], r["hi"], r["p_holm"], r.get("p_tost", math.nan), alpha,
                        HIGHER_IS_BETTER.get(r["metric"], True)),
                f"paired over {int(r['n'])} images: t CI, Wilcoxon p with Holm across models, TOST at "
                f"±{prose(margin)}", 0.0)


def _localisation(model: str, part: pd.DataFrame, prior: Optional[pd.DataFrame], interval, pair) -> list[dict]:
    if not measured(part, "auprc"):
        return [_missing(model, "localisation", not_measured_reason(part, "auprc"))]
    mean, lo, hi, how = interval("auprc")
    rows = [_row(model, "localisation", "pixel AUPRC", mean, lo, hi, "", DESCRIPTIVE, how)]
    versus = pair("localisation", "pixel AUPRC − location prior", prior, {"metric": "auprc"},
                  KEY_QUESTION["localisation"])
    rows.append(versus or _missing(model, "localisation", "no location prior scored (baselines.enabled off)"))
    return rows


def _faithfulness(model: str, part: pd.DataFrame, pairs: Optional[pd.DataFrame], interval, pair) -> list[dict]:
    if not measured(part, "road_gap"):
        return [_missing(model, "faithfulness", not_measured_reason(part, "road_gap"))]
    mean, lo, hi, how = interval("road_gap")
    rows = [_row(model, "faithfulness", "ROAD gap (LeRF − MoRF)", mean, lo, hi, "above 0?", level_verdict(lo, hi, 0.0),
                 how, 0.0)]
    for reference, measure, question in (("prior", "ROAD gap − location prior", "beats the location prior?"),
                                         ("blurred", "ROAD gap − its blurred copy", KEY_QUESTION["faithfulness"])):
        rows.append(pair("faithfulness", measure, pairs, {"reference": reference}, question)
                    or _row(model, "faithfulness", measure, math.nan, math.nan, math.nan, question, NOT_MEASURED,
                            f"no {reference} control in controls/"))
    return rows


def _randomisation(model: str, cascade: Optional[list[dict]]) -> list[dict]:
    verdicts = {str(v["model"]): v for v in cascade or []}
    if model not in verdicts:
        return [_missing(model, "randomisation", "no cascade scored for this map set (sanity.cascade)")]
    v = verdicts[model]
    line, lo, hi = float(v["pass_line"]), float(v["full_lo"]), float(v["full_hi"])
    answer = level_verdict(lo, hi, line, higher_is_better=False)
    if answer == YES and v.get("back_above"):
        answer = f"{YES}, not monotone (back above at step(s) {', '.join(map(str, v['back_above']))})"
    return [_row(model, "randomisation", "SSIM of the fully randomised map to the trained map", float(v["full_ssim"]),
                 lo, hi, KEY_QUESTION["randomisation"], answer,
                 f"pass line {prose(line)} (mean SSIM of unrelated images' trained maps, Arun et al. 2021)", line)]


def _robustness(model: str, part: pd.DataFrame, pairs: Optional[pd.DataFrame], interval, pair) -> list[dict]:
    if not measured(part, "max_sensitivity"):
        return [_missing(model, "robustness", not_measured_reason(part, "max_sensitivity"))]
    mean, lo, hi, how = interval("max_sensitivity")
    rows = [_row(model, "robustness", "max-sensitivity (lower: more robust)", mean, lo, hi, "", DESCRIPTIVE, how)]
    rows.append(pair("robustness", "max-sensitivity − twin", pairs, {"reference": TWIN}, KEY_QUESTION["robustness"])
                or _row(model, "robustness", "max-sensitivity − twin", math.nan, math.nan, math.nan,
                        KEY_QUESTION["robustness"], NOT_MEASURED, "the twin's maps carry no max_sensitivity"))
    return rows


def _stability(model: str, seeds: int, stability: Optional[pd.DataFrame], cascade: Optional[pd.DataFrame]) -> list[dict]:
    if seeds < 2 or stability is None or stability.empty:
        return [_missing(model, "stability", f"{seeds} valid seed(s): seed repeatability needs >= 2")]
    own = stability[(stability["kind"] == "repeatability") & (stability["measure"] == "ssim")
                    & (stability["model_a"].astype(str) == model)]
    if own.empty:
        return [_missing(model, "stability", "no pair of this model's runs was compared")]
    mean, lo, hi = float(own["mean"].mean()), float(own["lo"].min()), float(own["hi"].max())
    lines = cascade[(cascade["model"] == model) & (cascade["measure"] == "ssim")]["pass_line"] \
        if cascade is not None and len(cascade) else pd.Series(dtype=float)
    line = float(lines.iloc[0]) if len(lines) else math.nan
    answer = level_verdict(lo, hi, line) if np.isfinite(line) else DESCRIPTIVE
    basis = (f"{len(own)} pair(s) of seeds: mean SSIM of their maps of the same image; CI from the lowest to the "
             f"highest pair's 95% bound" + (f"; line: {prose(line)}, the SSIM of unrelated images' maps"
                                             if np.isfinite(line) else "; no pass line (no cascade)"))
    return [_row(model, "stability", "seed repeatability (SSIM)", mean, lo, hi, KEY_QUESTION["stability"], answer,
                 basis, line)]


# ----------------------------------------------------------------------------- depth trend

TREND_COLUMNS = ["family", "dimension", "metric", "better", "models", "n_models", "images", "runs", "slope", "lo",
                 "hi", "p", "margin", "p_tost", "verdict", "method", "note"]
# dimension -> (metric, whose rows: the model's own maps or its weight-randomised twin's)
TREND_DIMENSIONS = {"localisation": ("auprc", "trained"),
                    "localisation (the paper's score)": ("diff_gradcam", "trained"),
                    "faithfulness": ("road_gap", "trained"), "robustness": ("max_sensitivity", "trained"),
                    "randomisation": ("ssim_to_trained", TWIN)}
# the trend each summary line reads: one metric per dimension
SUMMARY_TREND = {"localisation": "auprc", "faithfulness": "road_gap", "robustness": "max_sensitivity",
                 "randomisation": "ssim_to_trained"}
IMPROVES, WORSENS, FLAT, NO_SLOPE = "more reliable with size", "less reliable with size", "no trend", "no slope"


def depth_trend_table(valid: pd.DataFrame, twin: pd.DataFrame, models: pd.DataFrame,
                      parameters: Mapping[str, Optional[float]], alpha: float, margin: float) -> pd.DataFrame:
    """Per family (FAMILY_ORDER, then others) and TREND_DIMENSIONS entry: the slope of the per-image
    score on log10(parameters in millions) over the family's valid models (`valid`; `twin`: their
    weight-randomised twins' rows, same seeds), images (and runs, with >= 2 seeds) as random effects."""
    families = [f for f in FAMILY_ORDER if f in set(models["family"])]
    families += sorted(set(models["family"]) - set(families))
    family_of = dict(zip(models["model"].astype(str), models["family"]))
    rows = []
    for dimension, (metric, source) in TREND_DIMENSIONS.items():
        frame, higher = (twin if source == TWIN else valid), HIGHER_IS_BETTER[metric]
        for family in families:
            base = {"family": family, "dimension": dimension, "metric": metric,
                    "better": "higher" if higher else "lower", "margin": margin}
            if not measured(frame, metric):
                rows.append({**base, "verdict": NOT_MEASURED, "note": not_measured_reason(frame, metric)})
                continue
            part = frame[frame["model"].astype(str).map(family_of) == family].dropna(subset=[metric])
            rows.append({**base, **_family_slope(part, metric, higher, family, parameters, alpha, margin)})
    return pd.DataFrame(rows, columns=TREND_COLUMNS).astype({"n_models": "Int64", "images": "Int64", "runs": "Int64"})


def _family_slope(part: pd.DataFrame, metric: str, higher: bool, family: str,
                  parameters: Mapping[str, Optional[float]], alpha: float, margin: float) -> dict[str, Any]:
    names = [str(m) for m in stats.levels(part["model"])] if len(part) else []
    unknown = [m for m in names if parameters.get(m) is None]
    counted = [m for m in names if m not in unknown]
    found: dict[str, Any] = {"models": ", ".join(names), "n_models": len(counted)}
    if len(counted) < 2:
        why = (f"{len(counted)} valid model(s) of the {family_name(family)} family with a parameter count" +
               (f" ({', '.join(unknown)}: no parameter count in its spec)" if unknown else "") + ": no slope")
        return {**found, "verdict": NO_SLOPE, "note": why}
    data = part[part["model"].astype(str).isin(counted)]
    data = data.assign(log10_parameters=np.log10(data["model"].astype(str).map(parameters).astype(float)))
    fit = stats.slope_mixed_model(data, metric, "log10_parameters", alpha=alpha)
    p_tost = tost_estimate(fit["slope"], fit["se"], margin, fit["df"]) if not fit["p"] < alpha else math.nan
    return {**found, "images": fit["images"], "runs": fit["runs"], "slope": fit["slope"], "lo": fit["lower"],
            "hi": fit["upper"], "p": fit["p"], "p_tost": p_tost, "method": fit["method"],
            "verdict": trend_verdict(fit["slope"], fit["lower"], fit["upper"], fit["p"], p_tost, alpha, higher),
            "note": fit["note"]}


def trend_verdict(slope: float, lo: float, hi: float, p: float, p_tost: float, alpha: float, higher: bool) -> str:
    """IMPROVES / WORSENS when the slope is significant and its CI lies on that side of 0 (better is
    up for `higher`); FLAT when the TOST shows it within the margin per decade; else UNSURE."""
    if not np.isfinite(slope):
        return NO_SLOPE
    if np.isfinite(p) and p < alpha and (lo > 0 or hi < 0):
        return IMPROVES if (lo > 0) == higher else WORSENS
    if np.isfinite(p_tost) and p_tost < alpha:
        return FLAT
    return UNSURE


# ----------------------------------------------------------------------------- the summary's answer

QUESTION = "Is Grad-CAM more reliable for deeper networks?"


def answer_lines(profile: Optional[pd.DataFrame], trend: Optional[pd.DataFrame]) -> list[str]:
    """One line per dimension (DIMENSIONS), from profile.csv and depth_trend.csv only: the trend
    within each family, then how many valid map sets answer the dimension's key question yes."""
    if profile is None or profile.empty:
        return [f"{QUESTION} No valid map set: no answer in any dimension."]
    return [_answer_line(dimension, profile[profile["dimension"] == dimension], _trend_rows(trend, dimension))
            for dimension in DIMENSIONS]


def _trend_rows(trend: Optional[pd.DataFrame], dimension: str) -> pd.DataFrame:
    if trend is None or trend.empty or dimension not in SUMMARY_TREND:
        return pd.DataFrame(columns=TREND_COLUMNS)
    return trend[(trend["dimension"] == dimension) & (trend["metric"] == SUMMARY_TREND[dimension])]


def _answer_line(dimension: str, profile: pd.DataFrame, trend: pd.DataFrame) -> str:
    head = f"{QUESTION} {dimension.capitalize()}: "
    key = profile[profile["question"] == KEY_QUESTION[dimension]]
    if key.empty or (key["verdict"] == NOT_MEASURED).all():
        why = key["basis"].iloc[0] if len(key) else "no row in the profile"
        return head + f"not measured in this study ({why})."
    counted = key[key["verdict"] != NOT_MEASURED]
    yes = counted[counted["verdict"].str.startswith(YES)]
    tally = (f"{len(yes)} of {len(counted)} valid map sets answer '{KEY_QUESTION[dimension]}' yes"
             + (f" ({', '.join(_label(m) for m in yes['model'])})" if len(yes) else "") + " (profile)")
    if dimension not in SUMMARY_TREND:
        return head + f"no per-image score to regress on size, so no depth trend; {tally}."
    return head + _trend_text(trend) + f"; {tally}."


def _trend_text(trend: pd.DataFrame) -> str:
    """The overall answer across families, then each family's slope and verdict."""
    sloped = trend[~trend["verdict"].isin([NO_SLOPE, NOT_MEASURED])]
    verdicts = set(sloped["verdict"])
    if sloped.empty:
        answer = "no depth trend estimable"
    elif IMPROVES in verdicts and WORSENS in verdicts:
        answer = "mixed: more reliable with size in one family, less in another"
    elif IMPROVES in verdicts:
        answer = "yes in " + ", ".join(map(family_name, sloped.loc[sloped["verdict"] == IMPROVES, "family"]))
    elif WORSENS in verdicts:
        answer = "no, the opposite in " + ", ".join(map(family_name, sloped.loc[sloped["verdict"] == WORSENS, "family"]))
    elif verdicts == {FLAT}:
        answer = "no: no trend with size in any family with a slope (equivalence shown)"
    else:
        answer = "not shown"
    parts = []
    for r in trend.itertuples():
        if r.verdict in (NO_SLOPE, NOT_MEASURED):
            parts.append(f"{family_name(r.family)}: {r.verdict}")
        else:
            parts.append(f"{family_name(r.family)}: {r.verdict}, slope {prose(r.slope)} [{prose(r.lo)}, {prose(r.hi)}] per decade"
                         + (f", within ±{prose(r.margin)}" if r.verdict == FLAT else ""))
    return f"{answer} ({'; '.join(parts)})" if parts else answer


FAMILY_NAMES = {"vgg": "VGG", "resnet": "ResNet", "vit": "ViT"}


def family_name(family: str) -> str:
    return FAMILY_NAMES.get(family, family)


def _label(model: str) -> str:
    from analysis.paper_values import LABELS

    return LABELS.get(model, model)

