"""The whole study: prepare -> train -> explain -> analyze (`orchestrator.stages.STAGES`), each
reused when its inputs are unchanged.

Every command works inside `open_study`: it takes the study's lock (one writer per study), makes
or reads the study id, sweeps what killed writers left, and keeps the MLflow parent run RUNNING
while it works, ending it FINISHED, FAILED or KILLED with the command. Whether a stage's output
is reused is decided by the study contract (`study.records`): each stage prints why it
reruns ("[explain] resnet18-seed0: cam.methods changed; computing its heatmaps"). `--force STAGE`
removes the outputs of that stage and every later one, then redoes them.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from orchestrator import tracking
from orchestrator.lock import command_line, object_store_lock, study_lock
from orchestrator.stages import STAGES, sweep
from study.store import StudyStore
from training.ray_data import study_log


def forced_stages(force: str | None) -> tuple[str, ...]:
    """The stage named by --force and every stage after it."""
    names = list(STAGES)
    return tuple(names[names.index(force):]) if force else ()


@contextlib.contextmanager
def open_study(config, command: str | None = None) -> Iterator[tuple[StudyStore, tracking.StudyTracker]]:
    """The study store, locked for this command, and its tracker with the parent run RUNNING."""
    store = StudyStore(config.study_dir)  # the command's one store: every stage is handed this object
    store.root.mkdir(parents=True, exist_ok=True)
    command = command or command_line()
    with study_lock(store.lock_path, command), _object_store_lock(store, command):
        _pull(store)
        print(f"[study] {config.study} (id {store.study_id()}) in {store.location}", flush=True)
        sweep(store)
        tracker = tracking.StudyTracker(config, store)
        tracker.start(command)
        try:
            with study_log(store.log_path):
                yield store, tracker
        except KeyboardInterrupt:
            tracker.finish("KILLED", "interrupted")
            raise
        except BaseException as error:
            tracker.finish("FAILED", error)
            raise
        else:
            tracker.finish("FINISHED")
        finally:  # what is written without the atomic helpers: MLflow's local files, the log
            store.push(store.mlflow_db, store.root / "mlartifacts", store.log_path)


def _object_store_lock(store: StudyStore, command: str):
    return object_store_lock(store.remote, command) if store.remote else contextlib.nullcontext()


def _pull(store: StudyStore) -> None:
    """A study in object storage: its mirror brought up to date before anything reads it. The
    bucket is the authority: a mirror file it does not hold is dropped, so the stage that made
    it is redone rather than reported up to date from a cache."""
    if store.remote:
        started = time.time()
        synced = store.remote.sync()
        print(f"[study] {store.remote.uri}: {synced.fetched} file(s) pulled into the local mirror {store.root} "
              f"({time.time() - started:.1f}s)", flush=True)
        if synced.dropped:
            print(f"[study] {store.remote.uri}: {len(synced.dropped)} mirror file(s) not in the bucket, dropped "
                  f"from the mirror (e.g. {synced.dropped[0]}); their stages will be redone", flush=True)


def run_study(config, store: StudyStore, tracker: tracking.StudyTracker, force: str | None = None) -> str:
    """All four stages (`STAGES`, in order); prints the wall time of each, the report path and the
    MLflow UI command."""
    forced, timings, report = forced_stages(force), {}, ""
    started = time.time()
    for name, stage in STAGES.items():
        began = time.time()
        report = stage(config, store, tracker, force=name in forced)
        timings[name] = time.time() - began
    print("[run] wall time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
          + f"; total {time.time() - started:.0f}s")
    print(f"[run] report: {store.shown(report)}")
    return report
