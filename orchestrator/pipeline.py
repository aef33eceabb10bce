"""The whole study: prepare -> train -> explain -> analyze, each reused when its inputs are unchanged.

Every command works inside `open_study`: it takes the study's lock (one writer per study), makes
or reads the study id, sweeps what killed writers left, and keeps the MLflow parent run RUNNING
while it works, ending it FINISHED, FAILED or KILLED with the command. Whether a stage's output
is reused is decided by the study contract (`study.records`): each stage prints why it
reruns ("explain: resnet18-seed0: cam.methods changed"). `--force STAGE` removes the outputs of
that stage and every later one, then redoes them.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import ray

from orchestrator import tracking
from orchestrator.lock import command_line, object_store_lock, study_lock
from orchestrator.ray_setup import init_ray
from orchestrator.stages import prepare_stage
from orchestrator.train_runs import explain_actors, placement, train_stage
from study import objectstore
from study.records import (
    analyze_inputs,
    read_record,
    record_reason,
    require_intact,
    write_record,
)
from study.runs import RETRAIN, RunPlan, is_finished, plan_runs
from study.store import StudyStore
from training.ray_data import study_log

STAGES = ("prepare", "train", "explain", "analyze")


def forced_stages(force: str | None) -> tuple[str, ...]:
    """The stage named by --force and every stage after it."""
    return STAGES[STAGES.index(force):] if force else ()


@contextlib.contextmanager
def open_study(config, command: str | None = None) -> Iterator[tuple[StudyStore, tracking.StudyTracker]]:
    """The study store, locked for this command, and its tracker with the parent run RUNNING."""
    store = StudyStore(config.study_dir)
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


def sweep(store: StudyStore) -> None:
    """Remove temporary files of writers that died mid-write (called with the lock held, before
    a stage starts writers of its own)."""
    swept = store.sweep_temporary()
    if swept:
        print(f"[study] removed {len(swept)} temporary file(s) left by interrupted writers, e.g. {swept[0]}")


def run_train(config, store: StudyStore, tracker: tracking.StudyTracker, force: bool = False) -> list[RunPlan]:
    sweep(store)
    init_ray(config)
    if force:
        _remove_runs(plan_runs(config, store), lambda plan: plan.run_dir)
    plans = train_stage(config, store, tracker)
    print(f"[train] compare runs in MLflow: {tracking.ui_lines(config, tracker)}")
    return plans


def run_explain(config, store: StudyStore, force: bool = False) -> None:
    """The baselines (model-free maps), then every finished run's CAMs."""
    from explain.baselines import explain_baselines
    from explain.extract import extract_runs

    sweep(store)
    init_ray(config)
    plans = plan_runs(config, store)
    if force:
        _remove_runs(plans, lambda plan: store.maps_dir(plan.spec.name, plan.seed, plan.permuted))
        _remove_runs(plans, lambda plan: store.sanity_dir(plan.spec.name, plan.seed, plan.permuted))
    finished = [plan for plan in plans if is_finished(plan)]
    # one actor per GPU on a GPU cluster (as many as runs could train at once), else one per CPU;
    # each reserves the host memory of the neediest model, no more actors than the nodes' memory
    # holds (refused in one line before any work when not even one fits)
    layout = placement(config)
    wanted = layout["concurrency"] if layout["gpus"] else max(1, int(ray.cluster_resources().get("CPU", 1)))
    actors, memory_per_actor = explain_actors(config, store, finished, layout, wanted)
    explain_baselines(config, store, force=force)
    for plan in plans:
        if plan not in finished:
            print(f"[explain] {plan.key}: no finished training run, skipped (see the train stage)")
    extract_runs(config, store, finished, actors=actors, gpus_per_actor=layout["gpus"] or 0,
                 memory_per_actor=memory_per_actor)


def run_analyze(config, store: StudyStore, tracker: tracking.StudyTracker, force: bool = False) -> str:
    """The analysis of the runs the config names; reused when none of its inputs changed."""
    from analysis.report import analyze

    sweep(store)
    plans = plan_runs(config, store)
    runs = [(plan.spec.name, plan.seed, plan.permuted) for plan in plans]
    inputs, record = analyze_inputs(config, store, runs), store.stage_record("analyze")
    report = store.analysis_dir / "report.html"
    reason = "--force" if force else record_reason(record, inputs)
    if reason is None and tracker.online and not (read_record(record) or {}).get("logged"):
        reason = "its results have not reached MLflow yet"
    if reason is None and report.is_file():
        print(f"[analyze] up to date: {store.shown(report)}")
        print(f"[analyze] compare runs in MLflow: {tracking.ui_lines(config, tracker)}")
        return str(report)
    print(f"[analyze] {reason or 'report missing'}; analysing {len(runs)} run(s)")
    _require_intact_inputs(store, plans)
    objectstore.remove([record])
    report = analyze(store.root, config.to_dict(), tracker=tracker, runs=runs)
    write_record(record, inputs, logged=tracker.online, vouches_for=[store.analysis_dir], own_folder=False)
    print(f"[analyze] report: {store.shown(report)}")
    print(f"[analyze] compare runs in MLflow: {tracking.ui_lines(config, tracker)}")
    return str(report)


def _require_intact_inputs(store: StudyStore, plans: list[RunPlan]) -> None:
    """What the analysis reads, checked against the records that vouch for it, so a damaged file
    is one line naming it rather than half a dataset read (`camstudy analyze` runs no explain
    stage first to redo it)."""
    explain_again = "run `camstudy explain` (or `camstudy run`) with the same config to recompute it"
    require_intact(store.baselines_dir / StudyStore.CAM_DONE, explain_again)
    for plan in plans:
        require_intact(plan.run_dir / StudyStore.DONE, RETRAIN)  # refused, as the train stage refuses it
        require_intact(store.maps_dir(plan.spec.name, plan.seed, plan.permuted) / StudyStore.CAM_DONE, explain_again)


def run_study(config, store: StudyStore, tracker: tracking.StudyTracker, force: str | None = None) -> str:
    """All four stages; prints the wall time of each, the report path and the MLflow UI command."""
    forced, timings = forced_stages(force), {}
    started = time.time()
    prepare_stage(config, force="prepare" in forced)
    timings["prepare"] = time.time() - started
    began = time.time()
    run_train(config, store, tracker, force="train" in forced)
    timings["train"] = time.time() - began
    began = time.time()
    run_explain(config, store, force="explain" in forced)
    timings["explain"] = time.time() - began
    began = time.time()
    report = run_analyze(config, store, tracker, force="analyze" in forced)
    timings["analyze"] = time.time() - began
    print("[run] wall time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
          + f"; total {time.time() - started:.0f}s")
    print(f"[run] report: {store.shown(report)}")
    return report


def _remove_runs(plans: list[RunPlan], folder) -> None:
    objectstore.remove(folder(plan) for plan in plans)
