"""cluster.yaml validated offline: Ray's JSON schema plus the launcher's own config preparation."""

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation():
    prepared = _validate(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    nodes = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head_cpu"
    assert nodes["head_cpu"]["resources"] == {"CPU": 0}, "the head must not take training work"
    assert nodes["gpu_worker_large"]["resources"]["large_gpu"] == 1
    assert "gpu" in prepared["docker"]["image"] and "ray-ml" not in prepared["docker"]["image"]


def test_paper_config_routes_vit_large_to_the_large_node_type():
    from training.config import load_config

    config = load_config(ROOT / "configs" / "paper.yaml")
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    wanted = set(config.resources.model_resources["vit_large"])
    offered = {name for node in cluster["available_node_types"].values() for name in node["resources"]}
    assert wanted <= offered
    assert config.tracking.uri.startswith("http://ray-head")


@pytest.mark.parametrize("breakage", ["unknown_top_level_key", "head_type_not_a_node_type"])
def test_validation_catches_a_broken_file(breakage):
    import jsonschema

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    if breakage == "unknown_top_level_key":
        config["max_wrokers"] = 3
    else:
        config["head_node_type"] = "no_such_type"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate(config)
