"""Every sentence that states a result is a function of a table, and flips when its data flips
(analysis/conclusions.py): the classifiers' calls at the threshold, the sanity verdict in both
directions, the cascade step by step, per-layer claims from the paired test, the degenerate
sets' cross-reference, and the one rounding rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import conclusions as C
from analysis.compute import AnalysisOutputs
from analysis.layers import layer_vs_final_table
from analysis.reliability import cascade_verdicts
from analysis.validity import EXCLUDED_COLUMNS
from study.config import StudyConfig


def outputs(**tables) -> AnalysisOutputs:
    found = AnalysisOutputs(directory=Path("."))
    found.tables.update(tables)
    return found


def table1(accuracy_lo: float, recall: float = 0.98, specificity: float = 0.02) -> pd.DataFrame:
    return pd.DataFrame([{"model": "resnet18", "seeds": 1, "auc": 0.8, "auc_lo": 0.7, "auc_hi": 0.9,
                          "accuracy": accuracy_lo + 0.1, "accuracy_lo": accuracy_lo, "accuracy_hi": accuracy_lo + 0.2,
                          "recall": recall, "specificity": specificity, "degenerate": ""}])


def test_a_classifier_that_ranks_but_does_not_separate_is_named():
    ranks_only = C._separation_sentence(outputs(table1=table1(0.40)), 0.5, 0.05)
    assert "0 of 1 classifiers separate" in ranks_only
    assert "ResNet18" in ranks_only and "rank but do not separate" in ranks_only
    assert "calls (almost) every image one class" in ranks_only
    separates = C._separation_sentence(outputs(table1=table1(0.62, recall=0.7, specificity=0.66)), 0.5, 0.05)
    assert "1 of 1 classifiers separate" in separates and "rank but do not separate" not in separates
    assert "sensitivity 0.7, specificity 0.66" in separates
    assert "which says nothing of their calls" in C._classification_conclusion(outputs(table1=table1(0.4)))


def sanity(difference: float, reject: bool) -> pd.DataFrame:
    return pd.DataFrame([{"model": "vit_base", "copy": "full", "metric": "diff_gradcam", "difference": difference,
                          "p_adj": 0.046, "reject": reject}])


def test_the_sanity_verdict_is_said_in_both_directions():
    worse = C._sanity_conclusion(sanity(-0.063, True))
    assert "for 0 of 1 models" in worse
    assert "the randomised copy scores higher for ViT Base (difference -0.063, Holm p = 0.046)" in worse
    better = C._sanity_conclusion(sanity(0.063, True))
    assert "for 1 of 1 models (ViT Base)" in better and "randomised copy scores higher" not in better
    neither = C._sanity_conclusion(sanity(0.01, False))
    assert "no difference shown for ViT Base" in neither


def cascade(passes: list[bool], means: list[float]) -> pd.DataFrame:
    return pd.DataFrame([{"model": "resnet18", "stages_randomized": step, "randomized_from": f"unit{step}",
                          "measure": "ssim", "n": 10, "mean": mean, "lo": mean - 0.05, "hi": mean + 0.05,
                          "pass_line": 0.3, "passes": passed, "degenerate": ""}
                         for step, (passed, mean) in enumerate(zip(passes, means))])


def sentence_of(table: pd.DataFrame) -> str:
    found = AnalysisOutputs(directory=Path("."))
    found.statistics["cascade"] = cascade_verdicts(table).to_dict(orient="records")
    return C._cascade_conclusion(found)


def test_a_cascade_that_climbs_back_above_the_line_is_named():
    climbing = sentence_of(cascade([False, True, False, True, False, True], [1, 0.1, 0.45, 0.1, 0.51, 0.02]))
    assert "for 1 of 1 valid map sets the fully randomised map" in climbing
    assert "not monotone: ResNet18 (below from step 1, not shown below again at steps 2, 4, SSIM up to 0.51)" in climbing
    monotone = sentence_of(cascade([False, True, True, True, True, True], [1, 0.1, 0.1, 0.1, 0.1, 0.02]))
    assert "ResNet18 fall below the line and stay below" in monotone and "not monotone" not in monotone
    never = sentence_of(cascade([False] * 6, [1, 0.9, 0.8, 0.7, 0.6, 0.5]))
    assert "for 0 of 1" in never and "no step of ResNet18 is shown below it" in never


def swept(shift: float, images: int = 30) -> pd.DataFrame:
    """resnet18 at layer3 and layer4 (the paper's): layer3's AUPRC = layer4's + shift (+ noise)."""
    rng = np.random.default_rng(0)
    base = rng.random(images) * 0.3
    rows = []
    for layer, depth, values in (("layer3", 0.7, base + shift + rng.normal(0, 0.01, images)), ("layer4", 1.0, base)):
        rows += [{"model": "resnet18", "seed": 0, "image_id": f"i{i}", "cam_method": "gradcam", "cam_layer": layer,
                  "layer_depth": depth, "final_layer": layer == "layer4", "auprc": v} for i, v in enumerate(values)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("shift, verdict", [(0.05, "better"), (-0.05, "worse"), (0.0, "no difference shown")])
def test_per_layer_claims_follow_the_paired_test(shift, verdict):
    table = layer_vs_final_table(swept(shift), pd.DataFrame(columns=EXCLUDED_COLUMNS), StudyConfig().statistics.alpha)
    assert table["verdict"].tolist() == [verdict]
    text = C._layer_conclusion(outputs(layer_vs_final=table))
    if verdict == "no difference shown":
        assert "0 differ" in text and "no layer of ResNet18 differs from its paper's layer" in text
    else:
        assert f"1 differ; {verdict} than the paper's layer: ResNet18 layer3" in text


def test_the_degenerate_sets_table_is_pointed_at_where_it_stands():
    found = AnalysisOutputs(directory=Path("."))
    row = {"model": "vit_small", "seed": 0, "method": "gradcam", "layer": "blocks.11", "reason": "all zero"}
    found.excluded = pd.DataFrame([row, {**row, "layer": "blocks.5"}], columns=EXCLUDED_COLUMNS)
    found.excluded_primary = found.excluded.iloc[:1]
    assert "listed in the table below" in C.excluded_sentence(found, where="below")
    assert "listed in the table above" in C.excluded_sentence(found, where="above")


def test_one_rounding_rule_for_every_number_in_prose():
    assert [C.prose(v) for v in (0.0145, 0.299, -0.0634, 0.68, 1.0, float("nan"), None)] == [
        "0.0145", "0.299", "-0.0634", "0.68", "1", "n/a", "n/a"]
    assert C.interval({"auc": 0.8123, "auc_lo": 0.7, "auc_hi": 0.9}, "auc") == "0.812 [0.7, 0.9]"
