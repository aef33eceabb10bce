"""Faithfulness and robustness in the explain stage (explain/road.py, docs/STUDY.md §11): the stages'
resources, the score columns, the stages called in-process, and the whole Ray Data pipeline on one
tiny trained run: what is scored, the controls, ROAD and max-sensitivity recomputed naively from the
Parquet, both dimensions turned off, and a lost controls/ folder redone."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from explain import faithfulness as F
from explain import road
from explain.extract import DONE, CamScorer, extract_runs, run_work
from explain.rows import score_columns, with_scores
from study import maps
from study.config import StudyConfig, load_config
from study.errors import ConfigError
from study.runs import plan_runs
from study.store import StudyStore
from tests.conftest import ROOT, TINY_SIZE, make_tiny_cache
from training import registry
from training.loop import load_trained_model, prepare_input, train_run

SIZE = 64  # the pipeline tests' image size
NEW = (*maps.FAITHFULNESS, *maps.ROBUSTNESS)


def _config(storage, **overrides):
    return load_config(ROOT / "configs" / "demo.yaml", {
        "storage": str(storage), "models.names": ["resnet18"], "preprocess.image_size": TINY_SIZE,
        "recipes.resnet.epochs": 1, "training.seeds": [0], "training.batch_size": 16,
        # every test image scored (the demo scores a subset; test_the_stages_in_process_score_what_section_11_names
        # checks one)
        "faithfulness.images": "all", "robustness.images": "all", **overrides})


def _off(config):
    return dataclasses.replace(config, faithfulness=dataclasses.replace(config.faithfulness, enabled=False),
                               robustness=dataclasses.replace(config.robustness, enabled=False))


# ---------------------------------------------------------------- no Ray


def test_the_default_steps_and_settings_have_one_home():
    config = StudyConfig()
    assert tuple(config.faithfulness.steps) == F.STEPS and config.faithfulness.imputation in F.IMPUTATIONS
    assert (config.robustness.n, config.robustness.radius) == (F.SENSITIVITY_N, F.SENSITIVITY_RADIUS)


def test_every_slot_holds_a_cam_actor_and_the_road_pool_grows_as_memory_allows():
    cam, none, _ = road.pools(road.Slots(2, 0, 1.0, 1e9), road=False)
    assert none is None and (cam.size, cam.cpus, cam.memory, cam.min_size) == (2, 1.0, 1e9, None)
    # two one-CPU nodes (tests/e2e/test_multinode.py): a CAM actor per node, and on each node the two
    # actors and an imputation task fit in its one CPU
    cam, roads, impute = road.pools(road.Slots(2, 0, 1.0, 1e9, 4e8), road=True)
    assert (cam.size, cam.min_size, roads.min_size, roads.size) == (2, None, 1, 2)
    assert cam.cpus + roads.cpus + impute <= 1.0 and impute > 0
    assert (cam.memory, roads.memory) == (1e9, 4e8)
    cam, roads, impute = road.pools(road.Slots(1, 1.0, 1.0, 8e9, 3e9), road=True)  # one GPU: the actors share it
    assert (cam.size, roads.size) == (1, 1) and cam.gpus + roads.gpus == 1.0 and cam.cpus == roads.cpus == 0
    assert impute == 1.0
    cam, roads, _ = road.pools(road.Slots(5, 1.0, 1.0, 8e9, 3e9), road=True)
    assert cam.size == roads.size == 5 and cam.gpus + roads.gpus == 1.0
    args = road.remote_args(roads)
    assert (args["compute"].min_size, args["compute"].max_size, args["memory"]) == (1, 5, int(3e9))


def test_a_subset_of_test_images_is_seeded_by_image_and_the_same_in_every_run():
    ids = [f"1.2.{i}" for i in range(40)]
    chosen = road.subset(ids, 10)
    assert len(chosen) == 10 and chosen == road.subset(list(reversed(ids)) + ids[:5], 10)  # order, repeats
    assert road.subset(ids, "all") is None and road.subset(ids, 40) is None and road.subset(ids[:3], 10) is None
    # the rank is the image's own: an image chosen among many is chosen among any fewer that hold it
    assert road.subset([i for i in ids if i in chosen or i < "1.2.2"], 10) == chosen
    assert road.subset(ids, 10) != road.subset([f"1.3.{i}" for i in range(40)], 10)
    with pytest.raises(ConfigError, match=r"faithfulness\.images: 0 is not valid; use an integer in \[1, "):
        _config("x", **{"faithfulness.images": 0})


def test_an_imputation_batch_holds_at_most_block_bytes_of_perturbed_images():
    from explain.extract import BLOCK_BYTES, BLOCK_ROWS

    paper = load_config(ROOT / "configs" / "paper.yaml")  # 224 px, nine steps: 3.6 MB of images per map
    rows = road.impute_rows(paper, BLOCK_BYTES, BLOCK_ROWS)
    per_map = len(paper.faithfulness.steps) * 2 * paper.preprocess.image_size ** 2 * 4
    assert 1 <= rows and rows * 5 * per_map <= BLOCK_BYTES < (rows + 1) * 5 * per_map
    assert road.impute_rows(paper, 1, BLOCK_ROWS) == 1 and road.impute_rows(_config("x"), BLOCK_BYTES, 7) == 7


def test_unscored_columns_are_nan_and_null_and_scores_fill_only_their_rows():
    columns = score_columns(3)
    assert set(columns) == set(NEW)
    assert np.isnan(columns["road_gap"].to_numpy(zero_copy_only=False)).all()
    assert columns["road_morf_steps"].null_count == 3 and columns["sensitivity_kept"].null_count == 3
    assert columns["road_morf_steps"].type == pa.list_(pa.float64()) and columns["sensitivity_kept"].type == pa.int64()
    table = pa.table(columns)
    filled = with_scores(table, {"road_gap": np.array([np.nan, 0.5, np.nan]),
                                 "road_morf_steps": np.array([[np.nan, np.nan], [0.1, 0.2], [np.nan, np.nan]]),
                                 "sensitivity_kept": np.array([np.nan, 2, np.nan])})
    assert filled.column("road_morf_steps").to_pylist() == [None, [0.1, 0.2], None]
    assert filled.column("sensitivity_kept").to_pylist() == [None, 2, None]
    assert filled.column_names == table.column_names and np.isnan(filled.column("road_morf").to_numpy()).all()


def test_the_stages_in_process_score_what_section_11_names(tiny_cache, tmp_path):
    """CamScorer -> impute_batch -> RoadScorer called directly (no Ray): the controls' rows, and ROAD
    finite exactly on the test rows of the paper's layer, the twin and the controls."""
    config = _config(tmp_path / "store", **{"sanity.cascade": False})
    (plan,) = plan_runs(config, StudyStore(config.study_dir))
    train_run(plan.spec, registry.recipe_for(plan.spec, config.recipes), config, tiny_cache, plan.run_dir,
              plan.seed, fingerprint=plan.fingerprint)
    work = run_work(config, tiny_cache, plan).iloc[:12]
    runs = {plan.key: (plan.spec.name, plan.seed, str(plan.run_dir), False)}
    table = CamScorer(config, runs, str(tiny_cache))(work)
    layers = {plan.key: road.scored_layers(plan.spec, config)}
    imputed = road.impute_batch(table, config, str(tiny_cache), layers, {plan.key: 0}, {plan.key: None})
    scored = road.RoadScorer(config, runs)(imputed)
    assert road.PERTURBED not in scored.column_names
    frame = scored.drop_columns(["heatmap"]).to_pandas()
    control = frame["model"].str.contains("@")
    assert len(frame) == len(table) + len(work) * (3 + 1)  # prior, image_only, random, blurred per image
    assert sorted(set(frame.loc[control, "model"])) == sorted(f"{c}@resnet18" for c in maps.CONTROLS)
    test = frame["split"] == "test"
    expect = test & (control | frame["final_layer"])
    assert np.isfinite(frame.loc[expect, "road_gap"]).all() and frame.loc[~expect, "road_gap"].isna().all()
    robust = test & ~control & frame["final_layer"]
    assert frame.loc[robust, "sensitivity_kept"].notna().all() and frame.loc[~robust, "sensitivity_kept"].isna().all()
    # faithfulness.images / robustness.images as numbers: only the chosen test images are scored
    test_ids = work.loc[work["split"] == "test", "image_id"]
    two, one = road.subset(test_ids, 2), road.subset(test_ids, 1)
    assert len(two) == 2 and len(one) == 1
    table = CamScorer(config, runs, str(tiny_cache), robust={plan.key: one})(work)
    frame = road.RoadScorer(config, runs)(road.impute_batch(table, config, str(tiny_cache), layers, {plan.key: 0},
                                                            {plan.key: two})).drop_columns(["heatmap"]).to_pandas()
    assert set(frame.loc[np.isfinite(frame["road_gap"]), "image_id"]) == two
    assert len(frame.loc[np.isfinite(frame["road_gap"])]) == 2 * 6  # map, twin, 4 controls
    assert set(frame.loc[frame["sensitivity_kept"].notna(), "image_id"]) == one
    # a label-permutation run (here the same weights, run as one): its maps scored with its own model, no controls
    key = f"{plan.key}-permuted"
    runs = {key: (plan.spec.name, plan.seed, str(plan.run_dir), True)}
    table = CamScorer(config, runs, str(tiny_cache))(work.assign(run=key))
    scored = road.RoadScorer(config, runs)(road.impute_batch(table, config, str(tiny_cache), {key: layers[plan.key]},
                                                              {key: 0}, {key: None}))
    frame = scored.drop_columns(["heatmap"]).to_pandas()
    assert len(frame) == len(table) and set(frame["randomization"]) == {"labels"}
    final = frame["final_layer"] & (frame["split"] == "test")
    assert np.isfinite(frame.loc[final, "road_gap"]).all() and frame.loc[~final, "road_gap"].isna().all()
    assert frame.loc[final, "sensitivity_kept"].notna().all()


# ---------------------------------------------------------------- the Ray Data pipeline


@pytest.fixture(scope="module")
def study(tmp_path_factory, ray_session):
    """One finished resnet18 run (one epoch) on a tiny cache at 64 px (the paper's layer is 2x2: its
    maps are not constant, as they are at 32 px), explained once with demo.yaml's faithfulness and
    robustness (ROAD steps 20/50/80, 3 perturbations)."""
    config = _config(tmp_path_factory.mktemp("store"), **{"preprocess.image_size": SIZE})
    store = StudyStore(config.study_dir)
    make_tiny_cache(store.cache_dir, size=SIZE)
    (plan,) = plan_runs(config, store)
    train_run(plan.spec, registry.recipe_for(plan.spec, config.recipes), config, store.cache_dir, plan.run_dir,
              plan.seed, fingerprint=plan.fingerprint)
    extract_runs(config, store, [plan], actors=2, gpus_per_actor=0)
    yield config, store, plan


def _read(folder):
    table = pq.read_table(folder)
    return table.drop(["heatmap"]).to_pandas(), table.column("heatmap").combine_chunks().to_numpy_ndarray()



@pytest.mark.slow
def test_road_is_finite_exactly_where_section_11_asks_and_nan_elsewhere(study):
    config, store, plan = study
    cams, _ = _read(store.cams_dir("resnet18", 0))
    sanity, _ = _read(store.sanity_dir("resnet18", 0))
    controls, _ = _read(store.controls_dir("resnet18", 0))
    steps = len(config.faithfulness.steps)
    final = cams["final_layer"]
    assert final.sum() and (~final).sum()  # demo.yaml: the paper's layer and the stages
    for frame, scored in ((cams, final), (sanity, sanity["randomization"] == "full"),
                          (controls, np.ones(len(controls), bool))):
        assert np.isfinite(frame.loc[scored, list(maps.FAITHFULNESS[:3])]).all().all()
        assert frame.loc[~scored, list(maps.FAITHFULNESS[:3])].isna().all().all()
        assert all(len(v) == steps for v in frame.loc[scored, "road_morf_steps"])
        assert frame.loc[~scored, "road_lerf_steps"].isna().all()
        np.testing.assert_allclose(frame.loc[scored, "road_gap"],
                                   frame.loc[scored, "road_lerf"] - frame.loc[scored, "road_morf"], atol=1e-12)
    # robustness: the trained and the twin's maps at the paper's layer, nothing else
    assert cams.loc[final, "sensitivity_kept"].notna().all() and cams.loc[~final, "sensitivity_kept"].isna().all()
    full = sanity["randomization"] == "full"
    assert sanity.loc[full, "sensitivity_kept"].notna().all() and sanity.loc[~full, "ssim_perturbed"].isna().all()
    assert controls[list(maps.ROBUSTNESS)].isna().all().all()
    assert (cams.loc[final, "sensitivity_kept"] <= config.robustness.n).all()
    assert np.isfinite(cams.loc[final, "max_sensitivity"]).mean() > 0.5  # maps of a 2x2 layer: mostly not all zero


@pytest.mark.slow
def test_the_controls_are_one_dataset_per_run_named_and_vouched_for(study):
    config, store, plan = study
    cams, _ = _read(store.cams_dir("resnet18", 0))
    controls, _ = _read(store.controls_dir("resnet18", 0))
    images = cams.loc[cams["final_layer"], "image_id"]
    assert controls.columns.tolist() == list(maps.SCORES)
    assert controls.groupby("model").size().to_dict() == {f"{c}@resnet18": len(images) for c in maps.CONTROLS}
    assert (controls["seed"] == 0).all() and not controls["randomized"].any()
    blurred = controls["model"] == "blurred@resnet18"
    assert (controls.loc[blurred, "cam_method"] == "gradcam").all()
    assert (controls.loc[blurred, "cam_layer"] == plan.spec.target_layer).all()
    assert (controls.loc[~blurred, "cam_method"] == controls.loc[~blurred, "model"].str.split("@").str[0]).all()
    assert controls["iou_tuned"].notna().all()  # tuned on the controls' own validation maps
    record = json.loads((store.cams_dir("resnet18", 0) / DONE).read_text())
    assert f"../../controls/{plan.key}/{StudyStore.CAM_PART}" in record["files"]
    assert record["control_rows"] == len(controls)
    assert (store.controls_dir("resnet18", 0) / StudyStore.CAM_TUNING).is_file()


@pytest.mark.slow
def test_the_blurred_control_is_the_blur_of_the_stored_map(study):
    config, store, plan = study
    cams, heat = _read(store.cams_dir("resnet18", 0))
    controls, control_heat = _read(store.controls_dir("resnet18", 0))
    final = cams["final_layer"].to_numpy()
    stored = dict(zip(cams.loc[final, "image_id"], heat[final]))
    blurred = (controls["model"] == "blurred@resnet18").to_numpy()
    side = int(cams.loc[final, "map_size"].iloc[0])
    for image_id, got in zip(controls.loc[blurred, "image_id"], control_heat[blurred]):
        expected = F.blurred(stored[image_id].astype(np.float32), F.cell_size(SIZE, side))[0]
        np.testing.assert_array_equal(got, expected.astype(np.float16))


def _image(store, image_id):
    index = pq.read_table(store.cache_dir / StudyStore.CACHE_INDEX).to_pandas().set_index("image_id")
    images = np.load(store.cache_dir / StudyStore.CACHE_IMAGES)
    return torch.from_numpy(images[index.loc[image_id, "row"]].astype(np.float32))[None, None]


@pytest.mark.slow
def test_a_stored_road_score_is_faithfulness_road_recomputed_naively(study):
    """ROAD of a stored trained map, its twin's map and a control, recomputed from the Parquet
    heatmap with `faithfulness.road` on the run's trained model, the image's id as the key."""
    config, store, plan = study
    model = load_trained_model(plan.spec, config, plan.run_dir).eval()
    prepare = lambda x: prepare_input(x, config.preprocess.channels, channels_last=False)  # noqa: E731
    for folder, chosen in ((store.cams_dir("resnet18", 0), "final_layer"),
                           (store.sanity_dir("resnet18", 0), "randomization"),
                           (store.controls_dir("resnet18", 0), "model")):
        frame, heat = _read(folder)
        rows = np.flatnonzero(np.isfinite(frame["road_gap"].to_numpy()))[:2]
        for i in rows:
            row = frame.iloc[i]
            found = F.road(model, _image(store, row["image_id"]), heat[i][None], config.faithfulness.steps,
                           config.faithfulness.imputation, seed=road.SEED, keys=[row["image_id"]], prepare=prepare)
            np.testing.assert_allclose(row["road_morf_steps"], found["morf"][0], rtol=0, atol=1e-6, err_msg=chosen)
            np.testing.assert_allclose(row["road_gap"], found["road_gap"][0], rtol=0, atol=1e-6, err_msg=chosen)


@pytest.mark.slow
def test_a_stored_max_sensitivity_is_recomputed_naively(study):
    from explain.cam import compute

    config, store, plan = study
    model = load_trained_model(plan.spec, config, plan.run_dir).eval()
    cams, heat = _read(store.cams_dir("resnet18", 0))
    i = int(np.flatnonzero(cams["final_layer"].to_numpy() & np.isfinite(cams["max_sensitivity"].to_numpy()))[0])
    row = cams.iloc[i]
    prepare = lambda x: prepare_input(x, config.preprocess.channels, channels_last=False)  # noqa: E731
    found = F.max_sensitivity(lambda m, x: compute(m, plan.spec, prepare(x), 1), model, _image(store, row["image_id"]),
                              maps=heat[i][None], n=config.robustness.n, seed=road.SEED, keys=[row["image_id"]],
                              relative_radius=config.robustness.radius, prepare=prepare)
    assert found["sensitivity_kept"][0] == row["sensitivity_kept"]
    np.testing.assert_allclose(found["max_sensitivity"][0], row["max_sensitivity"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(found["ssim_perturbed"][0], row["ssim_perturbed"], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_removed_controls_folder_makes_the_rerun_recompute_that_run(study, capsys):
    config, store, plan = study
    extract_runs(config, store, [plan], actors=2, gpus_per_actor=0)
    assert f"[explain] {plan.key}: up to date, skipped" in capsys.readouterr().out
    folder = store.controls_dir("resnet18", 0)
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    extract_runs(config, store, [plan], actors=1, gpus_per_actor=0)  # one actor slot: both pools share it
    out = capsys.readouterr().out
    assert "1 CAM actor(s), 1 ROAD actor(s)" in out
    reason = next(line for line in out.splitlines() if line.startswith(f"[explain] {plan.key}: "))
    assert f"controls/{plan.key}/" in reason and "is missing" in reason and "computing its heatmaps" in reason
    assert pq.read_table(folder).num_rows > 0


@pytest.mark.slow
def test_both_dimensions_off_give_the_old_columns_unchanged_nan_scores_and_no_extra_stage(study, capsys,
                                                                                          monkeypatch):
    config, store, plan = study
    extract_runs(config, store, [plan], actors=2, gpus_per_actor=0)  # on (made now, or up to date)
    before = {folder: pq.read_table(folder) for folder in (store.cams_dir("resnet18", 0),
                                                           store.sanity_dir("resnet18", 0))}
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(road, "add_stages", lambda *args, **kwargs: pytest.fail("a ROAD stage was added"))
        extract_runs(_off(config), store, [plan], actors=2, gpus_per_actor=0)
    out = capsys.readouterr().out
    assert "faithfulness.enabled" in out and "ROAD actor" not in out and "controls" not in out
    assert not store.controls_dir("resnet18", 0).exists()
    for folder, on in before.items():
        off = pq.read_table(folder)
        assert off.column_names == on.column_names == list(maps.COLUMNS)
        old = [name for name in maps.SCORES if name not in NEW]
        pd.testing.assert_frame_equal(off.select(old).to_pandas(), on.select(old).to_pandas(), check_exact=True)
        np.testing.assert_array_equal(off.column("heatmap").combine_chunks().to_numpy_ndarray(),
                                      on.column("heatmap").combine_chunks().to_numpy_ndarray())
        for name in NEW:
            assert off.column(name).null_count == len(off) or np.isnan(off.column(name).to_numpy()).all()
    record = json.loads((store.cams_dir("resnet18", 0) / DONE).read_text())
    assert record["inputs"]["faithfulness"] == {"enabled": False} and record["control_rows"] == 0
    extract_runs(config, store, [plan], actors=2, gpus_per_actor=0)  # back on: redone, controls again
    assert pq.read_table(store.controls_dir("resnet18", 0)).num_rows > 0
