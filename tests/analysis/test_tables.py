"""analysis.tables: the study's tables from small hand-made score frames, each number checked."""

import math

import numpy as np
import pandas as pd
import pytest

from scipy.stats import norm

from analysis import paper_values, stats, tables

ALPHA = 0.05
MODELS = pd.DataFrame({"model": ["vgg16", "resnet18"], "family": ["VGG", "ResNet"], "depth": [16, 18]})


def test_primary_method_prefers_gradcam():
    assert tables.primary_method(pd.DataFrame({"cam_method": ["scorecam", "gradcam", "gradcampp"]})) == "gradcam"
    assert tables.primary_method(pd.DataFrame({"cam_method": ["scorecam", "gradcampp", None]})) == "gradcampp"
    assert tables.primary_method(pd.DataFrame({"model": ["vgg16"]})) is None


def test_table1_one_seed_keeps_its_interval_several_seeds_give_an_sd():
    metrics = pd.DataFrame({"model": ["vgg16", "resnet18", "resnet18"], "seed": [0, 0, 1],
                            "accuracy": [0.80, 0.85, 0.87], "accuracy_lo": [0.75, 0.80, 0.82],
                            "accuracy_hi": [0.85, 0.90, 0.92], "auc": [0.90, 0.93, 0.95]})
    table = tables.table1(metrics, MODELS).set_index("model")
    assert list(table.index) == ["vgg16", "resnet18"]  # the models' plot order, with family and depth
    assert table.loc["vgg16", "family"] == "VGG" and table.loc["resnet18", "depth"] == 18
    vgg, resnet = table.loc["vgg16"], table.loc["resnet18"]
    assert (vgg["seeds"], vgg["accuracy"], vgg["accuracy_lo"], vgg["accuracy_hi"]) == (1, 0.80, 0.75, 0.85)
    assert math.isnan(vgg["accuracy_sd"])
    assert resnet["seeds"] == 2 and resnet["accuracy"] == pytest.approx(0.86)
    assert resnet["accuracy_sd"] == pytest.approx(np.std([0.85, 0.87], ddof=1))
    assert math.isnan(resnet["accuracy_lo"]) and math.isnan(resnet["accuracy_hi"])
    assert math.isnan(resnet["precision"])  # not measured: nan, not an error
    paper = paper_values.TABLE1.set_index("model")
    assert table.loc["resnet18", "paper_auc"] == paper.loc["resnet18", "auc"]



def test_table1_one_seed_intervals_are_made_again_at_the_studys_alpha():
    """test_metrics.json's intervals are at the default level; the report's are at statistics.alpha:
    a one-seed row is recomputed from the run's predictions, with the naive Wilson formula as check."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    probability = np.clip(labels * 0.3 + rng.uniform(0, 0.7, 60), 0, 1)
    predictions = pd.DataFrame({"model": "vgg16", "seed": 0, "image_id": [f"i{k}" for k in range(60)],
                                "label": labels, "probability": probability})
    accuracy = float(np.mean((probability >= 0.5) == labels))
    metrics = pd.DataFrame({"model": ["vgg16"], "seed": [0], "accuracy": [accuracy], "accuracy_lo": [0.0],
                            "accuracy_hi": [1.0], "auc": [0.9]})
    row = {alpha: tables.table1(metrics, MODELS, predictions, 0.5, alpha).set_index("model").loc["vgg16"]
           for alpha in (0.05, 0.2)}
    for alpha, found in row.items():
        z, n = norm.ppf(1 - alpha / 2), len(labels)
        centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
        assert (found["accuracy_lo"], found["accuracy_hi"]) == pytest.approx((centre - half, centre + half), rel=1e-12)
    assert row[0.2]["accuracy_hi"] - row[0.2]["accuracy_lo"] < row[0.05]["accuracy_hi"] - row[0.05]["accuracy_lo"]
    assert row[0.2]["auc_lo"] > row[0.05]["auc_lo"]
    recorded = tables.table1(metrics, MODELS).set_index("model").loc["vgg16"]  # no predictions: as recorded
    assert (recorded["accuracy_lo"], recorded["accuracy_hi"]) == (0.0, 1.0)

def trained_scores() -> pd.DataFrame:
    """Two models, two seeds, three images: diff_gradcam and EHR columns."""
    rows = []
    for model, offset in (("vgg16", 0.0), ("resnet18", 0.1)):
        for seed in (0, 1):
            for i, base in enumerate([0.1, 0.2, 0.6]):
                rows.append({"model": model, "seed": seed, "image_id": f"img{i}",
                             "diff_gradcam": base + offset + seed / 10,
                             "ehr_auc": 0.02 + offset / 10 + i / 100, "ehr_auc_chance": 0.01, "ehr_auc_oracle": 0.5,
                             "mask_fraction": 0.01 * (i + 1)})
    return pd.DataFrame(rows)


def test_table2_describes_every_scored_image_and_the_seed_spread():
    trained = trained_scores()
    table = tables.table2(trained, MODELS).set_index("model")
    values = trained[trained["model"] == "vgg16"]["diff_gradcam"]
    vgg = table.loc["vgg16"]
    assert (vgg["n"], vgg["seeds"]) == (6, 2)
    assert (vgg["mean"], vgg["std"], vgg["min"], vgg["max"]) == pytest.approx(
        (values.mean(), values.std(ddof=1), 0.1, 0.7))
    assert vgg["seed_sd"] == pytest.approx(np.std([0.3, 0.4], ddof=1))  # run means 0.3 and 0.4
    assert vgg["paper_mean"] == 0.186 and table.loc["resnet18", "paper_max"] == 0.787


def test_ehr_table_intervals_are_over_seed_averaged_images():
    table = tables.ehr_table(trained_scores(), MODELS, ALPHA).set_index("model")
    vgg = table.loc["vgg16"]
    mean, lo, hi = stats.mean_ci([0.02, 0.03, 0.04], ALPHA)  # three images, not six (image, seed) rows
    assert (vgg["n"], vgg["ehr_auc"], vgg["ehr_auc_lo"], vgg["ehr_auc_hi"]) == pytest.approx((3, mean, lo, hi))
    assert vgg["ehr_auc_over_chance"] == pytest.approx(0.03 / 0.01)
    assert vgg["mask_fraction"] == pytest.approx(0.02)
    assert vgg["paper_ehr_auc"] == 0.0243 and bool(vgg["paper_ehr_exact"])


def test_merge_intervals_writes_one_readable_column_per_quantity():
    frame = pd.DataFrame({"model": ["a", "b", "c"], "auc": [0.9, 0.8, np.nan], "auc_lo": [0.85, np.nan, 0.1],
                          "auc_hi": [0.95, np.nan, 0.2], "acc": [0.7, 0.6, 0.5], "acc_sd": [0.01, np.nan, 0.02],
                          "n": [10, 11, 12]})
    merged = tables.merge_intervals(frame, digits=2)
    assert list(merged.columns) == ["model", "auc", "acc", "n"]
    assert merged["auc"].tolist() == ["0.90 [0.85, 0.95]", "0.80", "—"]
    assert merged["acc"].tolist() == ["0.70 ± 0.01", "0.60", "0.50 ± 0.02"]
    assert merged["n"].tolist() == [10, 11, 12]


def test_with_flags_puts_the_reason_after_the_model():
    table = pd.DataFrame({"model": ["vgg16", "resnet18"], "family": ["VGG", "ResNet"], "mean": [0.1, 0.2]})
    flags = pd.DataFrame({"model": ["resnet18"], "degenerate": ["all heatmaps zero"]})
    flagged = tables.with_flags(table, flags)
    assert list(flagged.columns) == ["model", "degenerate", "family", "mean"]
    assert flagged["degenerate"].tolist() == ["", "all heatmaps zero"]
    assert "degenerate" in tables.with_flags(table.iloc[0:0], flags)


def test_copy_rows_reads_old_stores_randomized_as_the_full_twin():
    old = pd.DataFrame({"randomized": [False, True, False]})
    assert tables.randomization_of(old).tolist() == ["none", "full", "none"]
    new = pd.DataFrame({"randomized": [False, True, True], "randomization": ["none", "cascade", "labels"]})
    assert tables.copy_rows(new, "none", "labels").index.tolist() == [0, 2]


def test_tukey_vs_paper_sets_each_claim_beside_both_results():
    pairs = [("vgg16", "vgg19", True), ("resnet34", "resnet101", False), ("vit_small", "vit_base", False)]
    tukey = pd.DataFrame(pairs, columns=["group1", "group2", "reject"])
    comparison = {"paper": {"tukey": tukey}, "significant_pairs": ["resnet101 vs resnet34"]}
    table = tables.tukey_vs_paper(comparison).set_index(["model_a", "model_b"])
    assert len(table) == 3  # only the claims whose pair this study compared
    vgg = table.loc[("vgg16", "vgg19")]
    assert (vgg["paper_significant"], vgg["ours_paper_method"], vgg["ours_trusted"], vgg["agrees"]) == \
        (False, True, False, True)
    resnet = table.loc[("resnet34", "resnet101")]
    assert (resnet["paper_significant"], resnet["ours_paper_method"], resnet["ours_trusted"], resnet["agrees"]) == \
        (True, False, True, True)
    assert table.loc[("vit_small", "vit_base"), "source"].startswith("§4.3")
