"""MLflow: one parent run per study, one child run per attempt of each (model, seed).

Identity. The parent is found by the study's id (`study.json`, made with the store), never by
its name: two stores that share a study name on one tracking server stay apart. A child belongs
to one *attempt* of a run: a run that starts from epoch 0 (the first time, after `--force train`,
after its settings changed, or after losing its checkpoint) gets a new child, and the earlier
children of that run are tagged `camstudy.superseded=true` (a RUNNING one becomes KILLED); a run
resumed from its checkpoint continues its attempt's child, recorded in the run folder's
`attempt.json`, and so does a run killed before its child logged a first epoch (there is no
history to mix). So a child's params, metric history and status describe one attempt only.

Status. The parent is RUNNING while a command works on the study and ends FINISHED, FAILED or
KILLED with it; a child ends FINISHED, FAILED (error tag) or KILLED (interrupted).

Outages. A tracking server that cannot be reached never stops the study: the first failed call
prints one line and the tracker goes offline for the rest of the command (`StudyTracker.call`
skips what needs the server). Nothing is lost, because the store already holds everything
MLflow shows: the next command that reaches the server creates or closes each run's child from
its done.json (history and test metrics back-filled) and logs the analysis again. MLflow's own
HTTP retries are capped (MLFLOW_HTTP_REQUEST_MAX_RETRIES=3, TIMEOUT=30 s unless set) so an outage
costs seconds, not minutes.

Everything goes through `MlflowClient` with explicit run ids, so any process can log to the
right run. With no URI configured MLflow would write `sqlite:///mlflow.db` relative to the
current folder (a Ray session temp dir inside workers), so the URI is always made absolute.
"""

from __future__ import annotations

import functools
import getpass
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # MLflow's default: 7, with back-off
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

from mlflow.entities import Param  # noqa: E402 (after the environment defaults)
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from study.atomic import write_text_atomic
from study.mlflow_log import set_tags
from study.provenance import git_commit
from study.records import read_record
from study.store import StudyStore

STUDY_TAG = "camstudy.study"
STUDY_ID_TAG = "camstudy.study_id"
ROLE_TAG = "camstudy.role"
RUN_KEY_TAG = "camstudy.run_key"
SUPERSEDED_TAG = "camstudy.superseded"
FINGERPRINT_TAG = "camstudy.fingerprint"
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# test-set bookkeeping: counts and settings, kept as tags so the charts show only measurements
BOOKKEEPING = ("model", "seed", "best_epoch", "selection", "n", "n_positive", "threshold", "tp", "fp", "tn", "fn")


def tracking_uri(config, store: StudyStore) -> str:
    """The configured URI, or an absolute SQLite file in the study store."""
    if config.tracking.uri:
        return config.tracking.uri
    return f"sqlite:///{store.mlflow_db}"


# MLflow announces creating and migrating its SQLite tables at INFO on every new study: nothing a
# reader acts on (a failure still raises)
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

UI_PORT = 5000  # `mlflow ui`'s own default, written out so the printed URL names it
# The experiment tag the printed URL opens (`viewStateShareKey`): MLflow 3's runs table reads a
# shared view state from the experiment tag mlflow.sharedViewState.<key> (its JSON holds the
# search filter and the columns). It never takes `runsExpanded` from a shared view, so the URL
# lists the study's child runs, one row per (model, seed), rather than a collapsed parent.
VIEW_KEY = "camstudy-runs"
SHARED_VIEW_TAG = "mlflow.sharedViewState."
# one column per fact a reader compares the nine models on (MLflow's "<type>.`<name>`" keys)
VIEW_COLUMNS = (["params.`model`", "params.`seed`", "params.`depth`", "params.`params_millions`"]
                + [f"metrics.`test/{m}`" for m in ("auc", "accuracy", "recall", "specificity")]
                + [f"metrics.`cam/{m}`" for m in ("auprc_mean", "diff_gradcam_mean", "ehr_auc_norm_mean",
                                                  "pointing_game", "degenerate")]
                + ["tags.`camstudy.degenerate`"])


def ui_command(uri: str) -> str:
    """A command that opens the study's runs (tracking URI `uri`) as printed, in any shell: this
    environment's Python by absolute path (a fresh shell has no virtual environment on its PATH)."""
    if uri.startswith("http"):
        return f"open {uri} (MLflow server)"
    # one worker: a UI for one reader starts in seconds (the default starts several)
    return (f"{shlex.quote(sys.executable)} -m mlflow ui --backend-store-uri {shlex.quote(uri)} --port {UI_PORT} "
            "--workers 1")


def ui_url(uri: str, experiment_id: str) -> str:
    """The study's experiment in MLflow's model-training view (not its GenAI default), on the runs
    table with the study's shared view (`VIEW_KEY`)."""
    base = uri.rstrip("/") if uri.startswith("http") else f"http://127.0.0.1:{UI_PORT}"
    return (f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={VIEW_KEY}")


def ui_lines(tracker: "StudyTracker") -> str:
    """What a command prints at its end: the command, then the URL (when MLflow was reachable)."""
    experiment = tracker.call(lambda: tracker.experiment_id) if tracker.online else None
    return ui_command(tracker.uri) + (f"\n    then open {ui_url(tracker.uri, experiment)}" if experiment else "")


def shared_view(parent_run_id: str) -> str:
    """The runs table's shared view state: the study's children (this parent's), the columns."""
    return json.dumps({"searchFilter": f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                       "orderByKey": "params.`depth`", "orderByAsc": True,
                       "selectedColumns": ["attributes.`Run Name`", *VIEW_COLUMNS]})


class StudyTracker:
    """The study's experiment, parent run and current child runs on one tracking URI."""

    def __init__(self, config, store: StudyStore):
        self.store = store
        self.uri = tracking_uri(config, store)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.study, self.study_id = config.study, self.store.study_id()
        self.experiment_name = config.tracking.experiment
        self._experiment_id: Optional[str] = None
        self._parent: Optional[str] = None
        self.online = True

    def call(self, action: Callable, *args, **kwargs) -> Any:
        """`action(*args)`, or None without calling it once the server was found unreachable; the
        first failure to reach it prints one line and takes the tracker offline."""
        if not self.online:
            return None
        try:
            return action(*args, **kwargs)
        except Exception as error:
            if not is_outage(error):
                raise
            self.online = False
            print(f"[mlflow] {self.uri} cannot be reached ({str(error).splitlines()[0][:160]}); the study goes on, "
                  "its results stay in the store and reach MLflow on the next command that can reach it", flush=True)
            return None

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            existing = self.client.get_experiment_by_name(self.experiment_name)
            if existing is not None:
                self._experiment_id = existing.experiment_id
            else:
                artifacts = None
                if not self.uri.startswith("http"):
                    # a local backend would otherwise put artifacts in ./mlruns of whoever logs first
                    artifacts = (self.store.root / "mlartifacts").resolve().as_uri()
                self._experiment_id = self.client.create_experiment(self.experiment_name, artifact_location=artifacts)
            # MLflow 3 opens an untagged experiment in its GenAI view; these are model-training runs
            self.client.set_experiment_tag(self._experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
        return self._experiment_id

    def share_view(self) -> None:
        """The view the printed URL opens (`ui_url`), on the study's experiment."""
        self.client.set_experiment_tag(self.experiment_id, SHARED_VIEW_TAG + VIEW_KEY, shared_view(self.parent_run()))

    # ------------------------------------------------------------------ the parent

    def parent_run(self) -> str:
        """The study's parent run id (created once per study id, reused by every later command)."""
        if self._parent is None:
            found = self._search(f"tags.`{ROLE_TAG}` = 'parent'")
            if found:
                self._parent = found[0].info.run_id
            else:
                self._parent = self.client.create_run(self.experiment_id, run_name=self.study, tags={
                    STUDY_TAG: self.study, STUDY_ID_TAG: self.study_id, ROLE_TAG: "parent",
                    "camstudy.store": str(self.store.root), **source_tags()}).info.run_id
        return self._parent

    def start(self, command: str) -> None:
        """The parent is RUNNING while `command` works on the study (the first contact with the
        server: an outage here takes the tracker offline for the whole command)."""
        def running():
            parent = self.parent_run()
            self.client.update_run(parent, status="RUNNING")
            set_tags(self.client, parent, {"camstudy.command": command})
            self.share_view()
        self.call(running)

    def finish(self, status: str, error: BaseException | str | None = None) -> None:
        """FINISHED, FAILED (with the error as a tag) or KILLED."""
        self.call(lambda: end_run(self.client, self.parent_run(), error, status))

    # ------------------------------------------------------------------ children

    def current_children(self) -> dict[str, str]:
        """run key -> run id of each run's current attempt."""
        runs = self._search(f"tags.`{ROLE_TAG}` = 'child' and tags.`{SUPERSEDED_TAG}` = 'false'")
        return {run.data.tags[RUN_KEY_TAG]: run.info.run_id for run in runs}

    def attempt_child(self, run_key: str, run_dir: Path, params: dict[str, Any], fingerprint: str,
                      fresh: bool) -> str:
        """The child of this attempt of `run_key`: the recorded one when the run resumes from its
        checkpoint (`fresh` False) with the same fingerprint, or starts again before its recorded
        child logged any epoch (killed before its first checkpoint); else a new child that
        supersedes every earlier one. Marked RUNNING. A child whose command died between creating it
        and recording it in the run's attempt.json (it never saw an epoch) is taken up, not doubled."""
        attempt = read_record(run_dir / StudyStore.ATTEMPT) or {}
        run_id = attempt.get("run_id")
        recorded = self._own_run(run_id) if run_id and attempt.get("fingerprint") == fingerprint else None
        if recorded is None:
            recorded = self._unrecorded_child(run_key, fingerprint)
        # from epoch 0 (`fresh`) only while its history is empty: two attempts' epochs never share a child
        if recorded is not None and (not fresh or not recorded.data.metrics):
            run_id = recorded.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            if "camstudy.error" in recorded.data.tags:  # the failure it resumes past
                self.client.delete_tag(run_id, "camstudy.error")
            if attempt.get("run_id") != run_id:
                self._record_attempt(run_dir, run_id, fingerprint)
            return run_id
        run_id = self._new_child(run_key, params, fingerprint)
        self._supersede(run_key, keep=run_id)
        self._record_attempt(run_dir, run_id, fingerprint)
        return run_id

    @staticmethod
    def _record_attempt(run_dir: Path, run_id: str, fingerprint: str) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / StudyStore.ATTEMPT, json.dumps({"run_id": run_id, "fingerprint": fingerprint}))

    def _unrecorded_child(self, run_key: str, fingerprint: str):
        """The current child of `run_key` with these settings that no attempt.json names and that
        has no metrics: made by a command killed before it recorded the child (and so before the
        run's first epoch); None if there is none."""
        for run in self._search(f"tags.`{RUN_KEY_TAG}` = '{run_key}' and tags.`{SUPERSEDED_TAG}` = 'false' "
                                f"and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'"):
            if not run.data.metrics:
                return run
        return None

    def finished_child(self, run_key: str, run_dir: Path, params: dict[str, Any], fingerprint: str) -> str:
        """The child of a run finished earlier: its attempt's, or a new one if the tracking
        server has never seen it (a new tracking URI, a deleted run)."""
        attempt = read_record(run_dir / StudyStore.ATTEMPT) or {}
        run_id = attempt.get("run_id")
        if run_id and self._exists(run_id):
            return run_id
        current = self.current_children().get(run_key)
        return current or self.attempt_child(run_key, run_dir, params, fingerprint, fresh=True)

    def _new_child(self, run_key: str, params: dict[str, Any], fingerprint: str) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_key, tags={
            STUDY_TAG: self.study, STUDY_ID_TAG: self.study_id, ROLE_TAG: "child", RUN_KEY_TAG: run_key,
            SUPERSEDED_TAG: "false", FINGERPRINT_TAG: fingerprint, PARENT_TAG: self.parent_run(),
            **source_tags()})
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run.info.run_id

    def _supersede(self, run_key: str, keep: str) -> None:
        for run in self._search(f"tags.`{RUN_KEY_TAG}` = '{run_key}' and tags.`{SUPERSEDED_TAG}` = 'false'"):
            if run.info.run_id == keep:
                continue
            set_tags(self.client, run.info.run_id, {SUPERSEDED_TAG: "true", "camstudy.superseded_by": keep})
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, "KILLED")

    def _exists(self, run_id: str) -> bool:
        return self._own_run(run_id) is not None

    def _own_run(self, run_id: str):
        """The active run `run_id` of this study, or None."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException as error:
            if is_outage(error):  # not "absent": let StudyTracker.call take the tracker offline
                raise
            return None  # RESOURCE_DOES_NOT_EXIST: deleted, or another tracking server
        own = run.info.lifecycle_stage == "active" and run.data.tags.get(STUDY_ID_TAG) == self.study_id
        return run if own else None

    def _search(self, clause: str) -> list:
        return self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.`{STUDY_ID_TAG}` = '{self.study_id}' and {clause}")


def is_outage(error: BaseException) -> bool:
    """The server could not be reached or answered 5xx (not: it refused a request as invalid)."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    text = str(error)
    return isinstance(error, MlflowException) and "API request to" in text and (
        "failed with exception" in text or "error code 5" in text or "Max retries" in text)


def metric_name(key: str) -> str:
    """An epoch report's key as its MLflow metric, grouped by prefix so the UI charts sections:
    train_loss -> train/loss, val_auc -> val/auc, lr -> train/lr, best_epoch -> val/best_epoch."""
    for stage in ("train", "val", "test"):
        if key.startswith(f"{stage}_"):
            return f"{stage}/{key[len(stage) + 1:]}"
    return "val/best_epoch" if key == "best_epoch" else f"train/{key}"


def source_tags() -> dict[str, str]:
    """Who ran what, from which commit: MLflow's own source tags, on the parent and every child."""
    tags = {"mlflow.user": _user(), "mlflow.source.type": "LOCAL",
            "mlflow.source.name": "camstudy " + " ".join(sys.argv[1:3])}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


@functools.lru_cache(maxsize=1)
def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def end_run(client: MlflowClient, run_id: str, error: BaseException | str | None = None,
            status: str | None = None) -> None:
    """FINISHED, or FAILED with the error kept as a tag so the UI shows why, or `status` (KILLED)."""
    if error is not None:
        set_tags(client, run_id, {"camstudy.error": str(error)})
    client.set_terminated(run_id, status or ("FINISHED" if error is None else "FAILED"))
