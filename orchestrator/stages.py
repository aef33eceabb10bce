"""The four stages, one entry each in `STAGES` (name -> stage), called the same way by the CLI's
stage commands and by `pipeline.run_study`:

    STAGES[name](config, store, tracker, force=False)

Each goes through the one stage skeleton (`study.records.run_stage`): compute the inputs of
each of its outputs, ask the completion rule why each must be made, print one `[stage]` line per
output (`[explain] resnet18-seed0: up to date, skipped`, `[prepare] preprocess.image_size
changed; preparing the data`), remove what is stale, build what must be made, and write each
record last with the inputs the decision was made on.

- prepare: one output (manifest, split, preprocessing cache, data report), recorded in
  `stages/prepare.json`.
- train: one output per (model, seed), recorded in the run's `done.json` by its worker; a run
  that finished with other settings or whose outputs are damaged is refused, never retrained
  (`--force train` retrains); an unfinished run resumes from its checkpoint.
- explain: the baselines (one output, `explain.baselines`), then one output per finished run
  (`explain.extract`), each recorded in its folder's `_done.json`; both modules go through the
  same skeleton.
- analyze: one output (`analysis/`), recorded in `stages/analyze.json`; also made again when its
  results have not reached MLflow or the report is missing.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Optional

import ray

from orchestrator import schedule, tracking, train_runs
from orchestrator.ray_setup import await_released_resources, init_ray
from study import objectstore
from study.atomic import write_text_atomic
from study.config import StudyConfig, dump_config
from study.errors import ConfigError
from study.records import (
    STAGE_NAMES,
    Output,
    analyze_inputs,
    fingerprint,
    prepare_inputs,
    read_record,
    record_reason,
    require_intact,
    run_stage,
)
from study.runs import RETRAIN, RunPlan, is_finished, plan_runs
from study.store import StudyStore
from training.cache import write_cache
from training.data import SiimIndex, load_siim
from training.data_report import data_report, format_report
from training.prepare import Prepared, cache_index, prepare_data, write_manifest
from training.source import LAYOUT_OF_SOURCE
from training.synth import generate


def sweep(store: StudyStore) -> None:
    """Remove temporary files of writers that died mid-write (called with the lock held, before
    a stage starts writers of its own)."""
    swept = store.sweep_temporary()
    if swept:
        print(f"[study] removed {len(swept)} temporary file(s) left by interrupted writers, e.g. {swept[0]}")


# --------------------------------------------------------------------------- prepare


def stage_prepare(config: StudyConfig, store: StudyStore, tracker: Optional[tracking.StudyTracker] = None,
                  force: bool = False) -> None:
    """The manifest, split, preprocessing cache and data report (skipped when up to date)."""
    sweep(store)
    save_config(store, config)
    record = store.stage_record("prepare")
    output = Output("", record, prepare_inputs(config), stale=(record,))

    def build(todo: list[Output]) -> None:
        index = _load_source(config, store)
        prepared = _build(config, store, index)
        report = _report(config, store, index, prepared)
        output.done(images=len(prepared.manifest),
                    splits={split: row["images"] for split, row in report["counts"].items()},
                    vouches_for=[store.data_dir], own_folder=False)  # the manifest, the cache, the data report

    run_stage("prepare", [output], build, force=force, doing="preparing the data",
              reused=lambda output: f"up to date in {store.data_dir} (inputs {fingerprint(output.inputs)}); "
                                    "nothing to do")


def save_config(store: StudyStore, config: StudyConfig) -> None:
    """Write the resolved config unless the same text is already there."""
    text = dump_config(config)
    if not store.config_path.is_file() or store.config_path.read_text() != text:
        write_text_atomic(store.config_path, text)


def _load_source(config: StudyConfig, store: StudyStore) -> SiimIndex:
    data = config.data
    if data.source == "synthetic":
        generate(store.source_dir, **dataclasses.asdict(data.synthetic))  # skips when already complete
        index = load_siim(store.source_dir, strict=data.strict)
    else:
        index = load_siim(data.root, labels=data.labels, strict=data.strict)
        if index.layout != LAYOUT_OF_SOURCE[data.source]:
            raise ConfigError(f"data.source is {data.source!r} but {data.root} holds the "
                              f"{index.layout} layout; set data.source: "
                              f"{next(k for k, v in LAYOUT_OF_SOURCE.items() if v == index.layout)!r}")
    print(f"[prepare] {len(index.images)} labelled images in {data.root or store.source_dir} "
          f"({index.layout} layout; {len(index.unlabelled)} unlabelled, {len(index.orphans)} orphan label rows)")
    return index


def _build(config: StudyConfig, store: StudyStore, index: SiimIndex) -> Prepared:
    workers = config.resources.prepare_actors
    if store.remote and config.data.source == "synthetic" and workers != 0:
        # the synthetic source lives in this node's mirror only: Ray tasks elsewhere could not read it
        print("[prepare] synthetic data of a study in object storage is preprocessed in this process")
        workers = 0
    if workers != 0:  # 0: the in-process loop, no Ray
        init_ray(config)
    prepared = prepare_data(index.images, config.split, config.preprocess, workers,
                            dedupe_pixels=config.data.dedupe_pixels)
    write_manifest(prepared.manifest, store.manifest_path)
    write_cache(store.cache_dir, cache_index(prepared.manifest), prepared.images, prepared.masks)
    print(f"[prepare] wrote {store.manifest_path} and {store.cache_dir} "
          f"({prepared.images.nbytes / 1e6:.1f} MB of images)")
    return prepared


def _report(config: StudyConfig, store: StudyStore, index: SiimIndex, prepared: Prepared) -> dict:
    source = config.data.root or f"synthetic ({store.source_dir})"
    report = data_report(prepared, index.unlabelled, index.orphans, index.layout, source)
    write_text_atomic(store.data_report_path, json.dumps(report, indent=2))
    print(format_report(report))
    return report


# --------------------------------------------------------------------------- train


def stage_train(config: StudyConfig, store: StudyStore, tracker: tracking.StudyTracker,
                force: bool = False) -> list[RunPlan]:
    """Train every (model, seed) not yet finished (`orchestrator.train_runs`); return the plans.
    A finished run gets its MLflow child closed if it never was (`train_runs.reconcile_child`)."""
    sweep(store)
    init_ray(config)
    plans = plan_runs(config, store)
    outputs = [Output(plan.key, plan.run_dir / StudyStore.DONE, plan.inputs, whole=(plan.run_dir,), item=plan)
               for plan in plans]

    def build(todo: list[Output]) -> None:
        train_runs.train_plans(config, store, tracker, [output.item for output in todo], train_runs.placement(config))

    run_stage("train", outputs, build, force=force, reused="finished earlier, skipped", doing=_training,
              # done.json's rule: a run finished with other settings or damaged outputs is refused (raises)
              judge=lambda output: None if is_finished(output.item) else "not done yet",
              on_reused=lambda output: train_runs.reconcile_child(config, store, tracker, output.item))
    print(f"[train] compare runs in MLflow: {tracking.ui_lines(tracker)}")
    return plans


def _training(output: Output) -> str:
    resumes = output.reason != "--force" and (output.item.run_dir / StudyStore.CHECKPOINT).is_file()
    return "resuming from its last checkpoint" if resumes else "training it"


# --------------------------------------------------------------------------- explain


def stage_explain(config: StudyConfig, store: StudyStore, tracker: Optional[tracking.StudyTracker] = None,
                  force: bool = False) -> None:
    """The baselines (model-free maps), then every finished run's CAMs."""
    from explain.baselines import explain_baselines
    from explain.extract import extract_runs, run_folders

    sweep(store)
    init_ray(config)
    plans = plan_runs(config, store)
    finished = [plan for plan in plans if is_finished(plan)]
    # one actor per GPU on a GPU cluster (as many as runs could train at once), else one per CPU;
    # each reserves the host memory of the neediest model, no more actors than the nodes' memory
    # holds (refused in one line before any work when not even one fits)
    placement = train_runs.placement(config)
    wanted = placement.concurrency if placement.gpus else max(1, int(ray.cluster_resources().get("CPU", 1)))
    road_gb = train_runs.road_memory_gb(config, finished, placement.on_gpu)
    actors, memory_per_actor = train_runs.explain_actors(config, store, finished, placement, wanted, road_gb)
    explain_baselines(config, store, force=force)
    for plan in plans:
        if plan not in finished:
            print(f"[explain] {plan.key}: no finished training run, skipped (see the train stage)")
    if force:  # --force leaves no maps of a run it cannot explain now either
        objectstore.remove(folder for plan in plans if plan not in finished for folder in run_folders(store, plan))
    await_released_resources("explain")
    extract_runs(config, store, finished, actors=actors, gpus_per_actor=placement.gpus or 0,
                 memory_per_actor=memory_per_actor, road_memory_per_actor=int(road_gb * schedule.GB), force=force)


# --------------------------------------------------------------------------- analyze


def stage_analyze(config: StudyConfig, store: StudyStore, tracker: tracking.StudyTracker,
                  force: bool = False) -> str:
    """The analysis of the runs the config names (`analysis.report`); returns the report's path."""
    from analysis.report import analyze

    sweep(store)
    plans = plan_runs(config, store)
    runs = [(plan.spec.name, plan.seed, plan.permuted) for plan in plans]
    record, report = store.stage_record("analyze"), store.analysis_dir / "report.html"
    output = Output("", record, analyze_inputs(config, store, runs), stale=(record,))

    def judge(output: Output) -> Optional[str]:
        reason = record_reason(output.record, output.inputs)
        if reason is None and tracker.online and not (read_record(output.record) or {}).get("logged"):
            reason = "its results have not reached MLflow yet"
        if reason is None and not report.is_file():
            reason = "report missing"
        return reason

    def build(todo: list[Output]) -> None:
        _require_intact_inputs(store, plans)
        analyze(store, config, tracker=tracker, runs=runs)
        output.done(logged=tracker.online, vouches_for=[store.analysis_dir], own_folder=False)
        print(f"[analyze] report: {store.shown(report)}")

    run_stage("analyze", [output], build, force=force, judge=judge, doing=f"analysing {len(runs)} run(s)",
              reused=f"up to date: {store.shown(report)}")
    print(f"[analyze] compare runs in MLflow: {tracking.ui_lines(tracker)}")
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


Stage = Callable[..., object]  # stage(config, store, tracker, force=False)
STAGES: dict[str, Stage] = dict(zip(STAGE_NAMES, (stage_prepare, stage_train, stage_explain, stage_analyze)))
