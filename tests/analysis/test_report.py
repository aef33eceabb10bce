"""The analyze stage on synthetic study stores written in the stage contract's exact format."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from analysis import report, stats
from analysis.inputs import load_study, model_table
from training.classification import classification_report
from study.config import StudyConfig, build
from study.models import REGISTRY
from study.store import StudyStore

SIZE = 16  # cache and heatmap side, pixels
N_POSITIVE = 60
SHIFTED, SHIFT = "resnet50", 0.2
MODELS = ["vit_small", "resnet18", "vgg16", "resnet50"]  # deliberately not in plot order
THRESHOLD = StudyConfig().training.threshold  # the decision threshold the studies here are analysed at


def config_for(models, seeds) -> StudyConfig:
    """The study's typed config (`baselines.enabled` off: a study writes its baselines only when asked)."""
    return build(StudyConfig, {"study": "synthetic", "models": {"names": list(models), "init": "random"},
                               "training": {"seeds": list(seeds)},
                               "cam": {"methods": ["gradcam"], "images": "positives"},
                               "preprocess": {"image_size": SIZE}, "baselines": {"enabled": False}}, "")


class SyntheticStudy:
    """Writes a study store: manifest, cache, and per run predictions, metrics and CAM rows."""

    def __init__(self, root: Path, rng_seed: int = 0, run_sd: float = 0.0):
        self.root, self.rng, self.run_sd = root, np.random.default_rng(rng_seed), run_sd  # run_sd: seed-to-seed SD
        self.ids = [f"img{i:03d}" for i in range(2 * N_POSITIVE)]
        self.labels = np.r_[np.ones(N_POSITIVE, int), np.zeros(N_POSITIVE, int)]
        self.fraction = self.rng.uniform(0.01, 0.05, N_POSITIVE)
        self.image_effect = self.rng.normal(0.15, 0.2, N_POSITIVE)
        self.regions = self.rng.integers(1, 4, N_POSITIVE)
        self.elongation = self.rng.uniform(1, 6, N_POSITIVE)
        self.masks = self._masks()
        self._write_data()

    def _masks(self) -> np.ndarray:
        masks = np.zeros((2 * N_POSITIVE, SIZE, SIZE), np.uint8)
        for i in range(N_POSITIVE):
            r, c = self.rng.integers(2, SIZE - 6, 2)
            masks[i, r:r + 4, c:c + 3] = 1
        return masks

    def _write_data(self) -> None:
        data = self.root / "data"
        (data / "cache").mkdir(parents=True)
        manifest = pd.DataFrame({"image_id": self.ids, "split": "test", "label": self.labels,
                                 "mask_rle": "-1", "mask_fraction": np.r_[self.fraction, np.zeros(N_POSITIVE)]})
        manifest.to_parquet(data / "manifest.parquet")
        (data / "report.json").write_text(json.dumps({"images": len(self.ids), "unlabelled": 0}))
        np.save(data / "cache" / "images.npy", self.rng.normal(0, 1, (len(self.ids), SIZE, SIZE)).astype(np.float16))
        np.save(data / "cache" / "masks.npy", self.masks)
        index = manifest.assign(row=np.arange(len(self.ids)))
        index[["row", "image_id", "split", "label", "mask_fraction"]].to_parquet(data / "cache" / "index.parquet")

    def run(self, model: str, seed: int, done: bool = True, cams: bool = True, all_zero: bool = False,
            classifier_works: bool = True, matched: bool = False) -> None:
        """One run; `matched`: ResNets also get rows at layer3.-1, the resolution-matched layer,
        where the shifted model is not shifted (its effect lives in the 7x7 layer only)."""
        key = f"{model}-seed{seed}"
        train = self.root / "train" / key
        train.mkdir(parents=True)
        signal = 0.35 if classifier_works else -0.05  # -0.05: a classifier slightly worse than chance
        probability = np.clip(self.labels * signal + 0.05 + self.rng.uniform(0, 0.6, len(self.ids)), 0, 1)
        pd.DataFrame({"image_id": self.ids, "label": self.labels, "probability": probability}).to_parquet(
            train / "predictions.parquet")
        metrics = classification_report(self.labels, probability, threshold=THRESHOLD)
        (train / "test_metrics.json").write_text(json.dumps(metrics))
        if done:
            (train / "done.json").write_text("{}")
        if cams:
            self._cams(model, seed, probability[:N_POSITIVE], all_zero, matched and model.startswith("resnet"))

    def _cams(self, model: str, seed: int, probability: np.ndarray, all_zero: bool = False,
              matched: bool = False) -> None:
        run_effect = self.rng.normal(0, self.run_sd) if self.run_sd else 0.0
        shift = SHIFT if model == SHIFTED else 0.0
        trained = self.image_effect + shift + run_effect + self.rng.normal(0, 0.05, N_POSITIVE)
        randomized = self.rng.normal(0.0, 0.05, N_POSITIVE)
        if all_zero:
            trained = np.zeros(N_POSITIVE)
        resnet = model.startswith("resnet")
        final = dict(layer=REGISTRY[model].target_layer, size=7 if resnet else 14, depth=0.95, final=True,
                     matched=not resnet)
        layer3 = dict(layer="layer3.-1", size=14, depth=0.7, final=False, matched=True)
        for diff, flag, folder in ((randomized, True, "sanity"), (trained, False, "cams")):  # the store's layout
            out = self.root / folder / f"{model}-seed{seed}"
            out.mkdir(parents=True)
            zero = all_zero and not flag
            parts = [self._cam_table(model, seed, probability, diff, flag, zero, final)]
            if matched:
                unshifted = diff - (0 if flag else shift) + self.rng.normal(0, 0.05, N_POSITIVE)
                parts.append(self._cam_table(model, seed, probability, unshifted, flag, zero, layer3))
            pq.write_table(pa.concat_tables(parts), out / "part-00000.parquet")
        (self.root / "cams" / f"{model}-seed{seed}" / "_done.json").write_text("{}")

    def baselines(self) -> None:
        """baselines/: a location prior whose Diff_GradCAM follows the images like the models'
        (so only the shifted model beats it) and an image-only map near zero."""
        out = self.root / "baselines"
        out.mkdir(parents=True)
        prior = self.image_effect + self.rng.normal(0, 0.05, N_POSITIVE)
        edges = self.rng.normal(0.02, 0.05, N_POSITIVE)
        layer = dict(layer="", size=SIZE, depth=np.nan, final=True, matched=False)
        parts = [self._cam_table(name, None, np.full(N_POSITIVE, np.nan), diff, False, False, layer, method=name)
                 for name, diff in (("prior", prior), ("image_only", edges))]
        pq.write_table(pa.concat_tables(parts), out / "part-00000.parquet")
        (out / "_done.json").write_text("{}")

    def _cam_table(self, model, seed, probability, diff, randomized, all_zero=False, layer=None,
                   method="gradcam") -> pa.Table:
        layer = layer or dict(layer="layer4.-1", size=7, depth=0.95, final=True, matched=False)
        f = self.fraction
        ehr = f / 200 if all_zero else f * (1 + 4 * np.clip(diff, 0, None))  # all-zero: f/(2n) = its chance
        oracle = np.full(N_POSITIVE, 0.99)
        noise = self.rng.uniform(0, 0.3, (N_POSITIVE, SIZE, SIZE))
        heat = np.zeros_like(noise) if all_zero else np.clip(self.masks[:N_POSITIVE] * diff[:, None, None] + noise, 0, 1)
        columns = {"image_id": self.ids[:N_POSITIVE], "model": [model] * N_POSITIVE, "seed": [seed] * N_POSITIVE,
                   "label": np.ones(N_POSITIVE, int), "probability": probability, "correct": probability >= THRESHOLD,
                   "mask_fraction": f, "diff_gradcam": diff,
                   "ehr_auc": ehr, "ehr_auc_chance": f / 200 if all_zero else f, "ehr_auc_oracle": oracle,
                   "ehr_auc_norm": np.zeros(N_POSITIVE) if all_zero else (ehr - f) / (oracle - f), "ehr_auc_inputiba": ehr * 0.8,
                   "ehr_auc_inputiba_chance": f * 0.8, "ehr_auc_inputiba_oracle": oracle * 0.9,
                   "ehr_auc_inputiba_norm": (ehr - f) * 0.8 / (oracle * 0.9 - f * 0.8),
                   "energy_in_mask": np.clip(f + diff / 4, 0, 1), "pointing_hit": diff > 0.2,
                   "iou_otsu": np.clip(diff / 2, 0, 1),
                   "auprc": np.clip(f + diff / 2, 0, 1), "auroc_pixel": np.clip(0.5 + diff, 0, 1),
                   "mask_fraction_scored": f, "iou_tuned": np.clip(diff / 2, 0, 1),
                   "hit_tuned": (np.clip(diff / 2, 0, 1) >= 0.1).astype(float), "tuned_threshold": np.full(N_POSITIVE, 0.5),
                   "rle_rows": self.regions.astype(float), "n_regions": self.regions, "elongation": self.elongation,
                   "cam_all_zero": np.full(N_POSITIVE, all_zero), "cam_constant": np.full(N_POSITIVE, all_zero),
                   "cam_method": [method] * N_POSITIVE, "cam_layer": [layer["layer"]] * N_POSITIVE,
                   "layer_depth": np.full(N_POSITIVE, layer["depth"]), "map_size": np.full(N_POSITIVE, layer["size"]),
                   "final_layer": np.full(N_POSITIVE, layer["final"]), "matched_layer": np.full(N_POSITIVE, layer["matched"]),
                   "randomized": [randomized] * N_POSITIVE}
        table = pa.table(columns).set_column(2, "seed", pa.array([seed] * N_POSITIVE, pa.int64()))
        return table.append_column("heatmap", pa.FixedShapeTensorArray.from_numpy_ndarray(heat.astype(np.float16)))


def shifted_pairs(models) -> set[str]:
    order = model_table(models)["model"].tolist()
    return {f"{a} vs {b}" for i, a in enumerate(order) for b in order[i + 1:] if SHIFTED in (a, b)}


def mlflow_tracker(tmp: Path, run_keys):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.create_experiment("camstudy-test", artifact_location=(tmp / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="synthetic").info.run_id
    children = {key: client.create_run(experiment, run_name=key, tags={"mlflow.parentRunId": parent}).info.run_id
                for key in run_keys}
    tracker = SimpleNamespace(client=client, parent_run=lambda: parent, current_children=lambda: children,
                              call=lambda action, *args: action(*args))
    return tracker, children


@pytest.fixture(scope="module")
def single_seed(tmp_path_factory):
    root = tmp_path_factory.mktemp("single") / "study"
    study = SyntheticStudy(root)
    for model in MODELS:
        study.run(model, 0, matched=True)
    study.baselines()
    tracker, children = mlflow_tracker(root.parent, [f"{m}-seed0" for m in MODELS])
    path = report.analyze(StudyStore(root), config_for(MODELS, [0]), tracker=tracker)
    return SimpleNamespace(root=root, report=path, tracker=tracker, children=children)


def statistics(root: Path) -> dict:
    return json.loads((root / "analysis" / "statistics.json").read_text())


@pytest.mark.slow  # the whole analysis of a four-model study (module fixture)
def test_single_seed_detects_exactly_the_shifted_model(single_seed):
    comparison = statistics(single_seed.root)["comparisons"]["diff_gradcam"]
    assert set(comparison["significant_pairs"]) == shifted_pairs(MODELS)
    block = pd.DataFrame(comparison["block_tukey"])
    shifted = block[(block["group1"] == SHIFTED) | (block["group2"] == SHIFTED)]
    assert shifted["meandiff"].abs().to_numpy() == pytest.approx(SHIFT, abs=0.05)
    assert comparison["paper"]["anova"]["p"] < 1e-6
    estimates = pd.DataFrame(comparison["mixed_model"]["estimates"])
    assert estimates["model"].tolist() == ["vgg16", "resnet18", "resnet50", "vit_small"]  # family, then depth


@pytest.mark.slow
def test_report_is_self_contained_and_holds_every_table(single_seed):
    text = single_seed.report.read_text()
    assert single_seed.report == single_seed.root / "analysis" / "report.html"
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", text)
    assert text.count("data:image/png;base64,") >= 5
    for csv in (single_seed.root / "analysis" / "tables").glob("*.csv"):
        if csv.stem != "run_summary":
            assert f"id='table-{csv.stem}'" in text, csv.stem
    for heading in ("1. Setup", "2. Data", "Table 1", "Table 2", "chance level", "the paper's analysis",
                    "paired analysis", "14. Conclusions"):
        assert heading in text
    assert "Missing or incomplete inputs" not in text


@pytest.mark.slow
def test_tables_sit_beside_the_paper_values(single_seed):
    tables = single_seed.root / "analysis" / "tables"
    table1 = pd.read_csv(tables / "table1.csv").set_index("model")
    assert table1.loc["resnet50", "paper_accuracy"] == pytest.approx(0.882)
    row = table1.loc["resnet50"]
    assert row["accuracy_lo"] < row["accuracy"] < row["accuracy_hi"]
    table2 = pd.read_csv(tables / "table2.csv").set_index("model")
    assert table2.loc["vgg16", "paper_mean"] == pytest.approx(0.186)
    ehr = pd.read_csv(tables / "ehr.csv").set_index("model")
    assert ehr.loc["resnet18", "paper_ehr_exact"] == False  # noqa: E712 - a rough §4.3 value
    assert ehr.loc["vgg16", "paper_ehr_auc"] == pytest.approx(0.0243)
    sanity = pd.read_csv(tables / "sanity.csv")
    assert set(sanity["model"]) == set(MODELS) and sanity["reject"].all()


@pytest.mark.slow
def test_mlflow_logging_on_parent_and_children(single_seed):
    client, parent = single_seed.tracker.client, single_seed.tracker.parent_run()
    logged = {a.path for a in client.list_artifacts(parent, "analysis")}
    assert {"analysis/report.html", "analysis/statistics.json", "analysis/tables", "analysis/figures"} <= logged
    tables = {Path(a.path).name for a in client.list_artifacts(parent, "analysis/tables")}
    assert {"table1.json", "table2.json", "ehr.json", "diff_gradcam_block_tukey.json"} <= tables
    assert "stats/diff_gradcam_mixed_model_p" in client.get_run(parent).data.metrics
    for key, run_id in single_seed.children.items():
        metrics = client.get_run(run_id).data.metrics
        assert {f"cam/{k}" for k in report.tables.RUN_SUMMARY} <= set(metrics), key
    shifted = client.get_run(single_seed.children[f"{SHIFTED}-seed0"]).data.metrics["cam/diff_gradcam_mean"]
    other = client.get_run(single_seed.children["vgg16-seed0"]).data.metrics["cam/diff_gradcam_mean"]
    assert shifted - other == pytest.approx(SHIFT, abs=0.05)


@pytest.mark.slow
def test_the_parent_and_children_describe_the_study_in_mlflow(single_seed):
    """The parent's description is the report's summary and a table of the runs (also logged as a
    table); each child's names its model, seed, recipe and map-set status."""
    client, parent = single_seed.tracker.client, single_seed.tracker.parent_run()
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert note.startswith("- Is Grad-CAM more reliable for deeper networks? Classification: ")
    assert "\n- What ran: " in note and "Classifiers that rank above chance" in note
    header = "| run | AUC [95% CI] | accuracy | sensitivity | specificity | AUPRC | vs location prior (AUPRC) | degenerate |"
    assert header in note and all(f"| {key} |" in note for key in single_seed.children)
    tables = {Path(a.path).name for a in client.list_artifacts(parent, "analysis/tables")}
    assert "runs.json" in tables
    for key, run_id in single_seed.children.items():
        text = client.get_run(run_id).data.tags["mlflow.note.content"]
        assert text.endswith("map set at the paper's layer: valid"), text


@pytest.mark.slow
def test_the_summary_is_written_as_markdown_under_its_build_and_machine(single_seed):
    """analysis/summary.md, which the README quotes: the report's summary sentences, generated, under
    the commit and machine that produced them."""
    from analysis.conclusions import summary_items
    from analysis.compute import build_outputs
    from analysis.inputs import load_study

    text = (single_seed.root / "analysis" / "summary.md").read_text()
    head, _, body = text.partition("\n\n")
    assert re.fullmatch(r"Generated by camstudy \S+ on a \d+-core \S+ \S+, Python [\d.]+, \d{4}-\d\d-\d\d, "
                        r"from the study `\S+` \(analysis/summary.md\)\.", head), head
    inputs = load_study(StudyStore(single_seed.root), config_for(MODELS, [0]))
    outputs = build_outputs(inputs, single_seed.root / "scratch-summary")
    assert body.splitlines() == [f"- {item}" for item in summary_items(inputs, outputs)]


@pytest.mark.slow
def test_a_rerun_replaces_the_logged_tables(single_seed, tmp_path):
    client, parent = single_seed.tracker.client, single_seed.tracker.parent_run()
    table1 = pd.read_csv(single_seed.root / "analysis" / "tables" / "table1.csv")
    outputs = report.AnalysisOutputs(directory=single_seed.root / "analysis", tables={"table1": table1})
    report.log_to_mlflow(client, parent, {}, outputs)  # MLflow's log_table alone would append the rows
    logged = Path(client.download_artifacts(parent, "analysis/tables/table1.json", str(tmp_path)))
    assert len(json.loads(logged.read_text())["data"]) == len(MODELS)


@pytest.mark.slow  # the whole analysis of nine runs
def test_three_seeds_make_the_run_the_unit(tmp_path):
    models = MODELS[1:]  # three models keep this test short
    study = SyntheticStudy(tmp_path / "study", rng_seed=1, run_sd=0.01)
    for model in models:
        for seed in range(3):
            study.run(model, seed)
    report.analyze(StudyStore(study.root), config_for(models, [0, 1, 2]))
    comparison = statistics(study.root)["comparisons"]["diff_gradcam"]
    assert comparison["seeds_per_model"] == 3
    assert comparison["trusted_basis"].startswith("run-level")
    assert set(comparison["significant_pairs"]) == shifted_pairs(models)
    crossed = comparison["crossed"]
    assert crossed["variance"]["run"] < 0.01 < crossed["variance"]["image"]
    assert len(comparison["run_level"]["runs"]) == 9
    table1 = pd.read_csv(study.root / "analysis" / "tables" / "table1.csv")
    assert table1["seeds"].eq(3).all() and table1["accuracy_sd"].notna().all()


@pytest.mark.slow  # the whole analysis of four runs
def test_missing_inputs_give_a_report_section_not_a_crash(tmp_path):
    models = MODELS + ["vit_base"]
    study = SyntheticStudy(tmp_path / "study", rng_seed=2)
    study.run("vgg16", 0, done=False)  # a failed run: no done.json
    study.run("vit_base", 0, cams=False)  # finished, never explained
    for model in ("resnet18", "resnet50", "vit_small"):
        study.run(model, 0)
    config = config_for(models + ["resnet101"], [0])  # resnet101 never started
    path = report.analyze(StudyStore(study.root), config)
    text = path.read_text()
    assert "Missing or incomplete inputs" in text
    for fragment in ("vgg16-seed0: training did not finish", "vit_base-seed0: no finished CAM output",
                     "resnet101-seed0: no training run"):
        assert fragment in text
    comparison = statistics(study.root)["comparisons"]["diff_gradcam"]
    assert set(comparison["significant_pairs"]) == shifted_pairs(["resnet18", "resnet50", "vit_small"])
    table1 = pd.read_csv(study.root / "analysis" / "tables" / "table1.csv")
    assert set(table1["model"]) == {"resnet18", "resnet50", "vit_small", "vit_base"}


def test_a_store_without_any_cams_still_reports(tmp_path):
    study = SyntheticStudy(tmp_path / "study", rng_seed=3)
    study.run("resnet18", 0, cams=False)
    path = report.analyze(StudyStore(study.root), config_for(["resnet18"], [0]))
    text = path.read_text()
    assert "Missing or incomplete inputs" in text and "Table 1" in text
    assert statistics(study.root)["comparisons"] == {}


def test_load_study_ignores_unfinished_runs(tmp_path):
    study = SyntheticStudy(tmp_path / "study", rng_seed=4)
    study.run("resnet18", 0)
    study.run("resnet50", 0, done=False)
    inputs = load_study(StudyStore(study.root), config_for(["resnet18", "resnet50"], [0]))
    assert set(inputs.cams["model"]) == {"resnet18"} and set(inputs.predictions["model"]) == {"resnet18"}
    assert "heatmap" not in inputs.cams.columns
    assert stats.levels(inputs.cams["model"]) == ["resnet18"]


# --- docs/STUDY.md §8: degenerate map sets are named and left out ------------------------------------

ALL_ZERO, NO_CLASSIFIER = "vgg16", "vit_small"


@pytest.fixture(scope="module")
def degenerate(tmp_path_factory):
    """Four models: VGG16's maps are all zero, ViT-S's classifier is worse than chance."""
    root = tmp_path_factory.mktemp("degenerate") / "study"
    study = SyntheticStudy(root, rng_seed=3)
    for model in MODELS:
        study.run(model, 0, all_zero=model == ALL_ZERO, classifier_works=model != NO_CLASSIFIER)
    tracker, children = mlflow_tracker(root.parent, [f"{m}-seed0" for m in MODELS])
    path = report.analyze(StudyStore(root), config_for(MODELS, [0]), tracker=tracker)
    return SimpleNamespace(root=root, report=path, inputs=load_study(StudyStore(root), config_for(MODELS, [0])),
                           tracker=tracker, children=children)


@pytest.mark.slow  # the whole analysis of a four-model study (module fixture)
def test_mlflow_children_carry_the_degenerate_flag(degenerate):
    client = degenerate.tracker.client
    note = client.get_run(degenerate.children[f"{ALL_ZERO}-seed0"]).data.tags["mlflow.note.content"]
    assert "degenerate (" in note and "left out of every comparison" in note
    for model in MODELS:
        run = client.get_run(degenerate.children[f"{model}-seed0"])
        flagged = model in (ALL_ZERO, NO_CLASSIFIER)
        assert run.data.metrics["cam/degenerate"] == float(flagged)
        assert (run.data.tags["camstudy.degenerate"] != "false") == flagged
    logged = {a.path for a in client.list_artifacts(degenerate.tracker.parent_run(), "analysis")}
    assert "analysis/scores.parquet" in logged


@pytest.mark.slow
def test_degenerate_sets_are_listed_with_their_reasons(degenerate):
    excluded = {row["model"]: row for row in statistics(degenerate.root)["excluded"]}
    assert set(excluded) == {ALL_ZERO, NO_CLASSIFIER}
    assert excluded[ALL_ZERO]["reason"] == f"{N_POSITIVE} of {N_POSITIVE} maps are all-zero or constant"
    assert excluded[NO_CLASSIFIER]["reason"].startswith("classifier not shown to work (test AUC 0.")
    assert {k: excluded[ALL_ZERO][k] for k in ("seed", "method", "layer")} == {
        "seed": 0, "method": "gradcam", "layer": REGISTRY[ALL_ZERO].target_layer}
    table2 = pd.read_csv(degenerate.root / "analysis" / "tables" / "table2.csv", keep_default_na=False)
    flags = dict(zip(table2["model"], table2["degenerate"]))
    assert flags[ALL_ZERO] and flags[NO_CLASSIFIER] and not flags["resnet18"] and not flags[SHIFTED]


@pytest.mark.slow
def test_degenerate_sets_appear_in_no_comparison_or_conclusion(degenerate):
    from analysis.compute import build_outputs
    from analysis.conclusions import conclusions

    stats_json = statistics(degenerate.root)
    valid = {"resnet18", SHIFTED}
    for metric, comparison in stats_json["comparisons"].items():
        assert {row["model"] for row in comparison["mixed_model"]["estimates"]} == valid, metric
        pairs = {row[k] for row in comparison["block_tukey"] for k in ("group1", "group2")}
        assert pairs == valid, metric
    # the paper's own analysis is still shown over every model, as the paper did it
    assert {row[k] for row in stats_json["paper_all_models"]["diff_gradcam"]["tukey"]
            for k in ("group1", "group2")} == set(MODELS)
    sanity = pd.read_csv(degenerate.root / "analysis" / "tables" / "sanity.csv")
    assert set(sanity["model"]) == valid
    outputs = build_outputs(degenerate.inputs, degenerate.root / "scratch")
    sentences = " ".join(conclusions(degenerate.inputs, outputs))
    for model in (ALL_ZERO, NO_CLASSIFIER):
        from analysis.figures import label
        assert label(model) not in sentences


@pytest.mark.slow
def test_the_quoted_chance_level_is_the_mean_over_valid_sets(degenerate):
    """Recomputed from the Parquet by hand: per valid model, the mean chance over its images."""
    cams = pd.concat([pd.read_parquet(p) for p in (degenerate.root / "cams").glob("*/*.parquet")])
    valid = cams[cams["model"].isin(["resnet18", SHIFTED])]
    expected = valid.groupby("model")["ehr_auc_chance"].mean().mean()
    quoted = re.search(r"the chance level \(mean over the 2 valid map sets\) is (0\.\d{4})",
                       degenerate.report.read_text())
    assert quoted and float(quoted.group(1)) == pytest.approx(expected, abs=5e-5)
    assert abs(cams["ehr_auc_chance"].groupby(cams["model"]).mean().mean() - expected) > 1e-4  # it matters here


@pytest.mark.slow
def test_a_naive_read_of_cams_and_scores_parquet_give_table2(degenerate):
    naive = pd.concat([pd.read_parquet(p) for p in (degenerate.root / "cams").glob("*/*.parquet")])
    assert not naive["randomized"].any()  # cams/ holds trained maps only
    by_model = naive.groupby("model")["diff_gradcam"].mean()
    table2 = pd.read_csv(degenerate.root / "analysis" / "tables" / "table2.csv").set_index("model")["mean"]
    pd.testing.assert_series_equal(by_model.sort_index(), table2.sort_index(), check_names=False)
    scores = pd.read_parquet(degenerate.root / "analysis" / "scores.parquet")
    trained = scores[(scores["set"] == "trained") & (scores["level"] == "run")].set_index("model")
    pd.testing.assert_series_equal(trained["diff_gradcam"].sort_index(), table2.sort_index(), check_names=False)
    assert set(trained.index[trained["degenerate"]]) == {ALL_ZERO, NO_CLASSIFIER}
    assert set(scores["set"]) == {"trained", "randomized"} and {"diff_gradcam_lo", "diff_gradcam_hi"} <= set(scores)
    model_level = scores[scores["level"] == "model"].set_index("model")
    assert model_level["seed"].isna().all() and model_level["ci_method"].str.startswith("hierarchical bootstrap").all()
    pd.testing.assert_series_equal(model_level["diff_gradcam"].sort_index(), table2.sort_index(), check_names=False)


@pytest.mark.slow
def test_the_report_opens_with_the_summary_and_a_table_of_contents(degenerate):
    text = degenerate.report.read_text()
    # the summary (and the list of excluded sets it holds) comes before the contents and every result table
    assert text.index("id='summary'") < text.index("id='table-excluded'") < text.index("id='contents'") \
        < text.index("id='table-table1'") < text.index("id='table-table2'")
    summary = text[text.index("id='summary'"):text.index("id='contents'")]
    assert "Classifiers that rank above chance" in summary and "not shown to: ViT" in summary
    assert "Left out of every comparison" in summary
    assert "<a href='#table2'>" in text and "<a href='#conclusions'>" in text


# ---------------------------------------------------------------- beyond the paper (docs/STUDY.md §9)


def analysis_table(root, name):
    return pd.read_csv(root / "analysis" / "tables" / f"{name}.csv", keep_default_na=False)


@pytest.mark.slow
def test_only_the_shifted_model_beats_the_location_prior(single_seed):
    """The prior's Diff_GradCAM follows the images as the models' does: only the model shifted
    by +0.2 beats it, paired over images; the others are not distinguishable from it."""
    prior = analysis_table(single_seed.root, "beats_prior")
    diff = prior[prior["metric"] == "diff_gradcam"].set_index("model")
    assert set(diff.index) == set(MODELS)
    assert diff.loc[SHIFTED, "verdict"] == "beats the prior" and diff.loc[SHIFTED, "difference"] == pytest.approx(
        SHIFT, abs=0.05)
    assert (diff.drop(SHIFTED)["verdict"] == "not distinguishable from the prior").all()
    text = single_seed.report.read_text()
    assert "Against the location prior" in text and "by Diff_GradCAM, 1 of 4 beat it" in text


@pytest.mark.slow
def test_the_ladder_runs_from_chance_to_the_oracle(single_seed):
    ladder = analysis_table(single_seed.root, "ladder")
    diff = ladder[ladder["metric"] == "diff_gradcam"]
    assert list(dict.fromkeys(diff["rung"])) == ["chance", "image_only", "prior", "randomized", "gradcam", "oracle"]
    level = lambda rung, model="": float(diff[(diff["rung"] == rung) & (diff["model"] == model)]["mean"].iloc[0])  # noqa: E731
    assert level("chance") == 0.0 and level("oracle") == 1.0
    assert level("chance") < level("prior") < level("gradcam", SHIFTED) < level("oracle")
    assert (diff[diff["rung"] == "gradcam"]["n"] == N_POSITIVE).all()


@pytest.mark.slow
def test_the_shift_that_lives_in_the_7x7_layer_vanishes_at_one_map_size(single_seed):
    """The shifted ResNet-50 differs from every model at the paper's layers (7x7 against 14x14),
    but not when every model is read at 14x14: the paper's comparison confounds depth with
    map resolution, and the resolution-matched arm says so."""
    stats_json = statistics(single_seed.root)
    assert set(stats_json["comparisons"]["diff_gradcam"]["significant_pairs"]) == shifted_pairs(MODELS)
    matched = stats_json["resolution_matched"]
    assert matched["map_size"] == 14 and sorted(matched["models"]) == sorted(MODELS)
    assert matched["comparisons"]["diff_gradcam"]["significant_pairs"] == []
    table = analysis_table(single_seed.root, "resolution_matched")
    assert set(table["model"]) == set(MODELS) and (table["map_size"] == 14).all()
    sweep = analysis_table(single_seed.root, "layer_sweep")
    resnet = sweep[sweep["model"] == "resnet50"].sort_values("layer_depth")
    assert list(resnet["layer"]) == ["layer3.-1", "layer4.-1"] and list(resnet["map_size"]) == [14, 7]
    assert "At one map size (14×14" in single_seed.report.read_text()


@pytest.mark.slow
def test_lesion_covariates_are_estimated_beside_the_models(single_seed):
    table = analysis_table(single_seed.root, "covariates")
    assert set(table["metric"]) == {"diff_gradcam", "auprc"}
    assert set(table["term"]) == {"log10_mask_fraction", "n_regions", "log_elongation", "probability"}
    assert (table["images"] == N_POSITIVE).all() and (table["lower"] < table["upper"]).all()
    assert (single_seed.root / "analysis" / "figures" / "lesion_size.png").is_file()


@pytest.mark.slow
def test_the_readme_read_of_cams_gives_table2_only_with_the_paper_layer_filter(single_seed):
    """cams/ holds every swept layer: the README's pandas line filters `final_layer` and gets
    Table 2; without the filter the ResNets' 14x14 rows would be averaged in."""
    cams = pd.read_parquet(single_seed.root / "cams", columns=["model", "cam_method", "final_layer", "diff_gradcam"])
    table2 = cams[(cams.cam_method == "gradcam") & cams.final_layer].groupby("model")["diff_gradcam"].agg(
        ["count", "mean", "std", "min", "max"])
    expected = analysis_table(single_seed.root, "table2").set_index("model")
    np.testing.assert_allclose(table2.loc[expected.index, "mean"], expected["mean"], rtol=1e-12)
    assert (table2["count"] == N_POSITIVE).all()
    unfiltered = cams[cams.cam_method == "gradcam"].groupby("model")["diff_gradcam"].mean()
    assert abs(unfiltered[SHIFTED] - expected.loc[SHIFTED, "mean"]) > SHIFT / 4
