"""docs/STUDY.md §11 in the analysis: faithfulness and robustness tables against their references,
the reliability profile, the depth trend and the summary's answer per dimension, checked against
a naive recomputation from the Parquet (scipy and statsmodels called here, not through camstudy);
and a study scored before the columns existed still reports, saying they were not measured."""

from __future__ import annotations

import dataclasses
import json
import zlib
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import statsmodels.formula.api as smf
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests

from analysis import faithfulness as F
from analysis import profile as P
from analysis import report, stats
from analysis.compute import build_outputs
from analysis.conclusions import summary_items
from analysis.inputs import load_study
from study.maps import CONTROL_SEPARATOR
from study.models import REGISTRY
from study.store import StudyStore
from tests.analysis.test_report import N_POSITIVE, SyntheticStudy, config_for, mlflow_tracker

MODELS = ["resnet18", "resnet50", "vgg16"]  # ResNet: two models, a slope; VGG: one, no slope
FAITHFUL = "resnet50"  # its ROAD gap is 0.3 above its prior's and 0.1 above its blur's; ResNet-18's equals both
MARGIN = 0.02  # statistics.equivalence_margin's default


def _gap(study, model: str) -> dict[str, np.ndarray]:
    """Per image: the ROAD gap of the model's map and of each reference (known values)."""
    rng = np.random.default_rng(zlib.crc32(model.encode()))
    base = 0.1 + 0.05 * study.image_effect  # what any map of the image gets
    noise = lambda sd: rng.normal(0, sd, N_POSITIVE)  # noqa: E731
    lift = {"resnet50": 0.3, "resnet18": 0.0, "vgg16": 0.15}[model]
    trained = base + lift + noise(0.02)
    return {"trained": trained, "prior": (base if lift else trained) + noise(0.002),
            "blurred": trained - (0.1 if model == FAITHFUL else 0.0) + noise(0.002),
            "random": noise(0.02), "image_only": 0.02 + noise(0.02), "twin": noise(0.02)}


def _with_columns(table: pa.Table, gap: np.ndarray, sensitivity: np.ndarray) -> pa.Table:
    steps = pa.array([[0.5, 0.4, 0.3]] * table.num_rows, pa.list_(pa.float64()))
    morf = 0.5 - gap / 2
    for name, values in (("road_morf", morf), ("road_lerf", morf + gap), ("road_gap", gap), ("road_morf_steps", steps),
                         ("road_lerf_steps", steps), ("max_sensitivity", sensitivity),
                         ("ssim_perturbed", 1 - sensitivity), ("sensitivity_kept", np.full(table.num_rows, 10.0))):
        table = table.add_column(table.schema.get_field_index("heatmap"), name,
                                 values if isinstance(values, pa.Array) else pa.array(values, pa.float64()))
    return table


def add_section11(study, models, seeds=(0,)) -> None:
    """The explain stage's §11 columns on cams/ and sanity/, and controls/ per run."""
    root = study.root
    for model in models:
        for seed in seeds:
            key = f"{model}-seed{seed}"
            gaps = _gap(study, model)
            rng = np.random.default_rng(seed)
            trained_sensitivity = 0.2 + rng.normal(0, 0.02, N_POSITIVE)
            path = root / "cams" / key / "part-00000.parquet"
            table = pq.read_table(path)
            pq.write_table(_with_columns(table, gaps["trained"], trained_sensitivity), path)
            path = root / "sanity" / key / "part-00000.parquet"
            pq.write_table(_with_columns(pq.read_table(path), gaps["twin"], 0.5 + rng.normal(0, 0.02, N_POSITIVE)),
                           path)
            trained = pq.read_table(root / "cams" / key / "part-00000.parquet")
            parts = [trained.set_column(trained.schema.get_field_index("model"), "model",
                                        pa.array([f"{control}{CONTROL_SEPARATOR}{model}"] * trained.num_rows))
                     .set_column(trained.schema.get_field_index("road_gap"), "road_gap", pa.array(gaps[control]))
                     for control in ("prior", "image_only", "random", "blurred")]
            (root / "controls" / key).mkdir(parents=True)
            pq.write_table(pa.concat_tables(parts), root / "controls" / key / "part-00000.parquet")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("section11") / "study"
    study = SyntheticStudy(root, rng_seed=11)
    for model in MODELS:
        study.run(model, 0)
    study.baselines()
    add_section11(study, MODELS)
    config = config_for(MODELS, [0])
    inputs = load_study(StudyStore(root), config)
    outputs = build_outputs(inputs, root / "analysis-scratch")
    return SimpleNamespace(root=root, study=study, inputs=inputs, outputs=outputs, config=config)


def naive(root) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """cams/, sanity/ and controls/ as a reader would load them."""
    read = lambda folder: pd.concat([pd.read_parquet(p) for p in sorted((root / folder).glob("*/*.parquet"))])  # noqa: E731
    return read("cams"), read("sanity"), read("controls")


def test_faithfulness_and_robustness_tables_equal_the_parquet_means(measured):
    cams, _, _ = naive(measured.root)
    table = measured.outputs.tables["faithfulness"].set_index("model")
    for model, part in cams[cams["final_layer"]].groupby("model"):
        mean, lo, hi = part["road_gap"].mean(), *scipy_stats.t.interval(
            0.95, len(part) - 1, part["road_gap"].mean(), scipy_stats.sem(part["road_gap"]))
        assert table.loc[model, ["road_gap", "road_gap_lo", "road_gap_hi"]].to_numpy(float) == pytest.approx(
            [mean, lo, hi], rel=1e-9)
        assert table.loc[model, "n"] == N_POSITIVE
    robustness = measured.outputs.tables["robustness"].set_index("model")
    by_model = cams.groupby("model")["max_sensitivity"].mean()
    assert robustness.loc[by_model.index, "max_sensitivity"].to_numpy() == pytest.approx(by_model.to_numpy())


def test_the_pairs_are_wilcoxon_with_holm_per_reference_and_tost(measured):
    cams, sanity, controls = naive(measured.root)
    pairs = measured.outputs.tables["faithfulness_pairs"]
    assert list(dict.fromkeys(pairs["reference"])) == ["prior", "blurred", "random", "image_only", "randomized"]
    for reference in ("prior", "blurred", "randomized"):
        part = pairs[pairs["reference"] == reference].set_index("model")
        p_values = []
        for model in part.index:
            own = cams[cams["model"] == model].set_index("image_id")["road_gap"]
            other = (sanity[sanity["model"] == model] if reference == "randomized" else
                     controls[controls["model"] == f"{reference}@{model}"]).set_index("image_id")["road_gap"]
            difference = (own - other.reindex(own.index)).to_numpy()
            p_values.append(scipy_stats.wilcoxon(difference).pvalue)
            lo, hi = scipy_stats.t.interval(0.95, len(difference) - 1, difference.mean(), scipy_stats.sem(difference))
            assert part.loc[model, ["difference", "lo", "hi"]].to_numpy(float) == pytest.approx(
                [difference.mean(), lo, hi], rel=1e-9, abs=1e-12)
            tost = max(scipy_stats.ttest_1samp(difference, -MARGIN, alternative="greater").pvalue,
                       scipy_stats.ttest_1samp(difference, MARGIN, alternative="less").pvalue)
            assert part.loc[model, "p_tost"] == pytest.approx(tost, rel=1e-6)
        assert part["p"].to_numpy() == pytest.approx(p_values, rel=1e-9)
        assert part["p_holm"].to_numpy() == pytest.approx(multipletests(p_values, method="holm")[1], rel=1e-9)
    verdicts = pairs.set_index(["reference", "model"])["verdict"]
    assert verdicts[("prior", FAITHFUL)] == F.YES and verdicts[("blurred", FAITHFUL)] == F.YES
    assert verdicts[("prior", "resnet18")] == F.SAME and verdicts[("blurred", "resnet18")] == F.SAME
    robust = measured.outputs.tables["robustness_pairs"]
    assert set(robust["reference"]) == {"randomized"} and (robust["verdict"] == F.YES).all()


def test_the_profile_answers_each_dimension_with_its_ci(measured):
    profile = measured.outputs.tables["profile"]
    assert set(profile["model"]) == set(MODELS)
    assert set(profile["dimension"]) == set(P.DIMENSIONS)
    key = profile.set_index(["model", "question"])
    assert key.loc[(FAITHFUL, P.KEY_QUESTION["faithfulness"]), "verdict"] == F.YES
    assert key.loc[("resnet18", P.KEY_QUESTION["faithfulness"]), "verdict"] == F.SAME
    pairs = measured.outputs.tables["faithfulness_pairs"].set_index(["reference", "model"])
    row = key.loc[(FAITHFUL, P.KEY_QUESTION["faithfulness"])]
    assert [row["estimate"], row["lo"], row["hi"]] == pytest.approx(
        pairs.loc[("blurred", FAITHFUL), ["difference", "lo", "hi"]].to_numpy(float).tolist())
    auc = key.loc[(FAITHFUL, "test AUC above 0.5?")]
    assert auc["verdict"] == F.YES and auc["lo"] > 0.5
    accuracy = key.loc[(FAITHFUL, P.KEY_QUESTION["classification"])]
    table1 = measured.outputs.tables["table1"].set_index("model").loc[FAITHFUL]
    assert [accuracy["estimate"], accuracy["lo"], accuracy["hi"]] == pytest.approx(
        [table1["accuracy"], table1["accuracy_lo"], table1["accuracy_hi"]])
    # one seed, no cascade: these dimensions say why they have no number
    stability = profile[profile["dimension"] == "stability"]
    assert (stability["verdict"] == F.NOT_MEASURED).all() and stability["basis"].str.contains(">= 2").all()


def test_the_depth_trend_is_the_mixed_model_slope_on_log_parameters(measured):
    cams, _, _ = naive(measured.root)
    trend = measured.outputs.tables["depth_trend"].set_index(["family", "metric"])
    resnet = cams[cams["model"].isin(["resnet18", "resnet50"])].copy()
    resnet["x"] = np.log10(resnet["model"].map({m: REGISTRY[m].parameters_millions for m in MODELS}))
    fit = smf.mixedlm("road_gap ~ x", resnet, groups=resnet["image_id"]).fit(reml=True)
    row = trend.loc[("resnet", "road_gap")]
    assert row["slope"] == pytest.approx(fit.fe_params["x"], rel=1e-6)
    assert row["p"] == pytest.approx(fit.pvalues["x"], rel=1e-4)
    assert row["verdict"] == P.IMPROVES  # ResNet-50's gap is 0.3 above ResNet-18's
    vgg = trend.loc[("vgg", "road_gap")]
    assert vgg["verdict"] == P.NO_SLOPE and "1 valid model(s)" in vgg["note"]
    assert set(trend.index.get_level_values("family")) == {"vgg", "resnet"}  # the study's families only


def test_the_summary_opens_with_one_answer_per_dimension(measured):
    items = summary_items(measured.inputs, measured.outputs)
    answers = items[:len(P.DIMENSIONS)]
    assert all(a.startswith(P.QUESTION) for a in answers) and items[len(P.DIMENSIONS)].startswith("What ran")
    faithful = answers[P.DIMENSIONS.index("faithfulness")]
    assert faithful.startswith(f"{P.QUESTION} Faithfulness: yes in ResNet")
    assert "1 of 3 valid map sets answer 'beats its blurred copy?' yes (ResNet50)" in faithful
    assert "not measured" in answers[P.DIMENSIONS.index("stability")]
    # what ran says on how many images each dimension was scored, from its table, and flips with it
    what_ran = items[len(P.DIMENSIONS)]
    faithful_n = int(measured.outputs.tables["faithfulness"]["n"].max())
    robust_n = int(measured.outputs.tables["robustness"]["n"].max())
    assert f"(faithfulness (ROAD) on up to {faithful_n} of them, robustness on up to {robust_n} of them)" in what_ran
    tables = dict(measured.outputs.tables, faithfulness=measured.outputs.tables["faithfulness"].assign(n=3),
                  robustness=measured.outputs.tables["robustness"].iloc[:0])
    what_ran = summary_items(measured.inputs, dataclasses.replace(measured.outputs, tables=tables))[len(P.DIMENSIONS)]
    assert "(faithfulness (ROAD) on up to 3 of them)" in what_ran and "robustness on" not in what_ran


def test_the_ladder_gains_the_road_rungs(measured):
    ladder = measured.outputs.tables["ladder"]
    road = ladder[ladder["metric"] == "road_gap"]
    assert list(dict.fromkeys(road[road["model"] == FAITHFUL]["rung"])) == list(
        ("random", "image_only", "prior", "blurred", "randomized", "gradcam"))
    assert set(ladder[ladder["metric"] != "road_gap"]["rung"]) >= {"chance", "prior", "gradcam", "oracle"}
    assert (measured.outputs.directory / "figures" / "ladder_road.png").is_file()
    assert (measured.outputs.directory / "figures" / "profile.png").is_file()


# --------------------------------------------------------------------------- verdicts flip with their CI


@pytest.mark.parametrize("shift, expected", [(0.0, F.YES), (-0.2, F.WORSE), (-0.1, F.UNSURE)])
def test_a_verdict_flips_when_its_ci_moves_across_the_line(shift, expected):
    lo, hi = 0.02 + shift, 0.18 + shift  # a CI of width 0.16 slid across 0
    p = 0.001 if (lo > 0 or hi < 0) else 0.4
    assert F.verdict(lo, hi, p, 0.3, 0.05) == expected
    assert F.verdict(lo, hi, p, 0.3, 0.05, higher_is_better=False) == {F.YES: F.WORSE, F.WORSE: F.YES}.get(
        expected, expected)


def test_no_difference_needs_the_tost_and_yes_needs_both_the_test_and_the_ci():
    assert F.verdict(-0.01, 0.01, 0.8, 0.001, 0.05) == F.SAME
    assert F.verdict(-0.01, 0.01, 0.8, 0.2, 0.05) == F.UNSURE
    assert F.verdict(0.01, 0.05, 0.2, 0.2, 0.05) == F.UNSURE  # the CI clears 0 but Holm does not reject
    assert P.trend_verdict(0.01, -0.005, 0.025, 0.2, 0.01, 0.05, higher=True) == P.FLAT
    assert P.trend_verdict(0.05, 0.02, 0.08, 0.001, np.nan, 0.05, higher=False) == P.WORSENS


def _tables(verdict_b: str, trend_verdict: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    question = P.KEY_QUESTION["faithfulness"]
    profile = pd.DataFrame([
        {"model": "resnet18", "dimension": "faithfulness", "question": question, "verdict": F.YES, "basis": ""},
        {"model": "resnet50", "dimension": "faithfulness", "question": question, "verdict": verdict_b, "basis": ""}])
    trend = pd.DataFrame([{"family": "resnet", "dimension": "faithfulness", "metric": "road_gap",
                           "verdict": trend_verdict, "slope": 0.1, "lo": 0.05, "hi": 0.15, "margin": MARGIN}])
    return profile, trend


def test_the_summary_line_flips_when_its_table_flips():
    line = lambda profile, trend: P.answer_lines(profile, trend)[P.DIMENSIONS.index("faithfulness")]  # noqa: E731
    up = line(*_tables(F.YES, P.IMPROVES))
    assert "Faithfulness: yes in ResNet" in up and "2 of 2 valid map sets" in up
    down = line(*_tables(F.UNSURE, P.WORSENS))
    assert "Faithfulness: no, the opposite in ResNet" in down and "1 of 2 valid map sets" in down
    flat = line(*_tables(F.YES, P.FLAT))
    assert "no trend with size in any family with a slope" in flat and f"within ±{MARGIN}" in flat
    missing = P.answer_lines(pd.DataFrame([{"model": "resnet18", "dimension": "faithfulness",
                                            "question": P.KEY_QUESTION["faithfulness"], "verdict": F.NOT_MEASURED,
                                            "basis": "the map datasets have no road_gap column"}]), None)
    assert missing[P.DIMENSIONS.index("faithfulness")].endswith(
        "Faithfulness: not measured in this study (the map datasets have no road_gap column).")


# --------------------------------------------------------------------------- the slope with several seeds


def test_the_several_seed_slope_equals_the_crossed_mixed_model():
    """Images crossed with runs: the closed form against statsmodels' variance-component REML fit."""
    rng = np.random.default_rng(5)
    images, rows = 25, []
    image_effect = rng.normal(0, 0.3, images)
    for model, x in (("a", 1.0), ("b", 1.4), ("c", 2.0)):
        for seed in range(2):
            run = rng.normal(0, 0.05)
            rows += [{"model": model, "seed": seed, "image_id": f"i{i}", "x": x,
                      "y": 0.1 * x + image_effect[i] + run + rng.normal(0, 0.1)} for i in range(images)]
    data = pd.DataFrame(rows)
    ours = stats.slope_mixed_model(data, "y", "x")
    data["run"] = data["model"] + data["seed"].astype(str)
    model = smf.mixedlm("y ~ x", data, groups=np.ones(len(data)), re_formula="0",
                        vc_formula={"image": "0 + C(image_id)", "run": "0 + C(run)"})
    fit = model.fit(reml=True)
    assert ours["runs"] == 6 and ours["df"] == 4
    assert ours["slope"] == pytest.approx(fit.fe_params["x"], rel=1e-6)
    assert ours["se"] == pytest.approx(fit.bse_fe["x"], rel=0.02)


# --------------------------------------------------------------------------- a study scored before §11


def test_a_study_without_the_columns_reports_them_not_measured(tmp_path):
    study = SyntheticStudy(tmp_path / "study", rng_seed=12)
    for model in MODELS:
        study.run(model, 0)
    inputs = load_study(StudyStore(study.root), config_for(MODELS, [0]))
    outputs = build_outputs(inputs, study.root / "scratch")
    assert inputs.controls.empty
    assert not {"faithfulness", "faithfulness_pairs", "robustness", "robustness_pairs"} & set(outputs.tables)
    assert not (outputs.tables["ladder"]["metric"] == "road_gap").any()
    profile = outputs.tables["profile"]
    for dimension in ("faithfulness", "robustness"):
        rows = profile[profile["dimension"] == dimension]
        assert (rows["verdict"] == F.NOT_MEASURED).all() and rows["estimate"].isna().all()
    trend = outputs.tables["depth_trend"]
    assert (trend[trend["metric"] == "road_gap"]["verdict"] == F.NOT_MEASURED).all()
    assert trend[(trend["family"] == "resnet") & (trend["metric"] == "auprc")]["slope"].notna().all()
    items = summary_items(inputs, outputs)
    assert "Faithfulness: not measured in this study (the map datasets have no road_gap column: " in items[2]
    assert "Robustness: not measured" in items[4]
    assert "road_gap_mean" not in outputs.run_summary


@pytest.mark.slow  # the whole analysis with MLflow
def test_mlflow_children_get_the_per_run_means(tmp_path):
    study = SyntheticStudy(tmp_path / "study", rng_seed=13)
    for model in MODELS:
        study.run(model, 0)
    add_section11(study, MODELS)
    tracker, children = mlflow_tracker(tmp_path, [f"{m}-seed0" for m in MODELS])
    path = report.analyze(StudyStore(study.root), config_for(MODELS, [0]), tracker=tracker)
    cams, _, _ = naive(study.root)
    for model in MODELS:
        metrics = tracker.client.get_run(children[f"{model}-seed0"]).data.metrics
        part = cams[cams["model"] == model]
        assert metrics["faithfulness/road_gap_mean"] == pytest.approx(part["road_gap"].mean())
        assert metrics["robustness/max_sensitivity_mean"] == pytest.approx(part["max_sensitivity"].mean())
    text = path.read_text()
    for name in ("profile", "depth_trend", "faithfulness", "faithfulness_pairs", "robustness_pairs"):
        assert f"id='table-{name}'" in text, name
    assert json.loads((study.root / "analysis" / "statistics.json").read_text())["comparisons"]


# --------------------------------------------------------------------------- degenerate sets and several seeds


def test_a_degenerate_map_set_is_flagged_and_left_out_of_every_comparison(tmp_path):
    study = SyntheticStudy(tmp_path / "study", rng_seed=14)
    for model in MODELS:
        study.run(model, 0, all_zero=model == "vgg16")
    add_section11(study, MODELS)
    inputs = load_study(StudyStore(study.root), config_for(MODELS, [0]))
    outputs = build_outputs(inputs, study.root / "scratch")
    flags = outputs.tables["faithfulness"].set_index("model")["degenerate"]
    assert flags["vgg16"] and not flags["resnet18"] and not flags["resnet50"]
    for name in ("faithfulness_pairs", "robustness_pairs", "profile"):
        assert set(outputs.tables[name]["model"]) == {"resnet18", "resnet50"}, name
    trend = outputs.tables["depth_trend"].set_index(["family", "metric"])
    assert trend.loc[("vgg", "road_gap"), "verdict"] == P.NO_SLOPE
    assert trend.loc[("vgg", "road_gap"), "note"].startswith("0 valid model(s) of the VGG family")
    answers = " ".join(summary_items(inputs, outputs)[:len(P.DIMENSIONS)])
    assert "VGG16" not in answers
    road = outputs.tables["ladder"][outputs.tables["ladder"]["metric"] == "road_gap"]
    assert (road[road["model"] == "vgg16"]["degenerate"] != "").all()  # drawn hollow and grey


def test_several_seeds_use_the_bootstrap_the_crossed_slope_and_repeatability(tmp_path):
    models = ["resnet18", "resnet50"]
    study = SyntheticStudy(tmp_path / "study", rng_seed=15, run_sd=0.01)
    for model in models:
        for seed in (0, 1):
            study.run(model, seed)
    add_section11(study, models, seeds=(0, 1))
    inputs = load_study(StudyStore(study.root), config_for(models, [0, 1]))
    outputs = build_outputs(inputs, study.root / "scratch")
    table = outputs.tables["faithfulness"].set_index("model")
    assert (table["seeds"] == 2).all() and table["ci_method"].str.startswith("hierarchical bootstrap").all()
    scores = pd.read_parquet(outputs.scores_path)
    model_rows = scores[(scores["level"] == "model")].set_index("model")
    for model in models:  # one CI per quantity: the table's equals scores.parquet's model row
        assert table.loc[model, ["road_gap", "road_gap_lo", "road_gap_hi"]].to_numpy(float) == pytest.approx(
            model_rows.loc[model, ["road_gap", "road_gap_lo", "road_gap_hi"]].to_numpy(float))
    controls = scores[scores["set"] == "control"]
    assert len(controls) == 4 * 2 * len(models) and controls["model"].str.contains("@").all()
    trend = outputs.tables["depth_trend"].set_index(["family", "metric"]).loc[("resnet", "road_gap")]
    assert trend["runs"] == 4 and trend["method"].startswith("balanced-design")
    stability = outputs.tables["profile"][outputs.tables["profile"]["dimension"] == "stability"]
    assert stability["estimate"].notna().all() and set(stability["model"]) == set(models)


def test_control_rows_name_the_classifier_and_keep_the_papers_layer():
    controls = pd.DataFrame({"model": ["prior@resnet18", "blurred@resnet18", "blurred@resnet18", "random@vgg16"],
                             "final_layer": [None, True, False, True], "cam_method": ["prior", "gradcam", "gradcam", "x"],
                             "seed": [0, 0, 0, 0]})
    found = F.control_rows(controls, "gradcam")
    assert sorted(found) == ["blurred", "prior", "random"]
    assert found["prior"]["model"].tolist() == ["resnet18"] and len(found["blurred"]) == 1
    assert found["random"]["model"].tolist() == ["vgg16"]


def test_a_slope_that_cannot_be_fitted_is_a_row_saying_why():
    data = pd.DataFrame({"model": ["a", "b"], "seed": [0, 0], "image_id": ["i", "i"], "x": [1.0, 2.0], "y": [0.1, 0.2]})
    fit = stats.slope_mixed_model(data, "y", "x")
    assert np.isnan(fit["slope"]) and fit["note"].startswith("the mixed model could not be fitted")
