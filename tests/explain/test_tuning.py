"""Thresholds tuned on validation positives (explain/tuning.py): chosen from validation maps only,
applied to test maps, recorded."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from explain import tuning
from explain.metrics import tuning_thresholds
from explain.rows import map_table
from tests.explain.test_metrics import naive_iou_curve
from study.config import MetricsConfig


def rows_of(split, n, rng):
    return pd.DataFrame({"image_id": [f"{split}{i}" for i in range(n)], "label": 1, "probability": np.nan,
                         "correct": False, "mask_fraction": 0.1, "rle_rows": 1.0, "n_regions": 1,
                         "elongation": 1.0, "split": split, "randomized": False})


def lesion_batch(rng, n, size=16, blur=0.0):
    """Maps equal to a disc mask plus noise: the best threshold depends on the noise level."""
    masks = np.zeros((n, size, size), bool)
    masks[:, 4:10, 5:11] = True
    heat = np.clip(masks * 0.6 + rng.random((n, size, size)) * (0.5 + blur), 0, 1).astype(np.float32)
    return heat, masks


def table_for(val, test, config, method="gradcam"):
    parts = [map_table(rows, masks, heat, config, model="m", seed=0, method=method, layer="l", depth=1.0,
                       map_size=16, final_layer=True, matched_layer=False)
             for rows, (heat, masks) in ((val[0], val[1]), (test[0], test[1]))]
    return pa.concat_tables(parts)


def test_the_threshold_comes_from_validation_maps_and_scores_the_test_maps():
    rng = np.random.default_rng(0)
    config = MetricsConfig()
    val = (rows_of("val", 12, rng), lesion_batch(rng, 12))
    test = (rows_of("test", 8, rng), lesion_batch(rng, 8))
    kept, records = tuning.apply(table_for(val, test, config), ["cam_method", "cam_layer"], config)
    grid = tuning_thresholds(config.tuning_steps)
    mean_val = np.mean([naive_iou_curve(h, m) for h, m in zip(*val[1])], axis=0)
    expected_t = grid[int(np.argmax(mean_val))]
    assert all(name.startswith("test") for name in kept.column("image_id").to_pylist())
    assert "iou_curve" not in kept.column_names and kept.column_names[-1] == "heatmap"
    frame = kept.drop(["heatmap"]).to_pandas()
    assert len(frame) == 8 and (frame["tuned_threshold"] == expected_t).all()
    k = int(np.argmax(mean_val))
    expected_iou = [naive_iou_curve(h, m)[k] for h, m in zip(*test[1])]
    np.testing.assert_allclose(frame["iou_tuned"], expected_iou, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(frame["hit_tuned"], np.array(expected_iou) >= config.hit_iou)
    (record,) = records
    assert record["threshold"] == expected_t and record["val_images"] == 12
    assert record["image_ids"] == [f"val{i}" for i in range(12)]


def test_test_maps_never_move_the_threshold():
    rng = np.random.default_rng(1)
    config = MetricsConfig()
    val = (rows_of("val", 10, rng), lesion_batch(rng, 10))
    chosen = []
    for blur in (0.0, 2.0):  # wildly different test maps
        test = (rows_of("test", 6, rng), lesion_batch(rng, 6, blur=blur))
        kept, _ = tuning.apply(table_for(val, test, config), ["cam_method"], config)
        chosen.append(kept.column("tuned_threshold").to_pylist()[0])
    assert chosen[0] == chosen[1]


def test_each_set_gets_its_own_threshold_and_no_validation_map_means_none(tmp_path):
    rng = np.random.default_rng(2)
    config = MetricsConfig(tuning_steps=10)
    sharp = table_for((rows_of("val", 6, rng), lesion_batch(rng, 6)), (rows_of("test", 4, rng), lesion_batch(rng, 4)),
                      config, method="a")
    noisy = table_for((rows_of("val", 6, rng), lesion_batch(rng, 6, blur=0.8)),
                      (rows_of("test", 4, rng), lesion_batch(rng, 4, blur=0.8)), config, method="b")
    heat, masks = lesion_batch(rng, 3)
    orphan = map_table(rows_of("test", 3, rng), masks, heat, config, model="m", seed=0, method="c",
                       layer="l", depth=1.0, map_size=16, final_layer=True, matched_layer=False)
    kept, records = tuning.apply(pa.concat_tables([sharp, noisy, orphan]), ["cam_method"], config)
    by_method = kept.drop(["heatmap"]).to_pandas().groupby("cam_method")["tuned_threshold"].first()
    assert by_method["a"] < by_method["b"] and np.isnan(by_method["c"])
    frame = kept.drop(["heatmap"]).to_pandas()
    assert frame.loc[frame["cam_method"] == "c", ["iou_tuned", "hit_tuned"]].isna().all().all()
    tuning.write_records(tmp_path / "_tuning.json", records, config)
    written = json.loads((tmp_path / "_tuning.json").read_text())
    assert written["grid"] == pytest.approx(list(np.arange(1, 10) / 10))
    assert [s["cam_method"] for s in written["sets"]] == ["a", "b", "c"]
    assert written["sets"][2]["threshold"] is None and written["sets"][2]["val_images"] == 0


def test_the_rows_have_the_study_contracts_columns_before_and_after_tuning():
    from study import maps

    rng = np.random.default_rng(0)
    config = MetricsConfig()
    whole = table_for((rows_of("val", 3, rng), lesion_batch(rng, 3)), (rows_of("test", 2, rng), lesion_batch(rng, 2)),
                      config)
    assert tuple(whole.column_names) == maps.ROW_COLUMNS
    kept, _ = tuning.apply(whole, ["cam_method"], config)
    assert tuple(kept.column_names) == maps.COLUMNS
