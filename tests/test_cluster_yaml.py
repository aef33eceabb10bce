"""cluster.yaml validated offline: Ray's JSON schema plus the launcher's own config preparation."""

import copy
import shlex
import socket
import urllib.error
import urllib.request

import pytest
import yaml

from tests.mlflow_server import free_port, mlflow_server
from tests.conftest import ROOT


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
    from study.config import load_config

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


# --- secure by default, and working ----------------------------------------------------------

def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _commands(cluster: dict) -> list[str]:
    return [command for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
            for command in cluster.get(key) or []]


def test_every_ray_start_turns_token_auth_on_and_the_token_reaches_every_node():
    cluster = _cluster()
    starts = [c for c in _commands(cluster) if "ray start" in c]
    assert len(starts) == 2 and all("export RAY_AUTH_MODE=token;" in c.split("ray start")[0] for c in starts)
    assert cluster["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_nothing_listens_on_a_public_address():
    commands = " ".join(_commands(_cluster()))
    assert "0.0.0.0" not in commands
    assert "--dashboard-host=127.0.0.1" in commands  # `ray dashboard cluster.yaml` tunnels to it
    assert "mlflow server --host \"$(hostname -I | awk '{print $1}')\"" in commands  # the private address


def test_every_package_on_the_nodes_is_pinned_and_satisfies_pyproject():
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    declared = {Requirement(r).name.lower(): Requirement(r) for r in
                tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    pinned = {}
    for command in _commands(_cluster()):
        if not command.startswith("pip install"):
            continue
        for word in shlex.split(command)[2:]:
            if word.startswith("-"):
                continue
            if " @ " in word:  # camstudy itself, a direct reference
                assert "@v" in word, f"camstudy must be installed at a tag: {word}"
                continue
            name, _, version = word.partition("==")
            assert version, f"{word} is not pinned (name==version)"
            pinned[name.lower()] = version
    assert "--no-deps" in " ".join(_commands(_cluster()))  # camstudy itself does not re-resolve the pins
    for name, requirement in declared.items():
        if name == "ray":
            continue  # the Docker image pins Ray
        assert name in pinned, f"{name} is a dependency but not pinned on the nodes"
        assert requirement.specifier.contains(pinned[name]), f"{name}=={pinned[name]} violates {requirement}"


def _allowed_hosts() -> str:
    (mlflow,) = [c for c in _commands(_cluster()) if "mlflow server" in c]
    words = shlex.split(mlflow.split("mlflow server", 1)[1].split(">", 1)[0])
    return words[words.index("--allowed-hosts") + 1]


@pytest.mark.slow  # starts real MLflow servers
def test_mlflow_started_as_cluster_yaml_starts_it_accepts_the_head_name_and_nothing_else(tmp_path, monkeypatch):
    """MLflow 3 answers 403 'Invalid Host header' to names it was not told about; the study logs to
    http://ray-head:5000. Here `ray-head` resolves to 127.0.0.1 (in this process) and the server gets
    cluster.yaml's --allowed-hosts."""
    from mlflow.tracking import MlflowClient

    port = free_port()
    with mlflow_server(tmp_path, port, "--allowed-hosts", _allowed_hosts().replace("5000", str(port))):
        resolve = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", lambda host, *rest, **kw: resolve(
            "127.0.0.1" if host == "ray-head" else host, *rest, **kw))
        client = MlflowClient(tracking_uri=f"http://ray-head:{port}")
        experiment = client.create_experiment("cluster-yaml")
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "auc", 0.5)
        assert client.get_run(run.info.run_id).data.metrics == {"auc": 0.5}
        # and the check is real: another name is refused
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1",
                                         headers={"Host": f"evil.example:{port}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403
