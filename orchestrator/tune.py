"""`camstudy tune`: each family's recipe searched with Ray Tune, ASHA on validation AUC.

The strongest objection to comparing architectures under one fixed recipe is that no
architecture's recipe was tuned. This answers it: for every recipe family of the config, the
learning rate (log-uniform) and the weight decay (log-uniform, or none) are searched on the
family's first configured model (the paper's order puts its smallest first: vgg16, resnet18,
vit_small), each trial training with the study's own loop (`training.loop.train_run`) on the
prepared data, epochs capped by the family's configured recipe; ASHA (asynchronous successive
halving) stops trials whose validation AUC falls behind after 1, 4, 16... epochs. The test split
never takes part: a trial is judged by its best validation AUC.

Trials are Tune *function* trainables that run the loop in their own process, one CPU (and their
GPU share) each: no Ray Train controller waits for a worker inside a trial, so a 2-CPU machine
runs two trials at once without deadlock. Every trial is an MLflow child of the tune command's
own parent run (`camstudy.role = tune`), logged from the driver by a Tune callback.

The result is a YAML fragment: the chosen `recipes` and a `tuning` record (families, the models
tuned on, method, trials, each trial's outcome), which `camstudy run CONFIG --recipes FILE` takes
(tuned runs are new runs: their fingerprint holds the recipe) and the report shows.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import yaml
from mlflow.entities import Param
from ray.tune import Callback

from orchestrator import tracking
from study.atomic import write_text_atomic
from study.errors import ConfigError
from study.mlflow_log import log_metrics
from study.recipes import Recipe
from study.store import StudyStore
from training import registry

LR_RANGE = (1e-5, 1e-2)
WEIGHT_DECAY_RANGE = (1e-6, 1e-2)
SEED = 0  # the trials' training seed and the search's: recipes are compared on one initialisation
METRIC = "val_auc"


def family_models(config) -> dict[str, registry.ModelSpec]:
    """Each recipe family of the configured models -> its first configured model."""
    found: dict[str, registry.ModelSpec] = {}
    for spec in registry.specs_for(config.models):
        found.setdefault(spec.family, spec)
    return found


def method_text(trials: int, epochs: dict[str, int]) -> str:
    return (f"Ray Tune, ASHA on the best validation AUC (grace 1 epoch, reduction 4), {trials} trial(s) per family, "
            f"lr log-uniform [{LR_RANGE[0]:g}, {LR_RANGE[1]:g}], weight decay log-uniform "
            f"[{WEIGHT_DECAY_RANGE[0]:g}, {WEIGHT_DECAY_RANGE[1]:g}], epochs capped at the configured recipe's ("
            + ", ".join(f"{family} {n}" for family, n in epochs.items()) + f"), seed {SEED}")


def tune_recipes(config, store: StudyStore, tracker: tracking.StudyTracker, trials: int, out: Path) -> dict:
    """Search every family, write the fragment to `out`, return it."""
    if trials < 1:
        raise ConfigError(f"--trials {trials}: give at least one trial per family")
    families = family_models(config)
    epochs = {family: registry.recipe_for(spec, config.recipes).epochs for family, spec in families.items()}
    parent = tracker.call(_tune_parent, tracker, trials)
    chosen, outcomes = {}, {}
    for family, spec in families.items():
        print(f"[tune] {family}: {trials} trial(s) on {spec.name}, up to {epochs[family]} epoch(s) each", flush=True)
        chosen[family], outcomes[family] = _search(config, store, tracker, parent, spec, trials)
        print(f"[tune] {family}: chose lr {chosen[family].lr:.3g}, weight decay {chosen[family].weight_decay:.3g} "
              f"(best validation AUC {outcomes[family]['best_val_auc']:.3f})", flush=True)
    fragment = {"recipes": {family: dataclasses.asdict(recipe) for family, recipe in chosen.items()},
                "tuning": {"families": {family: spec.name for family, spec in families.items()},
                           "method": method_text(trials, epochs), "trials": trials, "file": str(out),
                           "outcomes": outcomes}}
    header = (f"# camstudy tune {time.strftime('%Y-%m-%d %H:%M')}: recipes chosen for study {config.study}.\n"
              f"# Use them with: camstudy run CONFIG --recipes {out}\n")
    write_text_atomic(out, header + yaml.safe_dump(fragment, sort_keys=False))
    if parent:
        tracker.call(tracking.end_run, tracker.client, parent, None)
    print(f"[tune] recipes written to {out}; run the study with them: camstudy run CONFIG --recipes {out}")
    return fragment


def _tune_parent(tracker: tracking.StudyTracker, trials: int) -> str:
    return tracker.client.create_run(tracker.experiment_id, run_name=f"{tracker.study}-tune", tags={
        tracking.STUDY_TAG: tracker.study, tracking.STUDY_ID_TAG: tracker.study_id, tracking.ROLE_TAG: "tune",
        "camstudy.trials": str(trials), **tracking.source_tags()}).info.run_id


def _search(config, store: StudyStore, tracker, parent: Optional[str], spec: registry.ModelSpec,
            trials: int) -> tuple[Recipe, dict]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    base = registry.recipe_for(spec, config.recipes)
    trainable = tune.with_parameters(_trial, config=config, model=spec.name, cache_dir=str(store.cache_dir),
                                     folder=str(store.tune_dir / spec.family))
    tuner = tune.Tuner(
        tune.with_resources(trainable, _trial_resources()),
        param_space={"lr": tune.loguniform(*LR_RANGE), "weight_decay": tune.loguniform(*WEIGHT_DECAY_RANGE)},
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=trials,
                                    search_alg=BasicVariantGenerator(random_state=SEED),
                                    scheduler=ASHAScheduler(max_t=base.epochs, grace_period=1, reduction_factor=4)),
        run_config=tune.RunConfig(name=spec.family, storage_path=str(store.tune_dir / "ray"), verbose=0,
                                  callbacks=[MlflowTrials(tracker, parent, spec)]))
    results = tuner.fit()
    best = results.get_best_result(metric=METRIC, mode="max", scope="all")
    recipe = dataclasses.replace(base, lr=float(best.config["lr"]), weight_decay=float(best.config["weight_decay"]))
    outcomes = [{"lr": float(result.config["lr"]), "weight_decay": float(result.config["weight_decay"]),
                 "best_val_auc": float(result.metrics_dataframe[METRIC].max()),
                 "epochs": int(result.metrics_dataframe["epoch"].max())}
                for result in results if result.metrics_dataframe is not None and METRIC in result.metrics_dataframe]
    return recipe, {"model": spec.name, "best_val_auc": float(best.metrics_dataframe[METRIC].max()),
                    "trials": outcomes}


def _trial_resources() -> dict[str, float]:
    """One CPU per trial, and a whole GPU where the cluster has GPUs."""
    import ray

    return {"cpu": 1, **({"gpu": 1} if ray.cluster_resources().get("GPU", 0) else {})}


def _trial(trial: dict, config, model: str, cache_dir: str, folder: str) -> None:
    """One trial: the study's training loop with this trial's learning rate and weight decay,
    reporting every epoch's validation metrics to Tune."""
    import torch
    from ray import tune

    from training.loop import train_run

    torch.set_num_threads(1)
    spec = registry.get_spec(config.models, model)
    recipe = dataclasses.replace(registry.recipe_for(spec, config.recipes), lr=float(trial["lr"]),
                                 weight_decay=float(trial["weight_decay"]))
    run_dir = Path(folder) / tune.get_context().get_trial_id()
    train_run(spec, recipe, config, cache_dir, run_dir, SEED,
              report=lambda epoch, metrics: tune.report({**metrics, "epoch": epoch}))


class MlflowTrials(Callback):
    """On the driver: one MLflow child of the tune parent per trial, its params, a step per epoch."""

    def __init__(self, tracker: tracking.StudyTracker, parent: Optional[str], spec: registry.ModelSpec):
        self.tracker, self.parent, self.spec = tracker, parent, spec
        self.runs: dict[str, Optional[str]] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.parent is None:
            return
        self.runs[trial.trial_id] = self.tracker.call(self._child, trial)

    def _child(self, trial) -> str:
        run = self.tracker.client.create_run(self.tracker.experiment_id, run_name=f"{self.spec.family}-{trial.trial_id}",
                                             tags={tracking.PARENT_TAG: self.parent,
                                                   tracking.STUDY_ID_TAG: self.tracker.study_id,
                                                   tracking.ROLE_TAG: "tune-trial", "camstudy.family": self.spec.family})
        self.tracker.client.log_batch(run.info.run_id, params=[
            Param(k, str(v)) for k, v in {"model": self.spec.name, "family": self.spec.family, "lr": trial.config["lr"],
                                          "weight_decay": trial.config["weight_decay"]}.items()])
        return run.info.run_id

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run = self.runs.get(trial.trial_id)
        if run:
            metrics = {tracking.metric_name(k): v for k, v in result.items()
                       if k in ("train_loss", "val_loss", "val_auc", "val_accuracy")}
            self.tracker.call(log_metrics, self.tracker.client, run, metrics, step=int(result["epoch"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        run = self.runs.get(trial.trial_id)
        if run:
            self.tracker.call(tracking.end_run, self.tracker.client, run, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        run = self.runs.get(trial.trial_id)
        if run:
            self.tracker.call(tracking.end_run, self.tracker.client, run, "trial failed")
