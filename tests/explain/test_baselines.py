"""The baseline ladder's model-free maps (explain/baselines.py): the location prior sees training
masks only, the image-only map is edges, both are scored like any CAM into baselines/."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from explain.baselines import explain_baselines, image_only, location_prior
from tests.conftest import ROOT, make_tiny_cache
from tests.explain.test_metrics import naive_auprc, naive_row
from study import maps
from study.config import load_config
from study.store import StudyStore


@pytest.fixture
def store(tmp_path):
    config = load_config(ROOT / "configs" / "demo.yaml", {"storage": str(tmp_path / "store")})
    store = StudyStore(config.study_dir)
    make_tiny_cache(store.cache_dir)
    return config, store


def _cache(store):
    index = pd.read_parquet(store.cache_dir / StudyStore.CACHE_INDEX)
    return index, np.load(store.cache_dir / StudyStore.CACHE_MASKS)


def test_the_prior_is_the_mean_training_mask_and_ignores_every_other_split(store):
    _, store = store
    index, masks = _cache(store)
    prior = location_prior(index, masks)
    train = index[(index["split"] == "train") & (index["label"] == 1)]["row"]
    mean = masks[train].astype(float).mean(axis=0)
    np.testing.assert_allclose(prior, (mean - mean.min()) / (mean.max() - mean.min()), rtol=0, atol=1e-6)
    changed = masks.copy()
    for split in ("test", "val"):
        rows = index[(index["split"] == split) & (index["label"] == 1)]["row"]
        changed[rows] = 1 - changed[rows]  # every held-out mask inverted
    np.testing.assert_array_equal(location_prior(index, changed), prior)
    changed[train.iloc[0]] = 1 - changed[train.iloc[0]]  # one training mask changed: the prior moves
    assert not np.array_equal(location_prior(index, changed), prior)


def test_image_only_is_smoothed_edge_strength():
    flat = np.full((1, 32, 32), 3.0, np.float32)
    assert np.count_nonzero(image_only(flat, 0.05)) == 0  # no edge, no heat (all-zero, counted as such)
    step = np.zeros((1, 32, 32), np.float32)
    step[0, :, 16:] = 1.0  # one vertical edge
    heat = image_only(step, 0.05)[0]
    assert heat.min() == 0.0 and heat.max() == 1.0
    assert set(np.argmax(heat, axis=1)) <= {15, 16}  # the peak is on the edge in every row
    assert heat[:, 0].max() < 0.05 and heat[:, -1].max() < 0.05


def test_baselines_are_scored_into_their_own_dataset_and_reused(store, capsys):
    config, store = store
    explain_baselines(config, store)
    table = pq.read_table(store.baselines_dir)
    index, masks = _cache(store)
    test = index[(index["split"] == "test") & (index["label"] == 1)]
    frame = table.drop(["heatmap"]).to_pandas()
    assert sorted(frame["model"].unique()) == ["image_only", "prior"]
    assert frame.groupby("model")["image_id"].apply(sorted).apply(list).to_dict() == {
        name: sorted(test["image_id"]) for name in ("image_only", "prior")}
    assert frame["seed"].isna().all() and not frame["randomized"].any()
    assert table.column_names == list(maps.COLUMNS)  # no classifier: no faithfulness or robustness (NaN, null)
    assert all(table.column(name).null_count == len(table) or frame[name].isna().all()
               for name in (*maps.FAITHFULNESS, *maps.ROBUSTNESS))
    heat = table.column("heatmap").combine_chunks().to_numpy_ndarray()
    row_of = index.set_index("image_id")["row"]
    for h, row in zip(heat, frame.itertuples()):  # every stored number re-scored from the stored map
        expected = naive_row(h, masks[row_of[row.image_id]].astype(bool))
        for name, value in expected.items():
            np.testing.assert_allclose(getattr(row, name), value, rtol=0, atol=1e-12, err_msg=name)
    prior_maps = heat[frame["model"].to_numpy() == "prior"]
    assert (prior_maps == prior_maps[0]).all()  # one map for every image
    tuning = json.loads((store.baselines_dir / StudyStore.CAM_TUNING).read_text())
    val_positives = int(((index["split"] == "val") & (index["label"] == 1)).sum())
    assert [s["model"] for s in tuning["sets"]] == ["prior", "image_only"]
    assert all(s["val_images"] == val_positives for s in tuning["sets"])
    assert json.loads((store.baselines_dir / StudyStore.CAM_DONE).read_text())["prior_from_train_positives"] == 48
    capsys.readouterr()
    explain_baselines(config, store)
    assert "baselines: up to date, skipped" in capsys.readouterr().out


def test_the_prior_beats_chance_where_lesions_sit_in_one_place(store):
    """In the tiny cache lesions lie in the central half: the prior's AUPRC must beat f."""
    config, store = store
    explain_baselines(config, store)
    frame = pq.read_table(store.baselines_dir).drop(["heatmap"]).to_pandas()
    prior = frame[frame["model"] == "prior"]
    assert prior["auprc"].mean() > prior["mask_fraction_scored"].mean()
    assert naive_auprc(np.ones((2, 2)), np.eye(2, dtype=bool)) == 0.5


@pytest.mark.slow  # scores every baseline and four map sets over the test images
def test_the_ladder_ranks_oracle_above_a_good_map_above_the_prior_above_chance(store):
    """Real baselines of the tiny cache and a map that sees the lesion (the mask, blurred) scored
    by the real row builder: the ladder must put them in this order on every threshold-free metric."""
    import cv2

    from analysis.ladder import beats_prior, ladder_table
    from explain.rows import map_table

    config, store = store
    explain_baselines(config, store)
    baselines = pq.read_table(store.baselines_dir).drop(["heatmap"]).to_pandas()
    index, masks = _cache(store)
    test = index[(index["split"] == "test") & (index["label"] == 1)].assign(
        probability=0.9, correct=True, randomized=False, split="test")
    lesion = masks[test["row"]].astype(bool)
    noise = np.random.default_rng(0).random(lesion.shape).astype(np.float32)
    sees = np.stack([cv2.GaussianBlur(m.astype(np.float32), (0, 0), 2.0) for m in lesion]) + 0.5 * noise
    sees = (sees - sees.min(axis=(1, 2), keepdims=True)) / np.ptp(sees, axis=(1, 2), keepdims=True)
    model = map_table(test, lesion, sees, config.metrics, model="good", seed=0, method="gradcam", layer="x",
                      depth=1.0, map_size=lesion.shape[-1], final_layer=True, matched_layer=False)
    trained = model.drop(["heatmap", "iou_curve", "split"]).to_pandas()
    ladder = ladder_table(trained, trained.iloc[0:0], baselines, {}, config.statistics.alpha)
    for metric in ("auprc", "auroc_pixel", "energy_in_mask"):
        level = ladder[ladder["metric"] == metric].set_index("rung")["mean"]
        assert level["oracle"] > level["gradcam"] > level["prior"] > level["chance"], metric
    verdict = beats_prior(trained, baselines, config.statistics.alpha).set_index("metric").loc["auprc", "verdict"]
    assert verdict == "beats the prior"
