"""The camstudy CLI as the lifecycle scenarios call it: the demo config shrunk to one tiny model,
run as a subprocess, and the MLflow runs it left (tests/e2e/test_study_lifecycle.py, test_sigterm.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator import tracking
from tests.conftest import ROOT

# Faithfulness and robustness (docs/STUDY.md §11) are off in the scenarios that test something else:
# their stages cost each explain a second actor pool and tasks, and their pipeline is tested whole in
# tests/explain/test_road.py, under kills in test_run_resume.py and across nodes in test_multinode.py.
SECTION_11_OFF = {"faithfulness.enabled": "false", "robustness.enabled": "false"}
SHRINK = {"models.names": "[resnet18]", "data.synthetic.n": 60, "data.synthetic.size": 64, "split.n_val": 16,
          "split.n_test": 16, "preprocess.image_size": 32, "recipes.resnet.epochs": 2, "training.batch_size": 16,
          "resources.prepare_actors": 0, "cam.sanity_randomized": "false", **SECTION_11_OFF}


def as_sets(overrides: dict) -> list[str]:
    """The CLI's --set arguments for config overrides."""
    return [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]


def command(stage: str, storage: Path, *extra: str, **overrides) -> list[str]:
    sets = as_sets({**SHRINK, "storage": storage, **overrides})
    return [sys.executable, "-m", "orchestrator", stage, "configs/demo.yaml", *sets, *extra]


def camstudy(stage: str, storage: Path, *extra: str, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run(command(stage, storage, *extra, **overrides), cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def client(storage: Path) -> tuple[MlflowClient, str]:
    """The study's MLflow store and its experiment id."""
    mlflow = MlflowClient(tracking_uri=f"sqlite:///{storage / 'demo' / 'mlflow.db'}")
    return mlflow, mlflow.get_experiment_by_name("camstudy").experiment_id


def runs(storage: Path, role: str) -> list:
    mlflow, experiment = client(storage)
    return mlflow.search_runs([experiment], filter_string=f"tags.`{tracking.ROLE_TAG}` = '{role}'",
                              order_by=["attributes.start_time ASC"])


def current(children: list) -> list:
    return [run for run in children if run.data.tags[tracking.SUPERSEDED_TAG] == "false"]
