"""The run plan: every (model, seed) training run a config asks for, in order, with what each
computes from (its inputs and their fingerprint), and whether it has finished; and the
placement of runs on the cluster (torch-free and Ray-free: `orchestrator.train_runs.placement`
asks Ray and answers a `Placement`).

A finished run is never silently retrained nor silently reused with other settings: see
`finished_run`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from study import models
from study.errors import TrainingError
from study.models import ModelSpec
from study.records import (
    changed_keys,
    damaged_file,
    fingerprint,
    read_record,
    run_inputs,
)
from study.store import StudyStore, run_key


@dataclass(frozen=True)
class RunPlan:
    spec: ModelSpec
    seed: int
    run_dir: Path
    inputs: dict = field(compare=False, repr=False)  # what the run computes from (study contract)
    permuted: bool = False  # trained on permuted labels (sanity.label_permutation, docs/STUDY.md §10)

    @property
    def key(self) -> str:
        return run_key(self.spec.name, self.seed, self.permuted)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.inputs)


@dataclass(frozen=True)
class Placement:
    """How training runs and explain actors are placed on the cluster: the resources of one run's
    workers, and either a number of runs in flight (`concurrency`) or, with GPUs and
    `resources.gpus_per_run: auto`, GPU packing (`packing`: each run asks for its own share,
    `orchestrator.schedule`). One run's own placement is this with its `resources` (its host
    memory, its GPU share) and, when packing, its `gpus` filled in (`orchestrator.train_runs.Starts`)."""

    workers: int  # Ray Train workers per run (resources.workers_per_run)
    gpus: float  # GPUs per worker (0 on CPUs; a run's share when packing)
    concurrency: int  # runs in flight at once (without packing)
    packing: bool  # each run asks for its own GPU share, packed longest first
    cluster_gpus: int  # GPUs the cluster has now
    torch_threads: int  # torch threads per worker
    resources: dict[str, float]  # what each worker asks Ray for (CPU, GPU, memory in bytes)
    on_gpu: bool  # runs train on GPUs (what the host-memory estimates and measurements are keyed by)
    # each live node's Ray resources: `memory` is what Ray lets tasks reserve there (bytes)
    nodes: tuple[dict[str, float], ...] = ()


def plan_runs(config, store: StudyStore) -> list[RunPlan]:
    """Every (model, seed) of the config, in registry order then seed order; with
    sanity.label_permutation, one run per model on permuted labels after them."""
    plans = []
    for spec in models.specs_for(config.models):
        recipe = models.recipe_for(spec, config.recipes)
        for seed in config.training.seeds:
            plans.append(RunPlan(spec, seed, store.run_dir(spec.name, seed), run_inputs(spec, recipe, config, seed)))
    if config.sanity.label_permutation:
        seed = config.sanity.permutation_seed
        for spec in models.specs_for(config.models):
            inputs = run_inputs(spec, models.recipe_for(spec, config.recipes), config, seed, permuted_labels=True)
            plans.append(RunPlan(spec, seed, store.run_dir(spec.name, seed, True), inputs, permuted=True))
    return plans


def is_finished(plan: RunPlan) -> bool:
    """done.json with this plan's fingerprint; one made with other settings is an error naming what changed."""
    return finished_run(plan.run_dir, plan.fingerprint, plan.inputs) is not None


# what a damaged output of a finished training run calls for: never a silent retraining (hours of GPU time)
RETRAIN = "rerun with `--force train` to retrain it, or restore the file"


def finished_run(run_dir: Path, fingerprint: str, inputs: Optional[Mapping[str, Any]] = None) -> Optional[dict]:
    """A training run's done.json summary when it finished with these settings, None when it has
    not finished. One finished with other settings, or whose outputs done.json vouches for are
    damaged, is an error naming what changed: it is never silently reused, nor silently retrained
    (that is `--force train`)."""
    done = Path(run_dir) / StudyStore.DONE
    summary = read_record(done)
    if summary is None:
        return None
    if summary.get("fingerprint") != fingerprint:
        keys = changed_keys(summary["inputs"], inputs) if inputs and isinstance(summary.get("inputs"), Mapping) else []
        what = f"{', '.join(keys[:4])} changed" if keys else "model, recipe, seed, data or training settings differ"
        raise TrainingError(f"{run_dir}: this run finished with other settings ({what}); rerun with "
                            "`--force train` to retrain it, or restore the settings it was trained with")
    damage = damaged_file(done, summary)
    if damage is not None:
        raise TrainingError(f"{damage}: an output of the finished run {run_dir.name} is damaged; {RETRAIN}")
    return summary
