"""Statistics of the study (docs/STUDY.md §6). Plain pandas in, plain dicts and DataFrames out.

- The paper's analysis, labelled as such: one-way ANOVA + Tukey HSD (`paper_anova_tukey`). It
  treats the scores of different models on the same image as independent samples.
- The primary analysis: images are subjects, paired across models. A linear mixed model
  `score ~ C(model) + (1 | image)` (`mixed_model`), all-pairs comparisons from the two-way
  `score ~ model + image` error term (block Tukey) or paired Wilcoxon tests with Holm correction
  (`paired_comparisons`), Friedman as the rank-based check (`friedman`).
- Seeds: with >= 3 seeds per model the training run is the unit (`run_level_anova`), and the
  crossed model (image + run random effects, `crossed_mixed_model`) reports the seed variance.
- Classification: paired DeLong (AUC) and exact McNemar (accuracy), Holm-corrected
  (`classification_comparisons`), using training.classification.

Every test returns its assumption checks where they apply and a plain-words verdict.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from typing import Any, Optional

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats
from statsmodels.stats.multicomp import pairwise_tukeyhsd
from statsmodels.stats.multitest import multipletests

from study.config import StatisticsConfig
from training.classification import auc, delong_paired, mcnemar_exact

ALPHA = StatisticsConfig.alpha  # the default of a direct call; the study passes config.statistics.alpha
SHAPIRO_MAX_N = 5000  # scipy's Shapiro-Wilk p is only approximate above n = 5000: subsample
PAIR_COLUMNS = ["group1", "group2", "meandiff", "p_adj", "lower", "upper", "reject"]


# ----------------------------------------------------------------------------- helpers


def holm(p_values: Any) -> np.ndarray:
    """Holm step-down adjusted p-values (statsmodels `multipletests`); nan entries stay nan and
    do not count as tests."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        adjusted[finite] = multipletests(p[finite], method="holm")[1]
    return adjusted


def levels(series: pd.Series) -> list:
    """The groups of `series` in analysis order: category order if categorical, else sorted."""
    present = set(series.dropna().unique())
    if isinstance(series.dtype, pd.CategoricalDtype):
        return [c for c in series.cat.categories if c in present]
    return sorted(present)


def mean_ci(values: Any, alpha: float = ALPHA) -> tuple[float, float, float]:
    """(mean, lo, hi): Student-t interval of the mean; nan bounds below two finite values."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return (float(x.mean()) if x.size else math.nan), math.nan, math.nan
    half = stats.t.ppf(1 - alpha / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def assumption_checks(residuals: Any, groups: Any, alpha: float = ALPHA) -> dict[str, Any]:
    """Shapiro-Wilk on the residuals (a fixed subsample above SHAPIRO_MAX_N) and Brown-Forsythe
    Levene (median-centred) on the residuals by group."""
    r = np.asarray(residuals, dtype=float)
    g = np.asarray(groups)
    sample = r if r.size <= SHAPIRO_MAX_N else np.random.default_rng(0).choice(r, SHAPIRO_MAX_N, replace=False)
    shapiro = stats.shapiro(sample) if sample.size >= 3 else (math.nan, math.nan)
    by_group = [r[g == level] for level in pd.unique(g)]
    usable = len(by_group) >= 2 and all(len(x) >= 2 for x in by_group)
    levene = stats.levene(*by_group, center="median") if usable else (math.nan, math.nan)
    return {"shapiro_W": float(shapiro[0]), "shapiro_p": float(shapiro[1]), "shapiro_n": int(sample.size),
            "residuals_normal": bool(shapiro[1] >= alpha) if np.isfinite(shapiro[1]) else None,
            "levene_W": float(levene[0]), "levene_p": float(levene[1]),
            "equal_variances": bool(levene[1] >= alpha) if np.isfinite(levene[1]) else None}


def significant_pairs(pairs: pd.DataFrame) -> list[str]:
    """"a vs b" for every rejected pair, as the pair table orders it."""
    rejected = pairs[pairs["reject"].astype(bool)]
    return [f"{a} vs {b}" for a, b in zip(rejected["group1"], rejected["group2"])]


def pair_key(a: str, b: str) -> str:
    """An order-free key of a pair, for joining pair tables."""
    return " | ".join(sorted((str(a), str(b))))


# ----------------------------------------------------------------------------- the paper's analysis


def paper_anova_tukey(df: pd.DataFrame, value: str = "diff_gradcam", group: str = "model",
                      alpha: float = ALPHA) -> tuple[dict[str, Any], pd.DataFrame]:
    """The paper's analysis: one-way ANOVA, then Tukey HSD (statsmodels `pairwise_tukeyhsd`).

    Returns (anova: F, df_between, df_within, p, n, assumptions, verdict; tukey: group1, group2,
    meandiff = mean(group2) - mean(group1), p_adj, lower, upper, reject), pairs in the order of
    `levels(df[group])` (category order, else sorted by name as R and statsmodels do).
    """
    data = df[[group, value]].dropna()
    y = data[value].to_numpy(dtype=float)
    g = data[group].astype(str).to_numpy()
    names = sorted(set(g))
    result = stats.f_oneway(*[y[g == name] for name in names])
    means = data.groupby(data[group].astype(str), observed=True)[value].transform("mean").to_numpy()
    anova = {"F": float(result.statistic), "df_between": len(names) - 1, "df_within": len(y) - len(names),
             "p": float(result.pvalue), "n": len(y), "assumptions": assumption_checks(y - means, g, alpha)}
    tukey = _in_order(_tukey_frame(pairwise_tukeyhsd(y, g, alpha=alpha)), [str(v) for v in levels(df[group])])
    anova["verdict"] = _anova_verdict(anova, tukey)
    return anova, tukey


def _tukey_frame(result) -> pd.DataFrame:
    # statsmodels orders the pairs (i, j), i < j over its sorted groups; meandiff = mean_j - mean_i
    first, second = np.triu_indices(len(result.groupsunique), 1)
    return pd.DataFrame({"group1": result.groupsunique[first], "group2": result.groupsunique[second],
                         "meandiff": result.meandiffs, "p_adj": result.pvalues,
                         "lower": result.confint[:, 0], "upper": result.confint[:, 1],
                         "reject": result.reject.astype(bool)})


def _in_order(pairs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Pairs with group1 before group2 in `order` (meandiff and CI negated where swapped), sorted."""
    rank = {name: i for i, name in enumerate(order)}
    swap = pairs["group1"].map(rank) > pairs["group2"].map(rank)
    out = pairs.copy()
    out.loc[swap, ["group1", "group2"]] = pairs.loc[swap, ["group2", "group1"]].to_numpy()
    out.loc[swap, "meandiff"] = -pairs.loc[swap, "meandiff"]
    out.loc[swap, "lower"], out.loc[swap, "upper"] = -pairs.loc[swap, "upper"], -pairs.loc[swap, "lower"]
    keys = list(zip(out["group1"].map(rank), out["group2"].map(rank)))
    return out.iloc[sorted(range(len(out)), key=keys.__getitem__)].reset_index(drop=True)


def _anova_verdict(anova: dict[str, Any], tukey: pd.DataFrame) -> str:
    checks = anova["assumptions"]
    words = [f"One-way ANOVA F({anova['df_between']}, {anova['df_within']}) = {anova['F']:.3f}, "
             f"p = {anova['p']:.3g}; Tukey HSD: {int(tukey['reject'].sum())} of {len(tukey)} pairs significant."]
    if checks["residuals_normal"] is False:
        words.append(f"Residuals are not normal (Shapiro p = {checks['shapiro_p']:.2g}, n = {checks['shapiro_n']}).")
    if checks["equal_variances"] is False:
        words.append(f"Group variances differ (Levene p = {checks['levene_p']:.2g}), which Tukey HSD assumes away.")
    if checks["residuals_normal"] is not False and checks["equal_variances"] is not False:
        words.append("Its assumptions hold (Shapiro, Levene).")
    return " ".join(words)


PAIRING_NOTE = ("Every model scores the same images, and this test treats those scores as independent "
                "samples: it ignores the pairing. Shown for comparison with the paper; trust the paired analysis.")


# ----------------------------------------------------------------------------- paired analysis


def complete_blocks(df: pd.DataFrame, value: str, group: str = "model", subject: str = "image_id") -> pd.DataFrame:
    """subject x group table of `value` (several seeds averaged), only subjects scored in every group."""
    order = levels(df[group])
    wide = df.pivot_table(index=subject, columns=group, values=value, aggfunc="mean", observed=True)
    return wide.reindex(columns=order).dropna()


def two_way_residuals(wide: pd.DataFrame) -> np.ndarray:
    """Residuals of the additive model `score ~ group + subject` on a complete table."""
    y = wide.to_numpy(dtype=float)
    return y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + y.mean()


def paired_comparisons(df: pd.DataFrame, method: str = "block-tukey", value: str = "diff_gradcam",
                       group: str = "model", subject: str = "image_id", alpha: float = ALPHA) -> pd.DataFrame:
    """All pairs of groups on complete subjects. meandiff = mean(group2) - mean(group1).

    block-tukey: Tukey HSD with the error term of the two-way `score ~ group + subject` ANOVA
    (df (n-1)(k-1)); for two groups it is the paired t-test.
    wilcoxon-holm: Wilcoxon signed-rank per pair, Holm-adjusted; no CI (lower/upper nan).
    """
    wide = complete_blocks(df, value, group, subject)
    if method == "block-tukey":
        return _block_tukey(wide, alpha)
    if method == "wilcoxon-holm":
        return _wilcoxon_holm(wide, alpha)
    raise ValueError(f"paired_comparisons: method {method!r} is not 'block-tukey' or 'wilcoxon-holm'")


def _block_tukey(wide: pd.DataFrame, alpha: float) -> pd.DataFrame:
    n, k = wide.shape
    df_error = (n - 1) * (k - 1)
    mse = float((two_way_residuals(wide) ** 2).sum() / df_error) if df_error > 0 else math.nan
    se = math.sqrt(mse / n) if n else math.nan  # SE of one group mean; q = |diff| / se
    q_crit = _q_critical(alpha, k, df_error) if df_error > 0 and k >= 2 else math.nan
    means = wide.mean()
    rows = []
    for a, b in itertools.combinations(wide.columns, 2):
        diff = float(means[b] - means[a])
        q = abs(diff) / se if se > 0 else math.inf
        p = float(stats.studentized_range.sf(q, k, df_error)) if df_error > 0 else math.nan
        rows.append({"group1": a, "group2": b, "meandiff": diff, "p_adj": p, "lower": diff - q_crit * se,
                     "upper": diff + q_crit * se, "reject": bool(p < alpha), "q": q, "n": n, "df_error": df_error})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS + ["q", "n", "df_error"])


@functools.lru_cache(maxsize=64)
def _q_critical(alpha: float, k: int, df_error: int) -> float:
    """Upper-alpha point of the studentized range (a numerical integral: ~1 s per call, so cached)."""
    return float(stats.studentized_range.ppf(1 - alpha, k, df_error))


def _wilcoxon_holm(wide: pd.DataFrame, alpha: float) -> pd.DataFrame:
    rows = []
    for a, b in itertools.combinations(wide.columns, 2):
        difference = (wide[b] - wide[a]).to_numpy()
        statistic, p = wilcoxon(difference)
        rows.append({"group1": a, "group2": b, "meandiff": float(difference.mean()),
                     "median_diff": float(np.median(difference)), "statistic": statistic, "p": p, "n": len(difference)})
    frame = pd.DataFrame(rows, columns=["group1", "group2", "meandiff", "median_diff", "statistic", "p", "n"])
    frame["p_adj"] = holm(frame["p"])
    frame["reject"] = frame["p_adj"] < alpha
    frame["lower"] = frame["upper"] = math.nan
    return frame[PAIR_COLUMNS + ["median_diff", "statistic", "p", "n"]]


def wilcoxon(difference: np.ndarray) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank (zero differences dropped); p = 1 when every difference is 0."""
    if not np.any(difference != 0):
        return 0.0, 1.0
    result = stats.wilcoxon(difference)
    return float(result.statistic), float(result.pvalue)


def friedman(df: pd.DataFrame, value: str = "diff_gradcam", group: str = "model",
             subject: str = "image_id") -> dict[str, Any]:
    """Friedman test over complete subjects, with Kendall's W = chi2 / (n (k - 1))."""
    wide = complete_blocks(df, value, group, subject)
    n, k = wide.shape
    if k < 3 or n < 2:
        return {"statistic": math.nan, "df": k - 1, "p": math.nan, "n": n, "k": k, "kendall_w": math.nan,
                "note": "Friedman needs >= 3 groups and >= 2 complete subjects"}
    result = stats.friedmanchisquare(*[wide[c].to_numpy() for c in wide.columns])
    return {"statistic": float(result.statistic), "df": k - 1, "p": float(result.pvalue), "n": n, "k": k,
            "kendall_w": float(result.statistic / (n * (k - 1)))}


def mixed_model(df: pd.DataFrame, value: str = "diff_gradcam", group: str = "model",
                subject: str = "image_id", alpha: float = ALPHA) -> dict[str, Any]:
    """`score ~ C(model) + (1 | image)` by REML (statsmodels MixedLM, groups = image).

    Fitted in cell-means form (`0 + C(model)`), so each coefficient is a model's mean. Returns
    estimates (model, estimate, se, lower, upper), the Wald test of equal means, the variance
    components (image, residual, ICC), assumption checks and any fit warnings.
    """
    data = _tidy(df, value, group, subject)
    order = levels(data["g"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = smf.mixedlm("y ~ 0 + C(g)", data, groups=data["s"]).fit(reml=True)
    image_var, residual_var = float(fit.cov_re.iloc[0, 0]), float(fit.scale)
    total = image_var + residual_var
    return {"formula": f"{value} ~ C({group}) + (1 | {subject})", "n": len(data), "subjects": data["s"].nunique(),
            "estimates": _estimates(order, fit.fe_params.to_numpy()[:len(order)],
                                    fit.cov_params().to_numpy()[:len(order), :len(order)], alpha),
            "equal_means": _wald_equal_means(fit.fe_params.to_numpy()[:len(order)],
                                             fit.cov_params().to_numpy()[:len(order), :len(order)]),
            "variance": {"image": image_var, "residual": residual_var,
                         "icc_image": image_var / total if total > 0 else math.nan},
            "assumptions": assumption_checks(fit.resid, data["g"].astype(str), alpha),
            "converged": bool(fit.converged), "warnings": sorted({str(w.message) for w in caught})}


def _tidy(df: pd.DataFrame, value: str, group: str, subject: str, run: Optional[str] = None) -> pd.DataFrame:
    """Rename to y, g (categorical in analysis order), s [, r]; drop missing values."""
    columns = {value: "y", group: "g", subject: "s", **({run: "r"} if run else {})}
    data = df[list(columns)].rename(columns=columns).dropna().reset_index(drop=True)
    data["g"] = pd.Categorical(data["g"].astype(str), categories=[str(c) for c in levels(df[group])])
    data["g"] = data["g"].cat.remove_unused_categories()
    data["s"] = data["s"].astype(str)
    return data


def _estimates(order: list, means: np.ndarray, cov: np.ndarray, alpha: float) -> pd.DataFrame:
    se = np.sqrt(np.diag(cov))
    z = stats.norm.ppf(1 - alpha / 2)
    return pd.DataFrame({"model": order, "estimate": means, "se": se, "lower": means - z * se, "upper": means + z * se})


def _wald_equal_means(means: np.ndarray, cov: np.ndarray) -> dict[str, float]:
    """Wald chi-square test that all cell means are equal (contrasts against the first)."""
    k = len(means)
    if k < 2:
        return {"chi2": math.nan, "df": 0, "p": math.nan}
    contrasts = np.hstack([-np.ones((k - 1, 1)), np.eye(k - 1)])
    d = contrasts @ means
    chi2 = float(d @ np.linalg.solve(contrasts @ cov @ contrasts.T, d))
    return {"chi2": chi2, "df": k - 1, "p": float(stats.chi2.sf(chi2, k - 1))}


# ----------------------------------------------------------------------------- seeds


def run_means(df: pd.DataFrame, value: str, group: str = "model", run: str = "seed") -> pd.DataFrame:
    """One row per training run: group, run, value = mean over the run's images."""
    means = df.groupby([group, run], observed=True)[value].mean().reset_index()
    if isinstance(df[group].dtype, pd.CategoricalDtype):
        means[group] = pd.Categorical(means[group], categories=df[group].cat.categories)
    return means


def run_level_anova(df: pd.DataFrame, value: str = "diff_gradcam", group: str = "model", run: str = "seed",
                    alpha: float = ALPHA) -> dict[str, Any]:
    """The run as the unit: one-way ANOVA + Tukey on per-run means, and the seed SD beside the
    spread of the model means."""
    means = run_means(df, value, group, run)
    anova, tukey = paper_anova_tukey(means, value, group, alpha)
    by_model = means.groupby(group, observed=True)[value]
    return {"anova": anova, "tukey": tukey, "runs": means,
            "runs_per_model": int(by_model.size().min()),
            "seed_sd": float(np.sqrt(by_model.var(ddof=1).mean())),
            "between_model_sd": float(by_model.mean().std(ddof=1)) if by_model.ngroups > 1 else math.nan}


def crossed_mixed_model(df: pd.DataFrame, value: str = "diff_gradcam", group: str = "model",
                        subject: str = "image_id", run: str = "seed", alpha: float = ALPHA,
                        statsmodels_check: bool = False) -> dict[str, Any]:
    """`score ~ C(model) + (1 | image) + (1 | run)`, images crossed with runs, on complete images.

    Closed form for the complete runs x images table: the ANOVA (expected mean squares)
    estimators of the image, run (seed) and residual variances, which equal REML when all are
    positive; model means with their variance sigma_run^2/S + sigma_image^2/n + sigma_e^2/(S n).
    The model-effect F test is MS_model / MS_run (= the one-way ANOVA on run means).

    statsmodels MixedLM cannot fit crossed random effects directly: `statsmodels_check` also fits
    them as variance components (`vc_formula`) of a single group. That fit does dense solves of
    size rows x (images + runs) each step (6.5 min for 13,500 rows on 2 cores), hence opt-in;
    tests/analysis/test_stats.py checks that both agree.
    """
    data = _tidy(df, value, group, subject, run)
    data["r"] = data["g"].astype(str) + "-seed" + data["r"].astype(str)  # a label per (model, run), not a store path
    table = data.pivot_table(index="s", columns="r", values="y", aggfunc="mean").dropna()
    run_model = data.drop_duplicates("r").set_index("r")["g"].reindex(table.columns)
    result = _balanced_crossed(table, run_model, levels(data["g"]), alpha)
    if statsmodels_check:
        result["statsmodels_vc"] = _vc_mixedlm(data[data["s"].isin(table.index)])
    return result


def _balanced_crossed(table: pd.DataFrame, run_model: pd.Series, order: list, alpha: float) -> dict[str, Any]:
    y = table.to_numpy(dtype=float)  # images x runs
    n, runs = y.shape
    run_mean, image_mean, grand = y.mean(axis=0), y.mean(axis=1), y.mean()
    model_of_run = run_model.astype(str).to_numpy()
    model_mean = {m: run_mean[model_of_run == m].mean() for m in order}
    seeds = {m: int((model_of_run == m).sum()) for m in order}
    ms_error = float((two_way_residuals(table) ** 2).sum() / ((n - 1) * (runs - 1)))
    ms_run = n * sum(((run_mean[model_of_run == m] - model_mean[m]) ** 2).sum() for m in order) / (runs - len(order))
    ms_image = runs * float(((image_mean - grand) ** 2).sum()) / (n - 1)
    ms_model = n * sum(seeds[m] * (model_mean[m] - grand) ** 2 for m in order) / (len(order) - 1)
    variance = {"image": max(0.0, (ms_image - ms_error) / runs), "run": max(0.0, (ms_run - ms_error) / n),
                "residual": ms_error}
    var_means = np.array([variance["run"] / seeds[m] + variance["image"] / n + ms_error / (seeds[m] * n)
                          for m in order])
    f = ms_model / ms_run if ms_run > 0 else math.inf
    df_model, df_run = len(order) - 1, runs - len(order)
    return {"formula": "score ~ C(model) + (1 | image) + (1 | run)", "method": "balanced-design ANOVA estimators",
            "n_images": n, "n_runs": runs, "seeds_per_model": seeds, "variance": variance,
            "variance_truncated_at_zero": bool(ms_image < ms_error or ms_run < ms_error),
            "estimates": _estimates(order, np.array([model_mean[m] for m in order]), np.diag(var_means), alpha),
            "model_effect": {"F": float(f), "df_model": df_model, "df_run": df_run,
                             "p": float(stats.f.sf(f, df_model, df_run)) if df_run > 0 else math.nan}}


def _vc_mixedlm(data: pd.DataFrame) -> dict[str, Any]:
    """statsmodels MixedLM with image and run as variance components of one all-covering group."""
    model = smf.mixedlm("y ~ 0 + C(g)", data, groups=np.ones(len(data)), re_formula="0",
                        vc_formula={"image": "0 + C(s)", "run": "0 + C(r)"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = model.fit(reml=True)
    components = dict(zip(model.exog_vc.names, (float(v) for v in fit.vcomp)))
    return {"note": "statsmodels MixedLM cannot fit crossed random effects directly; fitted as variance "
                    "components (vc_formula) of a single group",
            "variance": {**components, "residual": float(fit.scale)},
            "estimates": fit.fe_params.to_numpy().tolist(), "converged": bool(fit.converged),
            "warnings": sorted({str(w.message) for w in caught})}


# ----------------------------------------------------------------------------- a trend on a covariate


def slope_mixed_model(df: pd.DataFrame, value: str, x: str, group: str = "model", subject: str = "image_id",
                      run: str = "seed", alpha: float = ALPHA) -> dict[str, Any]:
    """The slope of a per-image score on a per-model covariate `x` (docs/STUDY.md §11's depth trend:
    x = log10 parameter count), images as random effect, and with >= 2 seeds per model the run too.

    One seed (some model has one): `score ~ x + (1 | image)` by REML (statsmodels MixedLM, groups =
    image) on each model's seed-averaged image scores, Wald z interval.
    Several seeds: `score ~ x + (1 | image) + (1 | run)` on the images every run scored, in closed
    form as `crossed_mixed_model` does: x is constant within a run, so on a complete images x runs
    table the GLS slope is the least-squares slope of the run means on x, with variance
    (sigma_run^2 + sigma_e^2/n) / Sxx estimated by the run means' residual mean square (the REML
    estimate while the run variance is positive), t interval on runs - 2 degrees of freedom.
    Returns slope, se, lower, upper, p, df (inf: normal), images, runs, models, method, note."""
    data = df[[value, x, group, subject, run]].dropna()
    models = int(data[group].nunique())
    seeds = int(data.groupby(group, observed=True)[run].nunique().min()) if len(data) else 0
    empty = {"slope": math.nan, "se": math.nan, "lower": math.nan, "upper": math.nan, "p": math.nan,
             "df": math.nan, "images": int(data[subject].nunique()), "runs": 0, "models": models, "method": "",
             "note": ""}
    if models < 2 or data[x].nunique() < 2:
        return {**empty, "note": f"{models} model(s) with distinct {x}: no slope"}
    if seeds >= 2:
        return {**empty, **_crossed_slope(data, value, x, group, subject, run, alpha)}
    image_level = data.groupby([group, subject], observed=True).agg(y=(value, "mean"), x=(x, "first")).reset_index()
    tidy = pd.DataFrame({"y": image_level["y"].astype(float).to_numpy(), "x": image_level["x"].astype(float).to_numpy(),
                         "s": image_level[subject].astype(str).to_numpy()})  # a model's seeds averaged per image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence is reported below, from the fit itself
            fit = smf.mixedlm("y ~ x", tidy, groups=tidy["s"]).fit(reml=True)
    except (np.linalg.LinAlgError, ValueError) as error:  # e.g. one image, or no spread left to fit
        return {**empty, "note": f"the mixed model could not be fitted ({error})"}
    slope, se = float(fit.fe_params["x"]), float(fit.bse_fe["x"])
    z = stats.norm.ppf(1 - alpha / 2)
    return {**empty, "slope": slope, "se": se, "lower": slope - z * se, "upper": slope + z * se,
            "p": float(2 * stats.norm.sf(abs(slope / se))) if se > 0 else math.nan, "df": math.inf,
            "runs": int(data[[group, run]].drop_duplicates().shape[0]),
            "method": "REML, score ~ x + (1 | image)",
            "note": "one seed: the slope describes these trained networks, not their architectures"
                    + ("" if fit.converged else "; the fit did not converge: read with care")}


def _crossed_slope(data: pd.DataFrame, value: str, x: str, group: str, subject: str, run: str,
                   alpha: float) -> dict[str, Any]:
    label = data[group].astype(str) + "-seed" + data[run].astype(str)  # a label per (model, run)
    table = data.assign(_r=label).pivot_table(index=subject, columns="_r", values=value, aggfunc="mean").dropna()
    xs = data.assign(_r=label).drop_duplicates("_r").set_index("_r")[x].astype(float).reindex(table.columns)
    means, covariate = table.mean(axis=0).to_numpy(float), xs.to_numpy(float)
    runs, dof = len(means), len(means) - 2
    centred = covariate - covariate.mean()
    sxx = float((centred ** 2).sum())
    slope = float((centred * (means - means.mean())).sum() / sxx) if sxx > 0 else math.nan
    residual = means - means.mean() - slope * centred
    se = math.sqrt(float((residual ** 2).sum()) / dof / sxx) if dof > 0 and sxx > 0 else math.nan
    half = stats.t.ppf(1 - alpha / 2, dof) * se if dof > 0 else math.nan
    p = float(2 * stats.t.sf(abs(slope / se), dof)) if dof > 0 and se > 0 else math.nan
    return {"slope": slope, "se": se, "lower": slope - half, "upper": slope + half, "p": p, "df": float(dof),
            "images": len(table), "runs": runs, "method": "balanced-design estimators, score ~ x + (1 | image) + "
                                                      "(1 | run), images every run scored",
            "note": "" if dof > 0 else f"{runs} runs: no degrees of freedom for the slope's error"}


# ----------------------------------------------------------------------------- the whole comparison


def compare_models(df: pd.DataFrame, value: str = "diff_gradcam", group: str = "model",
                   subject: str = "image_id", run: str = "seed", alpha: float = ALPHA) -> dict[str, Any]:
    """Every analysis of one localisation metric, and a verdict saying which result to trust.

    `df`: one row per (model, seed, image) of trained heatmaps. Image-level paired analyses use
    the seed-averaged score of each image; with several seeds the crossed model adds the run,
    and with >= 3 seeds per model the run-level ANOVA carries the architecture claims.
    """
    anova, tukey = paper_anova_tukey(df, value, group, alpha)
    wide = complete_blocks(df, value, group, subject)
    seeds_per_model = int(df.groupby(group, observed=True)[run].nunique().min())
    result = {"metric": value, "alpha": alpha, "seeds_per_model": seeds_per_model,
              "paper": {"anova": anova, "tukey": tukey, "note": PAIRING_NOTE},
              "complete_images": len(wide), "images_dropped": int(df[subject].nunique() - len(wide)),
              "block_tukey": paired_comparisons(df, "block-tukey", value, group, subject, alpha),
              "wilcoxon_holm": paired_comparisons(df, "wilcoxon-holm", value, group, subject, alpha),
              "friedman": friedman(df, value, group, subject),
              "two_way_assumptions": assumption_checks(two_way_residuals(wide).ravel(),
                                                       np.tile(wide.columns.astype(str), len(wide)), alpha)}
    image_level = df.groupby([group, subject], observed=True)[value].mean().reset_index()
    result["mixed_model"] = mixed_model(image_level, value, group, subject, alpha)
    if seeds_per_model >= 2:
        result["crossed"] = crossed_mixed_model(df, value, group, subject, run, alpha)
    if seeds_per_model >= 3:
        result["run_level"] = run_level_anova(df, value, group, run, alpha)
    result.update(_verdict(result, alpha))
    return result


def _verdict(result: dict[str, Any], alpha: float) -> dict[str, Any]:
    """Which pairs to trust, and why, in words."""
    block, wilcoxon = set(significant_pairs(result["block_tukey"])), set(significant_pairs(result["wilcoxon_holm"]))
    normal = result["two_way_assumptions"]["residuals_normal"] is not False
    if "run_level" in result:
        trusted, basis = set(significant_pairs(result["run_level"]["tukey"])), "run-level Tukey (the run is the unit)"
    elif normal:
        trusted, basis = block, "block Tukey (two-way error term; residuals pass Shapiro)"
    else:
        trusted, basis = block & wilcoxon, "pairs significant in both block Tukey and Wilcoxon-Holm"
    sequence = significant_pairs(result["block_tukey"].assign(reject=True))  # every pair, in analysis order
    ordered = [p for p in sequence if p in trusted]
    words = [_mixed_model_words(result), _assumption_words(result["two_way_assumptions"]),
             _agreement_words(block, wilcoxon), _seed_words(result),
             f"Trusted result ({basis}): " + (", ".join(ordered) + " differ significantly."
                                              if ordered else "no pair of models differs significantly.")]
    return {"trusted_basis": basis, "significant_pairs": ordered, "verdict": " ".join(w for w in words if w)}


def _mixed_model_words(result: dict[str, Any]) -> str:
    mm = result["mixed_model"]
    test = mm["equal_means"]
    icc = mm["variance"]["icc_image"]
    return (f"Mixed model (images as random effect, {result['complete_images']} complete images): "
            f"equal-means Wald chi2({test['df']}) = {test['chi2']:.2f}, p = {test['p']:.3g}; "
            f"{icc:.0%} of the variance is between images, which the paired analysis removes"
            + ("" if mm["converged"] else " (the fit did not converge: read with care)") + ".")


def _assumption_words(checks: dict[str, Any]) -> str:
    if checks["residuals_normal"] is False:
        return (f"Two-way residuals are not normal (Shapiro p = {checks['shapiro_p']:.2g}); the rank-based "
                "tests (Friedman, Wilcoxon-Holm) are the safer reading.")
    return "Two-way residuals pass the normality check (Shapiro)."


def _agreement_words(block: set, wilcoxon: set) -> str:
    if block == wilcoxon:
        return f"Block Tukey and Wilcoxon-Holm agree ({len(block)} significant pairs)."
    return ("Block Tukey and Wilcoxon-Holm disagree on: " + ", ".join(sorted(block ^ wilcoxon)) + ".")


def _seed_words(result: dict[str, Any]) -> str:
    if "run_level" in result:
        level = result["run_level"]
        return (f"With {level['runs_per_model']} seeds per model the run is the unit: ANOVA on run means "
                f"p = {level['anova']['p']:.3g}; seed SD {level['seed_sd']:.3g} against an SD of "
                f"{level['between_model_sd']:.3g} between model means.")
    if "crossed" in result:
        return ("Fewer than 3 seeds per model: the image-level tests ignore seed-to-seed variation "
                f"(run variance {result['crossed']['variance']['run']:.3g}); architecture claims need >= 3 seeds.")
    return "One seed per model: the results describe these trained networks, not the architectures."


# ----------------------------------------------------------------------------- sanity check


def sanity_comparisons(df: pd.DataFrame, value: str = "diff_gradcam", group: str = "model",
                       subject: str = "image_id", alpha: float = ALPHA) -> pd.DataFrame:
    """Trained vs weight-randomised heatmaps per model: paired Wilcoxon over images, Holm across models."""
    rows = []
    for model in levels(df[group]):
        part = df[df[group] == model]
        wide = part.pivot_table(index=subject, columns="randomized", values=value, aggfunc="mean").dropna()
        if not {False, True} <= set(wide.columns) or wide.empty:
            continue
        difference = (wide[False] - wide[True]).to_numpy()
        statistic, p = wilcoxon(difference)
        rows.append({"model": model, "trained": float(wide[False].mean()), "randomized": float(wide[True].mean()),
                     "difference": float(difference.mean()), "statistic": statistic, "p": p, "n": len(difference)})
    frame = pd.DataFrame(rows, columns=["model", "trained", "randomized", "difference", "statistic", "p", "n"])
    frame["p_adj"] = holm(frame["p"])
    frame["reject"] = frame["p_adj"] < alpha
    return frame


# ----------------------------------------------------------------------------- classification


def classification_comparisons(predictions: pd.DataFrame, threshold: float,
                               alpha: float = ALPHA) -> pd.DataFrame:
    """Every pair of models of the same seed on their common test images: paired DeLong (AUC)
    and exact McNemar (accuracy), each Holm-corrected over the pairs of that seed."""
    frames = [_seed_comparisons(part, threshold, alpha) for _, part in predictions.groupby("seed")]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=_CLASSIFICATION_COLUMNS)


_CLASSIFICATION_COLUMNS = ["seed", "group1", "group2", "n", "auc1", "auc2", "delong_z", "delong_p",
                           "delong_p_holm", "delong_reject", "accuracy1", "accuracy2", "mcnemar_b",
                           "mcnemar_c", "mcnemar_p", "mcnemar_p_holm", "mcnemar_reject"]


def _seed_comparisons(part: pd.DataFrame, threshold: float, alpha: float) -> pd.DataFrame:
    probability = part.pivot_table(index="image_id", columns="model", values="probability", observed=True)
    probability = probability.reindex(columns=levels(part["model"])).dropna()
    label = part.drop_duplicates("image_id").set_index("image_id")["label"].reindex(probability.index).to_numpy()
    correct = (probability.to_numpy() >= threshold) == (label[:, None] == 1)
    rows = []
    for (i, a), (j, b) in itertools.combinations(enumerate(probability.columns), 2):
        z, p = _delong_or_nan(label, probability[a].to_numpy(), probability[b].to_numpy())
        only_a, only_b, p_mcnemar = mcnemar_exact(correct[:, i], correct[:, j])
        rows.append({"seed": part["seed"].iloc[0], "group1": a, "group2": b, "n": len(label),
                     "auc1": auc(label, probability[a]), "auc2": auc(label, probability[b]),
                     "delong_z": z, "delong_p": p, "accuracy1": correct[:, i].mean(), "accuracy2": correct[:, j].mean(),
                     "mcnemar_b": only_a, "mcnemar_c": only_b, "mcnemar_p": p_mcnemar})
    frame = pd.DataFrame(rows, columns=[c for c in _CLASSIFICATION_COLUMNS if "holm" not in c and "reject" not in c])
    for test in ("delong", "mcnemar"):
        frame[f"{test}_p_holm"] = holm(frame[f"{test}_p"])
        frame[f"{test}_reject"] = frame[f"{test}_p_holm"] < alpha
    return frame[_CLASSIFICATION_COLUMNS]


def _delong_or_nan(label: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> tuple[float, float]:
    """DeLong's paired test; nan when a class has fewer than two cases (no AUC variance)."""
    if min(int((label == 1).sum()), int((label == 0).sum())) < 2:
        return math.nan, math.nan
    return delong_paired(label, scores_a, scores_b)


def classification_verdict(comparisons: pd.DataFrame) -> str:
    """How many model pairs differ in AUC and in accuracy after Holm correction."""
    if comparisons.empty:
        return "No pair of models with predictions on common test images: no classification comparison."
    pairs = len(comparisons)
    delong, mcnemar = int(comparisons["delong_reject"].sum()), int(comparisons["mcnemar_reject"].sum())
    seeds = comparisons["seed"].nunique()
    return (f"Over {pairs} model pairs ({seeds} seed{'s' if seeds > 1 else ''}), {delong} differ in AUC "
            f"(paired DeLong) and {mcnemar} in accuracy (exact McNemar) after Holm correction.")
