"""The whole study: prepare -> train -> explain -> analyze, each skipped when its outputs exist.

A finished training run is recognised by its `done.json`, a finished CAM extraction by
`cams/<run>/_done.json`, both carrying the run's fingerprint; `--force STAGE` removes the
outputs of that stage and every later one, then redoes them.
"""

from __future__ import annotations

import shutil
import time

import ray

from orchestrator import tracking
from orchestrator.ray_setup import init_ray
from orchestrator.stages import prepare_stage
from orchestrator.store import StudyStore
from orchestrator.train_runs import RunPlan, is_finished, placement, plan_runs, train_stage

STAGES = ("prepare", "train", "explain", "analyze")


def forced_stages(force: str | None) -> tuple[str, ...]:
    """The stage named by --force and every stage after it."""
    return STAGES[STAGES.index(force):] if force else ()


def run_train(config, force: bool = False, store: StudyStore | None = None) -> list[RunPlan]:
    """Train (after making sure the data is prepared, unless the caller just did)."""
    store = store or prepare_stage(config)
    init_ray(config)
    if force:
        _remove_runs(plan_runs(config, store), lambda plan: plan.run_dir)
    plans = train_stage(config, store)
    print(f"[train] MLflow: {tracking.ui_command(config)}")
    return plans


def run_explain(config, force: bool = False) -> None:
    from explain.extract import extract_runs

    store = StudyStore(config.study_dir)
    init_ray(config)
    plans = plan_runs(config, store)
    if force:
        _remove_runs(plans, lambda plan: store.cams_dir(plan.spec.name, plan.seed))
    finished = [plan for plan in plans if is_finished(plan)]
    for plan in plans:
        if plan not in finished:
            print(f"[explain] {plan.key}: no finished training run, skipped (see the train stage)")
    # one actor per GPU on a GPU cluster (as many as runs could train at once), else one per CPU
    layout = placement(config)
    if layout["gpus"]:
        extract_runs(config, store, finished, actors=layout["concurrency"], gpus_per_actor=layout["gpus"])
    else:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        extract_runs(config, store, finished, actors=max(1, cpus), gpus_per_actor=0)


def run_analyze(config) -> str:
    from analysis.report import analyze

    store = StudyStore(config.study_dir)
    report = analyze(store.root, config.to_dict(), tracker=tracking.StudyTracker(config))
    print(f"[analyze] report: {report}")
    return str(report)


def run_study(config, force: str | None = None) -> str:
    """All four stages; prints the wall time of each, the report path and the MLflow UI command."""
    forced, timings = forced_stages(force), {}
    started = time.time()
    store = prepare_stage(config, force="prepare" in forced)
    timings["prepare"] = time.time() - started
    began = time.time()
    run_train(config, force="train" in forced, store=store)
    timings["train"] = time.time() - began
    began = time.time()
    run_explain(config, force="explain" in forced)
    timings["explain"] = time.time() - began
    began = time.time()
    report = run_analyze(config)
    timings["analyze"] = time.time() - began
    print("[run] wall time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
          + f"; total {time.time() - started:.0f}s")
    print(f"[run] report: {report}")
    print(f"[run] compare runs: {tracking.ui_command(config)}")
    return report


def _remove_runs(plans: list[RunPlan], folder) -> None:
    for plan in plans:
        shutil.rmtree(folder(plan), ignore_errors=True)
