"""Degenerate map sets (docs/STUDY.md §8) in the figures: drawn hollow and grey and named "degenerate",
so that an all-zero set never reads as the best model. No browser, no study: small tables."""

from __future__ import annotations

import matplotlib.text
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from matplotlib.colors import to_rgba

from analysis import figures

GREY = to_rgba(figures.DEGENERATE_COLOUR)
MODELS = pd.DataFrame({"model": ["vgg16", "resnet50", "vit_small"], "family": ["vgg", "resnet", "vit"]})
FLAGS = ["", "", "60 of 60 maps are all-zero or constant"]  # ViT-S degenerate, as in the demo


@pytest.fixture
def drawn(monkeypatch):
    """The Figure each figure function saves, by file name."""
    kept = {}
    save = figures._save

    def keep(figure, path):
        kept[path.name] = figure
        return save(figure, path)

    monkeypatch.setattr(figures, "_save", keep)
    return kept


def _texts(figure) -> list[str]:
    figure.draw_without_rendering()
    return [t.get_text() for t in figure.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text()]


def _ehr_table(flags: list[str]) -> pd.DataFrame:
    values = np.array([0.05, 0.07, 0.0002])
    table = MODELS.assign(degenerate=flags, ehr_auc=values, ehr_auc_lo=values * 0.9, ehr_auc_hi=values * 1.1,
                          ehr_auc_chance=[0.03, 0.03, 0.0002], ehr_auc_oracle=0.99, paper_ehr_auc=[0.024, 0.022, 0.015],
                          paper_ehr_low=[0.024, 0.02, 0.014], paper_ehr_high=[0.024, 0.024, 0.016],
                          ehr_auc_norm=[0.02, 0.04, 0.0])
    return table.assign(ehr_auc_norm_lo=table["ehr_auc_norm"] - 0.01, ehr_auc_norm_hi=table["ehr_auc_norm"] + 0.01)


def test_figure2_draws_a_degenerate_set_hollow_grey_and_named(drawn, tmp_path):
    figures.ehr_figure(_ehr_table(FLAGS), tmp_path / "figure2.png")
    figure = drawn["figure2.png"]
    for ax in figure.axes:
        markers = [c for c in ax.collections if isinstance(c, PathCollection)]  # the scatters, not the error bars
        hollow = [c for c in markers if len(c.get_facecolors()) == 0]
        assert len(hollow) == 1 and tuple(hollow[0].get_edgecolors()[0]) == GREY
        assert hollow[0].get_offsets()[0][0] == 2  # ViT-S, the third model
        assert [t.get_text() for t in ax.get_xticklabels()] == ["VGG16", "ResNet50", "ViT Small (degenerate)"]
        assert ax.get_xticklabels()[2].get_color() == figures.DEGENERATE_COLOUR


def test_a_figure_without_degenerate_sets_names_none(drawn, tmp_path):
    figures.ehr_figure(_ehr_table(["", "", ""]), tmp_path / "figure2.png")
    assert not any("degenerate" in text for text in _texts(drawn["figure2.png"]))


def test_the_box_plot_draws_a_degenerate_set_unfilled_grey_and_named(drawn, tmp_path):
    rng = np.random.default_rng(0)
    trained = pd.DataFrame({"model": np.repeat(MODELS["model"], 20),
                            "diff_gradcam": np.r_[rng.normal(0.2, 0.1, 40), np.zeros(20)]})
    figures.distribution_figure(trained, MODELS, {}, tmp_path / "boxes.png", degenerate=["vit_small"])
    ax = drawn["boxes.png"].axes[0]
    boxes = [p for p in ax.patches if p.get_label() != figures.DEGENERATE_LEGEND]
    assert [p.get_facecolor()[3] for p in boxes][:2] != [0, 0] and boxes[2].get_facecolor()[3] == 0  # no fill
    assert boxes[2].get_edgecolor() == GREY
    assert ax.get_xticklabels()[2].get_text() == "ViT Small (degenerate)"
    assert figures.DEGENERATE_LEGEND in ax.get_legend_handles_labels()[1]


def test_the_ladder_draws_a_degenerate_rung_hollow_grey_and_named(drawn, tmp_path):
    rows = [("chance", "", ""), ("gradcam", "vgg16", ""), ("gradcam", "vit_small", FLAGS[2]), ("oracle", "", "")]
    ladder = pd.DataFrame([{"metric": "auprc", "rung": rung, "model": model, "n": 60, "mean": mean, "lo": mean - 0.01,
                            "hi": mean + 0.01, "degenerate": flag}
                           for (rung, model, flag), mean in zip(rows, [0.03, 0.1, 0.03, 1.0])])
    figures.ladder_figure(ladder, MODELS, tmp_path / "ladder.png")
    ax = drawn["ladder.png"].axes[0]
    hollow = [line for line in ax.lines if line.get_markerfacecolor() == "none"]
    assert len(hollow) == 1 and to_rgba(hollow[0].get_color()) == GREY and hollow[0].get_ydata()[0] == 2
    assert ax.get_yticklabels()[2].get_text() == "ViT Small (degenerate)"


def test_figures_of_valid_sets_only_name_the_degenerate_ones_they_leave_out(drawn, tmp_path):
    sanity = pd.DataFrame({"model": ["vgg16", "resnet50"], "metric": "diff_gradcam", "trained": [0.2, 0.3],
                           "randomized": [0.0, 0.01], "reject": [True, True]})
    figures.sanity_figure(sanity, tmp_path / "sanity.png", degenerate=["vit_small"])
    assert any(text.endswith("left out of comparisons): ViT Small") for text in _texts(drawn["sanity.png"]))
