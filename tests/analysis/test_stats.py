"""analysis.stats against published R results and hand-computed small cases."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from analysis import stats
from study.config import StudyConfig
from tests.conftest import SHARED_DATA

PLANT_GROWTH = {
    "ctrl": [4.17, 5.58, 5.18, 6.11, 4.50, 4.61, 5.17, 4.53, 5.33, 5.14],
    "trt1": [4.81, 4.17, 4.41, 3.59, 5.87, 3.83, 6.03, 4.89, 4.32, 4.69],
    "trt2": [6.31, 5.12, 5.54, 5.50, 5.37, 5.29, 4.92, 6.15, 5.80, 5.26],
}


def plant_growth() -> pd.DataFrame:
    return pd.DataFrame([{"group": g, "weight": w} for g, ws in PLANT_GROWTH.items() for w in ws])


def test_paper_anova_tukey_matches_r_on_plant_growth():
    # R: summary(aov(weight ~ group, PlantGrowth)); TukeyHSD(...)
    anova, tukey = stats.paper_anova_tukey(plant_growth(), value="weight", group="group")
    assert (anova["df_between"], anova["df_within"]) == (2, 27)
    assert anova["F"] == pytest.approx(4.846088, abs=1e-6)
    assert anova["p"] == pytest.approx(0.01591, abs=1e-5)
    expected = {("ctrl", "trt1"): (-0.371, -1.0622161, 0.3202161, 0.3908711),
                ("ctrl", "trt2"): (0.494, -0.1972161, 1.1852161, 0.1979960),
                ("trt1", "trt2"): (0.865, 0.1737839, 1.5562161, 0.0120064)}
    for row in tukey.itertuples():
        diff, lower, upper, p = expected[(row.group1, row.group2)]
        assert row.meandiff == pytest.approx(diff, abs=1e-9)
        assert (row.lower, row.upper) == (pytest.approx(lower, abs=1e-6), pytest.approx(upper, abs=1e-6))
        assert row.p_adj == pytest.approx(p, abs=1e-4)
    assert tukey["reject"].tolist() == [False, False, True]
    assert anova["verdict"].startswith("One-way ANOVA F(2, 27) = 4.846") and "1 of 3 pairs" in anova["verdict"]


def test_one_way_anova_matches_r_on_chickwts():
    # R: summary(aov(weight ~ feed, chickwts)): F = 15.365 on 5 and 65 df, p = 5.936e-10
    path = SHARED_DATA / "chickwts.csv"
    if not path.is_file():
        pytest.skip(f"{path} absent (it lives in the shared data folder)")
    anova, tukey = stats.paper_anova_tukey(pd.read_csv(path), value="weight", group="feed")
    assert (anova["df_between"], anova["df_within"]) == (5, 65)
    assert anova["F"] == pytest.approx(15.365, abs=5e-4)
    assert anova["p"] == pytest.approx(5.936e-10, rel=1e-3)
    assert len(tukey) == 15


def test_holm_on_a_known_vector():
    # sorted 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, then max(0.04*1, 0.06) = 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = stats.holm([0.01, np.nan, 0.02])
    assert np.isnan(adjusted[1]) and adjusted[[0, 2]] == pytest.approx([0.02, 0.02])
    p = np.random.default_rng(0).uniform(0, 0.2, 12)
    assert stats.holm(p) == pytest.approx(multipletests(p, method="holm")[1])
    assert stats.holm([]).shape == (0,) and np.isnan(stats.holm([np.nan, np.nan])).all()
    assert stats.holm([0.4, 0.4, 0.3]) == pytest.approx([0.9, 0.9, 0.9])  # 0.3*3, then max(0.4*2, 0.9)


def paired_frame(columns: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"model": m, "image_id": f"i{i}", "score": v}
                         for m, values in columns.items() for i, v in enumerate(values)])


def test_block_tukey_with_two_groups_is_the_paired_t_test():
    a = [0.10, 0.30, 0.25, 0.40, 0.05, 0.20]
    b = [0.18, 0.33, 0.40, 0.41, 0.15, 0.22]
    pairs = stats.paired_comparisons(paired_frame({"a": a, "b": b}), "block-tukey", value="score")
    t = scipy_stats.ttest_rel(b, a)
    row = pairs.iloc[0]
    assert row.meandiff == pytest.approx(np.mean(np.subtract(b, a)))
    assert row.p_adj == pytest.approx(t.pvalue, rel=1e-6)
    half = scipy_stats.t.ppf(0.975, 5) * np.std(np.subtract(b, a), ddof=1) / np.sqrt(6)
    assert (row.lower, row.upper) == (pytest.approx(row.meandiff - half), pytest.approx(row.meandiff + half))


def test_block_tukey_error_term_is_the_two_way_anova_residual():
    # 3 groups x 4 subjects by hand: residual = y - row mean - column mean + grand mean
    y = np.array([[1.0, 2.0, 4.0], [2.0, 2.5, 5.0], [0.5, 2.0, 3.0], [1.5, 3.5, 4.0]])
    frame = paired_frame({g: y[:, j].tolist() for j, g in enumerate("abc")})
    pairs = stats.paired_comparisons(frame, "block-tukey", value="score")
    residual = y - y.mean(1, keepdims=True) - y.mean(0) + y.mean()
    mse = (residual ** 2).sum() / 6
    q = abs(y[:, 2].mean() - y[:, 0].mean()) / np.sqrt(mse / 4)
    row = pairs[(pairs.group1 == "a") & (pairs.group2 == "c")].iloc[0]
    assert row.df_error == 6
    assert row.p_adj == pytest.approx(scipy_stats.studentized_range.sf(q, 3, 6), rel=1e-9)


def test_wilcoxon_holm_exact_hand_case():
    # differences 1..5 all positive: W+ = 15, exact two-sided p = 2 / 2^5 = 0.0625
    frame = paired_frame({"a": [0, 0, 0, 0, 0], "b": [1, 2, 3, 4, 5], "c": [0, 0, 0, 0, 0]})
    pairs = stats.paired_comparisons(frame, "wilcoxon-holm", value="score").set_index(["group1", "group2"])
    assert pairs.loc[("a", "b"), "p"] == pytest.approx(0.0625)
    assert pairs.loc[("a", "c"), "p"] == 1.0  # no non-zero difference
    assert pairs.loc[("a", "b"), "p_adj"] == pytest.approx(min(1.0, 3 * 0.0625))


def test_friedman_with_identical_rankings():
    # k = 3, n = 4, every subject ranks a < b < c: chi2 = 12/(n k (k+1)) sum R^2 - 3 n (k+1) = 8
    frame = paired_frame({"a": [1, 2, 3, 4], "b": [5, 6, 7, 8], "c": [9, 10, 11, 12]})
    result = stats.friedman(frame, value="score")
    assert result["statistic"] == pytest.approx(8.0)
    assert result["p"] == pytest.approx(np.exp(-4))  # chi2 with 2 df: sf(x) = exp(-x/2)
    assert result["kendall_w"] == pytest.approx(1.0)


def test_mixed_model_recovers_means_and_image_variance():
    rng = np.random.default_rng(1)
    image = rng.normal(0, 1.0, 80)
    frame = pd.concat([pd.DataFrame({"model": m, "image_id": np.arange(80),
                                     "score": image + shift + rng.normal(0, 0.2, 80)})
                       for m, shift in (("a", 0.0), ("b", 0.0), ("c", 0.5))], ignore_index=True)
    result = stats.mixed_model(frame, value="score")
    estimates = result["estimates"].set_index("model")["estimate"]
    means = frame.groupby("model")["score"].mean()
    assert estimates.to_numpy() == pytest.approx(means.to_numpy(), abs=1e-6)  # balanced: cell means
    assert result["variance"]["residual"] == pytest.approx(0.04, rel=0.3)
    assert result["variance"]["icc_image"] > 0.9
    assert result["equal_means"]["p"] < 1e-6


def crossed_frame(seed: int, n_images: int = 40, seeds: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 0.3, n_images)
    rows = []
    for m, shift in (("a", 0.0), ("b", 0.0), ("c", 0.3)):
        for s in range(seeds):
            run = rng.normal(0, 0.05)
            rows.append(pd.DataFrame({"model": m, "seed": s, "image_id": np.arange(n_images),
                                      "score": image + shift + run + rng.normal(0, 0.1, n_images)}))
    return pd.concat(rows, ignore_index=True)


def test_crossed_model_closed_form_agrees_with_statsmodels_vc_fit():
    result = stats.crossed_mixed_model(crossed_frame(2), value="score", statsmodels_check=True)
    fitted = result["statsmodels_vc"]["variance"]
    for component in ("image", "run", "residual"):
        assert result["variance"][component] == pytest.approx(fitted[component], rel=0.02, abs=1e-5)
    assert result["estimates"]["estimate"].to_numpy() == pytest.approx(result["statsmodels_vc"]["estimates"], abs=1e-4)


def test_crossed_model_f_test_equals_run_level_anova():
    frame = crossed_frame(3)
    crossed = stats.crossed_mixed_model(frame, value="score")
    run_level = stats.run_level_anova(frame, value="score")
    assert crossed["model_effect"]["F"] == pytest.approx(run_level["anova"]["F"])
    assert crossed["model_effect"]["p"] == pytest.approx(run_level["anova"]["p"])


def test_mcnemar_exact_hand_case_through_classification_comparisons():
    # 12 discordant cases, 10 one way and 2 the other: p = 2 (1 + 12 + 66) / 2^12 = 0.0386
    label = np.ones(30, dtype=int)
    right_a = np.r_[np.ones(10), np.zeros(2), np.ones(10), np.zeros(8)]
    right_b = np.r_[np.zeros(10), np.ones(2), np.ones(10), np.zeros(8)]
    predictions = pd.DataFrame({"seed": 0, "image_id": np.tile(np.arange(30), 2), "label": np.tile(label, 2),
                                "model": np.repeat(["a", "b"], 30),
                                "probability": np.where(np.r_[right_a, right_b] == 1, 0.9, 0.1)})
    row = stats.classification_comparisons(predictions, StudyConfig().training.threshold).iloc[0]
    assert (row.mcnemar_b, row.mcnemar_c) == (10, 2)
    assert row.mcnemar_p == pytest.approx(158 / 4096)
    assert row.mcnemar_p == pytest.approx(mcnemar([[10, 10], [2, 8]], exact=True).pvalue)


def test_delong_pairs_match_proc_on_asah():
    # pROC tests: roc.test(r.wfns, r.s100b) Z = 2.20898359144091, p = 0.0271757822291882
    path = SHARED_DATA / "aSAH.csv"
    if not path.is_file():
        pytest.skip(f"{path} absent (it lives in the shared data folder)")
    data = pd.read_csv(path)
    label = (data["outcome"] == "Poor").astype(int)
    predictions = pd.concat([pd.DataFrame({"seed": 0, "image_id": data.index, "label": label, "model": m,
                                           "probability": data[m]}) for m in ("wfns", "s100b")])
    predictions["model"] = pd.Categorical(predictions["model"], categories=["wfns", "s100b"])
    row = stats.classification_comparisons(predictions, StudyConfig().training.threshold).iloc[0]
    assert row.delong_z == pytest.approx(2.20898359144091, rel=1e-6)
    assert row.delong_p == pytest.approx(0.0271757822291882, rel=1e-6)


def test_assumption_checks_flag_skew_and_unequal_variance():
    rng = np.random.default_rng(4)
    residuals = np.r_[rng.exponential(1.0, 300), rng.normal(0, 5.0, 300)]
    checks = stats.assumption_checks(residuals, np.repeat(["a", "b"], 300))
    assert checks["residuals_normal"] is False and checks["equal_variances"] is False


def test_compare_models_finds_exactly_the_shifted_model():
    rng = np.random.default_rng(5)
    image = rng.normal(0.15, 0.2, 60)
    frame = pd.concat([pd.DataFrame({"model": m, "seed": 0, "image_id": np.arange(60),
                                     "score": image + (0.2 if m == "c" else 0) + rng.normal(0, 0.05, 60)})
                       for m in "abcd"], ignore_index=True)
    result = stats.compare_models(frame, value="score")
    assert set(result["significant_pairs"]) == {"a vs c", "b vs c", "c vs d"}
    assert "One seed per model" in result["verdict"]
