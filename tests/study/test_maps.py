"""The map datasets' columns (study/maps.py): one statement that the explain stage writes and the
analysis reads (tests/explain/test_tuning.py checks the rows explain makes against it)."""

from study import maps


def test_the_stored_columns_in_order():
    assert maps.COLUMNS == (
        "image_id", "model", "seed", "label", "probability", "correct", "mask_fraction", "rle_rows", "n_regions",
        "elongation", "randomized", "randomization", "stages_randomized", "randomized_from", "cam_method",
        "cam_layer", "layer_depth", "map_size", "final_layer", "matched_layer", "diff_gradcam", "ehr_auc",
        "ehr_auc_chance", "ehr_auc_oracle", "ehr_auc_norm", "ehr_auc_inputiba", "ehr_auc_inputiba_chance",
        "ehr_auc_inputiba_oracle", "ehr_auc_inputiba_norm", "energy_in_mask", "pointing_hit", "iou_otsu", "auprc",
        "auroc_pixel", "mask_fraction_scored", "cam_all_zero", "cam_constant", "spearman_to_trained",
        "ssim_to_trained", "top10_iou_to_trained", "road_morf", "road_lerf", "road_gap", "road_morf_steps",
        "road_lerf_steps", "max_sensitivity", "ssim_perturbed", "sensitivity_kept", "tuned_threshold", "iou_tuned",
        "hit_tuned", "heatmap")
    assert len(set(maps.COLUMNS)) == len(maps.COLUMNS)


def test_tuning_turns_the_rows_into_the_stored_columns():
    dropped = [c for c in maps.ROW_COLUMNS if c not in (maps.SPLIT, maps.IOU_CURVE)]
    assert maps.COLUMNS == (*dropped[:-1], *maps.TUNED, maps.HEATMAP)
    assert maps.ROW_COLUMNS[-1] == maps.COLUMNS[-1] == maps.HEATMAP


def test_a_reader_of_the_scores_gets_every_column_but_the_map():
    assert maps.SCORES == maps.COLUMNS[:-1] and maps.HEATMAP not in maps.SCORES
    assert set(maps.REQUIRED) <= set(maps.SCORES)
    assert set(maps.SIMILARITY.values()) <= set(maps.SCORES) and set(maps.METRICS) <= set(maps.SCORES)
