"""The explain stage's Ray Data pipeline on two tiny trained runs: Parquet per run, skips, resumes."""

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from explain.extract import DONE, extract_runs
from explain.metrics import COLUMNS
from training.config import load_config
from training.contract import StudyStore
from orchestrator.train_runs import plan_runs
from tests.conftest import TINY_SIZE, make_tiny_cache
from training import registry
from training.loop import train_run

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [0, 1]
CAM_COLUMNS = ["image_id", "model", "seed", "label", "probability", "correct", "mask_fraction", "randomized",
               "cam_method", "cam_layer", *COLUMNS, "heatmap"]


@pytest.fixture(scope="module")
def study(tmp_path_factory, ray_session):
    """Two finished resnet18 runs (seeds 0 and 1, one epoch) on the tiny cache, on the session's Ray."""
    config = load_config(ROOT / "configs" / "demo.yaml", {
        "storage": str(tmp_path_factory.mktemp("store")), "models.names": ["resnet18"],
        "preprocess.image_size": TINY_SIZE, "recipes.resnet.epochs": 1, "training.seeds": SEEDS,
        "training.batch_size": 16})
    store = StudyStore(config.study_dir)
    make_tiny_cache(store.cache_dir)
    plans = plan_runs(config, store)
    for plan in plans:
        train_run(plan.spec, registry.recipe_for(plan.spec, config.recipes), config, store.cache_dir,
                  plan.run_dir, plan.seed, fingerprint=plan.fingerprint)
    yield config, store, plans


def _positives_in_test(store) -> int:
    index = pq.read_table(store.cache_dir / "index.parquet").to_pandas()
    return int(((index["split"] == "test") & (index["label"] == 1)).sum())


def test_one_pipeline_writes_every_run_with_the_documented_columns(study, capsys):
    config, store, plans = study
    extract_runs(config, store, plans, actors=2, gpus_per_actor=0)
    assert "2 run(s)" in capsys.readouterr().out
    positives = _positives_in_test(store)
    for plan in plans:
        out = store.cams_dir(plan.spec.name, plan.seed)
        table = pq.read_table(out)  # plain pyarrow, no Ray
        assert table.column_names == CAM_COLUMNS
        assert table.num_rows == 2 * positives  # trained and randomised copy
        frame = table.drop(["heatmap"]).to_pandas()
        assert set(frame["seed"]) == {plan.seed} and set(frame["model"]) == {"resnet18"}
        assert sorted(frame["randomized"].value_counts().to_dict().items()) == [(False, positives), (True, positives)]
        heat = table.column("heatmap").combine_chunks().to_numpy_ndarray()
        assert heat.shape == (2 * positives, TINY_SIZE, TINY_SIZE) and 0 <= heat.min() and heat.max() <= 1
        record = json.loads((out / DONE).read_text())
        assert record["rows"] == 2 * positives and record["inputs"]["train"] == {"fingerprint": plan.fingerprint}
        assert record["inputs"]["cam"]["methods"] == ["gradcam"]


def test_a_rerun_skips_finished_runs_and_redoes_only_a_missing_one(study, capsys):
    config, store, plans = study
    extract_runs(config, store, plans, actors=2, gpus_per_actor=0)  # both present (or made now)
    kept = store.cams_dir(plans[0].spec.name, plans[0].seed) / DONE
    before = kept.stat().st_mtime_ns
    lost = store.cams_dir(plans[1].spec.name, plans[1].seed)
    for path in lost.iterdir():
        path.unlink()
    lost.rmdir()
    capsys.readouterr()
    extract_runs(config, store, plans, actors=2, gpus_per_actor=0)
    out = capsys.readouterr().out
    assert f"[explain] {plans[0].key}: up to date, skipped" in out and "1 run(s)" in out
    assert f"[explain] {plans[1].key}: not done yet; computing its heatmaps" in out
    assert kept.stat().st_mtime_ns == before
    assert pq.read_table(lost).num_rows == 2 * _positives_in_test(store)


def test_a_changed_explain_setting_recomputes_every_run_and_says_why(study, capsys):
    config, store, plans = study
    extract_runs(config, store, plans, actors=2, gpus_per_actor=0)
    changed = dataclasses.replace(config, cam=dataclasses.replace(config.cam, methods=("gradcam", "gradcam++")))
    capsys.readouterr()
    extract_runs(changed, store, plans, actors=2, gpus_per_actor=0)
    out = capsys.readouterr().out
    positives = _positives_in_test(store)
    for plan in plans:
        assert f"[explain] {plan.key}: cam.methods changed; computing its heatmaps" in out
        frame = pq.read_table(store.cams_dir(plan.spec.name, plan.seed)).drop(["heatmap"]).to_pandas()
        assert frame.groupby("cam_method").size().to_dict() == {"gradcam": 2 * positives, "gradcam++": 2 * positives}
    capsys.readouterr()
    extract_runs(config, store, plans, actors=2, gpus_per_actor=0)  # back to the old setting: redone again
    assert capsys.readouterr().out.count("cam.methods changed") == len(plans)


def test_a_one_channel_study_trains_and_explains(tiny_cache, tmp_path):
    """preprocess.channels: 1 reaches the CAM stage: the trained model and its randomised twin
    both take one-channel input (no Ray: the actor class is called directly)."""
    from explain.extract import CamScorer, run_work

    config = load_config(ROOT / "configs" / "demo.yaml", {
        "storage": str(tmp_path / "store"), "models.names": ["resnet18"], "preprocess.image_size": TINY_SIZE,
        "preprocess.channels": 1, "recipes.resnet.epochs": 1, "training.batch_size": 16})
    (plan,) = plan_runs(config, StudyStore(config.study_dir))
    train_run(plan.spec, registry.recipe_for(plan.spec, config.recipes), config, tiny_cache, plan.run_dir,
              plan.seed, fingerprint=plan.fingerprint)
    work = run_work(config, tiny_cache, plan)
    scorer = CamScorer(config, {plan.key: (plan.spec.name, plan.seed, str(plan.run_dir))}, str(tiny_cache))
    table = scorer(work)
    assert table.num_rows == len(work) and sorted(set(table.column("randomized").to_pylist())) == [False, True]
    heat = table.column("heatmap").combine_chunks().to_numpy_ndarray()
    assert heat.shape == (len(work), TINY_SIZE, TINY_SIZE) and heat.max() <= 1
