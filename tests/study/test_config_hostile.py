"""Hostile configs: every bad input is one `camstudy: error:` line and exit 2, never a traceback.

Each case of the bad-input battery is here (YAML errors in files and in --set, non-string keys,
dates, non-UTF-8 files, storage that is a file, out-of-range numbers), plus property-based
tests: random YAML documents, random bytes and random --set values either load or raise
ConfigError, nothing else.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import cli
from study.config import StudyConfig, load_config, parse_override
from study.records import flatten
from study.errors import ConfigError
from tests.conftest import ROOT

DEMO = ROOT / "configs" / "demo.yaml"


def _fails_in_one_line(capsys, *argv: str) -> str:
    """`camstudy prepare ...` exits 2 with exactly one stderr line; returns it."""
    assert cli.main(["prepare", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("camstudy: error: "), lines
    return lines[0]


def _config_file(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "study.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def test_invalid_yaml_in_set_names_the_key_line_and_column(capsys):
    line = _fails_in_one_line(capsys, str(DEMO), "--set", "training.seeds=[0,")
    assert "override training.seeds: not valid YAML at line 1, column" in line


def test_invalid_yaml_in_a_file_names_the_file_line_and_column(tmp_path, capsys):
    line = _fails_in_one_line(capsys, _config_file(tmp_path, "study: demo\ntraining:\n  seeds: [0,\n"))
    assert "study.yaml: not valid YAML at line 4, column 1" in line


@pytest.mark.parametrize("text, expected", [
    ("1: demo\n", "the key 1 is a int, not a name"),
    ("training:\n  2024-01-05: 3\n", "training: the key datetime.date(2024, 1, 5) is a date"),
    ("study: 2024-13-45\n", "not valid YAML: month must be in 1..12"),
    ("study: 2024-01-05\n", "study: expected a string, got the date 2024-01-05 (YAML reads an unquoted date"),
    ("- study\n- demo\n", "the top level must be a mapping of sections, got list"),
    ("study: demo\n---\nstudy: other\n", "not valid YAML"),
    ("study: !!binary aGVsbG8=\n", "study: expected a string, got b'hello'"),
    ("study: \"demo\\x07\"\n", "holds control characters"),
    ("a: &x [*x]\n", "a: unknown key"),
    ("models:\n  weights_files: {3: w.pth}\n", "models.weights_files: the key 3 is a int"),
    ("[" * 5000, "not valid YAML"),
])
def test_surprising_yaml_is_one_line_naming_the_problem(tmp_path, capsys, text, expected):
    assert expected in _fails_in_one_line(capsys, _config_file(tmp_path, text))


def test_a_non_utf8_file_names_the_byte(tmp_path, capsys):
    line = _fails_in_one_line(capsys, _config_file(tmp_path, "study: d\xe9mo\n".encode("latin-1")))
    assert "not UTF-8 text (byte 8 is 0xe9); save the config as UTF-8" in line


@pytest.mark.parametrize("override, expected", [
    ("training.max_failures=-1", "training.max_failures: -1 is not valid"),
    ("resources.cpus_per_worker=0", "resources.cpus_per_worker: 0.0 is not valid; use a number of CPUs"),
    ("resources.cpus_per_worker=-2", "resources.cpus_per_worker: -2.0 is not valid"),
    ("training.seeds=[-1]", "training.seeds: (-1,) is not valid"),
    ("training.seeds=[0,0]", "training.seeds: (0, 0) is not valid; use a list without duplicates"),
    ("split.seed=-1", "split.seed: -1 is not valid"),
    ("resources.torch_threads=0", "resources.torch_threads: 0 is not valid"),
    ("resources.gpus_per_run=-1", "resources.gpus_per_run: -1.0 is not valid"),
    ("recipes.resnet.lr=.inf", "recipes.resnet.lr: expected a finite number, got inf"),
    ("recipes.vit.momentum=.nan", "recipes.vit.momentum: expected a finite number, got nan"),
    ("recipes.vit.momentum=1.5", "recipes.vit.momentum: 1.5 is not valid; use a value in [0, 1)"),
    ("preprocess.image_size=1000000", "preprocess.image_size: 1000000 is not valid; use an integer in [16, 1024]"),
    ("training.batch_size=100000000000000000000000", "training.batch_size: 100000000000000000000000 is not valid"),
    ("resources.max_concurrent_runs=0", "resources.max_concurrent_runs: 0 is not valid"),
    ("metrics.inputiba_cap=2", "metrics.inputiba_cap: 2.0 is not valid"),
    ("cam.methods=[]", "cam.methods: () is not valid"),
    ("study=../etc", "study: '../etc' is not valid"),
    ("x" * 5000 + "=1", "is not a dotted config key"),
    ("training..seeds=1", "is not a dotted config key"),
    ("=1", "is not a dotted config key"),
    ("study", "expected KEY=VALUE"),
])
def test_out_of_range_and_malformed_overrides_are_one_line(capsys, override, expected):
    line = _fails_in_one_line(capsys, str(DEMO), "--set", override)
    assert expected in line and len(line) < 400, line


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("1.0e6", 1e6), ("3E-4", 3e-4), ("5", 5.0)])
def test_yaml_1_1_number_forms_are_numbers(text, value):
    assert load_config(DEMO, {"recipes.resnet.lr": parse_override(f"x={text}")[1]}).recipes["resnet"].lr == value


def test_an_empty_section_can_take_overrides():
    config = load_config(DEMO, dict([parse_override("data.synthetic.n=150")]))
    assert config.data.synthetic.n == 150


def test_storage_that_is_a_file_or_under_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "is a file, not a folder" in _fails_in_one_line(capsys, str(DEMO), "--set", f"storage={blocker}")
    line = _fails_in_one_line(capsys, str(DEMO), "--set", f"storage={blocker}/sub/dir")
    assert f"cannot be made: {blocker} is a file" in line


def test_unwritable_storage_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("os.access", lambda path, mode: False)  # tests run as root: chmod would not stop them
    with pytest.raises(ConfigError, match=f"storage: {tmp_path} is not writable by this user"):
        load_config(DEMO, {"storage": str(tmp_path / "studies")})


def test_the_real_command_line_prints_one_line_and_exits_2(tmp_path):
    """Through a fresh interpreter, as a user sees it (no traceback on stdout or stderr)."""
    done = subprocess.run([sys.executable, "-m", "orchestrator", "prepare", str(DEMO), "--set", "training.seeds=[0,"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("camstudy: error: override training.seeds")


# --- property-based: random documents and overrides -------------------------------------------

KNOWN_KEYS = sorted(flatten(StudyConfig().to_dict()))
SECTIONS = sorted(StudyConfig().to_dict())
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.dates(), st.sampled_from(["auto", "all", "match", "gradcam", "1e-3"]))
keys = st.one_of(st.sampled_from(SECTIONS + [key.rsplit(".", 1)[-1] for key in KNOWN_KEYS]), st.text(max_size=8),
                 st.integers(-3, 3), st.booleans())
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(keys, inner, max_size=5)), max_leaves=20)
_SCRATCH = Path(tempfile.mkdtemp(prefix="camstudy-config-fuzz-"))


def _loads_or_config_error(text: str | bytes, overrides: dict | None = None) -> None:
    path = Path(_config_file(_SCRATCH, text))
    try:
        config = load_config(path, {"storage": str(_SCRATCH / "studies"), **(overrides or {})})
    except ConfigError as error:
        assert "\n" not in str(error) and len(str(error)) < 1000, str(error)
    else:
        assert isinstance(config, StudyConfig)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(SECTIONS), documents, max_size=4) | documents)
def test_random_yaml_documents_load_or_raise_config_error(document):
    try:
        text = yaml.safe_dump(document, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return  # not every Python value has a YAML form
    _loads_or_config_error(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes_as_a_config_file_load_or_raise_config_error(data):
    _loads_or_config_error(data)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(KNOWN_KEYS) | st.text(max_size=12), st.text(max_size=30) | scalars.map(str))
def test_random_set_values_load_or_raise_config_error(key, value):
    try:
        dotted, parsed = parse_override(f"{key}={value}")
    except ConfigError as error:
        assert "\n" not in str(error)
        return
    _loads_or_config_error(DEMO.read_bytes(), {dotted: parsed})


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and re.fullmatch(r"camstudy \d+\.\d+\.\d+\n", capsys.readouterr().out)
