"""Seeds end to end (docs/STUDY.md §6, §10): `camstudy run configs/demo.yaml --seeds 0,1,2`, shrunk, with
the label-permutation runs, through every stage: the run becomes the unit, the crossed model
reports the seed variance, stability compares seeds and architectures, model-level CIs come from
the hierarchical bootstrap."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.reliability import stability_table
from study.config import StudyConfig
from study.store import StudyStore
from tests.conftest import ROOT
from tests.e2e.camstudy_cli import SECTION_11_OFF, as_sets

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# the demo's data and recipes (its ResNets learn the lesions in 4 epochs), two of its models
SHRINK = ["--set", "models.names=[resnet18,resnet34]", "--set", "sanity.label_permutation=true",
          "--set", "cam.layers=[final]",  # the sweep is tested elsewhere
          *as_sets(SECTION_11_OFF)]
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory):
    storage = tmp_path_factory.mktemp("seeds") / "store"
    done = subprocess.run([sys.executable, "-m", "orchestrator", "run", "configs/demo.yaml", "--seeds", "0,1,2",
                           "--set", f"storage={storage}", *SHRINK], cwd=ROOT, capture_output=True, text=True,
                          timeout=1700)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return storage / "demo", done.stdout


def table(study: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(study / "analysis" / "tables" / f"{name}.csv", keep_default_na=False)


def test_every_seed_and_the_permuted_runs_are_trained_and_explained(three_seeds):
    study, out = three_seeds
    for model in ("resnet18", "resnet34"):
        for seed in SEEDS:
            assert (study / "train" / f"{model}-seed{seed}" / "done.json").is_file()
            assert (study / "cams" / f"{model}-seed{seed}" / "_done.json").is_file()
        permuted = study / "sanity" / f"{model}-seed0-permuted"
        assert json.loads((study / "train" / f"{model}-seed0-permuted" / "done.json").read_text())[
            "inputs"]["permuted_labels"] is True
        labels = pd.read_parquet(permuted)
        assert set(labels["randomization"]) == {"labels"} and labels["randomized"].all()
    sanity = table(study, "sanity")
    assert {"full", "labels"} <= set(sanity["copy"])


def test_with_three_seeds_the_run_is_the_unit(three_seeds):
    study, _ = three_seeds
    comparison = json.loads((study / "analysis" / "statistics.json").read_text())["comparisons"]
    if not comparison:
        pytest.skip("fewer than two valid map sets in this tiny study: nothing to compare")
    diff = comparison["diff_gradcam"]
    assert diff["seeds_per_model"] == 3 and "run_level" in diff and "crossed" in diff
    assert diff["trusted_basis"].startswith("run-level Tukey")
    assert diff["crossed"]["n_runs"] == 6 and diff["crossed"]["variance"]["run"] >= 0


def test_stability_compares_seeds_and_architectures(three_seeds):
    study, _ = three_seeds
    stability = table(study, "stability")
    assert set(stability["measure"]) == {"spearman", "ssim", "top10_iou"}
    repeat = stability[(stability["kind"] == "repeatability") & (stability["measure"] == "ssim")]
    assert len(repeat) > 0 and (repeat["model_a"] == repeat["model_b"]).all() and (repeat["seed_a"] != repeat["seed_b"]).all()
    assert (repeat["mean"] < 1).all()  # two seeds of a tiny model do not make the same maps


def test_a_run_compared_with_itself_is_perfectly_stable(three_seeds, tmp_path):
    study, _ = three_seeds
    copy = tmp_path / "demo"
    shutil.copytree(study / "cams" / "resnet18-seed0", copy / "cams" / "resnet18-seed0")
    shutil.copytree(study / "cams" / "resnet18-seed0", copy / "cams" / "resnet18-seed7")  # the same maps again
    rows = pd.concat([pd.read_parquet(copy / "cams" / key, columns=["image_id", "final_layer"]).assign(
        model="resnet18", seed=seed) for key, seed in (("resnet18-seed0", 0), ("resnet18-seed7", 7))])
    rows = rows[rows["final_layer"]]
    same = stability_table(StudyStore(copy), rows, "gradcam", StudyConfig().statistics.alpha).set_index("measure")
    assert same.loc["ssim", "mean"] == 1.0 and same.loc["top10_iou", "mean"] == 1.0
    assert same.loc["spearman", "mean"] == pytest.approx(1.0) or np.isnan(same.loc["spearman", "mean"])


def test_model_level_cis_are_hierarchical_bootstraps_over_the_three_seeds(three_seeds):
    study, _ = three_seeds
    scores = pd.read_parquet(study / "analysis" / "scores.parquet")
    models = scores[scores["level"] == "model"]
    assert set(models["seeds"]) == {3} and models["seed"].isna().all()
    assert models["ci_method"].str.contains("1000 replicates").all()
    assert (models["diff_gradcam_lo"] <= models["diff_gradcam"]).all()
    assert (models["diff_gradcam"] <= models["diff_gradcam_hi"]).all()
