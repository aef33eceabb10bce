"""The explain stage: Ray Data CAM extraction and scoring into Parquet, for every trained (model, seed).

One pipeline for all unfinished runs: the scored test images of each run (rows of the
preprocessing cache) x {trained, randomised copy} -> `map_batches` with an actor class that
loads a run's checkpoint once (and keeps that run's two models while its rows keep coming),
computes CAMs on its device and scores them. The driver collects each run's rows as they
stream in and writes the run's Parquet into a temporary folder renamed to
`cams/<model>-seed<k>/` as soon as the run is complete, so a finished run is never half
written, a crash loses only the runs still in flight, and a rerun skips the finished ones.
One pipeline rather than one per run: its fixed cost (actor processes, imports, planning) is
paid once per stage (on 2 CPUs that cost was ~20 s per run, against ~2 s of CAM work).

Blocks hold one run's rows (BLOCK_ROWS at most), so an actor builds a run's models once per
block; the actor still groups each batch by run, so scoring never depends on how rows are cut.
Blocks come largest model first and each actor takes one at a time, so the stage ends with short
blocks on every actor rather than one actor busy with ViT-L while the other idles.

Each scored image gets one row per CAM method and layer (`cam.layers`: every layer of a batch
comes from one forward and one autograd call, `explain.cam.sweep`); the columns are
`explain.rows.COLUMNS`. The metrics are computed from the float16 map exactly as stored, so
re-scoring the Parquet reproduces them. `cams/<run>/` holds the trained model's maps only; the
weight-randomised twin's rows (same columns, `randomized` true) go to `sanity/<run>/`, so a
reader who globs `cams/` gets the report's numbers (for the paper's layer: `final_layer`).
The validation positives are explained too, only to tune each map set's IoU threshold
(`explain.tuning`); their rows are not stored, the threshold and their ids are (`_tuning.json`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from explain import tuning
from explain.rows import map_table
from training import registry
from training.atomic import atomic_dir
from training.cache import read_index
from training.contract import StudyStore, explain_inputs, record_reason, run_key, write_record
from training.errors import DataError
from training.models import cam_layers, layer_roles
from training.ray_data import reraise_own, without_budget_backpressure

DONE = StudyStore.CAM_DONE  # written last into a run's CAM folder: the inputs it was made from
# Rows per Ray Data block, one run per block. A block is one task on one actor, which builds the
# block's run's two models once (seconds for VGG and ViT-L on a CPU): a small run stays one
# block, a large one is spread over several actors.
BLOCK_ROWS = 256


def scored_images(config, cache_dir: Path, run_dir: Path) -> pd.DataFrame:
    """Test positives (or true positives) with their cache row, prediction and correctness."""
    index = read_index(cache_dir)
    test = positives(index, "test")
    predictions = pd.read_parquet(run_dir / StudyStore.PREDICTIONS)[["image_id", "probability"]]
    rows = test.merge(predictions, on="image_id", how="left", validate="one_to_one")
    if rows["probability"].isna().any():
        missing = rows.loc[rows["probability"].isna(), "image_id"].head(3).tolist()
        raise DataError(f"{run_dir / StudyStore.PREDICTIONS}: no prediction for test images {missing}; "
                        "the run's predictions do not match the cache — rerun `camstudy train` with --force train")
    rows["correct"] = rows["probability"] >= config.training.threshold
    if config.cam.images == "true-positives":
        rows = rows[rows["correct"]]
    return rows.reset_index(drop=True).assign(**{tuning.SPLIT: "test"})


def positives(index: pd.DataFrame, split: str) -> pd.DataFrame:
    return index[(index["split"] == split) & (index["label"] == 1)]


def tuning_images(cache_dir: Path) -> pd.DataFrame:
    """The validation positives, which choose each map set's IoU threshold (no prediction needed)."""
    rows = positives(read_index(cache_dir), "val")
    return rows.assign(probability=np.nan, correct=False, **{tuning.SPLIT: "val"}).reset_index(drop=True)


class CamScorer:
    """Ray Data actor: per run, builds the trained model and its randomised twin once, then scores
    batches. `runs` maps a run key to (model name, seed, run folder)."""

    def __init__(self, config, runs: dict[str, tuple[str, int, str]], cache_dir: str):
        import torch

        self.torch, self.config, self.runs = torch, config, runs
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.images = np.load(Path(cache_dir) / StudyStore.CACHE_IMAGES, mmap_mode="r")
        self.masks = np.load(Path(cache_dir) / StudyStore.CACHE_MASKS, mmap_mode="r")
        self.loaded: tuple[str, registry.ModelSpec, dict] | None = None  # one run's models at a time

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        parts = []
        for key, rows in batch.groupby("run", sort=False):
            spec, models = self._models(key)
            seed = self.runs[key][1]
            parts += [table for flag in (False, True) if (rows["randomized"] == flag).any()
                      for table in self._score(rows[rows["randomized"] == flag], spec, seed, models[flag])]
        return pa.concat_tables(parts)

    def _models(self, key: str) -> tuple[registry.ModelSpec, dict]:
        if self.loaded is None or self.loaded[0] != key:
            self.loaded = None  # free the previous run's models before building the next
            model_name, seed, run_dir = self.runs[key]
            spec = registry.get_spec(self.config.models, model_name)
            self.loaded = (key, spec, {False: self._trained(spec, Path(run_dir)), True: self._randomised(spec, seed)})
        return self.loaded[1], self.loaded[2]

    def _trained(self, spec, run_dir: Path):
        from training.loop import load_trained_model

        return load_trained_model(spec, self.config, run_dir).to(self.device).eval()

    def _randomised(self, spec, seed: int):
        # Adebayo et al. 2018 model-parameter randomisation: same architecture, fresh weights
        self.torch.manual_seed(10_000 + seed)
        preprocess = self.config.preprocess
        return registry.build_model(spec, init="random", image_size=preprocess.image_size,
                                    in_chans=preprocess.channels).to(self.device).eval()

    def _score(self, rows: pd.DataFrame, spec, seed: int, model) -> list[pa.Table]:
        """Every method at every configured layer of `model` for these rows: one table per map set."""
        from explain.cam import sweep

        from training.loop import prepare_input

        torch = self.torch
        take = rows["row"].to_numpy()
        images = torch.from_numpy(np.ascontiguousarray(self.images[take])).to(self.device)
        images = prepare_input(images[:, None], self.config.preprocess.channels, channels_last=False)
        masks = torch.from_numpy(np.ascontiguousarray(self.masks[take])).to(self.device).bool()
        layers = cam_layers(spec, self.config.cam.layers)
        geometry = registry.layer_geometry(spec, tuple(layers), self.config.preprocess.image_size,
                                           self.config.preprocess.channels)
        maps = sweep(model, spec, images, 1, layers, self.config.cam.methods)
        return [map_table(rows, masks, heat, self.config.metrics, model=spec.name, seed=seed, method=method,
                          layer=layer, depth=geometry[layer][0], map_size=geometry[layer][1],
                          **layer_roles(spec, layer))
                for layer, by_method in maps.items() for method, heat in by_method.items()]


def run_work(config, cache_dir: Path, plan) -> pd.DataFrame:
    """One run's rows to explain: its scored test images and the validation positives that tune
    its thresholds, once per model copy (trained, randomised). Empty when no test image is scored."""
    test = scored_images(config, cache_dir, plan.run_dir)
    if test.empty:
        return test.assign(randomized=False, run=plan.key)
    rows = pd.concat([test, tuning_images(cache_dir)], ignore_index=True)
    flags = [False, True] if config.cam.sanity_randomized else [False]
    return pd.concat([rows.assign(randomized=flag, run=plan.key) for flag in flags], ignore_index=True)


def maps_per_image(spec, config) -> int:
    """Rows one image gives: every method at every configured layer (rollout has no layer: once)."""
    methods = [m for m in config.cam.methods if m != "rollout"]
    return len(cam_layers(spec, config.cam.layers)) * len(methods) + ("rollout" in config.cam.methods)


def extraction_reason(config, store, plan) -> str | None:
    """None when the run's CAM output was made from the inputs the config asks for now, else why not."""
    return record_reason(store.cams_dir(plan.spec.name, plan.seed) / DONE, explain_inputs(config, plan.fingerprint))


def extract_runs(config, store, plans, actors: int, gpus_per_actor: float, cpus_per_actor: float = 1.0) -> None:
    """Score every plan's run into `cams/<model>-seed<k>/` in one Ray Data pipeline; runs whose
    output was made from the same inputs are skipped, the others (re)computed with the reason."""
    todo = []
    for plan in plans:
        reason = extraction_reason(config, store, plan)
        if reason is None:
            print(f"[explain] {plan.key}: up to date, skipped")
        else:
            print(f"[explain] {plan.key}: {reason}; computing its heatmaps")
            todo.append(plan)
    if not todo:
        return
    work = {plan.key: run_work(config, store.cache_dir, plan) for plan in todo}
    for plan in [plan for plan in todo if work[plan.key].empty]:  # e.g. no true positive to explain
        print(f"[explain] {plan.key}: no image to explain ({config.cam.images}); nothing written")
        _write_run(config, store, plan, None)
        todo.remove(plan)
        del work[plan.key]
    if not todo:
        return
    try:
        collected = _stream(config, store, work, todo, actors, gpus_per_actor, cpus_per_actor)
    except Exception as error:
        reraise_own(error)
        raise
    if collected:  # only if rows were lost on the way: say so rather than write a short run
        raise RuntimeError(f"[explain] incomplete CAM output for {sorted(collected)}; rerun `camstudy explain`")


def _stream(config, store, work: dict[str, pd.DataFrame], todo, actors: int, gpus_per_actor: float,
            cpus_per_actor: float) -> dict[str, list[pa.Table]]:
    """Run the pipeline; write each run as soon as all its rows are back. Returns what is left."""
    import ray.data

    order = [plan.key for plan in registry.largest_first(todo)]
    blocks = [work[key].iloc[i:i + BLOCK_ROWS] for key in order for i in range(0, len(work[key]), BLOCK_ROWS)]
    step, actors = config.cam.batch_size, min(actors, len(blocks))  # an idle actor would hold a CPU/GPU
    expected = {plan.key: len(work[plan.key]) * maps_per_image(plan.spec, config) for plan in todo}
    maps = sum(expected.values())
    print(f"[explain] {len(todo)} run(s), {sum(map(len, work.values()))} image rows (test images to score and "
          f"validation positives to tune on, per model copy), {maps} heatmaps to compute, {actors} actor(s)")
    runs = {plan.key: (plan.spec.name, plan.seed, str(plan.run_dir)) for plan in todo}
    collected: dict[str, list[pa.Table]] = {key: [] for key in work}
    plan_of, started = {plan.key: plan for plan in todo}, time.time()
    context = ray.data.DataContext.get_current()
    with without_budget_backpressure(context):  # a Dataset copies the context it is made in
        dataset = ray.data.from_pandas(blocks).map_batches(
            CamScorer, batch_format="pandas", batch_size=step,
            fn_constructor_kwargs={"config": config, "runs": runs, "cache_dir": str(store.cache_dir)},
            # one block at a time per actor: the next goes to whichever actor frees first (the
            # default queues several per actor up front, which left one actor idle at the end)
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
            num_gpus=gpus_per_actor, num_cpus=0 if gpus_per_actor else cpus_per_actor)
        for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for key, part in _by_run(table):
                collected[key].append(part)
                if sum(len(t) for t in collected[key]) == expected[key]:
                    out = _write_run(config, store, plan_of[key], pa.concat_tables(collected.pop(key)))
                    print(f"[explain] {key}: {expected[key]} heatmaps made, the test images' written "
                          f"({time.time() - started:.0f}s) -> {out}")
    return collected


def _by_run(table: pa.Table) -> list[tuple[str, pa.Table]]:
    import pyarrow.compute as pc

    runs = table.select(["model", "seed"]).group_by(["model", "seed"]).aggregate([]).to_pylist()
    return [(run_key(run["model"], run["seed"]),
             table.filter((pc.field("model") == run["model"]) & (pc.field("seed") == run["seed"]))) for run in runs]


def _write_run(config, store, plan, table: pa.Table | None) -> Path:
    """cams/<run>/ (trained maps, _tuning.json, _done.json last) and sanity/<run>/ (the twin's maps)."""
    import pyarrow.parquet as pq

    out, sanity = store.cams_dir(plan.spec.name, plan.seed), store.sanity_dir(plan.spec.name, plan.seed)
    records: list[dict] = []
    if table is not None:
        table, records = tuning.apply(table, ["cam_method", "cam_layer", "randomized"], config.metrics)
    trained, randomised = _by_copy(table, False), _by_copy(table, True)
    if randomised is not None and len(randomised):  # before cams/: its _done.json vouches for both
        with atomic_dir(sanity) as tmp:
            pq.write_table(randomised, tmp / StudyStore.CAM_PART)
    else:  # cam.sanity_randomized turned off: no stale twin maps beside the new ones
        shutil.rmtree(sanity, ignore_errors=True)
    with atomic_dir(out) as tmp:
        if trained is not None:
            pq.write_table(trained, tmp / StudyStore.CAM_PART)
        tuning.write_records(tmp / StudyStore.CAM_TUNING, records, config.metrics)
        write_record(tmp / DONE, explain_inputs(config, plan.fingerprint),
                     rows=0 if trained is None else len(trained),
                     sanity_rows=0 if randomised is None else len(randomised))
    return out


def _by_copy(table: pa.Table | None, randomized: bool) -> pa.Table | None:
    import pyarrow.compute as pc

    if table is None:
        return None
    return table.filter(table["randomized"] if randomized else pc.invert(table["randomized"]))
