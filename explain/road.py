"""Faithfulness and robustness in the explain stage (docs/STUDY.md §11): the Ray Data stages around
`explain.faithfulness`, which computes.

The explain pipeline with `faithfulness.enabled` (`explain.extract` builds it):

    image rows -> CamScorer actors -> impute_batch (CPU tasks) -> RoadScorer actors -> driver
                  maps, robustness    controls, ROAD's imputation   ROAD's forwards

- The CAM actors (`explain.extract.CamScorer`) map the images as before and, with
  `robustness.enabled`, score max-sensitivity (`robustness_scores`): the trained model's maps at
  the paper's layer and the weight-randomised twin's, each with its own model's CAM as the
  explanation function (it needs the model's gradients, so it runs where the model is).
- `impute_batch` needs no model, so it is a task stage (one CPU each) between the two actor pools,
  and a model actor never waits for a SciPy solve (docs/ARCHITECTURE.md, performance principles). It
  makes the controls' rows (`control_tables`) and, for every map to score, the perturbed images
  (`faithfulness.impute`), carried to the next stage in a transient column.
- `RoadScorer` actors load a run's trained model once (as the CAM actors do) and run the forwards
  (`faithfulness.road_scores`) on the perturbed images, filling the ROAD columns.

What ROAD scores (test rows only: validation rows only tune thresholds), always with the run's
TRAINED model, whose faithfulness is measured: every trained map at the layers of
`faithfulness.layers` (a label-permutation run's maps with its own model), the weight-randomised
twin's map ("full"), and the controls. The controls, per image (validation images too, so that
their IoU threshold is tuned on their own maps like any map set's): the location prior and the
image-only map (`explain.baselines.model_free_maps`, the maps of `baselines/`), a uniform random
map (`faithfulness.random_maps`), and a Gaussian-blurred copy of each trained map at those layers
(`faithfulness.blurred` of the map as stored, sigma half a map cell). They go to `controls/<run>/`
(`model` = f"{control}@{model}"): `baselines/` is made before any model is trained and shared by
every run, whereas a control's ROAD score needs the run's model. A label-permutation run has no
controls (its maps are themselves a sanity check).

Every seeded draw (tie order, imputation noise, the random map, the robustness perturbations) is
drawn from (SEED, image id): the same for every map of an image in every run, so paired
comparisons over images (a model's map against its blur or the prior, one model against another)
differ only by the map and the model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from explain import faithfulness
from explain.rows import TRAINED, map_table, with_scores
from study import maps
from study.store import StudyStore

SEED = 0  # the study's one seed of every faithfulness and robustness draw (with each image's id)
RUN, ROW, PERTURBED = "_run", "_row", "_perturbed"  # transient columns: the run key, the cache row, ROAD's inputs
# controls made per image (the blurred copy is made per map)
IMAGE_CONTROLS = tuple(name for name in maps.CONTROLS if name != "blurred")
ROAD_BATCH = 64  # images per ROAD forward: no autograd, so a forward holds one layer's activations at a time


# --------------------------------------------------------------------------- what is scored


def road_on(config) -> bool:
    return config.faithfulness.enabled


def scored_layers(spec, config) -> list[str]:
    """The layers whose trained maps ROAD scores: `faithfulness.layers` of the spec (the paper's always)."""
    from study.models import cam_layers

    return cam_layers(spec, config.faithfulness.layers)


def controls_per_row(spec, config, permuted: bool) -> int:
    """Control maps one image row gives (validation and test alike): the image controls and one
    blurred copy per trained map at the scored layers; 0 for a label-permutation run or without ROAD."""
    if permuted or not road_on(config):
        return 0
    methods = [m for m in config.cam.methods if m != "rollout"]
    blurred = len(scored_layers(spec, config)) * len(methods) + ("rollout" in config.cam.methods)
    return len(IMAGE_CONTROLS) + blurred


def control_model(control: str, model: str) -> str:
    return f"{control}{maps.CONTROL_SEPARATOR}{model}"


def is_control(table: pa.Table) -> pa.ChunkedArray:
    """Which rows of a map table are a control's (their `model` names the control)."""
    return pc.match_substring(table["model"], maps.CONTROL_SEPARATOR)


def _scored(frame: pd.DataFrame, layers: dict[str, set], chosen: dict[str, Optional[frozenset]]) -> np.ndarray:
    """Rows whose map ROAD scores: test rows (of the run's `chosen` images) of a trained map at a
    scored layer, of the twin, of a control."""
    trained = frame["randomization"].isin(["none", "labels"]).to_numpy() & np.array(
        [layer in layers[run] for run, layer in zip(frame[RUN], frame["cam_layer"])], bool)
    control = frame["model"].str.contains(maps.CONTROL_SEPARATOR, regex=False).to_numpy()
    twin = (frame["randomization"] == "full").to_numpy()
    picked = np.array([chosen.get(run) is None or image in chosen[run]
                       for run, image in zip(frame[RUN], frame["image_id"])], bool)
    return (frame["split"] == "test").to_numpy() & picked & (control | trained | twin)


# --------------------------------------------------------------------------- which test images


def subset(image_ids, n) -> Optional[frozenset]:
    """The test images a dimension scores when its `images` is a number n: the n of `image_ids`
    with the lowest rank drawn from (SEED, image id), so that every run that maps an image ranks it
    the same (runs with the same test images score the same ones, and pairs over images hold);
    None (all) for 'all' or when there are no more than n."""
    ids = list(dict.fromkeys(image_ids))
    if n == "all" or len(ids) <= n:
        return None
    return frozenset(sorted(ids, key=lambda image: (faithfulness.key_int(f"{SEED}/{image}"), str(image)))[:n])


def subsets(config, work: dict[str, pd.DataFrame], section: str) -> dict[str, Optional[frozenset]]:
    """Run key -> the test images `section` ('faithfulness' or 'robustness') scores (`subset`)."""
    n = getattr(config, section).images
    return {key: subset(rows.loc[rows["split"] == "test", "image_id"], n) for key, rows in work.items()}


# --------------------------------------------------------------------------- robustness (in the CAM actors)


def robustness_scores(model, spec, grey, reference, method: str, config, keys, prepare,
                      predicted=None) -> dict[str, np.ndarray]:
    """Max-sensitivity of `method`'s maps `reference` (B, S, S) at the paper's layer of the images
    `grey` (B, 1, S, S; perturbed in the grey preprocessed scale, as the model sees them), with
    `model`'s own CAM as the explanation function (`faithfulness.max_sensitivity`). The class of a
    perturbed image comes from its CAM's own forward; `predicted` (B,) is the class of each image,
    read from the forward of the caller's CAM of it (`explain.cam.model_output`)."""
    from explain.cam import model_output, sweep

    target = spec.target_layer

    def explain(model, x):
        with model_output(model) as output:
            heat = sweep(model, spec, prepare(x), 1, [target], [method])[target][method]
        return heat, faithfulness.positive_probability(output["output"])

    found = faithfulness.max_sensitivity(
        explain, model, grey, maps=reference, n=config.robustness.n, seed=SEED, keys=list(keys),
        relative_radius=config.robustness.radius, threshold=config.training.threshold, prepare=prepare,
        predicted=predicted, with_probability=True)
    return {name: np.asarray(found[name], np.float64) for name in maps.ROBUSTNESS}


# --------------------------------------------------------------------------- the CPU stage


def impute_rows(config, block_bytes: int, block_rows: int) -> int:
    """Map rows per imputation batch: a row's map, its blurred copy and its image's three controls
    are at most five maps to perturb, each `faithfulness.steps` x 2 images (float32) at the
    preprocessed size; a batch holds at most `block_bytes` of them (and at most `block_rows` rows)."""
    size = config.preprocess.image_size
    per_map = len(config.faithfulness.steps) * 2 * size * size * 4
    return int(max(1, min(block_rows, block_bytes // (5 * per_map))))


@lru_cache(maxsize=2)
def _cache(study_dir: str, cache_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, masks, location prior) of the preprocessing cache, once per worker process (the
    prior reads every training mask)."""
    from explain.baselines import location_prior
    from training.cache import read_index

    StudyStore(study_dir).pull(Path(cache_dir))  # a study in object storage: this node's mirror
    images = np.load(Path(cache_dir) / StudyStore.CACHE_IMAGES, mmap_mode="r")
    masks = np.load(Path(cache_dir) / StudyStore.CACHE_MASKS, mmap_mode="r")
    return images, masks, location_prior(read_index(Path(cache_dir)), masks)


def impute_batch(table: pa.Table, config, cache_dir: str, layers: dict[str, list[str]],
                 seeds: dict[str, int], chosen: dict[str, Optional[frozenset]]) -> pa.Table:
    """Ray Data task (CPU, no model): the batch's rows with their controls' rows added, and, for
    every map ROAD scores, its perturbed images (steps x 2, grey) in the PERTURBED column (null for
    the others). `layers`: run key -> its scored layers; `seeds`: run key -> the run's seed;
    `chosen`: run key -> the test images scored (`subsets`; None: all)."""
    images, masks, prior = _cache(config.study_dir, cache_dir)
    layers = {run: set(names) for run, names in layers.items()}
    controls = control_tables(table, config, images, masks, prior, layers, seeds)
    if controls:
        table = pa.concat_tables([table, *(part.select(table.column_names).cast(table.schema) for part in controls)])
    frame = table.select(["model", "randomization", "cam_layer", "split", "image_id", RUN, ROW]).to_pandas()
    scored = np.flatnonzero(_scored(frame, layers, chosen))
    steps, size = len(config.faithfulness.steps), config.preprocess.image_size
    perturbed = np.zeros((0, steps, 2, 1, size, size), np.float32)
    if len(scored):
        heat = _heatmaps(table.take(pa.array(scored)))
        grey = np.asarray(images[frame[ROW].to_numpy()[scored]], np.float32)[:, None]
        perturbed = faithfulness.impute(grey, heat, config.faithfulness.steps, config.faithfulness.imputation,
                                        SEED, keys=frame["image_id"].to_numpy()[scored].tolist())
    return table.append_column(PERTURBED, _perturbed_column(len(table), scored, perturbed))


def _heatmaps(table: pa.Table) -> np.ndarray:
    return table.column(maps.HEATMAP).combine_chunks().to_numpy_ndarray()


def _perturbed_column(n: int, scored: np.ndarray, perturbed: np.ndarray) -> pa.Array:
    """large_list<float32>: each scored row's perturbed images, flattened; null for the others."""
    width = int(np.prod(perturbed.shape[1:]))
    lengths = np.zeros(n, np.int64)
    lengths[scored] = width
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    valid = np.zeros(n, bool)
    valid[scored] = True
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(perturbed.reshape(-1)),
                                         mask=pa.array(~valid))


def control_tables(table: pa.Table, config, images, masks, prior, layers: dict[str, set],
                   seeds: dict[str, int]) -> list[pa.Table]:
    """The controls' rows for the trained maps in `table` (localisation scored like any map, ROAD
    later): the image controls once per image (from its rows of the first method at the paper's
    layer) and the blurred copy of each map at a scored layer."""
    from explain.baselines import model_free_maps
    from explain.faithfulness import blurred, cell_size, random_maps

    frame = table.drop_columns([maps.HEATMAP, maps.IOU_CURVE]).to_pandas()
    frame = frame[frame["randomization"] == "none"]
    frame = frame[[layer in layers[run] for run, layer in zip(frame[RUN], frame["cam_layer"])]]
    if frame.empty:
        return []
    size = config.preprocess.image_size
    found = []
    for (run, model), part in frame.groupby([RUN, "model"], sort=False):
        first = part[part["final_layer"] & (part["cam_method"] == config.cam.methods[0])]
        if len(first):
            grey = np.asarray(images[first[ROW].to_numpy()], np.float32)
            free = model_free_maps(grey, prior, config.baselines.image_only_sigma)
            free["random"] = random_maps((size, size), SEED, first["image_id"].tolist())
            found += [_control_table(first, masks, free[name], config, control_model(name, model), seeds[run],
                                     method=name, layer="", depth=float("nan"), map_size=size, final_layer=True,
                                     matched_layer=False) for name in IMAGE_CONTROLS]
        for (layer, method), rows in part.groupby(["cam_layer", "cam_method"], sort=False):
            source = rows.iloc[0]
            heat = _heatmaps(table.take(pa.array(rows.index.to_numpy())))
            found.append(_control_table(
                rows, masks, blurred(heat, cell_size(size, int(source["map_size"]))), config,
                control_model("blurred", model), seeds[run], method=method, layer=layer,
                depth=float(source["layer_depth"]), map_size=int(source["map_size"]),
                final_layer=bool(source["final_layer"]), matched_layer=bool(source["matched_layer"])))
    return found


def _control_table(rows: pd.DataFrame, masks, heat: np.ndarray, config, model: str, seed: int,
                   **which: Any) -> pa.Table:
    mask = np.asarray(masks[rows[ROW].to_numpy()]).astype(bool)
    table = map_table(rows.reset_index(drop=True), mask, heat, config.metrics, model=model, seed=seed,
                      copy=TRAINED, **which)
    for name in (name for name in rows.columns if name.startswith("_")):  # the transient columns (run, row, node)
        table = table.append_column(name, pa.array(rows[name].to_numpy()))
    return table


# --------------------------------------------------------------------------- the model stage


class RoadScorer:
    """Ray Data actor: per run, loads the trained model once (kept while that run's rows keep
    coming) and scores every row's perturbed images with it (`faithfulness.road_scores`); the
    PERTURBED column is dropped. `runs` maps a run key to (model name, seed, run folder, permuted)."""

    def __init__(self, config, runs: dict[str, tuple[str, int, str, bool]]):
        import torch

        self.torch, self.config, self.runs = torch, config, runs
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.store = StudyStore(config.study_dir)
        self.loaded: Optional[tuple[str, Any]] = None

    def __call__(self, table: pa.Table) -> pa.Table:
        from training.loop import prepare_input

        column = table.column(PERTURBED).combine_chunks()
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        n, steps, size = len(table), len(self.config.faithfulness.steps), self.config.preprocess.image_size
        scores = {name: np.full(n, np.nan) for name in maps.FAITHFULNESS[:3]}
        scores.update({name: np.full((n, steps), np.nan) for name in maps.STEP_LISTS})
        if valid.any():
            runs = table.column(RUN).to_numpy(zero_copy_only=False)
            flat = column.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
            perturbed = flat.reshape(int(valid.sum()), steps, 2, 1, size, size)
            where = np.flatnonzero(valid)
            channels = self.config.preprocess.channels
            for run in dict.fromkeys(runs[where]):
                mine = runs[where] == run
                found = faithfulness.road_scores(self._model(run), perturbed[mine], batch_size=ROAD_BATCH,
                                                 device=self.device,
                                                 prepare=lambda x: prepare_input(x, channels, channels_last=False))
                rows = where[mine]
                for name in maps.FAITHFULNESS[:3]:
                    scores[name][rows] = found[name]
                scores["road_morf_steps"][rows], scores["road_lerf_steps"][rows] = found["morf"], found["lerf"]
        return with_scores(table.drop_columns([PERTURBED]), scores)

    def _model(self, key: str):
        from training import registry
        from training.loop import load_trained_model

        if self.loaded is None or self.loaded[0] != key:
            self.loaded = None  # free the previous run's model before loading the next
            model_name, _, run_dir, _ = self.runs[key]
            spec = registry.get_spec(self.config.models, model_name)
            self.store.pull(Path(run_dir))
            self.loaded = (key, load_trained_model(spec, self.config, Path(run_dir)).to(self.device).eval())
        return self.loaded[1]


# --------------------------------------------------------------------------- the stages' resources


@dataclass(frozen=True)
class Pool:
    """One actor pool of the explain pipeline: its size and what each actor asks Ray for."""

    size: int
    gpus: float
    cpus: float
    memory: float
    min_size: Optional[int] = None  # an autoscaling pool: from min_size up to size actors as Ray can place them


class Slots(NamedTuple):
    """The explain stage's actor slots as the orchestrator sized them: how many, and per slot the
    GPUs (0 on a CPU cluster) and CPUs, and the host memory (bytes) of a CAM and of a ROAD actor."""

    actors: int
    gpus: float
    cpus: float = 1.0
    memory: float = 0
    road_memory: float = 0


def pools(slots: Slots, road: bool) -> tuple[Pool, Optional[Pool], float]:
    """(CAM pool, ROAD pool or None, CPUs per imputation task) for the slots.

    Without ROAD, one CAM actor per slot, as before. With ROAD, one CAM actor per slot still (Ray Data
    spreads a pool over the nodes: every node computes maps), and a ROAD actor beside it as memory
    allows: the ROAD pool autoscales from one actor (the orchestrator set aside its memory) up to
    one per slot. The two split a slot's GPU. Without GPUs the slot's CPUs are split CAM
    1/2, ROAD 1/4 and a quarter left to the imputation tasks, so that model actors holding every
    CPU never starve the tasks (which would stall the pipeline), on nodes of one CPU too."""
    actors, gpus, cpus, memory, road_memory = slots
    if not road:
        return Pool(actors, gpus, 0 if gpus else cpus, memory), None, 0.0
    if gpus:
        return Pool(actors, gpus / 2, 0, memory), Pool(actors, gpus / 2, 0, road_memory, min_size=1), 1.0
    return (Pool(actors, 0, cpus / 2, memory), Pool(actors, 0, cpus / 4, road_memory, min_size=1),
            min(1.0, cpus / 4))


# `max_restarts` (`remote_args`) has no named parameter in Ray 2.60's map_batches, so it goes through
# **ray_remote_args, which Ray marks deprecated with a console warning at every call from this
# package; that warning (only it, only for explain's calls) says nothing a user can act on.
warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", module="explain")


def remote_args(pool: Pool) -> dict:
    """map_batches' resource arguments for an actor pool (`max_restarts` 0: see explain.extract)."""
    import ray.data

    # a fixed pool: one batch at a time per actor (the next goes to whichever actor frees first); an
    # autoscaling pool queues two, since Ray Data adds an actor only when its actors' queues pass
    # 175% of their capacity (DataContext.autoscaling_config), which one batch in flight never reaches
    sizes = {"size": pool.size, "max_tasks_in_flight_per_actor": 1} if pool.min_size is None else \
        {"min_size": pool.min_size, "max_size": pool.size, "max_tasks_in_flight_per_actor": 2}
    return {"compute": ray.data.ActorPoolStrategy(**sizes),
            "num_gpus": pool.gpus, "num_cpus": pool.cpus, "max_restarts": 0,
            **({"memory": int(pool.memory)} if pool.memory else {})}


def add_stages(dataset, config, runs: dict, plans: dict, cache_dir: str, chosen: dict[str, Optional[frozenset]],
               pool: Pool, impute_cpus: float, batch: int):
    """The imputation tasks and the ROAD actors after the CAM actors, `batch` map rows at a time
    (`impute_rows`), ROAD scoring each run's `chosen` test images (`subsets`). The tasks' remote
    arguments differ from the actors' (`max_restarts`), so Ray Data never fuses the imputation into
    the ROAD actors."""
    layers = {key: scored_layers(plan.spec, config) for key, plan in plans.items()}
    seeds = {key: plan.seed for key, plan in plans.items()}
    dataset = dataset.map_batches(impute_batch, batch_format="pyarrow", batch_size=batch, num_cpus=impute_cpus,
                                  fn_kwargs={"config": config, "cache_dir": cache_dir, "layers": layers,
                                             "seeds": seeds, "chosen": chosen})
    return dataset.map_batches(RoadScorer, batch_format="pyarrow", batch_size=batch,
                               fn_constructor_kwargs={"config": config, "runs": runs}, **remote_args(pool))
