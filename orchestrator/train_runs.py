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
which resumes from that same checkpoint.

Per-epoch metrics travel worker -> `ray.train.report` -> a `UserCallback` on the Train
controller -> a Ray queue -> the driver, which logs them to the run's MLflow child and prints
one progress line; only the driver talks to MLflow. Epochs whose report was lost with a dead
driver are back-filled from the run's done.json when the run is closed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.util.queue import Empty, Queue

from orchestrator import tracking
from orchestrator.store import StudyStore
from orchestrator.train_worker import EpochReporter, train_worker
from training import registry
from training.errors import ConfigError, TrainingError
from training.loop import DONE, PREDICTIONS, TEST_METRICS, run_fingerprint


@dataclass(frozen=True)
class RunPlan:
    spec: registry.ModelSpec
    seed: int
    run_dir: Path
    fingerprint: str

    @property
    def key(self) -> str:
        return f"{self.spec.name}-seed{self.seed}"


def plan_runs(config, store: StudyStore) -> list[RunPlan]:
    """Every (model, seed) of the config, in registry order then seed order."""
    plans = []
    for spec in registry.specs_for(config.models):
        recipe = registry.recipe_for(spec, config.recipes)
        for seed in config.training.seeds:
            plans.append(RunPlan(spec, seed, store.run_dir(spec.name, seed),
                                 run_fingerprint(spec, recipe, config, seed)))
    return plans


def is_finished(plan: RunPlan) -> bool:
    """done.json with this plan's fingerprint; one made with other settings is an error."""
    done = plan.run_dir / DONE
    if not done.is_file():
        return False
    if json.loads(done.read_text()).get("fingerprint") != plan.fingerprint:
        raise ConfigError(f"{plan.run_dir}: this run was trained with other settings than the config now "
                          "asks for; rerun with `--force train` to retrain (or restore the old config)")
    return True


def child_params(config, plan: RunPlan) -> dict[str, Any]:
    """Identical param names on every child, so MLflow's compare view lines the runs up."""
    recipe = registry.recipe_for(plan.spec, config.recipes)
    return {
        "model": plan.spec.name, "family": plan.spec.family, "depth": plan.spec.depth,
        "params_millions": round(registry.parameter_count_millions(plan.spec), 2), "seed": plan.seed,
        "optimizer": recipe.optimizer, "lr": recipe.lr, "epochs": recipe.epochs,
        "batch_size": config.training.batch_size, "image_size": config.preprocess.image_size,
        "pretrained": config.models.init, "cam_layer": plan.spec.target_layer,
        "timm_name": plan.spec.timm_name, "selection": config.training.selection,
        "threshold": config.training.threshold, "workers_per_run": config.resources.workers_per_run,
        "fingerprint": plan.fingerprint,
    }


@ray.remote(num_cpus=0)
def _fit(config, plan: RunPlan, store_root: str, progress: Queue,
         placement: dict) -> str | None:
    """Run one Ray Train run to completion; return the error text, or None on success."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    trainer = _trainer_class(placement["workers"])(
        train_worker,
        train_loop_config={"config": config, "model": plan.spec.name, "seed": plan.seed,
                           "cache_dir": str(StudyStore(store_root).cache_dir), "run_dir": str(plan.run_dir),
                           "fingerprint": plan.fingerprint, "torch_threads": placement["torch_threads"]},
        scaling_config=ScalingConfig(num_workers=placement["workers"], use_gpu=placement["gpus"] > 0,
                                     resources_per_worker={**placement["resources"],
                                                           **config.resources.model_resources.get(plan.spec.name, {})}),
        run_config=RunConfig(name=plan.key, storage_path=str(Path(store_root, "ray")),
                             failure_config=FailureConfig(max_failures=config.training.max_failures),
                             callbacks=[EpochReporter(plan.key, progress)]),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        return _root_cause(error)
    return None if result.error is None else _root_cause(result.error)


def _trainer_class(workers: int) -> type:
    """TorchTrainer for a DDP group, the torch-free base class for one worker (module docstring)."""
    if workers > 1:
        from ray.train.torch import TorchTrainer
        return TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    return DataParallelTrainer


def _root_cause(error: BaseException) -> str:
    """The innermost message: a worker's TrainingError says model, seed and epoch."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def placement(config) -> dict:
    """Resources of one run and how many runs fit at once on this cluster."""
    resources_cfg, cluster = config.resources, ray.cluster_resources()
    gpus_here = cluster.get("GPU", 0)
    gpus = resources_cfg.gpus_per_run
    if gpus == "auto":
        gpus = 1 if gpus_here else 0
    workers, cpus = resources_cfg.workers_per_run, resources_cfg.cpus_per_worker
    concurrency = resources_cfg.max_concurrent_runs
    if concurrency == "auto":
        if gpus and gpus_here:
            concurrency = int(gpus_here // (gpus * workers))
        elif gpus:  # GPU nodes not up yet (autoscaler): queue every run, Ray places them as nodes join
            concurrency = len(config.models.names) * len(config.training.seeds)
        else:
            concurrency = int(cluster.get("CPU", 1) // (cpus * workers))
    threads = resources_cfg.torch_threads
    return {"workers": workers, "gpus": gpus, "concurrency": max(1, concurrency),
            "torch_threads": max(1, int(cpus)) if threads == "auto" else threads,
            "resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


def train_stage(config, store: StudyStore) -> list[RunPlan]:
    """Train every (model, seed) not yet finished; return the plans. Raises if any run failed."""
    plans = plan_runs(config, store)
    todo = [plan for plan in plans if not is_finished(plan)]
    tracker = tracking.StudyTracker(config)
    for plan in plans:
        if plan not in todo:
            print(f"[train] {plan.key}: finished earlier, skipped")
            _reconcile_child(config, store, tracker, plan)
    if not todo:
        return plans
    layout = placement(config)
    print(f"[train] {len(todo)} run(s), up to {layout['concurrency']} at once, "
          f"{layout['workers']} worker(s) x {layout['resources']} each")
    failures = _run_all(config, store, tracker, todo, layout)
    if failures:
        raise TrainingError("training failed for " + "; ".join(f"{k}: {e}" for k, e in failures.items())
                            + ". Fix the cause and rerun: finished runs are kept, unfinished ones resume.")
    return plans


def _run_all(config, store, tracker, todo: list[RunPlan], layout: dict) -> dict[str, str]:
    pending = registry.largest_first(todo)
    progress, in_flight, failures, run_ids = Queue(), {}, {}, {}
    started = time.time()
    while pending or in_flight:
        while pending and len(in_flight) < layout["concurrency"]:
            plan = pending.pop(0)
            run_id = tracker.child_run(plan.key, child_params(config, plan))
            tracker.client.log_artifact(run_id, str(store.config_path))  # the resolved config, as run
            run_ids[plan.key] = run_id
            in_flight[_fit.remote(config, plan, str(store.root), progress, layout)] = (plan, run_id)
        finished, _ = ray.wait(list(in_flight), num_returns=1, timeout=2.0)
        _log_progress(progress, started, tracker.client, run_ids)  # before any finished run is closed
        for ref in finished:
            plan, run_id = in_flight.pop(ref)
            error = ray.get(ref)
            _close_child(tracker.client, run_id, plan, error)
            if error:
                failures[plan.key] = error
            print(f"[train] {plan.key}: {'FAILED: ' + error if error else 'done'}")
    return failures


def _log_progress(progress: Queue, started: float, client, run_ids: dict[str, str]) -> None:
    """Each epoch report waiting in the queue: an MLflow step on its run's child, a progress line."""
    while True:
        try:
            key, report = progress.get_nowait()
        except Empty:
            return
        _log_epoch(client, run_ids[key], report)
        numbers = " ".join(f"{k}={v:.4g}" for k, v in report.items()
                           if k != "epoch" and isinstance(v, (int, float)))
        print(f"[train {time.time() - started:6.0f}s] {key} epoch {report['epoch']}: {numbers}", flush=True)


def _reconcile_child(config, store, tracker, plan: RunPlan) -> None:
    """A run that finished while the driver died (done.json written, MLflow child never closed)
    gets its final metrics and FINISHED status now; a closed child is left as it is."""
    run_id = tracker.child_run(plan.key, child_params(config, plan), resume=False)
    if tracker.client.get_run(run_id).info.status != "FINISHED":
        tracker.client.log_artifact(run_id, str(store.config_path))
        _close_child(tracker.client, run_id, plan, None)


def _log_missing_epochs(client, run_id: str, plan: RunPlan) -> None:
    """Epochs whose report never reached MLflow (it was in the queue of a driver that died, before
    the run resumed or finished), from done.json's history."""
    logged = {point.step for point in client.get_metric_history(run_id, "val_auc")}
    for epoch in json.loads((plan.run_dir / DONE).read_text())["history"]:
        if epoch["epoch"] not in logged:
            _log_epoch(client, run_id, epoch)


def _log_epoch(client, run_id: str, epoch: dict) -> None:
    """One epoch's metrics (a report, or a done.json history entry) as MLflow step `epoch`."""
    tracking.log_metrics(client, run_id, {k: v for k, v in epoch.items() if k != "epoch"},
                         step=int(epoch["epoch"]))


def _close_child(client, run_id: str, plan: RunPlan, error: str | None) -> None:
    """Final test metrics (with CI bounds) on success, FAILED with the error otherwise."""
    if error is None:
        _log_missing_epochs(client, run_id, plan)
        metrics = json.loads((plan.run_dir / TEST_METRICS).read_text())
        tracking.log_metrics(client, run_id, {f"test_{k}": v for k, v in metrics.items()})
        client.log_artifact(run_id, str(plan.run_dir / PREDICTIONS))
    tracking.end_run(client, run_id, error)
