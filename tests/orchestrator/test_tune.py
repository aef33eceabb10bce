"""`camstudy tune` (orchestrator/tune.py): two Ray Tune trials of one family on tiny data, the
recipe file they write, and `--recipes` taking it."""

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.tracking import StudyTracker
from orchestrator.tune import LR_RANGE, WEIGHT_DECAY_RANGE, tune_recipes
from tests.conftest import ROOT, make_tiny_cache
from study.config import load_config, recipe_overrides
from study.store import StudyStore
from study.errors import ConfigError

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("tune")
    config = load_config(ROOT / "configs" / "demo.yaml", {
        "storage": str(root / "store"), "models.names": ["resnet18"], "preprocess.image_size": 32,
        "recipes.resnet.epochs": 2, "training.batch_size": 16})
    store = StudyStore(config.study_dir)
    make_tiny_cache(store.cache_dir)
    tracker = StudyTracker(config, store)
    out = root / "recipes.yaml"
    fragment = tune_recipes(config, store, tracker, trials=2, out=out)
    return config, store, tracker, out, fragment


@pytest.mark.slow  # two Ray Tune trials, each a Ray Train run
def test_two_trials_choose_a_recipe_from_the_search_space(tuned):
    config, store, _, out, fragment = tuned
    assert set(fragment["recipes"]) == {"resnet"}
    chosen = fragment["recipes"]["resnet"]
    assert LR_RANGE[0] <= chosen["lr"] <= LR_RANGE[1] and WEIGHT_DECAY_RANGE[0] <= chosen["weight_decay"] <= WEIGHT_DECAY_RANGE[1]
    assert chosen["optimizer"] == "adam" and chosen["epochs"] == 2  # the configured cap
    record = fragment["tuning"]
    assert record["families"] == {"resnet": "resnet18"} and record["trials"] == 2
    trials = record["outcomes"]["resnet"]["trials"]
    assert len(trials) == 2 and record["outcomes"]["resnet"]["best_val_auc"] == max(t["best_val_auc"] for t in trials)
    assert {t["lr"] for t in trials} >= {chosen["lr"]}
    assert len(list((store.tune_dir / "resnet").iterdir())) == 2  # one run folder per trial
    assert yaml.safe_load(out.read_text()) == fragment


@pytest.mark.slow
def test_the_recipe_file_feeds_a_run_and_records_how_it_was_chosen(tuned):
    config, _, _, out, fragment = tuned
    loaded = load_config(ROOT / "configs" / "demo.yaml", {**recipe_overrides(out), "storage": config.storage})
    assert loaded.recipes["resnet"].lr == fragment["recipes"]["resnet"]["lr"]
    assert loaded.recipes["vgg"] == config.recipes["vgg"]  # families not tuned keep theirs
    assert loaded.tuning.families == {"resnet": "resnet18"} and "ASHA" in loaded.tuning.method
    from analysis.html import _tuning_text

    assert "resnet on resnet18" in _tuning_text(loaded.tuning)
    assert "not tuned" in _tuning_text(config.tuning)


@pytest.mark.slow
def test_trials_are_mlflow_children_of_the_tune_parent(tuned):
    config, _, tracker, _, _ = tuned
    client = MlflowClient(tracking_uri=tracker.uri)
    runs = client.search_runs([tracker.experiment_id])
    parents = [r for r in runs if r.data.tags.get("camstudy.role") == "tune"]
    trials = [r for r in runs if r.data.tags.get("camstudy.role") == "tune-trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 2 and all(t.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for t in trials)
    assert all({"lr", "weight_decay", "model"} <= set(t.data.params) for t in trials)
    assert all("val/auc" in t.data.metrics for t in trials)


def test_a_file_that_is_not_a_recipe_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: other\n")
    with pytest.raises(ConfigError, match="not a recipe file"):
        recipe_overrides(bad)
    with pytest.raises(ConfigError, match="file not found"):
        recipe_overrides(tmp_path / "absent.yaml")
