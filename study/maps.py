"""The columns of the map datasets (`cams/<run>/`, `sanity/<run>/`, `controls/<run>/`, `baselines/`), stated once
(torch-free): what the explain stage writes (`explain.rows`, `explain.tuning`) and what the
analysis reads (`analysis.inputs`). One row is one map of one image; every dataset has the same
columns, in this order:

    image_id, model, seed, label, probability, correct       the image and the run's prediction
    mask_fraction, rle_rows, n_regions, elongation           the lesion (training.lesions)
    randomized, randomization, stages_randomized,           which copy of the model: "none" (trained),
      randomized_from                                        "full" (fresh weights), "cascade" (the units
                                                             of training.registry.cascade_units down to
                                                             `randomized_from` re-initialised), "labels"
    cam_method, cam_layer                                    which map
    layer_depth, map_size, final_layer, matched_layer        where in the network (training.registry)
    diff_gradcam ... auroc_pixel, mask_fraction_scored,      every metric of explain.metrics
      cam_all_zero
    cam_constant                                             max = min: all-zero or flat
    spearman_to_trained, ssim_to_trained,                    a randomised map against the trained map of the
      top10_iou_to_trained                                   same image, method and layer (NaN for others)
    road_morf, road_lerf, road_gap,                          faithfulness (docs/STUDY.md §11): ROAD with the
      road_morf_steps, road_lerf_steps                       run's trained model; the per-step lists are
                                                             list<float64>, one probability per
                                                             `faithfulness.steps` entry, in order
    max_sensitivity, ssim_perturbed, sensitivity_kept        robustness (§11): max-sensitivity with the map's
                                                             own model; sensitivity_kept int64 (kept
                                                             perturbations)
    tuned_threshold, iou_tuned, hit_tuned                    IoU and hit at the threshold tuned on the
                                                             validation positives (explain.tuning)
    heatmap                                                  float16 (S, S), FixedShapeTensorArray

The faithfulness and robustness columns are NaN (lists and counts: null) where a map is not
scored for them: validation rows, layers outside `faithfulness.layers`, the cascade's maps, the
controls' robustness, `baselines/` (no classifier), a dimension turned off. Datasets written
before these columns existed lack them; readers take them when present. `controls/<run>/` holds
the faithfulness controls of one run (`CONTROLS`), scored with that run's trained model: `model`
is f"{control}@{model}", `cam_method` the control's name (the blurred copy: its map's method).

Before tuning, a batch's rows (`ROW_COLUMNS`, `explain.rows.map_table`) also carry `split`
("test" is kept, "val" tunes the threshold) and `iou_curve` (IoU at every candidate threshold),
and no tuned columns; `explain.tuning` drops both and adds the tuned ones before the heatmap.
"""

from __future__ import annotations

IMAGE = ("image_id", "model", "seed", "label", "probability", "correct")
LESION = ("mask_fraction", "rle_rows", "n_regions", "elongation")
COPY = ("randomized", "randomization", "stages_randomized", "randomized_from")
WHICH_MAP = ("cam_method", "cam_layer", "layer_depth", "map_size", "final_layer", "matched_layer")
# what `explain.metrics.score_batch` computes per map (float64; cam_all_zero bool)
METRICS = ("diff_gradcam", "ehr_auc", "ehr_auc_chance", "ehr_auc_oracle",
           "ehr_auc_norm", "ehr_auc_inputiba", "ehr_auc_inputiba_chance",
           "ehr_auc_inputiba_oracle", "ehr_auc_inputiba_norm", "energy_in_mask", "pointing_hit",
           "iou_otsu", "auprc", "auroc_pixel", "mask_fraction_scored", "cam_all_zero")
CAM_CONSTANT = "cam_constant"
# `explain.similarity`'s measures -> the column holding each
SIMILARITY = {"spearman": "spearman_to_trained", "ssim": "ssim_to_trained", "top10_iou": "top10_iou_to_trained"}
TUNED = ("tuned_threshold", "iou_tuned", "hit_tuned")
HEATMAP = "heatmap"
SPLIT = "split"  # before tuning: "val" rows tune, "test" rows are kept
IOU_CURVE = "iou_curve"  # before tuning: (K,) IoU of {h >= t_k} at the candidate thresholds

# Faithfulness and robustness (docs/STUDY.md §11), per map; NaN (lists, counts: null) where a map is
# not scored for them. road_*_steps: the positive-class probability after each step of
# `faithfulness.steps`, in order.
FAITHFULNESS = ("road_morf", "road_lerf", "road_gap", "road_morf_steps", "road_lerf_steps")
STEP_LISTS = FAITHFULNESS[3:]  # list<float64>
ROBUSTNESS = ("max_sensitivity", "ssim_perturbed", "sensitivity_kept")
KEPT = "sensitivity_kept"  # int64 (null where not scored); the other robustness columns float64

# a batch's rows as `explain.rows.map_table` makes them, before tuning
ROW_COLUMNS = (*IMAGE, *LESION, *COPY, *WHICH_MAP, SPLIT, *METRICS, CAM_CONSTANT, *SIMILARITY.values(),
               *FAITHFULNESS, *ROBUSTNESS, IOU_CURVE, HEATMAP)
# the columns of every stored map dataset, in order
COLUMNS = (*IMAGE, *LESION, *COPY, *WHICH_MAP, *METRICS, CAM_CONSTANT, *SIMILARITY.values(), *FAITHFULNESS,
           *ROBUSTNESS, *TUNED, HEATMAP)
SCORES = COLUMNS[:-1]  # every column but the map: what a reader of the scores loads
# without these a dataset is not read (the analysis lists it as malformed); the rest are read when present
REQUIRED = ("image_id", "model", "seed", "diff_gradcam", "randomized", "cam_method")

# the faithfulness controls (docs/STUDY.md §11): maps scored through the same ROAD path with a run's
# trained model; their rows name the control and the classifier, f"{control}@{model}"
CONTROLS = ("prior", "image_only", "random", "blurred")
CONTROL_SEPARATOR = "@"
