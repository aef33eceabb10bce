"""The explain stage: Ray Data CAM extraction and scoring into Parquet, for every trained (model, seed).

One pipeline for all unfinished runs: the scored test images of each run (rows of the
preprocessing cache) -> `map_batches` with an actor class that loads a run's checkpoint once,
with the copies its sanity checks need (the weight-randomised twin, the cascade's working copy:
`explain.randomization`), keeps them while that run's rows keep coming, maps each batch with
all of them on its device and scores the maps. The driver collects each run's rows as they
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
twin's and the cascade's rows (same columns, `randomized` true, `randomization` "full" or
"cascade", with their similarity to the trained map) go to `sanity/<run>/`, so a reader who
globs `cams/` gets the report's numbers (for the paper's layer: `final_layer`). A
label-permutation run's maps (`randomization` "labels") go to `sanity/<run>-permuted/`.
The validation positives are explained too, only to tune each map set's IoU threshold
(`explain.tuning`); their rows are not stored, the threshold and their ids are (`_tuning.json`).

Faithfulness and robustness (docs/STUDY.md §11, `explain.road`): with `robustness.enabled` the
actor also scores max-sensitivity of the maps at the paper's layer; with `faithfulness.enabled`
two stages follow it, CPU tasks that make the controls' rows and ROAD's perturbed images (no
model) and a second actor pool that runs ROAD's forwards with each run's trained model. The
controls' rows go to `controls/<model>-seed<k>/`, tuned on their own validation maps and
vouched for by the run's `_done.json` like `sanity/`. Rows carry transient columns between the
stages (`TRANSIENT`: the run key, the cache row, the perturbed images, the node), never stored.

Which runs are explained is the stage skeleton's decision (`study.records.run_stage`): one
output per run, recorded in its folder's `_done.json` (`explain_inputs`), reused while that
record matches and vouches for intact files.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from explain import faithfulness, road, tuning
from explain.cam import GRADIENT_METHODS
from explain.rows import TRAINED, Copy, map_table
from explain.sink import MapSink, ParquetSink
from study import objectstore
from study.atomic import atomic_dir
from study.errors import DataError
from study.models import cam_layers, layer_roles
from study.progress import duration_text
from study.records import Output, explain_inputs, run_stage
from study.store import StudyStore
from training import registry
from training.cache import read_index
from training.ray_data import reraise_own, without_budget_backpressure

DONE = StudyStore.CAM_DONE  # written last into a run's CAM folder: the inputs it was made from
# Rows per Ray Data block, one run per block. A block is one task on one actor, which builds the
# block's run's two models once (seconds for VGG and ViT-L on a CPU): a small run stays one
# block, a large one is spread over several actors. A task returns its block's maps at once, so
# a block also holds at most BLOCK_BYTES of heatmaps (`block_rows`): an actor's memory is bounded
# whatever the number of images, layers or cascade steps.
BLOCK_ROWS = 256
BLOCK_BYTES = 128 << 20


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
    """Ray Data actor: per run, builds the trained model and the copies the sanity checks need once
    (`explain.randomization`), then maps every batch of images with all of them. `runs` maps a
    run key to (model name, seed, run folder, permuted)."""

    def __init__(self, config, runs: dict[str, tuple[str, int, str, bool]], cache_dir: str,
                 robust: Optional[dict[str, Optional[frozenset]]] = None):
        import torch

        # robust: run key -> the test images robustness scores (`road.subsets`; None or absent: all)
        self.torch, self.config, self.runs, self.robust = torch, config, runs, robust or {}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # an actor may run on another node, whose store is its own: for a study in object
        # storage, that node's mirror (the driver's store object would name the driver's folder)
        self.store = StudyStore(config.study_dir)
        self.store.pull(Path(cache_dir))  # staged once per node
        self.images = np.load(Path(cache_dir) / StudyStore.CACHE_IMAGES, mmap_mode="r")
        self.masks = np.load(Path(cache_dir) / StudyStore.CACHE_MASKS, mmap_mode="r")
        self.loaded: tuple[str, registry.ModelSpec, dict] | None = None  # one run's models at a time

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        import ray

        parts = []
        for key, rows in batch.groupby("run", sort=False):
            spec, models = self._models(key)
            found = pa.concat_tables(self._score(rows, spec, self.runs[key][1], models))
            parts.append(found.append_column(road.RUN, pa.array([key] * len(found))))
        table = pa.concat_tables(parts)
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        return table.append_column(NODE, pa.array([node] * len(table)))  # recorded in _done.json, not stored

    def _models(self, key: str) -> tuple[registry.ModelSpec, dict]:
        from explain.randomization import Cascade, twin
        from training.loop import load_trained_model

        if self.loaded is None or self.loaded[0] != key:
            self.loaded = None  # free the previous run's models before building the next
            model_name, seed, run_dir, permuted = self.runs[key]
            spec = registry.get_spec(self.config.models, model_name)
            self.store.pull(Path(run_dir))
            models = {"trained": load_trained_model(spec, self.config, Path(run_dir)).to(self.device).eval()}
            copies = copies_of(self.config, permuted)
            if copies["full"] or copies["cascade"]:
                models["twin"] = twin(spec, self.config, seed, self.device)
            if copies["cascade"]:
                models["cascade"] = Cascade(models["trained"], models["twin"], cascade_units(spec, self.config))
            models["copies"] = copies
            self.loaded = (key, spec, models)
        return self.loaded[1], self.loaded[2]

    def _score(self, rows: pd.DataFrame, spec, seed: int, models: dict) -> list[pa.Table]:
        """Every method at every configured layer of the trained model (or of a label-permutation
        run) for every row; for the test rows also the cascade's steps and the twin at the
        paper's layer (the sanity copies need no threshold of their own: `tuning_fallback`)."""
        from explain.cam import model_output, sweep

        torch = self.torch
        images, masks = self._batch(rows)
        layers = cam_layers(spec, self.config.cam.layers)
        geometry = registry.layer_geometry(spec, tuple(layers), self.config.preprocess.image_size,
                                           self.config.preprocess.channels)

        def tables(part: pd.DataFrame, part_masks, maps: dict, copy: Copy, reference: dict | None = None,
                   robust: dict | None = None):
            return [map_table(part, part_masks, heat, self.config.metrics, model=spec.name, seed=seed, method=method,
                              layer=layer, depth=geometry[layer][0], map_size=geometry[layer][1],
                              **layer_roles(spec, layer), copy=copy,
                              reference=None if reference is None else reference[layer][method],
                              given=(robust or {}).get(method) if layer == spec.target_layer else None
                              ).append_column(road.ROW, pa.array(part["row"].to_numpy(), pa.int64()))
                    for layer, by_method in maps.items() for method, heat in by_method.items()]

        with model_output(models["trained"]) as output:  # its logits: the class robustness keeps
            trained = sweep(models["trained"], spec, images, 1, layers, self.config.cam.methods)
        test = torch.from_numpy((rows["split"] == "test").to_numpy(copy=True)).to(self.device)
        found = tables(rows, masks, trained, models["copies"]["trained"],
                       robust=self._robustness(models["trained"], spec, rows, trained[spec.target_layer],
                                               output.get("output"), test))
        if test.any() and (models["copies"]["full"] or models["copies"]["cascade"]):
            reference = {spec.target_layer: {m: heat[test] for m, heat in trained[spec.target_layer].items()}}
            sanity, twin_logits = self._sanity(spec, images[test], models)
            tested = rows[test.cpu().numpy()]
            found += [table for copy, maps in sanity for table in
                      tables(tested, masks[test], maps, copy, reference,
                             robust=self._robustness(models["twin"], spec, tested, maps[spec.target_layer],
                                                     twin_logits)
                             if copy.randomization == "full" else None)]
        return found

    def _robustness(self, model, spec, rows: pd.DataFrame, maps: dict, logits, test=None) -> dict | None:
        """method -> the robustness columns (`road.robustness_scores`) of `rows` at the paper's layer,
        NaN for validation rows; None with `robustness.enabled` off. `maps`: method -> the maps of
        every row; `logits`: the model's on every row, from the forward of those maps (None: one
        more forward finds the class); `test`: which rows are test rows (default: all)."""
        if not self.config.robustness.enabled:
            return None
        from training.loop import prepare_input

        test = np.ones(len(rows), bool) if test is None else test.cpu().numpy()
        chosen = self.robust.get(rows["run"].iloc[0]) if len(rows) else None
        if chosen is not None:
            test = test & rows["image_id"].isin(chosen).to_numpy()
        if not test.any():
            return None
        channels = self.config.preprocess.channels
        take = rows["row"].to_numpy()[test]
        grey = self.torch.from_numpy(np.asarray(self.images[take], np.float32))[:, None]
        predicted = None if logits is None else \
            faithfulness.positive_probability(logits).cpu().numpy()[test] >= self.config.training.threshold
        found = {}
        for method, heat in maps.items():
            scores = road.robustness_scores(model, spec, grey, heat[self.torch.from_numpy(test).to(heat.device)],
                                            method, self.config, rows["image_id"].to_numpy()[test],
                                            lambda x: prepare_input(x, channels, channels_last=False), predicted)
            found[method] = {}
            for name, values in scores.items():
                found[method][name] = np.full(len(rows), np.nan)
                found[method][name][test] = values
        return found

    def _batch(self, rows: pd.DataFrame):
        """The rows' images (as the network takes them) and masks, on the device."""
        from training.loop import prepare_input

        take = rows["row"].to_numpy()
        images = self.torch.from_numpy(np.ascontiguousarray(self.images[take])).to(self.device)
        images = prepare_input(images[:, None], self.config.preprocess.channels, channels_last=False)
        return images, self.torch.from_numpy(np.ascontiguousarray(self.masks[take])).to(self.device).bool()

    def _sanity(self, spec, images, models: dict) -> tuple[list[tuple[Copy, dict]], Any]:
        """([(copy, layer -> method -> maps) at the paper's layer], the twin's logits or None): each
        cascade step, then the twin, whose gradient-method maps are the cascade's last step (the
        same weights, so that step's forward gives the twin's logits)."""
        from explain.cam import model_output, sweep

        target, methods, copies = spec.target_layer, self.config.cam.methods, models["copies"]
        found, last, logits = [], {}, None
        if copies["cascade"]:
            gradient = [m for m in methods if m in GRADIENT_METHODS]
            for step, unit, model in models["cascade"].steps():
                with model_output(model) as output:
                    last = sweep(model, spec, images, 1, [target], gradient)[target]
                logits = output.get("output")
                found.append((Copy("cascade", step, unit), {target: last}))
        if copies["full"]:
            rest = [m for m in methods if m not in last]
            if rest:
                with model_output(models["twin"]) as output:
                    last = {**last, **sweep(models["twin"], spec, images, 1, [target], rest)[target]}
                logits = output.get("output")
            found.append((Copy("full", len(cascade_units(spec, self.config)), "all"), {target: last}))
        return found, logits


def copies_of(config, permuted: bool) -> dict:
    """Which copies a run's images are mapped with: a label-permutation run only as trained (its
    maps are the data-randomisation test); a trained run also with the twin and the cascade when
    `cam.sanity_randomized` and `sanity.cascade` ask for them."""
    return {"trained": Copy("labels") if permuted else TRAINED,
            "full": config.cam.sanity_randomized and not permuted,
            "cascade": config.sanity.cascade and not permuted}


def cascade_units(spec, config) -> tuple:
    return registry.cascade_units(spec, config.preprocess.image_size, config.preprocess.channels)


def run_work(config, cache_dir: Path, plan) -> pd.DataFrame:
    """One run's rows to explain: its scored test images and the validation positives that tune
    its thresholds. Empty when no test image is scored."""
    test = scored_images(config, cache_dir, plan.run_dir)
    if test.empty:
        return test.assign(run=plan.key)
    return pd.concat([test, tuning_images(cache_dir)], ignore_index=True).assign(run=plan.key)


def maps_per_row(spec, config, permuted: bool, test: bool) -> int:
    """Maps one image row gives: every method at every configured layer (rollout has no layer:
    once) of the trained model; for a test row of a trained run also each cascade step's and the
    twin's maps at the paper's layer."""
    methods = [m for m in config.cam.methods if m != "rollout"]
    trained = len(cam_layers(spec, config.cam.layers)) * len(methods) + ("rollout" in config.cam.methods)
    copies = copies_of(config, permuted)
    if not test:
        return trained
    steps = (len(cascade_units(spec, config)) + 1) if copies["cascade"] else 0  # step 0 and one per unit
    cascade = steps * sum(m in GRADIENT_METHODS for m in config.cam.methods)
    return trained + cascade + len(config.cam.methods) * copies["full"]


def block_rows(spec, config, permuted: bool) -> int:
    """Image rows per block: BLOCK_ROWS, fewer when their float16 maps would pass BLOCK_BYTES (never
    fewer than one CAM batch)."""
    per_row = maps_per_row(spec, config, permuted, True) * config.preprocess.image_size ** 2 * 2
    return int(min(BLOCK_ROWS, max(config.cam.batch_size, BLOCK_BYTES // max(per_row, 1))))


def expected_maps(spec, config, permuted: bool, rows: pd.DataFrame) -> int:
    test = int((rows[tuning.SPLIT] == "test").sum())
    return (len(rows) - test) * maps_per_row(spec, config, permuted, False) + test * maps_per_row(
        spec, config, permuted, True)


def expected_controls(spec, config, permuted: bool, rows: pd.DataFrame) -> int:
    """The faithfulness controls' maps of a run (`explain.road`): every image row gives the same number."""
    return len(rows) * road.controls_per_row(spec, config, permuted)


def run_folders(store, plan) -> tuple[Path, ...]:
    """Every folder of a run's explain output: cams/, sanity/ and controls/ (a label-permutation run:
    its sanity/)."""
    if plan.permuted:
        return (store.sanity_dir(plan.spec.name, plan.seed, True),)
    return (store.cams_dir(plan.spec.name, plan.seed), store.sanity_dir(plan.spec.name, plan.seed),
            store.controls_dir(plan.spec.name, plan.seed))


def run_outputs(config, store, plans) -> list[Output]:
    """One output per run: recorded in `_done.json` of its CAM folder (a temporary folder renamed
    into place, so nothing is stale before it is made again); `--force` removes all its folders."""
    return [Output(plan.key, run_folders(store, plan)[0] / DONE, explain_inputs(config, plan.fingerprint),
                   whole=run_folders(store, plan), item=plan) for plan in plans]


def extract_runs(config, store, plans, actors: int, gpus_per_actor: float, cpus_per_actor: float = 1.0,
                 memory_per_actor: float = 0, road_memory_per_actor: float = 0, force: bool = False) -> None:
    """Score every plan's run into `cams/<model>-seed<k>/` in one Ray Data pipeline; runs whose
    output was made from the same inputs are skipped, the others (re)computed with the reason.
    `actors` slots (`road.pools`); the memories are bytes Ray reserves per CAM and ROAD actor."""
    slots = road.Slots(actors, gpus_per_actor, cpus_per_actor, memory_per_actor, road_memory_per_actor)
    run_stage("explain", run_outputs(config, store, plans), force=force, doing="computing its heatmaps",
              build=lambda todo: _extract(config, store, todo, slots))


def _extract(config, store, todo: list[Output], slots: road.Slots) -> None:
    work = {output.name: run_work(config, store.cache_dir, output.item) for output in todo}
    for output in [output for output in todo if work[output.name].empty]:  # e.g. no true positive to explain
        print(f"[explain] {output.name}: no image to explain ({config.cam.images}); nothing written")
        _write_run(config, store, output, None)
        todo = [other for other in todo if other is not output]
        del work[output.name]
    if not todo:
        return
    try:
        unfinished = _stream(config, store, work, todo, slots)
    except Exception as error:
        reraise_own(error)
        raise
    if unfinished:  # only if rows were lost on the way: say so rather than write a short run
        raise RuntimeError(f"[explain] incomplete CAM output for {sorted(unfinished)}; rerun `camstudy explain`")


def _stream(config, store, work: dict[str, pd.DataFrame], outputs: list[Output],
            slots: road.Slots) -> dict[str, MapSink]:
    """Run the pipeline; each run's rows go to its `MapSink` as they arrive (its test rows spill to
    disk), and the run is written as soon as all its rows are in. Returns the runs left unfinished."""
    import ray.data

    todo = [output.item for output in outputs]
    output_of = {output.name: output for output in outputs}
    order = [plan.key for plan in registry.largest_first(todo)]
    plan_of = {plan.key: plan for plan in todo}
    rows = {key: block_rows(plan_of[key].spec, config, plan_of[key].permuted) for key in order}
    blocks = [work[key].iloc[i:i + rows[key]] for key in order for i in range(0, len(work[key]), rows[key])]
    step = config.cam.batch_size
    slots = slots._replace(actors=min(slots.actors, len(blocks)))  # an idle actor would hold a CPU/GPU
    cam_pool, road_pool, impute_cpus = road.pools(slots, road.road_on(config))
    expected = {plan.key: expected_maps(plan.spec, config, plan.permuted, work[plan.key]) for plan in todo}
    controls = {plan.key: expected_controls(plan.spec, config, plan.permuted, work[plan.key]) for plan in todo}
    maps = sum(expected.values()) + sum(controls.values())
    print(f"[explain] {len(todo)} run(s), {sum(map(len, work.values()))} image rows (test images to score and "
          f"validation positives to tune on, per model copy), {maps} heatmaps to compute"
          + (f" ({sum(controls.values())} of them faithfulness controls)" if road_pool else "")
          + f", {cam_pool.size} CAM actor(s)" + (f", {road_pool.min_size}{'' if road_pool.size == road_pool.min_size else f' to {road_pool.size}'} ROAD "
             "actor(s)" if road_pool else ""))
    runs = {plan.key: (plan.spec.name, plan.seed, str(plan.run_dir), plan.permuted) for plan in todo}
    sinks = {key: RunSinks(store.root, key, config.metrics, expected[key], controls[key]) for key in work}
    nodes: dict[str, set] = {key: set() for key in work}
    context = ray.data.DataContext.get_current()
    try:
        with without_budget_backpressure(context), MapProgress(maps) as progress:  # a Dataset copies its context
            dataset = ray.data.from_pandas(blocks).map_batches(
                CamScorer, batch_format="pandas", batch_size=step,
                fn_constructor_kwargs={"config": config, "runs": runs, "cache_dir": str(store.cache_dir),
                                       "robust": road.subsets(config, work, "robustness")},
                # one block at a time per actor (`road.remote_args`): the next goes to whichever actor
                # frees first (the default queues several per actor up front, which left one actor idle
                # at the end); no actor restarts: a lost actor fails the stage with one line, and the
                # rerun redoes only the runs not yet written (finished runs are complete on disk). Ray
                # Data passes its actors' arguments through the object store, so with restarts on
                # Ray logs an error at every actor's start that their arguments could be lost. The
                # memory is the host memory (bytes) Ray reserves per actor, so actors that cannot fit
                # together are not started together.
                **road.remote_args(cam_pool))
            if road_pool is not None:
                dataset = road.add_stages(dataset, config, runs, plan_of, str(store.cache_dir),
                                          road.subsets(config, work, "faithfulness"), road_pool,
                                          impute_cpus, road.impute_rows(config, BLOCK_BYTES, BLOCK_ROWS))
            for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                for key, part in _by_run(table):
                    nodes[key].update(part.column(NODE).to_pylist())
                    sinks[key].add(part.drop_columns([name for name in TRANSIENT if name in part.column_names]))
                    progress.add(len(part))
                    if sinks[key].complete:
                        out = _write_run(config, store, output_of[key], sinks.pop(key), sorted(nodes[key]))
                        progress.say(f"[explain] {key}: {expected[key] + controls[key]} heatmaps made, the test "
                                     f"images' written -> {out}")
    finally:
        for sink in sinks.values():  # unfinished runs: their spills go, they are redone next time
            sink.discard()
    return sinks


class RunSinks:
    """One run's rows on their way to disk: its maps (cams/ and sanity/) and its faithfulness
    controls (controls/), each a `MapSink` tuned on its own validation rows."""

    def __init__(self, spill_dir: Path, key: str, metrics_config, maps: int, controls: int):
        self.maps = MapSink(spill_dir, key, TUNING_KEYS, metrics_config, fallback=tuning_fallback, expected=maps)
        self.controls = MapSink(spill_dir, f"{key}-controls", CONTROL_TUNING_KEYS, metrics_config, expected=controls)

    @property
    def complete(self) -> bool:
        return self.maps.complete and self.controls.complete

    def add(self, table: pa.Table) -> None:
        import pyarrow.compute as pc

        control = road.is_control(table)
        self.maps.add(table.filter(pc.invert(control)))
        self.controls.add(table.filter(control))

    def discard(self) -> None:
        self.maps.discard()
        self.controls.discard()


class MapProgress:
    """Maps done of the stage's total, the rate and the time left, printed at least every
    `EVERY_S` seconds (from a timer thread, so a stage waiting on its first batch still speaks).
    The time left is the maps still to come at the rate of the maps done so far."""

    EVERY_S = 30.0

    def __init__(self, total: int, clock=time.monotonic):
        import threading

        self.total, self.done, self.clock = total, 0, clock
        self.started = clock()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._tick, name="explain-progress", daemon=True)

    def __enter__(self) -> "MapProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=1)

    def add(self, maps: int) -> None:
        with self._lock:
            self.done += maps

    def line(self) -> str:
        elapsed = self.clock() - self.started
        with self._lock:
            done = self.done
        head = f"[explain {elapsed:4.0f}s] {done}/{self.total} heatmaps"
        if not done:
            return f"{head}, time left: estimating (actors starting, no batch back yet)"
        rate = done / max(elapsed, 1e-9)
        return f"{head}, {rate:.1f} maps/s, ~{duration_text(max(0, self.total - done) / rate)} left"

    def say(self, text: str) -> None:
        print(f"{text} ({self.line()})", flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.EVERY_S):
            print(self.line(), flush=True)


def _by_run(table: pa.Table) -> list[tuple[str, pa.Table]]:
    """The rows of each run in `table`, by the run key the actors wrote beside them."""
    import pyarrow.compute as pc

    return [(key, table.filter(pc.equal(table[road.RUN], key)))
            for key in dict.fromkeys(table.column(road.RUN).to_pylist())]


def _write_run(config, store, output: Output, sinks: RunSinks | None, nodes: list[str] | None = None) -> Path:
    """cams/<run>/ (trained maps, _tuning.json, _done.json last), sanity/<run>/ (the twin's and the
    cascade's maps) and controls/<run>/ (the faithfulness controls, with their _tuning.json); a
    label-permutation run's maps, tuning and record all go to sanity/<run>-permuted/. The rows
    stream from the sinks' spills, a row group at a time."""
    plan = output.item
    sink = sinks.maps if sinks is not None else None
    records = sink.finish() if sink is not None else []
    try:
        if plan.permuted:
            folder = store.sanity_dir(plan.spec.name, plan.seed, True)
            with atomic_dir(folder) as tmp:
                rows = _write_scored(sink, lambda randomized: tmp)
                _write_records(config, tmp, output, records, rows=rows[True] + rows[False], nodes=nodes or [])
            return folder
        control_sink = sinks.controls if sinks is not None and sinks.controls.expected else None
        cams = store.cams_dir(plan.spec.name, plan.seed)
        sanity, controls = store.sanity_dir(plan.spec.name, plan.seed), store.controls_dir(plan.spec.name, plan.seed)
        with atomic_dir(cams) as cams_tmp:
            # renamed first: the _done.json in cams/ vouches for both
            with atomic_dir(sanity) as sanity_tmp, (atomic_dir(controls) if control_sink else nullcontext()) as \
                    controls_tmp:
                rows = _write_scored(sink, lambda randomized: sanity_tmp if randomized else cams_tmp)
                control_rows = _write_controls(config, control_sink, controls_tmp) if control_sink else 0
            stale = [folder for folder, made in ((sanity, rows[True]), (controls, control_rows)) if not made]
            objectstore.remove(stale)  # a check or a dimension turned off: no stale maps beside the new ones
            _write_records(config, cams_tmp, output, records,
                           vouches_for=[folder for folder in (sanity, controls) if folder not in stale],
                           rows=rows[False], sanity_rows=rows[True], control_rows=control_rows, nodes=nodes or [])
        return cams
    finally:
        if sinks is not None:
            sinks.discard()


def _write_controls(config, sink: MapSink, folder: Path) -> int:
    """controls/<run>/: the controls' scored rows and their _tuning.json; the rows written."""
    records = sink.finish()
    rows = _write_scored(sink, lambda randomized: folder)
    tuning.write_records(folder / StudyStore.CAM_TUNING, records, config.metrics)
    return rows[False] + rows[True]


def _write_scored(sink: MapSink | None, folder_for) -> dict[bool, int]:
    """Stream the sink's scored rows into `folder_for(randomized)`/CAM_PART; the rows of each side."""
    import pyarrow.compute as pc

    files: dict[Path, ParquetSink] = {}
    rows = {False: 0, True: 0}
    try:
        for table in (sink.scored() if sink is not None else ()):
            for randomized in (False, True):
                side = table.filter(table["randomized"] if randomized else pc.invert(table["randomized"]))
                if len(side):
                    path = folder_for(randomized) / StudyStore.CAM_PART
                    files.setdefault(path, ParquetSink(path)).write(side)
                    rows[randomized] += len(side)
    finally:
        for file in files.values():
            file.close()
    return rows


TUNING_KEYS = ["cam_method", "cam_layer", "randomization", "stages_randomized"]  # one threshold per map set
CONTROL_TUNING_KEYS = ["model", "cam_method", "cam_layer"]  # one per control (the blurred copy: per method and layer)
NODE = "_node"  # the Ray node that computed a row: the run's _done.json lists them
TRANSIENT = (NODE, road.RUN, road.ROW, road.PERTURBED)  # carried between the stages, never stored


def tuning_fallback(key: tuple) -> tuple:
    """A sanity copy (mapped on test images only) is scored at the threshold its trained model's
    map set of the same method and layer was tuned to: the trained model's operating point."""
    method, layer, _, _ = key
    return method, layer, "none", 0


def _write_records(config, folder: Path, output: Output, records: list[dict], vouches_for=(), **info) -> None:
    """_tuning.json, then, last, _done.json with the inputs the maps were made from, vouching for
    the maps beside it and those in `vouches_for` (the run's sanity/ folder)."""
    tuning.write_records(folder / StudyStore.CAM_TUNING, records, config.metrics)
    output.done(at=folder / DONE, vouches_for=vouches_for, **info)
