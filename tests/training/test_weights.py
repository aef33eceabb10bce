"""Starting weights: local files load the backbone exactly; missing weights say how to get them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from training import registry
from study.errors import ConfigError, WeightsError
from tests.conftest import ROOT


def _backbone_equal(source: torch.nn.Module, loaded: torch.nn.Module, head: tuple[str, ...]) -> None:
    a, b = source.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if not key.startswith(head):
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("fmt", ["pth", "wrapped-pth", "safetensors"])
def test_a_local_file_supplies_the_backbone_and_the_head_is_new(tmp_path, fmt):
    spec = registry.get("resnet18")
    torch.manual_seed(1)
    source = registry.build_model(spec, init="random", image_size=32)
    path = tmp_path / f"resnet18.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        safetensors.torch.save_file(source.state_dict(), path)
    else:
        torch.save({"state_dict": source.state_dict()} if fmt == "wrapped-pth" else source.state_dict(), path)
    torch.manual_seed(2)
    loaded = registry.build_model(spec, init="imagenet", image_size=32, weights_file=str(path))
    _backbone_equal(source, loaded, ("fc.",))
    assert not torch.equal(source.fc.weight, loaded.fc.weight)  # the head is re-initialised, not loaded
    assert loaded.camstudy_weights.source == f"file:{path}"
    assert loaded.camstudy_weights.dropped == ("fc.bias", "fc.weight")


def test_a_vit_file_is_resampled_to_the_image_size_and_a_1000_class_head_dropped(tmp_path):
    spec = registry.get("vit_small")
    source = registry.build_model(spec, init="random", image_size=64, num_classes=1000)
    path = tmp_path / "vit.safetensors"
    safetensors.torch.save_file(source.state_dict(), path)
    loaded = registry.build_model(spec, init="imagenet", image_size=32, weights_file=str(path))
    assert loaded.pos_embed.shape[1] == 1 + 4  # 64 px -> 4x4 grid resampled to 2x2 by timm's filter
    assert torch.equal(loaded.blocks[-1].norm1.weight, source.blocks[-1].norm1.weight)
    assert loaded.head.weight.shape == (2, 384)
    assert loaded.camstudy_weights.dropped == ("head.bias", "head.weight")


def test_missing_wrong_and_contradictory_files_are_errors(tmp_path):
    spec = registry.get("resnet18")
    with pytest.raises(WeightsError, match=r"models.weights_files.resnet18: .*nope.pth does not exist"):
        registry.build_model(spec, init="imagenet", image_size=32, weights_file=str(tmp_path / "nope.pth"))
    other = tmp_path / "resnet34.pth"
    torch.save(registry.build_model(registry.get("resnet34"), init="random", image_size=32).state_dict(), other)
    with pytest.raises(WeightsError, match="does not match resnet18: unexpected layer1.2"):
        registry.build_model(spec, init="imagenet", image_size=32, weights_file=str(other))
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable state dict"):
        registry.build_model(spec, init="imagenet", image_size=32, weights_file=str(garbage))
    with pytest.raises(ConfigError, match="models.init is 'random'"):
        registry.build_model(spec, init="random", image_size=32, weights_file=str(other))


def test_an_unknown_pretrained_tag_lists_the_known_ones():
    spec = registry.ModelSpec("r18", "resnet18", "no_such_tag", "resnet", 18, "layer4.-1")
    with pytest.raises(WeightsError, match=r"no pretrained weights 'resnet18.no_such_tag'.*resnet18.tv_in1k"):
        registry.build_model(spec, init="imagenet", image_size=32)


def test_weights_read_the_specs_from_the_study_contract_and_name_an_unknown_architecture():
    from study.config import ExtraModel, ModelsConfig, StudyConfig
    from training import weights

    config = StudyConfig(models=ModelsConfig(names=("x",), extra={"x": ExtraModel("no_such_net", "resnet", 1, "layer4")}))
    for ask in (weights.missing_weights, weights.fetch_weights):
        with pytest.raises(WeightsError, match=r"^x: 'no_such_net' is not a timm architecture"):
            ask(config)


OFFLINE_SCRIPT = """
import json
from study.config import StudyConfig, ModelsConfig
from training import registry, weights
from study.errors import WeightsError
out = {}
try:
    registry.build_model(registry.get("resnet18"), init="imagenet", image_size=32)
except WeightsError as error:
    out["build"] = str(error)
config = StudyConfig(models=ModelsConfig(names=("resnet18", "vit_small"), weights_files={"vit_small": "/x.pth"}))
out["missing"] = weights.missing_weights(config)
try:
    weights.fetch_weights(config)
except WeightsError as error:
    out["fetch"] = str(error)
print(json.dumps(out))
"""


def test_without_network_or_cache_the_error_says_how_to_provide_weights(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    message = out["build"]
    for fact in ("resnet18.tv_in1k", "timm/resnet18.tv_in1k", "HF_HUB_OFFLINE is set", str(tmp_path / "hf"),
                 "camstudy fetch-weights CONFIG", "HF_HOME", "models.weights_files.resnet18", "models.init: random"):
        assert fact in message, (fact, message)
    assert out["missing"] == [f"resnet18: resnet18.tv_in1k (not in {tmp_path / 'hf' / 'hub'})",
                              "vit_small: file /x.pth"]
    assert "resnet18.tv_in1k" in out["fetch"]


class _RunsCode:
    """A pickle payload that would run code when loaded without weights_only."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["CAMSTUDY_PICKLE_MARKER"]),))


def test_a_malicious_pickle_is_refused_in_one_line_and_never_runs(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CAMSTUDY_PICKLE_MARKER", str(marker))
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _RunsCode()}, path)
    spec = registry.get("resnet18")
    with pytest.raises(WeightsError, match=r"resnet18.pth is refused: it holds Python objects besides tensors") as caught:
        registry.build_model(spec, init="imagenet", image_size=32, weights_file=str(path))
    assert "\n" not in str(caught.value) and not marker.exists()


@pytest.mark.parametrize("payload", [[torch.zeros(1)], {"a": 1}, {3: torch.zeros(1)}])
def test_a_file_that_is_not_a_state_dict_is_named(tmp_path, payload):
    path = tmp_path / "w.pth"
    torch.save(payload, path)
    with pytest.raises(WeightsError, match="is not a state dict"):
        registry.build_model(registry.get("resnet18"), init="imagenet", image_size=32, weights_file=str(path))
