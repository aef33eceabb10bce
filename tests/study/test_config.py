"""The typed config: the shipped YAML files load, and every bad value names its dotted key."""

from pathlib import Path

import pytest

from study.config import StudyConfig, dump_config, load_config, parse_override
from study.errors import ConfigError
from tests.conftest import ROOT

DEMO = ROOT / "configs" / "demo.yaml"
PAPER = ROOT / "configs" / "paper.yaml"


@pytest.mark.parametrize("path", [DEMO, PAPER], ids=["demo", "paper"])
def test_shipped_configs_load(path):
    config = load_config(path)
    assert isinstance(config, StudyConfig)
    assert load_config(path) == config  # loading is deterministic


def test_paper_preset_is_the_published_protocol():
    config = load_config(PAPER)
    assert (config.split.n_positive, config.split.n_negative) == ("all", "match")
    assert (config.split.n_val, config.split.n_test, config.split.balance) == (1000, 1000, "exact")
    assert (config.preprocess.image_size, config.preprocess.clahe_clip_limit,
            config.preprocess.clahe_tiles, config.preprocess.interpolation) == (224, 2.0, 8, "area")
    assert config.data.source == "siim-dicom" and config.models.init == "imagenet"


def test_unknown_key_suggests_the_right_spelling():
    with pytest.raises(ConfigError, match=r"split\.n_vall: unknown key \(did you mean 'n_val'\?\)"):
        load_config(DEMO, {"split.n_vall": 100})


def test_unknown_section_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"preprocesss: unknown key \(did you mean 'preprocess'\?\).*allowed keys"):
        load_config(DEMO, {"preprocesss.image_size": 32})


@pytest.mark.parametrize("override, key, allowed", [
    ({"preprocess.image_size": "big"}, "preprocess.image_size", "an integer"),  # wrong type
    ({"preprocess.image_size": 8}, "preprocess.image_size", "an integer in [16, 1024]"),  # out of range
    ({"augment.hflip_probability": 1.5}, "augment.hflip_probability", "a probability in [0, 1]"),
    ({"preprocess.interpolation": "nearest"}, "preprocess.interpolation", "'area', 'linear', 'cubic'"),
    ({"split.balance": "greedy"}, "split.balance", "'exact', 'max-available'"),
    ({"split.n_positive": "some"}, "split.n_positive", "an integer or one of 'all'"),  # Union
    ({"split.n_negative": 1.5}, "split.n_negative", "one of 'match', 'all'"),
    ({"cam.methods": ["gradcamm"]}, "cam.methods[0]", "'gradcam', 'gradcam++'"),
    ({"data.strict": "yes"}, "data.strict", "true or false"),
    ({"resources.prepare_actors": -1}, "resources.prepare_actors", "'auto'"),
    ({"data.synthetic.n": 2}, "data.synthetic.n", "an integer in [10, 1000000]"),
])
def test_a_bad_value_is_one_error_naming_the_key_and_what_is_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as caught:
        load_config(DEMO, override)
    message = str(caught.value)
    assert f": {key}: " in message and allowed in message
    # the override set the bad value, so the error names it, not the file
    (dotted, _), = override.items()
    assert message.count("\n") == 0 and message.startswith(f"override {dotted}=")


def test_real_data_needs_a_root():
    with pytest.raises(ConfigError, match=r"data\.root: .*required when data\.source is 'siim-dicom'"):
        load_config(DEMO, {"data.source": "siim-dicom"})


def test_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_parse_override_reads_yaml_values():
    assert parse_override("training.seeds=[0,1,2]") == ("training.seeds", [0, 1, 2])
    assert parse_override("split.n_positive=all") == ("split.n_positive", "all")
    assert parse_override("preprocess.clahe= false") == ("preprocess.clahe", False)
    assert parse_override("data.root=/a=b") == ("data.root", "/a=b")  # only the first '=' splits
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("training.seeds")


def test_overrides_reach_the_config():
    config = load_config(DEMO, dict(map(parse_override, ["training.seeds=[0,1]", "preprocess.image_size=32"])))
    assert config.training.seeds == (0, 1) and config.preprocess.image_size == 32


def test_hash_is_stable_and_sensitive_only_to_its_sections():
    base = load_config(DEMO)
    assert base.hash("data", "split") == load_config(DEMO).hash("data", "split")
    other_training = load_config(DEMO, {"training.batch_size": 7})
    assert other_training.hash("data", "split", "preprocess") == base.hash("data", "split", "preprocess")
    assert other_training.hash() != base.hash()
    other_split = load_config(DEMO, {"split.seed": 1})
    assert other_split.hash("data", "split", "preprocess") != base.hash("data", "split", "preprocess")


def test_storage_is_made_absolute_object_stores_kept_and_files_refused_at_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(DEMO, {"storage": "runs/here"})
    assert Path(config.storage).is_absolute() and config.storage == str(tmp_path / "runs" / "here")
    assert config.study_dir == f"{tmp_path}/runs/here/demo"
    assert load_config(DEMO, {"storage": "s3://bucket/x/"}).study_dir == "s3://bucket/x/demo"
    for bad in ("ftp://host/x", "s3://", "https://bucket/x"):
        with pytest.raises(ConfigError, match=r"^override storage=.*: storage: .* is not an object store camstudy can use"):
            load_config(DEMO, {"storage": bad})
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"storage: .*a-file is a file, not a folder"):
        load_config(DEMO, {"storage": "a-file"})


def test_relative_storage_is_refused_under_ray_job_submit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"metadata": {"job_submission_id": "raysubmit_1"}}')
    with pytest.raises(ConfigError, match=r"storage: 'studies' is relative, and under `ray job submit`"):
        load_config(DEMO)
    assert load_config(DEMO, {"storage": str(tmp_path / "shared")}).storage == str(tmp_path / "shared")


def test_negative_max_failures_is_refused():
    with pytest.raises(ConfigError, match=r"training\.max_failures: -1 is not valid; use an integer in \[0, 100\]"):
        load_config(DEMO, {"training.max_failures": -1})


def test_dumped_config_loads_back_to_the_same_config(tmp_path):
    config = load_config(PAPER)
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_config(config))
    assert load_config(dumped) == config


def test_ddp_workers_are_accepted_when_they_split_the_batch_evenly():
    config = load_config(DEMO, {"resources.workers_per_run": 2, "training.batch_size": 32})
    assert config.resources.workers_per_run == 2
    with pytest.raises(ConfigError) as caught:
        load_config(DEMO, {"resources.workers_per_run": 3, "training.batch_size": 32})
    message = str(caught.value)
    assert ": training.batch_size: 32 is not valid" in message
    assert "a multiple of resources.workers_per_run (3)" in message
    with pytest.raises(ConfigError, match=r"resources\.workers_per_run: 0 is not valid; use an integer in \[1, 1024\]"):
        load_config(DEMO, {"resources.workers_per_run": 0})


def test_exponent_numbers_are_numbers_and_non_finite_ones_are_refused():
    assert load_config(DEMO, {"recipes.resnet.lr": "1e-3"}).recipes["resnet"].lr == 1e-3
    assert load_config(DEMO, {"recipes.resnet.lr": "1.0e6"}).recipes["resnet"].lr == 1e6
    with pytest.raises(ConfigError, match=r"recipes\.resnet\.lr: expected a finite number, got inf"):
        load_config(DEMO, {"recipes.resnet.lr": float("inf")})
    with pytest.raises(ConfigError, match=r"recipes\.vit\.momentum: expected a finite number"):
        load_config(DEMO, {"recipes.vit.momentum": float("nan")})
    with pytest.raises(ConfigError, match=r"training\.seeds: \(-1,\) is not valid; use a non-empty list of integers in \[0, 4294967295\]"):
        load_config(DEMO, {"training.seeds": [-1]})


@pytest.mark.parametrize("override, allowed", [
    ({"faithfulness.steps": [50, 20]}, "percentages in increasing order without duplicates"),
    ({"faithfulness.steps": [20, 20]}, "percentages in increasing order without duplicates"),
    ({"faithfulness.steps": [0, 50]}, "strictly between 0 and 100"),
    ({"faithfulness.steps": [50, 100]}, "strictly between 0 and 100"),
    ({"faithfulness.steps": []}, "a non-empty list of percentages"),
    ({"faithfulness.steps": ["half"]}, "expected a number"),
    ({"faithfulness.layers": ["stages"]}, "includes 'final'"),
    ({"faithfulness.imputation": "mean"}, "'road', 'blur', 'zero'"),
    ({"faithfulness.enabled": "yes"}, "true or false"),
    ({"robustness.n": 0}, "an integer in [1, 1000]"),
    ({"robustness.n": 2.5}, "expected an integer"),
    ({"robustness.radius": 0}, "(0, 1]"),
    ({"robustness.radius": 1.5}, "(0, 1]"),
])
def test_faithfulness_and_robustness_values_are_checked_with_the_key_and_the_remedy(override, allowed):
    (dotted, _), = override.items()
    with pytest.raises(ConfigError) as caught:
        load_config(DEMO, override)
    message = str(caught.value)
    assert message.startswith(f"override {dotted}=") and allowed in message and message.count("\n") == 0
    assert f": {dotted.split('.')[0]}." in message


def test_faithfulness_layers_must_be_arms_the_cam_stage_computes_and_typos_are_named():
    with pytest.raises(ConfigError, match=r"faithfulness\.layers: 'matched' not in cam\.layers \['final'\].*add the "
                                          r"arm to cam\.layers or drop it from faithfulness\.layers"):
        load_config(PAPER, {"faithfulness.layers": ["final", "matched"]})
    assert load_config(DEMO, {"faithfulness.layers": ["final", "matched"]}).faithfulness.layers == ("final", "matched")
    with pytest.raises(ConfigError, match=r"faithfulness\.step: unknown key \(did you mean 'steps'\?\)"):
        load_config(DEMO, {"faithfulness.step": [10]})
    with pytest.raises(ConfigError, match=r"robustness\.radious: unknown key \(did you mean 'radius'\?\)"):
        load_config(DEMO, {"robustness.radious": 0.1})


def test_the_shipped_configs_state_faithfulness_and_robustness_and_the_demo_cuts_only_their_cost():
    demo, paper, default = load_config(DEMO), load_config(PAPER), StudyConfig()
    assert paper.faithfulness == default.faithfulness and paper.robustness == default.robustness
    assert demo.faithfulness.enabled and demo.robustness.enabled
    # fewer steps, perturbations and images than the paper's, nothing else changed (the values are
    # configs/demo.yaml's to state)
    assert set(demo.faithfulness.steps) < set(paper.faithfulness.steps) and demo.robustness.n < paper.robustness.n
    assert paper.faithfulness.images == paper.robustness.images == "all"
    assert isinstance(demo.faithfulness.images, int) and isinstance(demo.robustness.images, int)
    assert demo.faithfulness.layers == paper.faithfulness.layers
    assert (demo.faithfulness.imputation, demo.robustness.radius) == ("road", default.robustness.radius)
