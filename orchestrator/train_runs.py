"""The train stage: one Ray Train run per (model, seed), a bounded number in flight.

A run of k > 1 workers (`resources.workers_per_run`) is a `TorchTrainer`, whose backend sets up
the torch.distributed group for DDP. A single-worker run needs no group and uses the plain
`DataParallelTrainer` (Ray Train V2's base class of `TorchTrainer`; same controller, workers,
failure handling and `ray.train.torch.get_device`): `TorchConfig` would make the Train
controller import torch, ~3 CPU-seconds of every run's start on a small machine.

Why one `@ray.remote(num_cpus=0)` task per run rather than Tune: the task only waits on
`TorchTrainer.fit()`, so it holds no CPU (a Tune trial holding a CPU while its Train worker needs
one deadlocks a 2-CPU machine), and a rerun needs no `Tuner.restore`: every run resumes from the
checkpoint our own loop writes to `train/<model>-seed<k>/`, and a finished run is skipped by its
`done.json` before Ray is even asked. `FailureConfig(max_failures)` restarts a crashed worker,
which resumes from that same checkpoint. An error of camstudy's own (a diverged loss, a missing
weights file) is not a crash: retrying cannot mend it, and Ray Train V2 retries every worker
failure, so the worker records it in the run folder (`error.json`) and returns; the driver then
stops every run in flight and reports that one line.

Every worker asks Ray for the host memory its run needs (Ray's `memory` resource: an estimate,
or the peak a finished run of the model measured, `orchestrator.schedule`), and the driver starts
a run only when that fits in what the nodes have left; a run that fits on no node even alone is
refused before anything starts. When Ray's memory monitor kills a run anyway, Ray retries it once
(`orchestrator.ray_setup.OOM_RETRIES`), the console gets one line naming the run and the full
report goes to the study log.

Per-epoch metrics travel worker -> `ray.train.report` -> a `UserCallback` on the Train
controller -> a Ray queue -> the driver, which logs them to the run's MLflow child and prints
one progress line; only the driver talks to MLflow. Epochs whose report was lost with a dead
driver are back-filled from the run's done.json when the run is closed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import ray
import ray.train
from ray.util.queue import Empty, Queue

from orchestrator import ray_setup, schedule, tracking
from orchestrator.train_worker import EpochReporter, train_worker
from study import errors
from study.atomic import write_text_atomic
from study.errors import CamstudyError, TrainingError
from study.mlflow_log import log_metrics, set_tags
from study.progress import duration_text
from study.records import read_record
from study.runs import Placement, RunPlan
from study.store import StudyStore
from training import registry
from training.ray_data import TRACE_LOGGER

NODE_TAG = "camstudy.node"  # the Ray node a run trained on (its host in camstudy.node_host)


def child_params(config, plan: RunPlan) -> dict[str, Any]:
    """Identical param names on every child, so MLflow's compare view lines the runs up."""
    recipe = registry.recipe_for(plan.spec, config.recipes)
    return {
        "model": plan.spec.name, "family": plan.spec.family, "depth": plan.spec.depth,
        "params_millions": round(registry.parameter_count_millions(
            plan.spec, config.preprocess.image_size, in_chans=config.preprocess.channels), 2), "seed": plan.seed,
        "optimizer": recipe.optimizer, "lr": recipe.lr, "epochs": recipe.epochs,
        "batch_size": config.training.batch_size, "image_size": config.preprocess.image_size,
        "pretrained": config.models.init, "cam_layer": plan.spec.target_layer,
        "timm_name": plan.spec.timm_name, "selection": config.training.selection,
        "threshold": config.training.threshold, "workers_per_run": config.resources.workers_per_run,
        "labels": "permuted" if plan.permuted else "as given", "fingerprint": plan.fingerprint,
    }


@dataclass(frozen=True)
class Outcome:
    """How one run's `fit` ended: `error` None on success; `own` True for camstudy's own error."""

    error: Optional[str] = None
    own: bool = False
    kind: str = "TrainingError"


@ray.remote(num_cpus=0)
def _fit(config, plan: RunPlan, progress: Queue, placement: Placement, ray_storage: str) -> Outcome:
    """Run one Ray Train run to completion and say how it ended; `ray_storage`: the driver's
    store's `ray_storage`. Its workers find the study from the config (a study in object storage:
    in their node's mirror, pulled as needed)."""
    from ray.train import FailureConfig, RunConfig

    trainer = _trainer_class(placement.workers)(
        train_worker,
        train_loop_config={"config": config, "model": plan.spec.name, "seed": plan.seed,
                           "fingerprint": plan.fingerprint, "torch_threads": placement.torch_threads,
                           "permuted": plan.permuted},
        scaling_config=scaling_config(config, plan, placement),
        run_config=RunConfig(name=plan.key, storage_path=ray_storage,
                             failure_config=FailureConfig(max_failures=config.training.max_failures),
                             callbacks=[EpochReporter(plan.key, progress)]),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        return Outcome(_root_cause(error))
    if result.error is not None:
        return Outcome(_root_cause(result.error))
    own = read_record(plan.run_dir / StudyStore.ERROR)
    return Outcome(own["message"], own=True, kind=own["kind"]) if own else Outcome()


def scaling_config(config, plan: RunPlan, placement: Placement):
    """What each of the run's workers asks Ray for: the run's placement (CPUs, its GPU share, its
    host `memory` in bytes: `Starts`) and the model's own extra resources (resources.model_resources)."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=placement.workers, use_gpu=placement.gpus > 0,
                         resources_per_worker={**placement.resources,
                                               **config.resources.model_resources.get(plan.spec.name, {})})


def _trainer_class(workers: int) -> type:
    """TorchTrainer for a DDP group, the torch-free base class for one worker (module docstring)."""
    if workers > 1:
        from ray.train.torch import TorchTrainer
        return TorchTrainer
    from training.ray_private import v2_data_parallel_trainer  # Ray Train V2's, not a public path
    return v2_data_parallel_trainer()


def _root_cause(error: BaseException) -> str:
    """The innermost message: a worker's TrainingError says model, seed and epoch."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def placement(config) -> Placement:
    """How runs are placed on this cluster, from what Ray reports now (`study.runs.Placement`)."""
    resources_cfg, cluster = config.resources, ray.cluster_resources()
    runs = len(registry.specs_for(config.models)) * (len(config.training.seeds) + config.sanity.label_permutation)
    gpus_here = cluster.get("GPU", 0)
    gpus = resources_cfg.gpus_per_run
    packing = gpus == "auto" and gpus_here > 0
    if gpus == "auto":
        gpus = 1 if gpus_here else 0
    workers, cpus = resources_cfg.workers_per_run, resources_cfg.cpus_per_worker
    concurrency = resources_cfg.max_concurrent_runs
    if concurrency == "auto":
        if gpus and gpus_here:
            concurrency = int(gpus_here // (gpus * workers))
        elif gpus:  # GPU nodes not up yet (autoscaler): queue every run, Ray places them as nodes join
            concurrency = runs
        else:
            concurrency = int(cluster.get("CPU", 1) // (cpus * workers))
    threads = resources_cfg.torch_threads
    return Placement(workers=workers, gpus=gpus, concurrency=max(1, concurrency), packing=packing,
                     cluster_gpus=int(gpus_here), torch_threads=max(1, int(cpus)) if threads == "auto" else threads,
                     resources={"CPU": cpus, **({"GPU": gpus} if gpus else {})}, on_gpu=bool(gpus),
                     # `memory` of a node: by default the memory free when it started less the object store's 30%
                     nodes=tuple(node["Resources"] for node in ray.nodes() if node.get("Alive")))


REFERENCE_FLOPS_PER_S = 1e14  # only orders runs: any constant gives the same order


def expected_seconds(plan: RunPlan, config) -> float:
    """A run's training work in GPU-seconds at a nominal speed (forward FLOPs x 3 for the backward,
    x epochs; the training split is the same for every run): what orders the runs."""
    flops, _ = registry.forward_cost(plan.spec, config.preprocess.image_size, config.preprocess.channels)
    return 3 * flops * registry.recipe_for(plan.spec, config.recipes).epochs / REFERENCE_FLOPS_PER_S


# A training step's cost on a CPU, fitted to the throughput measured on a 2-core machine (nine
# models, 64 px, batch 16; docs/ARCHITECTURE.md's fact sheet): seconds ≈ FLOP_S x 3 x forward FLOPs x
# batch + PARAMETER_S x parameters (the optimizer step and weight traffic: what makes VGG and
# ViT-L slower than their FLOPs say). Within 30% for each model; only the ratio matters here.
FLOP_S, PARAMETER_S = 2.79e-12, 4.71e-9


def relative_epoch_cost(plan: RunPlan, config) -> float:
    """One epoch's cost per training image (relative: the stage scales it by measured epochs)."""
    flops, _ = registry.forward_cost(plan.spec, config.preprocess.image_size, config.preprocess.channels)
    params = registry.parameter_count_millions(plan.spec, config.preprocess.image_size,
                                               in_chans=config.preprocess.channels) * 1e6
    return FLOP_S * 3 * flops + PARAMETER_S * params / config.training.batch_size


def run_demands(config, store: StudyStore, plans: list[RunPlan],
                duration: Callable[[RunPlan, Any], float] = expected_seconds) -> dict[str, schedule.Demand]:
    """Each run's GPU share (measured peak memory when the store has one, else the estimate;
    `resources.model_resources.<model>.GPU` overrides) and expected duration (`duration`; the
    schedule simulator passes measured throughputs)."""
    seconds = {plan.key: duration(plan, config) for plan in plans}
    longest = max(seconds.values())
    found = {}
    for plan in plans:
        override = config.resources.model_resources.get(plan.spec.name, {}).get("GPU")
        share = float(override) if override is not None else schedule.gpu_share(
            _memory_gb(plan, config, store), config.resources.gpu_memory_gb, seconds[plan.key], longest)
        found[plan.key] = schedule.Demand(plan.key, share * config.resources.workers_per_run, seconds[plan.key])
    return found


def _memory_gb(plan: RunPlan, config, store: StudyStore) -> float:
    key = schedule.memory_key(plan.spec.name, config.training.batch_size, config.preprocess.image_size,
                              config.training.amp, config.resources.workers_per_run)
    measured = schedule.measured_memory_gb(store.gpu_memory_path, key)
    if measured is not None:
        return measured * schedule.HEADROOM
    params, activations = _model_size(plan.spec, config)
    return schedule.estimated_memory_gb(params, activations, _worker_batch(config),
                                        registry.recipe_for(plan.spec, config.recipes).optimizer)


def host_memory_gb(plan: RunPlan, config, store: StudyStore, on_gpu: bool) -> float:
    """The host memory one worker of `plan` asks Ray for: the peak a finished run of the model with
    these settings measured on this kind of node (host_memory.json) with headroom, else the estimate
    (`schedule.estimated_host_memory_gb`)."""
    measured = schedule.measured_memory_gb(store.host_memory_path, _host_memory_key(plan, config, on_gpu))
    if measured is not None:
        return measured * schedule.HEADROOM
    params, activations = _model_size(plan.spec, config)
    return schedule.estimated_host_memory_gb(params, activations, _worker_batch(config),
                                             registry.recipe_for(plan.spec, config.recipes).optimizer,
                                             _cache_gb(store), on_gpu)


def explain_needs(config, store: StudyStore, plans: list[RunPlan], on_gpu: bool) -> dict[str, float]:
    """The host memory (GB) an explain actor needs for each model of `plans`: its measured peak with
    headroom when host_memory.json has one (under `schedule.explain_memory_key`), else
    `schedule.estimated_explain_memory_gb`."""
    needs = {}
    for spec in {plan.spec for plan in plans}:
        key = schedule.explain_memory_key(spec.name, config.preprocess.image_size, config.cam.batch_size, on_gpu)
        measured = schedule.measured_memory_gb(store.host_memory_path, key)
        params, activations = _model_size(spec, config)
        needs[spec.name] = (measured * schedule.HEADROOM if measured is not None else
                            schedule.estimated_explain_memory_gb(params, activations, config.cam.batch_size, on_gpu))
    return needs


def road_memory_gb(config, plans: list[RunPlan], on_gpu: bool) -> float:
    """Host memory (GB) a ROAD actor reserves: what the largest model of `plans` takes
    (`schedule.estimated_road_memory_gb`); 0 without faithfulness (no ROAD actor)."""
    if not config.faithfulness.enabled or not plans:
        return 0.0
    return max(schedule.estimated_road_memory_gb(_model_size(spec, config)[0], on_gpu)
               for spec in {plan.spec for plan in plans})


def explain_actors(config, store: StudyStore, plans: list[RunPlan], placement: Placement,
                   wanted: int, reserve_gb: float = 0.0) -> tuple[int, int]:
    """(CAM actors, host memory per CAM actor in bytes) for the explain stage. Any actor may be
    given any run, so each reserves what the neediest model takes; at most `wanted` actors and no
    more than the nodes' memory holds at once (an actor Ray cannot place would stall the pipeline)
    once `reserve_gb` is set aside on the largest node (one ROAD actor: `road_memory_gb`); refused
    in one line when not even one fits on the largest node."""
    needs = explain_needs(config, store, plans, placement.on_gpu)
    if not needs:
        return wanted, 0
    model = max(needs, key=needs.get)
    need = needs[model]
    asks = {**placement.resources, "CPU": 0 if placement.gpus else 1}  # as explain.extract asks per actor
    nodes = [node for node in placement.nodes if _offers(node, asks)]
    if not nodes:  # no node to place on yet (an autoscaler adds them): Ray holds the actors until one joins
        return wanted, int(need * schedule.GB)
    free = sorted((node.get("memory", 0) / schedule.GB for node in nodes), reverse=True)
    free[0] -= reserve_gb
    memory = schedule.NodeMemory(free)
    fitting = memory.fitting(need)
    if fitting == 0:
        road = f" beside a ROAD actor's {reserve_gb:.1f} GB" if reserve_gb else ""
        raise errors.CamstudyError(
            f"explain: an actor for {model} needs ~{need:.1f} GB of host memory{road}, more than the "
            f"{free[0] + reserve_gb:.1f} GB Ray can reserve on the largest node; lower cam.batch_size, leave {model} "
            f"out of models.names, " + ("turn faithfulness.enabled off, " if reserve_gb else "")
            + "or add a node with more memory")
    return min(wanted, fitting), int(need * schedule.GB)


def _model_size(spec: registry.ModelSpec, config) -> tuple[float, float]:
    """(parameters in millions, activation elements per image) at the configured input size."""
    _, activations = registry.forward_cost(spec, config.preprocess.image_size, config.preprocess.channels)
    return registry.parameter_count_millions(spec, config.preprocess.image_size,
                                             in_chans=config.preprocess.channels), activations


def _worker_batch(config) -> int:
    return config.training.batch_size // config.resources.workers_per_run


def _cache_gb(store: StudyStore) -> float:
    """The preprocessed images every training worker holds in memory (the train stage runs after
    prepare, so the cache is there; before it, nothing is counted)."""
    try:
        return (store.cache_dir / StudyStore.CACHE_IMAGES).stat().st_size / schedule.GB
    except OSError:
        return 0.0


def _host_memory_key(plan: RunPlan, config, on_gpu: bool) -> str:
    return schedule.host_memory_key(plan.spec.name, config.training.batch_size, config.preprocess.image_size,
                                    config.training.amp, config.resources.workers_per_run, on_gpu)


def _offers(node: dict, asks: dict) -> bool:
    """Whether a node has every resource a worker asks for (memory aside: that is what is packed)."""
    return all(node.get(name, 0) >= amount for name, amount in asks.items() if amount and name != "memory")


def train_plans(config, store: StudyStore, tracker: tracking.StudyTracker, todo: list[RunPlan],
                placement: Placement) -> None:
    """Train every run of `todo` (the train stage's unfinished runs: `orchestrator.stages`), placed
    by `placement`. Raises if any run failed."""
    if placement.packing:
        print(f"[train] {len(todo)} run(s) packed on {placement.cluster_gpus} GPU(s), each asking for its own share "
              f"(resources.gpus_per_run: auto), longest first")
    else:
        print(f"[train] {len(todo)} run(s), up to {placement.concurrency} at once, "
              f"{placement.workers} worker(s) x {placement.resources} each")
    failures = _run_all(config, store, tracker, todo, placement)
    if failures:
        raise TrainingError("training failed for " + "; ".join(f"{k}: {e}" for k, e in failures.items())
                            + ". Fix the cause and rerun: finished runs are kept, unfinished ones resume.")


def _run_all(config, store, tracker, todo: list[RunPlan], placement: Placement) -> dict[str, str]:
    """Every run of `todo`, at most `concurrency` at once. A crashed run (after its retries) is
    reported at the end; camstudy's own error in any run stops them all and is raised at once;
    an interrupt (Ctrl-C, SIGTERM from `ray job stop`) marks every run in flight KILLED."""
    starts = Starts(config, store, todo, placement)
    print(f"[train] {starts.memory_line()}")
    # the progress queue's actor is restarted if Ray's memory monitor kills it (its newest-first
    # policy kills small helpers too): reports lost with it are back-filled from done.json
    progress = Queue(actor_options={"max_restarts": -1, "max_task_retries": -1})
    in_flight, failures, run_ids = {}, {}, {}
    status = StageProgress(config, todo, placement.concurrency)
    try:
        while starts.pending or in_flight:
            for plan, run_placement in starts.now(len(in_flight)):
                run_ids[plan.key] = _start_child(config, store, tracker, plan)
                status.run_started(plan.key)
                in_flight[_fit.options(name=ray_setup.RUN_TASK.format(plan.key)).remote(
                    config, plan, progress, run_placement, store.ray_storage)] = plan
            finished, _ = ray.wait(list(in_flight), num_returns=1, timeout=2.0)
            _log_progress(progress, status, tracker, run_ids)  # before any finished run is closed
            status.heartbeat(len(in_flight))
            for ref in finished:
                plan = in_flight.pop(ref)
                starts.finished(plan)
                status.run_finished(plan.key)
                outcome = _outcome(plan, ref)
                store.pull(plan.run_dir)  # a study in object storage: what the run's workers uploaded
                if run_ids[plan.key]:
                    tracker.call(_close_child, tracker.client, run_ids[plan.key], plan, outcome.error)
                if outcome.error is None:
                    record_gpu_memory(config, store, plan)
                    record_host_memory(config, store, plan, placement.on_gpu)
                print(f"[train] {plan.key}: {'FAILED: ' + outcome.error if outcome.error else 'done'}")
                if outcome.own:
                    raise getattr(errors, outcome.kind, CamstudyError)(outcome.error)
                if outcome.error:
                    failures[plan.key] = outcome.error
    except BaseException as stop:
        _stop_in_flight(tracker, in_flight, run_ids, stop)
        raise
    return failures


def _outcome(plan: RunPlan, ref) -> Outcome:
    """How the run's task ended, in one line: a memory-monitor kill (of the run's task, past Ray's
    retries, or of its Train workers, past `training.max_failures`) is summarised and its report
    (45-60 lines) goes to the study log."""
    try:
        outcome = ray.get(ref)
    except ray.exceptions.OutOfMemoryError as error:
        outcome = Outcome(str(error))
    if outcome.error is None or ray_setup.memory_kill(outcome.error) is None:
        return outcome
    return Outcome(_brief(outcome.error, plan.key) + f"; lower training.batch_size or resources.max_concurrent_runs, "
                   f"or give {plan.spec.name} a node with more memory")


def _brief(error: str, key: str = "train") -> str:
    """A memory-monitor report (45-60 lines) as one line, the report itself into the study log;
    any other error as it is."""
    kill = ray_setup.memory_kill(error)
    if kill is None:
        return error
    logging.getLogger(TRACE_LOGGER).error("%s: Ray's memory monitor:\n%s", key, error)
    return (f"killed by Ray's memory monitor (node {kill['ip']} at {kill['used_gb']:.1f} of {kill['limit_gb']:.1f} "
            f"GB; the report is in the study log)")


class Starts:
    """Which pending runs start now. Without packing: up to a fixed number in flight, largest
    model first. With packing: every run that fits on the GPUs' free shares, longest first
    (`orchestrator.schedule.Packer`), each asking Ray for its own share. Either way a run starts
    only when its workers' host memory fits in what the nodes it can run on have left
    (`schedule.NodeMemory`; skipped while no such node is up: an autoscaler adds them), and a run
    that fits on no node even alone is refused before any run starts."""

    def __init__(self, config, store: StudyStore, todo: list[RunPlan], placement: Placement):
        self.placement = placement
        self.pending = registry.largest_first(todo)
        self.packer = schedule.Packer(placement.cluster_gpus) if placement.packing else None
        self.demands = run_demands(config, store, todo) if placement.packing else {}
        self.memory_gb = {plan.key: host_memory_gb(plan, config, store, placement.on_gpu) for plan in todo}
        nodes = placement.nodes
        self.memory = schedule.NodeMemory([node.get("memory", 0) / schedule.GB for node in nodes])
        self.nodes = {plan.key: [i for i, node in enumerate(nodes) if _offers(node, self._asks(config, plan))]
                      for plan in todo}
        self._refuse_what_fits_nowhere(config)

    def now(self, in_flight: int) -> list[tuple[RunPlan, Placement]]:
        order = self.pending
        if self.packer is not None:
            by_key = {plan.key: plan for plan in self.pending}
            order = [by_key[d.key] for d in schedule.longest_first(self.demands[key] for key in by_key)]
        started = []
        for plan in order:
            if self.packer is None and in_flight + len(started) >= self.placement.concurrency:
                break
            if self._take(plan):
                started.append(plan)
        self.pending = [plan for plan in self.pending if plan not in started]
        return [(plan, self._placement(plan)) for plan in started]

    def finished(self, plan: RunPlan) -> None:
        self.memory.release(plan.key)
        if self.packer is not None:
            self.packer.release(plan.key)

    def memory_line(self) -> str:
        """What each model's workers reserve, and what the nodes offer, for the stage's opening lines."""
        per_model = {plan.spec.name: self.memory_gb[plan.key] for plan in self.pending}
        offered = ", ".join(f"{gb:.1f}" for gb in self.memory.free) or "unknown (no node up yet)"
        return ("host memory reserved per worker (Ray `memory`): "
                + ", ".join(f"{model} {gb:.1f} GB" for model, gb in per_model.items()) + f"; node(s) offer {offered} GB")

    def _take(self, plan: RunPlan) -> bool:
        """Reserve the run's host memory and, when packing, its GPU share: both or neither."""
        nodes = self.nodes[plan.key]
        if nodes and not self.memory.place(plan.key, self.memory_gb[plan.key], self.placement.workers, nodes):
            return False
        if self.packer is not None and self.packer.place(self.demands[plan.key]) is None:
            self.memory.release(plan.key)
            return False
        return True

    def _placement(self, plan: RunPlan) -> Placement:
        """The run's own resources per worker: its host memory in bytes and, when packing, its GPU share."""
        resources = {**self.placement.resources, "memory": int(self.memory_gb[plan.key] * schedule.GB)}
        if self.packer is None:
            return dataclasses.replace(self.placement, resources=resources)
        share = self.demands[plan.key].gpus / self.placement.workers
        return dataclasses.replace(self.placement, gpus=share, resources={**resources, "GPU": share})

    def _asks(self, config, plan: RunPlan) -> dict:
        return {**self.placement.resources, **config.resources.model_resources.get(plan.spec.name, {})}

    def _refuse_what_fits_nowhere(self, config) -> None:
        """One line naming each model whose worker needs more host memory than the largest node it
        can run on offers Ray, before any run starts (Ray would hold it as infeasible for ever)."""
        too_big = {}
        for plan in self.pending:
            largest = max((self.memory.free[i] for i in self.nodes[plan.key]), default=None)
            if largest is not None and self.memory_gb[plan.key] > largest:
                too_big.setdefault(plan.spec.name, (self.memory_gb[plan.key], largest))
        if too_big:
            where = "the GPU" if self.placement.on_gpu else "the CPU"
            raise TrainingError(
                "; ".join(f"training {model} needs ~{need:.1f} GB of host memory per worker, more than the "
                          f"{largest:.1f} GB Ray can reserve on the largest node it can run on" for model, (need, largest)
                          in too_big.items())
                + f" (batch {_worker_batch(config)} at {config.preprocess.image_size} px on {where}); lower "
                  f"training.batch_size or preprocess.image_size, leave {', '.join(too_big)} out of models.names, "
                  f"or add a node with more memory")


def _start_child(config, store, tracker, plan: RunPlan) -> Optional[str]:
    """The MLflow child of this attempt (a new one unless the run resumes from its checkpoint);
    None while the tracking server cannot be reached."""
    fresh = not (plan.run_dir / StudyStore.CHECKPOINT).is_file()

    def start() -> str:
        run_id = tracker.attempt_child(plan.key, plan.run_dir, child_params(config, plan), plan.fingerprint, fresh)
        tracker.client.log_artifact(run_id, str(store.config_path))  # the resolved config, as run
        return run_id
    return tracker.call(start)


def record_gpu_memory(config, store: StudyStore, plan: RunPlan) -> None:
    """The peak GPU memory a finished run measured, into the store's gpu_memory.json (the driver
    is its one writer), so later runs of the model with these settings ask for what it took."""
    key = schedule.memory_key(plan.spec.name, config.training.batch_size, config.preprocess.image_size,
                              config.training.amp, config.resources.workers_per_run)
    record_peak(store.gpu_memory_path, key, (read_record(plan.run_dir / StudyStore.DONE) or {}).get("gpu_peak_gb"))


def record_host_memory(config, store: StudyStore, plan: RunPlan, on_gpu: bool) -> None:
    """The peak resident memory of a finished run's worker (rank 0), into host_memory.json, so later
    runs of the model with these settings on this kind of node reserve what it took."""
    record_peak(store.host_memory_path, _host_memory_key(plan, config, on_gpu),
                (read_record(plan.run_dir / StudyStore.DONE) or {}).get("host_peak_gb"))


def record_peak(path: Path, key: str, peak: Any) -> None:
    """Keep the largest peak (GB) measured under `key` in the JSON file at `path`; a missing peak
    (an older done.json, a CPU run's GPU peak) changes nothing."""
    if not isinstance(peak, (int, float)):
        return
    known = read_record(path) or {}
    known[key] = max(float(peak), float(known.get(key, 0.0)))
    write_text_atomic(path, json.dumps(known, indent=1, sort_keys=True))


def _stop_in_flight(tracker, in_flight: dict, run_ids: dict[str, Optional[str]], stop: BaseException) -> None:
    """Cancel every run still in flight (its Train controller and workers go with its task) and
    mark its child KILLED, with the reason."""
    reason = "interrupted" if isinstance(stop, KeyboardInterrupt) else f"stopped: {_brief(str(stop))}"
    for ref, plan in in_flight.items():
        ray.cancel(ref, force=True)
        if run_ids[plan.key]:
            tracker.call(tracking.end_run, tracker.client, run_ids[plan.key], reason, status="KILLED")
        print(f"[train] {plan.key}: {reason}; it resumes from its last checkpoint on the next run")


class StageProgress:
    """Runs done of the stage's total and the time left, from the planned work: each run's epochs
    still to come times its epoch cost, plus its start-up (Ray Train's `fit` before the first
    epoch) and its tail (test predictions after the last), packed longest first onto the `slots`
    runs that train at once; a run in flight keeps its slot, less the time it has already run.
    A run's epoch cost is its own measured epoch (`epoch_seconds` of its reports) once it reported
    one; before that its `relative_epoch_cost` times the median ratio of measured to relative
    cost over the runs that reported. Start-up and tail are the medians measured so far (before
    any: START_UP_S, 0). No estimate before the first epoch; a line every minute even then.
    `clock` is injectable for tests."""

    HEARTBEAT_S = 60.0
    START_UP_S = 12.0  # a TorchTrainer.fit() before its first epoch, 9-15 s measured (docs/ARCHITECTURE.md)

    def __init__(self, config, plans: list[RunPlan], slots: int = 1, clock: Callable[[], float] = time.time):
        self.clock, self.slots = clock, max(1, int(slots))
        self.epochs = {plan.key: registry.recipe_for(plan.spec, config.recipes).epochs for plan in plans}
        self.relative = {plan.key: relative_epoch_cost(plan, config) for plan in plans}
        self.done = {plan.key: 0 for plan in plans}  # epochs finished per run
        self.measured: dict[str, float] = {}  # seconds of a run's latest epoch
        self.began: dict[str, float] = {}  # run in flight -> when it started
        self.last_report: dict[str, float] = {}  # run in flight -> when its latest epoch ended
        self.start_ups: list[float] = []
        self.tails: list[float] = []
        self.runs, self.runs_done = len(plans), 0
        self.started = self.last_line = clock()

    def run_started(self, key: str) -> None:
        self.began[key] = self.clock()

    def run_finished(self, key: str) -> None:
        if key in self.last_report:
            self.tails.append(self.clock() - self.last_report.pop(key))
        self.done[key] = self.epochs.get(key, self.done.get(key, 0))
        self.began.pop(key, None)
        self.runs_done += 1

    def epoch_reported(self, key: str, epoch: int, seconds: Optional[float] = None) -> None:
        now = self.clock()
        if key in self.began and key not in self.last_report and seconds:  # its first report: start-up measured
            self.start_ups.append(max(0.0, now - self.began[key] - float(seconds)))
        # a resumed run's first report also stands for the epochs it finished before
        self.done[key] = max(self.done.get(key, 0), int(epoch))
        if seconds and seconds > 0:
            self.measured[key] = float(seconds)
        self.last_report[key] = self.last_line = now

    def seconds_left(self) -> Optional[float]:
        """The planned remaining wall time (None until an epoch was measured)."""
        if not self.measured:
            return None
        scale = statistics.median(self.measured[k] / max(self.relative.get(k, 0), 1e-12) for k in self.measured)
        cost = {key: self.measured.get(key, scale * self.relative[key]) for key in self.epochs}
        start_up = statistics.median(self.start_ups) if self.start_ups else self.START_UP_S
        tail = statistics.median(self.tails) if self.tails else 0.0
        now = self.clock()
        loads = []
        for key, began in self.began.items():  # in flight: what is left of its own plan
            since = now - self.last_report.get(key, began)
            ahead = (0.0 if key in self.last_report else start_up) + (self.epochs[key] - self.done[key]) * cost[key]
            loads.append(max(0.0, ahead - since) + tail)
        loads += [0.0] * max(0, self.slots - len(loads))
        waiting = sorted((start_up + (self.epochs[key] - self.done[key]) * cost[key] + tail for key in self.epochs
                          if key not in self.began and self.done[key] < self.epochs[key]), reverse=True)
        for work in waiting:  # longest first onto the slot that frees first
            loads[loads.index(min(loads))] += work
        return max(loads) if loads else 0.0

    def line(self) -> str:
        done = f"{self.runs_done}/{self.runs} runs done"
        left = self.seconds_left()
        if left is None:
            return f"{done}, time left: estimating (no epoch finished yet)"
        return f"{done}, ~{duration_text(left)} left"

    def heartbeat(self, in_flight: int) -> None:
        if self.clock() - self.last_line >= self.HEARTBEAT_S:
            self.last_line = self.clock()
            print(f"[train {self.clock() - self.started:6.0f}s] {self.line()}; {in_flight} in flight", flush=True)


def _log_progress(progress: Queue, status: StageProgress, tracker, run_ids: dict[str, Optional[str]]) -> None:
    """Each epoch report waiting in the queue: an MLflow step on its run's child, a progress line."""
    while True:
        try:
            key, report = progress.get_nowait()
        except Empty:
            return
        if run_ids[key]:
            tracker.call(_log_epoch, tracker.client, run_ids[key], report)
        status.epoch_reported(key, int(report["epoch"]), report.get("epoch_seconds"))
        numbers = " ".join(f"{k}={v:.4g}" for k, v in report.items()
                           if k != "epoch" and isinstance(v, (int, float)))
        print(f"[train {time.time() - status.started:6.0f}s] {key} epoch {report['epoch']}: {numbers} "
              f"({status.line()})", flush=True)


def reconcile_child(config, store, tracker, plan: RunPlan) -> None:
    """A run that finished while the driver died or MLflow was unreachable (done.json written,
    child never closed or never made) gets its child, final metrics and FINISHED status now; a
    closed child is left as it is."""
    def reconcile() -> None:
        run_id = tracker.finished_child(plan.key, plan.run_dir, child_params(config, plan), plan.fingerprint)
        if tracker.client.get_run(run_id).info.status != "FINISHED":
            tracker.client.log_artifact(run_id, str(store.config_path))
            _close_child(tracker.client, run_id, plan, None)
    tracker.call(reconcile)


def _log_missing_epochs(client, run_id: str, plan: RunPlan) -> None:
    """Epochs whose report never reached MLflow (it was in the queue of a driver that died, before
    the run resumed or finished), from done.json's history."""
    logged = {point.step for point in client.get_metric_history(run_id, tracking.metric_name("val_auc"))}
    for epoch in json.loads((plan.run_dir / StudyStore.DONE).read_text())["history"]:
        if epoch["epoch"] not in logged:
            _log_epoch(client, run_id, epoch)


def _log_epoch(client, run_id: str, epoch: dict) -> None:
    """One epoch's metrics (a report, or a done.json history entry) as MLflow step `epoch`."""
    log_metrics(client, run_id, {tracking.metric_name(k): v for k, v in epoch.items() if k != "epoch"},
                         step=int(epoch["epoch"]))


def _best_epoch_metrics(plan: RunPlan) -> dict:
    """best/*: the selected epoch's validation metrics (the weights the test set saw), apart from
    the last logged step."""
    done = json.loads((plan.run_dir / StudyStore.DONE).read_text())
    chosen = [e for e in done["history"] if e["epoch"] == done["best_epoch"]]
    if not chosen:
        return {}
    return {"best/epoch": done["best_epoch"], **{f"best/{k}": v for k, v in chosen[0].items()
                                                 if k.startswith("val_")}}


def _close_child(client, run_id: str, plan: RunPlan, error: str | None) -> None:
    """Final test metrics (with CI bounds) on success, FAILED with the error otherwise."""
    if error is None:
        _log_missing_epochs(client, run_id, plan)
        metrics = json.loads((plan.run_dir / StudyStore.TEST_METRICS).read_text())
        log_metrics(client, run_id, {f"test/{k}": v for k, v in metrics.items()
                                              if k not in tracking.BOOKKEEPING})
        log_metrics(client, run_id, _best_epoch_metrics(plan))
        set_tags(client, run_id, {f"camstudy.test.{k}": metrics[k] for k in tracking.BOOKKEEPING
                                           if k in metrics})
        client.log_artifact(run_id, str(plan.run_dir / StudyStore.TEST_METRICS))
        client.log_artifact(run_id, str(plan.run_dir / StudyStore.PREDICTIONS))
        node = (read_record(plan.run_dir / StudyStore.DONE) or {}).get("node") or {}
        set_tags(client, run_id, {NODE_TAG: node.get("ray_node_id") or node.get("host") or "unknown",
                                           f"{NODE_TAG}_host": node.get("host") or "unknown"})
    tracking.end_run(client, run_id, error)
