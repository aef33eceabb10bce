"""The explain stage's Ray Data pipeline on two tiny trained runs: Parquet per run, skips, resumes."""

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from explain.extract import DONE, extract_runs
from explain.metrics import COLUMNS
from study.config import load_config
from study.store import StudyStore
from study.runs import plan_runs
from tests.conftest import ROOT, TINY_SIZE, make_tiny_cache
from tests.explain.test_metrics import naive_ehr, naive_row
from training import registry
from training.loop import train_run

SEEDS = [0, 1]
LAYERS = 4  # demo.yaml's cam.layers [final, stages, matched] for resnet18: layer1.-1 ... layer4.-1
STEPS = 6  # its cascade: step 0 (as trained), the head, then layer4 ... layer1 (with the stem)
CAM_COLUMNS = ["image_id", "model", "seed", "label", "probability", "correct", "mask_fraction", "rle_rows",
               "n_regions", "elongation", "randomized", "randomization", "stages_randomized", "randomized_from",
               "cam_method", "cam_layer", "layer_depth", "map_size", "final_layer", "matched_layer", *COLUMNS,
               "cam_constant", "spearman_to_trained", "ssim_to_trained", "top10_iou_to_trained", "road_morf",
               "road_lerf", "road_gap", "road_morf_steps", "road_lerf_steps", "max_sensitivity", "ssim_perturbed",
               "sensitivity_kept", "tuned_threshold", "iou_tuned", "hit_tuned", "heatmap"]


# every test trains tiny runs and runs the explain stage's Ray Data pipeline on them
pytestmark = pytest.mark.slow


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
    assert len(registry.cascade_units(plans[0].spec, TINY_SIZE)) + 1 == STEPS
    for plan in plans:
        out = store.cams_dir(plan.spec.name, plan.seed)
        # cams/: the trained model at every layer; sanity/: every cascade step and the twin at the
        # paper's layer
        for folder, randomized, copies in ((out, False, LAYERS), (store.sanity_dir(plan.spec.name, plan.seed), True,
                                                                   STEPS + 1)):
            table = pq.read_table(folder)  # plain pyarrow, no Ray
            assert table.column_names == CAM_COLUMNS
            assert table.num_rows == positives * copies
            frame = table.drop(["heatmap"]).to_pandas()
            assert set(frame["seed"]) == {plan.seed} and set(frame["model"]) == {"resnet18"}
            assert set(frame["randomized"]) == {randomized}
            heat = table.column("heatmap").combine_chunks().to_numpy_ndarray()
            assert heat.shape == (positives * copies, TINY_SIZE, TINY_SIZE) and 0 <= heat.min() and heat.max() <= 1
            assert (frame["cam_constant"] == (heat.max(axis=(1, 2)) == heat.min(axis=(1, 2)))).all()
        record = json.loads((out / DONE).read_text())
        assert record["rows"] == positives * LAYERS and record["sanity_rows"] == positives * (STEPS + 1)
        # the record vouches for the maps in both folders (a damaged one is recomputed)
        assert f"../../sanity/{plan.key}/{StudyStore.CAM_PART}" in record["files"]
        assert StudyStore.CAM_PART in record["files"]
        assert record["inputs"]["train"] == {"fingerprint": plan.fingerprint}
        assert record["inputs"]["cam"]["methods"] == ["gradcam"]


def test_rescoring_the_stored_heatmaps_with_naive_code_reproduces_every_stored_metric(study):
    """docs/STUDY.md §8: metrics come from the map as stored (float16), so a reader re-scoring the Parquet
    with the definitions (tests/explain/test_metrics.py's naive loops, float64) gets the stored numbers."""
    config, store, plans = study
    extract_runs(config, store, plans, actors=2, gpus_per_actor=0)
    masks = np.load(store.cache_dir / StudyStore.CACHE_MASKS).astype(bool)
    row_of = pq.read_table(store.cache_dir / StudyStore.CACHE_INDEX).to_pandas().set_index("image_id")["row"]
    checked, stored = 0, 0
    for plan in plans:
        for folder in (store.cams_dir(plan.spec.name, plan.seed), store.sanity_dir(plan.spec.name, plan.seed)):
            table = pq.read_table(folder)
            stored += table.num_rows
            heat = table.column("heatmap").combine_chunks().to_numpy_ndarray()
            assert heat.dtype == np.float16
            frame = table.drop(["heatmap"]).to_pandas()
            for h, row in zip(heat, frame.itertuples()):
                m = masks[row_of[row.image_id]]
                expected = {**naive_row(h, m), "ehr_auc": naive_ehr(h, m, config.metrics.ehr_thresholds)}
                for name, value in expected.items():
                    np.testing.assert_allclose(getattr(row, name), value, rtol=0, atol=1e-12, err_msg=name)
                checked += 1
    assert checked == stored == len(plans) * _positives_in_test(store) * (LAYERS + STEPS + 1)


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
    assert pq.read_table(lost).num_rows == _positives_in_test(store) * LAYERS


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
        assert frame.groupby("cam_method").size().to_dict() == {"gradcam": positives * LAYERS,
                                                                  "gradcam++": positives * LAYERS}
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
    scorer = CamScorer(config, {plan.key: (plan.spec.name, plan.seed, str(plan.run_dir), False)}, str(tiny_cache))
    table = scorer(work)
    # every row: the trained model at every layer; test rows also: the cascade and the twin
    maps = len(work) * LAYERS + int((work["split"] == "test").sum()) * (STEPS + 1)
    assert table.num_rows == maps and sorted(set(table.column("randomized").to_pylist())) == [False, True]
    heat = table.column("heatmap").combine_chunks().to_numpy_ndarray()
    assert heat.shape == (maps, TINY_SIZE, TINY_SIZE) and heat.max() <= 1


def test_the_cascade_starts_at_the_trained_map_and_sanity_maps_use_the_trained_threshold(study):
    """Step 0 (the working copy before any re-initialisation) gives the trained maps, so its
    similarity to them is 1; steps are numbered head first; the twin is the last step. The
    sanity copies are scored at the IoU threshold their trained map set was tuned to."""
    config, store, plans = study
    extract_runs(config, store, plans, actors=2, gpus_per_actor=0)
    plan = plans[0]
    sanity = pq.read_table(store.sanity_dir(plan.spec.name, plan.seed))
    frame = sanity.drop(["heatmap"]).to_pandas()
    heat = sanity.column("heatmap").combine_chunks().to_numpy_ndarray()
    cascade = frame[frame["randomization"] == "cascade"]
    units = registry.cascade_units(plan.spec, TINY_SIZE)
    assert sorted(cascade["stages_randomized"].unique()) == list(range(len(units) + 1))
    firsts = cascade.drop_duplicates("stages_randomized").set_index("stages_randomized")["randomized_from"]
    assert list(firsts) == ["", *[name for name, _ in units]] and firsts[1] == "head"
    step0 = cascade[cascade["stages_randomized"] == 0]
    assert (step0["ssim_to_trained"] == 1.0).all() and (step0["top10_iou_to_trained"] == 1.0).all()
    cams = pq.read_table(store.cams_dir(plan.spec.name, plan.seed))
    final = cams.column("final_layer").to_numpy()
    trained = dict(zip(np.asarray(cams.column("image_id").to_pylist())[final],
                       cams.column("heatmap").combine_chunks().to_numpy_ndarray()[final]))
    for i in step0.index:
        np.testing.assert_array_equal(heat[i], trained[frame.loc[i, "image_id"]])
    full = frame[frame["randomization"] == "full"]
    assert len(full) == len(step0) and (full["stages_randomized"] == len(units)).all()
    assert (full["cam_layer"] == plan.spec.target_layer).all() and full["ssim_to_trained"].notna().all()
    trained_threshold = cams.column("tuned_threshold").to_numpy()[final][0]
    assert np.isfinite(trained_threshold) and (frame["tuned_threshold"] == trained_threshold).all()
    tuning = json.loads((store.cams_dir(plan.spec.name, plan.seed) / StudyStore.CAM_TUNING).read_text())
    borrowed = [s for s in tuning["sets"] if s["randomization"] != "none"]
    assert borrowed and all(s["tuned_on"].startswith("the maps of") and s["threshold"] == trained_threshold
                            for s in borrowed)
