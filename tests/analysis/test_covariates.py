"""analysis.covariates: the lesion-covariate mixed model recovers known effects, and the
lesion-size bins average the right images."""

import numpy as np
import pandas as pd
import pytest

from analysis import covariates

TRUE = {"log10_mask_fraction": 0.2, "n_regions": 0.05, "log_elongation": -0.1, "probability": 0.3}


def lesion_rows(images: int = 60, seed: int = 0) -> pd.DataFrame:
    """Three models scoring the same images; the score depends on the covariates by TRUE, on the
    model, and on the image (a random intercept)."""
    rng = np.random.default_rng(seed)
    fraction = 10 ** rng.uniform(-3, -1, images)
    regions = rng.integers(1, 4, images)
    elongation = rng.uniform(1, 5, images)
    image_effect = rng.normal(0, 0.03, images)
    rows = []
    for m, model in enumerate(["resnet18", "vgg16", "vit_small"]):
        probability = rng.uniform(0.3, 1.0, images)
        score = (TRUE["log10_mask_fraction"] * np.log10(fraction) + TRUE["n_regions"] * regions
                 + TRUE["log_elongation"] * np.log(elongation) + TRUE["probability"] * probability
                 + 0.1 * m + image_effect + rng.normal(0, 0.02, images))
        rows.append(pd.DataFrame({"model": model, "image_id": [f"img{i}" for i in range(images)], "seed": 0,
                                  "mask_fraction": fraction, "n_regions": regions, "elongation": elongation,
                                  "probability": probability, "diff_gradcam": score}))
    return pd.concat(rows, ignore_index=True)


def test_design_logs_the_covariates_and_drops_unusable_rows():
    rows = lesion_rows(4)
    rows.loc[0, "mask_fraction"] = 0.0  # an empty mask: no log10
    rows.loc[1, "elongation"] = np.nan  # no lesion geometry
    data = covariates.design(rows, "diff_gradcam")
    assert len(data) == len(rows) - 2
    assert list(data.columns) == ["y", "model", "image", *covariates.TERMS]
    kept = rows.drop(index=[0, 1]).reset_index(drop=True)
    assert data["log10_mask_fraction"].to_numpy() == pytest.approx(np.log10(kept["mask_fraction"]))
    assert data["log_elongation"].to_numpy() == pytest.approx(np.log(kept["elongation"]))
    assert data["y"].to_numpy() == pytest.approx(kept["diff_gradcam"])


def test_covariate_model_recovers_the_effects():
    rows = lesion_rows()
    table = covariates.covariate_model(rows, "diff_gradcam", alpha=0.05)
    assert list(table.columns) == covariates.TERM_COLUMNS
    assert table["term"].tolist() == list(covariates.TERMS)
    for row in table.itertuples():
        assert row.estimate == pytest.approx(TRUE[row.term], abs=0.02), row.term
        assert row.lower < TRUE[row.term] < row.upper, row.term
        assert row.se > 0 and row.p < 1e-3, row.term  # every effect is strong against the noise
        assert (row.n, row.images, row.metric) == (len(rows), 60, "diff_gradcam")
    wider = covariates.covariate_model(rows, "diff_gradcam", alpha=0.01)
    assert ((wider["upper"] - wider["lower"]) > (table["upper"] - table["lower"])).all()


def test_covariate_model_leaves_out_a_covariate_that_does_not_vary():
    rows = lesion_rows().assign(n_regions=1)
    table = covariates.covariate_model(rows, "diff_gradcam", alpha=0.05)
    assert "n_regions" not in set(table["term"]) and len(table) == 3


def test_covariate_model_is_empty_without_data_to_fit():
    rows = lesion_rows()
    for frame in (rows.drop(columns="elongation"),  # a store scored before the lesion covariates
                  rows[rows["image_id"].isin([f"img{i}" for i in range(covariates.MIN_IMAGES - 1)])]):
        table = covariates.covariate_model(frame, "diff_gradcam", alpha=0.05)
        assert table.empty and list(table.columns) == covariates.TERM_COLUMNS


def test_size_bins_average_each_quartile_of_images():
    images = [f"img{i}" for i in range(8)]
    fraction = np.arange(1, 9) / 100  # image i has share (i + 1) / 100
    rows = pd.concat([pd.DataFrame({"model": model, "seed": seed, "image_id": images, "mask_fraction": fraction,
                                    "auprc": fraction * scale + seed})
                      for model, scale in (("a", 1.0), ("b", 10.0)) for seed in (0, 1)], ignore_index=True)
    bins = covariates.size_bins(rows, ["auprc"], bins=4)
    assert list(bins.columns) == ["model", "size_bin", "mask_fraction", "auprc"]
    assert len(bins) == 8
    a = bins[bins["model"] == "a"].sort_values("size_bin")
    assert a["size_bin"].tolist() == [0, 1, 2, 3]
    assert a["mask_fraction"].to_numpy() == pytest.approx([0.015, 0.035, 0.055, 0.075])  # the bin's median share
    assert a["auprc"].to_numpy() == pytest.approx(np.array([0.015, 0.035, 0.055, 0.075]) + 0.5)  # seeds averaged
    b = bins[bins["model"] == "b"].sort_values("size_bin")
    assert b["auprc"].to_numpy() == pytest.approx(np.array([0.15, 0.35, 0.55, 0.75]) + 0.5)


def test_size_bins_are_empty_without_sizes_to_bin():
    one_size = pd.DataFrame({"model": "a", "seed": 0, "image_id": ["x", "y"], "mask_fraction": 0.1, "auprc": 0.5})
    for frame in (one_size, one_size.iloc[0:0], one_size.drop(columns="mask_fraction")):
        bins = covariates.size_bins(frame, ["auprc"])
        assert bins.empty and list(bins.columns) == ["model", "size_bin", "mask_fraction", "auprc"]
