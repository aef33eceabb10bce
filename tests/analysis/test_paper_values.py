"""analysis.paper_values: the paper's published numbers, consistent with each other and with the
paper's tables (Qiu, Rivaz & Xiao: Table 1, Table 2, §4.3)."""

import pandas as pd
import pytest

from analysis import paper_values as pv

MODELS = set(pv.LABELS)


def test_nine_models_in_every_table():
    assert len(MODELS) == 9
    for table in (pv.TABLE1, pv.TABLE2):
        assert table["model"].tolist() == list(pv.LABELS)  # one row each, in the paper's order
    assert set(pv.EHR_AUC) == MODELS
    assert set(pv.TUKEY_CLAIMS["model_a"]) | set(pv.TUKEY_CLAIMS["model_b"]) <= MODELS


def test_table1_is_fractions_as_printed():
    metrics = pv.TABLE1.set_index("model")
    assert ((metrics > 0.5) & (metrics < 1)).all().all()  # percentages stored as fractions
    # spot checks against the printed table
    assert metrics.loc["resnet50", "accuracy"] == 0.8820 and metrics.loc["resnet50", "auc"] == 0.9450
    assert metrics.loc["vgg19", "precision"] == 0.7747 and metrics.loc["vit_large", "recall"] == 0.8640
    assert metrics["auc"].idxmax() == "resnet50"


def test_table2_mean_lies_between_min_and_max():
    t = pv.TABLE2
    assert ((t["min"] < t["mean"]) & (t["mean"] < t["max"]) & (t["std"] > 0)).all()
    assert t.set_index("model").loc["vgg16"].tolist() == [0.186, 0.212, -0.213, 0.773]


def test_ehr_auc_values_lie_in_their_stated_range():
    for model, value in pv.EHR_AUC.items():
        assert value.source.startswith("§4.3"), model
        if value.exact:
            assert value.low is None and value.high is None, model
        else:
            assert value.low <= value.value <= value.high, model
    assert pv.EHR_AUC["resnet101"] == pv.PaperValue(0.0319, True, pv.EHR_AUC["resnet101"].source)
    # §4.3: ResNet101 leads, VGG16 second
    ranked = sorted(pv.EHR_AUC, key=lambda m: pv.EHR_AUC[m].value, reverse=True)
    assert ranked[0] == "resnet101" and pv.EHR_AUC["vgg16"].value == 0.0243


def test_ehr_table_fills_the_range_of_exact_values():
    table = pv.ehr_table()
    assert list(table.columns) == ["model", "paper_ehr_auc", "paper_ehr_exact", "paper_ehr_low", "paper_ehr_high",
                                   "paper_ehr_source"]
    assert set(table["model"]) == MODELS
    exact = table[table["paper_ehr_exact"]]
    assert (exact["paper_ehr_low"] == exact["paper_ehr_auc"]).all()
    assert (exact["paper_ehr_high"] == exact["paper_ehr_auc"]).all()
    resnet18 = table.set_index("model").loc["resnet18"]
    assert (resnet18["paper_ehr_low"], resnet18["paper_ehr_high"]) == (0.021, 0.023)
    assert table[["paper_ehr_low", "paper_ehr_high"]].notna().all().all()


def test_tukey_claims_and_anchors():
    claims = pv.TUKEY_CLAIMS
    assert not claims.duplicated(["model_a", "model_b"]).any()
    assert (claims["model_a"] != claims["model_b"]).all()
    significant = claims[claims["paper_significant"]]
    assert significant[["model_a", "model_b"]].values.tolist() == [["resnet34", "resnet101"]]
    assert claims["source"].str.startswith("§4.3").all()
    assert pv.ANOVA_P_BELOW == 0.001
    arun = pv.ARUN_AUPRC
    assert 0 < arun["saliency_low"] < arun["saliency_high"] < arun["unet"] < 1


@pytest.mark.parametrize("table", [pv.TABLE1, pv.TABLE2, pv.TUKEY_CLAIMS], ids=["table1", "table2", "tukey"])
def test_tables_are_plain_frames(table):
    assert isinstance(table, pd.DataFrame) and not table.isna().any().any()
