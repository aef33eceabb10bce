"""MLflow: one parent run per study, one child run per (model, seed).

Everything goes through `MlflowClient` with explicit run ids, so any process (the driver, a Ray
Train controller) can log to the right run; `nested=True` would do nothing across processes.
With no URI configured MLflow would write `sqlite:///mlflow.db` relative to the current folder
(a Ray session temp dir inside workers), so the URI is always resolved to an absolute location.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterable

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

STUDY_TAG = "camstudy.study"
ROLE_TAG = "camstudy.role"
RUN_KEY_TAG = "camstudy.run_key"
PARENT_TAG = "mlflow.parentRunId"


def tracking_uri(config) -> str:
    """The configured URI, or an absolute SQLite file in the study store."""
    if config.tracking.uri:
        return config.tracking.uri
    return f"sqlite:///{Path(config.study_dir, 'mlflow.db')}"


def ui_command(config) -> str:
    uri = tracking_uri(config)
    if uri.startswith("http"):
        return f"open {uri} (MLflow server)"
    return f"mlflow ui --backend-store-uri {uri}"


class StudyTracker:
    """Finds or creates the study's experiment, parent run and child runs."""

    def __init__(self, config):
        self.uri = tracking_uri(config)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.study = config.study
        self.experiment_id = self._experiment(config)

    def _experiment(self, config) -> str:
        existing = self.client.get_experiment_by_name(config.tracking.experiment)
        if existing is not None:
            return existing.experiment_id
        artifacts = None
        if not self.uri.startswith("http"):
            # a local backend would otherwise put artifacts in ./mlruns of whoever logs first
            artifacts = Path(config.study_dir, "mlartifacts").resolve().as_uri()
        return self.client.create_experiment(config.tracking.experiment, artifact_location=artifacts)

    def parent_run(self) -> str:
        """The study's parent run id (created once, reused by every later stage and rerun)."""
        found = self._find(f"tags.`{ROLE_TAG}` = 'parent'")
        if found:
            return found
        run = self.client.create_run(self.experiment_id, run_name=self.study,
                                     tags={STUDY_TAG: self.study, ROLE_TAG: "parent"})
        return run.info.run_id

    def child_run(self, run_key: str, params: dict[str, Any], resume: bool = True) -> str:
        """The child run for `run_key` (e.g. "resnet18-seed0"); a resumed run continues its own
        (marked RUNNING again when `resume`)."""
        found = self._find(f"tags.`{RUN_KEY_TAG}` = '{run_key}'")
        if found:
            if resume:
                self.client.update_run(found, status="RUNNING")
            return found
        parent = self.parent_run()
        run = self.client.create_run(self.experiment_id, run_name=run_key, tags={
            STUDY_TAG: self.study, ROLE_TAG: "child", RUN_KEY_TAG: run_key, PARENT_TAG: parent})
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run.info.run_id

    def _find(self, clause: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.`{STUDY_TAG}` = '{self.study}' and {clause}",
                                       max_results=1)
        return runs[0].info.run_id if runs else None


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
    """Log the finite numeric entries of `metrics` at `step` in one batch."""
    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items()
             if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]
    if batch:
        client.log_batch(run_id, metrics=batch)


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def end_run(client: MlflowClient, run_id: str, error: BaseException | str | None = None) -> None:
    """FINISHED, or FAILED with the error kept as a tag so the UI shows why."""
    if error is None:
        client.set_terminated(run_id, "FINISHED")
        return
    set_tags(client, run_id, {"camstudy.error": str(error)})
    client.set_terminated(run_id, "FAILED")


def child_runs(client: MlflowClient, experiment_id: str, study: str) -> Iterable:
    return client.search_runs([experiment_id],
                              filter_string=f"tags.`{STUDY_TAG}` = '{study}' and tags.`{ROLE_TAG}` = 'child'")
