"""Fail before work: a config that cannot run is refused at load, in one line naming the key and
the fix, before the study folder, its lock or an MLflow run exists (no Ray is started: every case
here fails inside `load_config`, before the CLI imports the pipeline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import cli
from training.source import check_data_source
from study.config import load_config
from study.errors import ConfigError
from tests.conftest import ROOT

DEMO = ROOT / "configs" / "demo.yaml"
PAPER = ROOT / "configs" / "paper.yaml"


def _refused(tmp_path: Path, capsys, *argv: str, config: Path = DEMO) -> str:
    """`camstudy run CONFIG ARGV` exits 2 with one `camstudy: error:` line and leaves no storage
    folder (so no study folder, mlflow.db or lock); returns the line."""
    storage = tmp_path / "storage"
    assert cli.main(["run", str(config), "--set", f"storage={storage}", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("camstudy: error: "), lines
    assert captured.out == ""
    assert not storage.exists(), sorted(storage.rglob("*"))
    return lines[0]


def _real(root: Path, *argv: str) -> list[str]:
    """The --set arguments of a real-data source at `root`, then `argv`."""
    sets = ["data.source=siim-dicom", f"data.root={root}", *argv]
    return [arg for text in sets for arg in ("--set", text)]


def _dicom_root(tmp_path: Path, label_rows: list[str] | None) -> Path:
    """A stage-1 layout with one (empty: detection lists names, never reads a file) DICOM and,
    unless None, a train-rle.csv of `label_rows`."""
    root = tmp_path / "siim"
    dicom = root / "dicom-images-train" / "1.2.3" / "1.2.4" / "1.2.5.dcm"
    dicom.parent.mkdir(parents=True)
    dicom.write_bytes(b"")
    if label_rows is not None:
        (root / "train-rle.csv").write_text("ImageId, EncodedPixels\n" + "".join(f"{row}\n" for row in label_rows))
    return root


def _labels(positive: int, negative: int) -> list[str]:
    """Label rows of `positive` images (two regions each) and `negative` ones."""
    return ([f"pos{i}, {start} 3" for i in range(positive) for start in (1, 20)]
            + [f"neg{i}, -1" for i in range(negative)])


# --- the data root --------------------------------------------------------------------------


def test_a_missing_data_root_is_refused_naming_data_root_and_the_override(tmp_path, capsys):
    line = _refused(tmp_path, capsys, *_real(tmp_path / "nowhere"))
    assert f"--set data.root={tmp_path / 'nowhere'}: data.root: {tmp_path / 'nowhere'} does not exist" in line
    assert "set data.root to the folder of your SIIM download" in line and "train-rle.csv" in line


def test_a_missing_data_root_in_the_file_names_the_file(tmp_path, capsys):
    config = tmp_path / "study.yaml"
    config.write_text(f"data:\n  source: siim-png\n  root: {tmp_path / 'nowhere'}\n")
    line = _refused(tmp_path, capsys, config=config)
    assert line.startswith(f"camstudy: error: {config}: data.root: {tmp_path / 'nowhere'} does not exist")
    assert "png_images/" in line  # what the siim-png layout holds


def test_a_missing_data_root_fails_within_seconds_from_a_fresh_interpreter(tmp_path):
    """As a user runs it: the error comes before the pipeline (Ray, MLflow) is even imported."""
    storage = tmp_path / "storage"
    done = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(PAPER), "--set", f"storage={storage}",
                           "--set", f"data.root={tmp_path / 'nowhere'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.count("\n") == 1 and "data.root: " in done.stderr and "does not exist" in done.stderr
    assert not storage.exists()


def test_a_folder_without_a_siim_layout_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = _refused(tmp_path, capsys, *_real(tmp_path / "empty"))
    assert "data.root: " in line and "no SIIM-ACR data found" in line
    assert "train-rle.csv" in line and "png_images/" in line  # what it looked for


def test_dicoms_without_a_label_file_are_refused(tmp_path, capsys):
    line = _refused(tmp_path, capsys, *_real(_dicom_root(tmp_path, None)))
    assert "data.root: " in line and "holds DICOMs but no train-rle.csv" in line and "set data.labels" in line


def test_a_label_file_that_is_not_there_is_refused(tmp_path, capsys):
    root = _dicom_root(tmp_path, None)
    line = _refused(tmp_path, capsys, *_real(root, f"data.labels={tmp_path / 'stage_2_train.csv'}"))
    assert f"data.labels: {tmp_path / 'stage_2_train.csv'} is not a file" in line


def test_the_other_layout_than_data_source_names_is_refused(tmp_path, capsys):
    (tmp_path / "png" / "png_images").mkdir(parents=True)
    line = _refused(tmp_path, capsys, *_real(tmp_path / "png"))
    assert "data.source: 'siim-dicom', but" in line and "holds the png layout; set data.source: 'siim-png'" in line


def test_a_split_larger_than_the_label_file_is_refused(tmp_path, capsys):
    root = _dicom_root(tmp_path, _labels(positive=30, negative=50))
    line = _refused(tmp_path, capsys, *_real(root, "split.n_val=40", "split.n_test=40"))
    assert "split.n_val + split.n_test = 40 + 40 = 80" in line and "labels 80 images (30 positive)" in line
    assert "lower split.n_val and split.n_test" in line
    line = _refused(tmp_path, capsys, *_real(root, "split.n_positive=31", "split.n_val=4", "split.n_test=4"))
    assert "split.n_positive: 31 positive images requested" in line and "at most 30" in line


def test_a_png_layout_is_counted_from_its_image_lists(tmp_path, capsys):
    root = tmp_path / "png"
    (root / "png_images").mkdir(parents=True)
    (root / "stage_1_train_images.csv").write_text(
        "new_filename,ImageId,has_pneumo\n" + "".join(f"{i}_train_{i % 2}_.png,id{i},{i % 2}\n" for i in range(20)))
    line = _refused(tmp_path, capsys, *_real(root, "data.source=siim-png", "split.n_val=10", "split.n_test=10"))
    assert "labels 20 images (10 positive)" in line


def test_a_plausible_data_root_passes_without_reading_an_image(tmp_path):
    root = _dicom_root(tmp_path, _labels(positive=10, negative=10))  # its one DICOM is an empty file
    overrides = {"storage": str(tmp_path / "storage"), "data.source": "siim-dicom", "data.root": str(root),
                 "split.n_val": 4, "split.n_test": 4}
    assert load_config(DEMO, overrides, checks=(check_data_source,)).data.root == str(root)
    assert not (tmp_path / "storage").exists()


def test_a_data_root_only_the_cluster_has_is_checked_only_by_the_commands_that_read_it(tmp_path):
    """Tests, benches and the submitting machine load the paper config without its data root."""
    assert load_config(PAPER).data.root == "/mnt/shared/siim-acr"
    if not Path("/mnt/shared/siim-acr").exists():
        with pytest.raises(ConfigError, match=r"paper\.yaml: data\.root: /mnt/shared/siim-acr does not exist"):
            load_config(PAPER, {"storage": str(tmp_path)}, checks=(check_data_source,))


# --- models, CAM layers and methods ---------------------------------------------------------------


def test_a_misspelt_model_name_is_refused_naming_the_override(tmp_path, capsys):
    line = _refused(tmp_path, capsys, "--set", "models.names=[resnet18,resnt34]")
    assert line.startswith("camstudy: error: --set models.names=[resnet18,resnt34]: models.names: unknown model(s) "
                           "['resnt34']; known models: vgg16")
    assert "resnet34" in line and "models.extra" in line


def test_a_model_declared_under_models_extra_is_known(tmp_path):
    extra = {"tiny": {"timm_name": "resnet10t", "family": "resnet", "depth": 10, "target_layer": "layer4.-1",
                      "stage_layers": ["layer1.-1", "layer4.-1"], "matched_layer": "layer3.-1"}}
    config = load_config(DEMO, {"models.names": ["resnet18", "tiny"], "models.extra": extra})
    assert config.models.names == ("resnet18", "tiny")


def test_a_layer_arm_an_extra_model_has_no_layers_for_is_refused(tmp_path, capsys):
    line = _refused(tmp_path, capsys, "--set", "models.names=[tiny]", "--set",
                    "models.extra={tiny: {timm_name: resnet10t, family: resnet, depth: 10, target_layer: layer4.-1}}")
    assert "cam.layers asks for 'stages' but model tiny declares no stage_layers" in line
    assert "set models.extra.tiny.stage_layers or drop 'stages' from cam.layers" in line


@pytest.mark.parametrize("override, expected", [
    ("cam.layers=[final,stage]", "cam.layers[1]: 'stage' is not allowed; use one of 'final', 'stages', 'matched'"),
    ("cam.methods=[gradcam,gradcamm]", "cam.methods[1]: 'gradcamm' is not allowed; use one of 'gradcam'"),
    ("cam.methods=[gradcam,rollout]", "cam.methods: 'rollout' reads attention blocks, which only ViTs have, but "
                                      "the study trains the CNNs vgg16, vgg19, resnet18"),
])
def test_an_unknown_layer_arm_or_cam_method_is_refused(tmp_path, capsys, override, expected):
    line = _refused(tmp_path, capsys, "--set", override)
    assert line.startswith(f"camstudy: error: --set {override}: ") and expected in line


def test_rollout_on_vits_only_is_accepted():
    config = load_config(DEMO, {"models.names": ["vit_small"], "cam.methods": ["gradcam", "rollout"]})
    assert config.cam.methods == ("gradcam", "rollout")


# --- the split of synthetic data --------------------------------------------------------------------


def test_a_split_the_synthetic_data_cannot_give_is_refused(tmp_path, capsys):
    line = _refused(tmp_path, capsys, "--set", "split.n_val=150")  # demo: 200 images, test 50
    assert line.startswith("camstudy: error: --set split.n_val=150: split.n_val + split.n_test = 150 + 50 = 200 "
                           "leaves no training images")
    assert "data.synthetic.n = 200 labelled images, 100 positive" in line
    line = _refused(tmp_path, capsys, "--set", "data.synthetic.n=60")
    assert line.startswith("camstudy: error: --set data.synthetic.n=60: split.n_val + split.n_test = 40 + 50")


def test_synthetic_data_with_no_positive_image_is_refused(tmp_path, capsys):
    line = _refused(tmp_path, capsys, "--set", "data.synthetic.n=10", "--set", "data.synthetic.positive_fraction=0.04",
                    "--set", "split.n_val=2", "--set", "split.n_test=2")
    assert "0 positive and 10 negative; both labels are needed" in line and "data.synthetic.positive_fraction" in line


@pytest.mark.parametrize("n, fraction", [(200, 0.5), (37, 0.3), (11, 0.55), (400, 0.123)])
def test_the_synthetic_label_counts_are_the_generators(n, fraction):
    """The load-time split check counts positives as training.synth draws them."""
    from training.synth import _plan

    positive = sum(case.positive for case in _plan(n, 0, fraction, 0, 0))
    every_image = {"data.synthetic.n": n, "data.synthetic.positive_fraction": fraction, "split.n_negative": "all"}
    with pytest.raises(ConfigError, match=f"the data has {positive} positive and {n - positive} negative"):
        load_config(DEMO, {**every_image, "split.n_val": n // 2, "split.n_test": n - n // 2})


# --- which override is named ----------------------------------------------------------------------


def test_a_bad_set_value_names_the_override_not_the_file(tmp_path, capsys):
    line = _refused(tmp_path, capsys, "--set", "preprocess.image_size=big")
    assert line == ("camstudy: error: --set preprocess.image_size=big: preprocess.image_size: expected an integer, "
                    "got 'big'")


def test_a_rule_across_keys_names_the_override_it_mentions(tmp_path, capsys):
    line = _refused(tmp_path, capsys, "--set", "resources.workers_per_run=3")
    assert line.startswith("camstudy: error: --set resources.workers_per_run=3: training.batch_size: 32 is not valid")


def test_an_error_in_the_file_names_the_file_even_with_overrides(tmp_path, capsys):
    config = tmp_path / "study.yaml"
    config.write_text("preprocess:\n  image_size: big\n")
    line = _refused(tmp_path, capsys, "--set", "training.seeds=[0]", config=config)
    assert line.startswith(f"camstudy: error: {config}: preprocess.image_size: expected an integer")


def test_seeds_and_recipes_are_named_as_given(tmp_path, capsys):
    storage = tmp_path / "storage"
    assert cli.main(["run", str(DEMO), "--set", f"storage={storage}", "--seeds", "0,0"]) == 2
    assert capsys.readouterr().err.startswith("camstudy: error: --seeds 0,0: training.seeds: (0, 0) is not valid")
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text("recipes:\n  resnet: {optimizer: adam, lr: -1.0, epochs: 1}\n")
    assert cli.main(["run", str(DEMO), "--set", f"storage={storage}", "--recipes", str(recipes)]) == 2
    assert capsys.readouterr().err.startswith(f"camstudy: error: --recipes {recipes}: recipes.resnet.lr: ")
    assert not storage.exists()


def test_the_demo_still_loads_and_passes_the_run_checks(tmp_path):
    config = load_config(DEMO, {"storage": str(tmp_path / "storage")}, checks=(check_data_source,))
    assert config.data.source == "synthetic" and not (tmp_path / "storage").exists()
