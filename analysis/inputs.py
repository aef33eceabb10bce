"""Reading the study store for the analyze stage (docs/ARCHITECTURE.md, "Stages and the study store").

    train/<model>-seed<k>/  done.json (finished), predictions.parquet, test_metrics.json
    cams/<model>-seed<k>/   Parquet parts, one row per scored image × method (trained model)
    sanity/<model>-seed<k>/ the same for the weight-randomised twin (`randomized` true)
    baselines/              the location prior and the image-only map, the same columns
    controls/<model>-seed<k>/ the faithfulness controls scored with the run's model (docs/STUDY.md §11):
                            `model` is f"{control}@{model}", the same columns
    data/                   manifest.parquet, report.json, cache/ (Figure 1 backgrounds)

Plain pandas and pyarrow only: the analysis runs without torch, timm or Ray, and finds every
file through the study contract: the command's `StudyStore` and typed `StudyConfig`, passed
down, never rebuilt from a path or read as a plain dict. It reads the runs it is given
(the runs the config names), never whatever else lies in the store. A run without done.json
is unfinished or failed, one without a CAM completion record has no scored maps; what such a
run left is ignored and listed in `missing`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from study import maps as map_columns
from study.config import StudyConfig
from study.models import FAMILY_ORDER, REGISTRY
from study.store import StudyStore, run_key

# family and depth of the built-in models (layers as the paper counts them), from their specs
BUILTIN_MODELS: dict[str, tuple[str, int]] = {name: (spec.family, spec.depth) for name, spec in REGISTRY.items()}
# parameters in millions of the built-in models (their specs): the depth trend's x (docs/STUDY.md §11)
PARAMETERS: dict[str, float] = {name: spec.parameters_millions for name, spec in REGISTRY.items()
                                if spec.parameters_millions is not None}
PRIMARY_CAM_METHOD = "gradcam"
# the map datasets' columns (study.maps): a dataset without the required ones is left out; the
# others, every column but the heatmap, are read when present
CAM_REQUIRED = list(map_columns.REQUIRED)
CAM_OPTIONAL = [column for column in map_columns.SCORES if column not in map_columns.REQUIRED]
# docs/STUDY.md §11, per map: read when present (stores scored before them lack them); the per-step
# lists (road_*_steps) are left in the Parquet
NEW_SCORES = [c for c in (*map_columns.FAITHFULNESS, *map_columns.ROBUSTNESS) if not c.endswith("_steps")]
CAM_OPTIONAL += [c for c in NEW_SCORES if c not in CAM_OPTIONAL]


def model_table(models: list[str], known: Optional[Mapping[str, tuple[str, int]]] = None) -> pd.DataFrame:
    """model, family, depth, in plot order: by family (VGG, ResNet, ViT, others), then depth.

    `known` (model -> (family, depth)) overrides the built-in table; an unknown model gets
    family "unknown" and no depth rather than stopping the report.
    """
    table = {**BUILTIN_MODELS, **(known or {})}
    builtin_rank = {name: i for i, name in enumerate(BUILTIN_MODELS)}
    rows = [{"model": m, "family": table.get(m, ("unknown", np.nan))[0],
             "depth": table.get(m, ("unknown", np.nan))[1]} for m in dict.fromkeys(models)]
    frame = pd.DataFrame(rows, columns=["model", "family", "depth"])
    family_rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    frame["_f"] = frame["family"].map(lambda f: family_rank.get(f, len(FAMILY_ORDER)))
    frame["_b"] = frame["model"].map(lambda m: builtin_rank.get(m, len(builtin_rank)))
    frame = frame.sort_values(["_f", "family", "depth", "_b", "model"], na_position="last")
    return frame.drop(columns=["_f", "_b"]).reset_index(drop=True)


def known_from_config(config: StudyConfig) -> dict[str, tuple[str, int]]:
    """family/depth of the config's `models.extra` entries."""
    return {name: (spec.family, spec.depth) for name, spec in config.models.extra.items()}


@dataclass
class StudyInputs:
    """Everything the analysis reads, plus what it looked for and did not find."""

    store: StudyStore
    config: StudyConfig
    models: pd.DataFrame  # model, family, depth (plot order)
    runs: pd.DataFrame  # run_key, model, seed, permuted, finished, has_predictions, has_metrics, has_cams
    test_metrics: pd.DataFrame  # model, seed, accuracy(_lo/_hi), precision..., auc...
    predictions: pd.DataFrame  # model, seed, image_id, label, probability
    cams: pd.DataFrame  # CAM rows without the heatmap column
    baselines: pd.DataFrame = field(default_factory=pd.DataFrame)  # baselines/ rows without the heatmap
    controls: pd.DataFrame = field(default_factory=pd.DataFrame)  # controls/ rows of every run, without the heatmap
    manifest: Optional[pd.DataFrame] = None
    data_report: Optional[dict[str, Any]] = None
    missing: list[str] = field(default_factory=list)

    @property
    def model_order(self) -> list[str]:
        return self.models["model"].tolist()

    @property
    def root(self) -> Path:
        """The study's folder (for a study in object storage, this node's mirror)."""
        return self.store.root


def load_study(store: StudyStore, config: StudyConfig,
               known_models: Optional[Mapping[str, tuple[str, int]]] = None,
               runs: Optional[list[tuple]] = None) -> StudyInputs:
    """Read the finished runs among `runs` ((model, seed) or (model, seed, permuted); default:
    the config's models x seeds and label-permutation runs); list each expected piece that is
    absent. A label-permutation run contributes its maps (sanity/), never to Table 1."""
    missing: list[str] = []
    runs = _survey_runs(store, runs if runs is not None else _expected_runs(config))
    finished = runs[runs["finished"]]
    trained = finished[~finished["permuted"]]
    inputs = StudyInputs(
        store=store, config=config,
        models=model_table(runs["model"].tolist(), {**known_from_config(config), **(known_models or {})}),
        runs=runs,
        test_metrics=_read_test_metrics(store, trained[trained["has_metrics"]]),
        predictions=_read_predictions(store, trained[trained["has_predictions"]]),
        cams=_read_all_cams(store, finished[finished["has_cams"]], missing),
        baselines=_read_baselines(store, missing, expected=config.baselines.enabled),
        controls=_read_controls(store, trained[trained["has_cams"]], missing),
        manifest=_read_optional_parquet(store.manifest_path, missing),
        data_report=_read_optional_json(store.data_report_path, missing),
    )
    inputs.missing = _run_problems(runs) + missing
    return inputs


def _expected_runs(config: StudyConfig) -> list[tuple[str, int, bool]]:
    names, sanity = config.models.names, config.sanity
    permuted = [(m, sanity.permutation_seed, True) for m in names] if sanity.label_permutation else []
    return [(m, s, False) for m in names for s in config.training.seeds] + permuted


def _survey_runs(store: StudyStore, expected: list[tuple]) -> pd.DataFrame:
    """One row per expected run with what exists for it."""
    rows = []
    for model, seed, *permuted in dict.fromkeys(expected):
        permuted = bool(permuted and permuted[0])
        train, maps = store.run_dir(model, seed, permuted), store.maps_dir(model, seed, permuted)
        rows.append({"run_key": run_key(model, seed, permuted), "model": model, "seed": seed, "permuted": permuted,
                     "train_dir": train.is_dir(), "finished": (train / StudyStore.DONE).is_file(),
                     "has_predictions": (train / StudyStore.PREDICTIONS).is_file(),
                     "has_metrics": (train / StudyStore.TEST_METRICS).is_file(),
                     "has_cams": (maps / StudyStore.CAM_DONE).is_file() and _has_parquet(maps)})
    return pd.DataFrame(rows, columns=["run_key", "model", "seed", "permuted", "train_dir", "finished",
                                       "has_predictions", "has_metrics", "has_cams"])


def _has_parquet(directory: Path) -> bool:
    return directory.is_dir() and any(directory.glob("*.parquet"))


def _run_problems(runs: pd.DataFrame) -> list[str]:
    """One plain sentence per run that cannot contribute everything."""
    problems = []
    for run in runs.itertuples():
        if not run.train_dir:
            problems.append(f"{run.run_key}: no training run (train/{run.run_key}/ absent)")
        elif not run.finished:
            problems.append(f"{run.run_key}: training did not finish (no done.json); "
                            "its predictions, metrics and CAMs are left out")
        else:
            problems += [f"{run.run_key}: {what}" for flag, what in (
                (run.has_predictions, "no predictions.parquet"), (run.has_metrics, "no test_metrics.json"),
                (run.has_cams, f"no finished CAM output (cams/{run.run_key}/)")) if not flag]
    return problems


def _read_test_metrics(store: StudyStore, runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run in runs.itertuples():
        values = json.loads((store.run_dir(run.model, run.seed) / StudyStore.TEST_METRICS).read_text())
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        rows.append({"model": run.model, "seed": run.seed, **numbers})
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["model", "seed"])


def _read_predictions(store: StudyStore, runs: pd.DataFrame) -> pd.DataFrame:
    frames = [pd.read_parquet(store.run_dir(run.model, run.seed) / StudyStore.PREDICTIONS,
                              columns=["image_id", "label", "probability"]).assign(model=run.model, seed=run.seed)
              for run in runs.itertuples()]
    if not frames:
        return pd.DataFrame(columns=["image_id", "label", "probability", "model", "seed"])
    return pd.concat(frames, ignore_index=True)


def _read_all_cams(store: StudyStore, runs: pd.DataFrame, missing: list[str]) -> pd.DataFrame:
    """Trained (cams/) and sanity (sanity/) rows of every run, told apart by `randomized` and
    `randomization`; a label-permutation run has its sanity/ folder only."""
    folders = [folder for run in runs.itertuples()
               for folder in ((store.sanity_dir(run.model, run.seed, True),) if run.permuted else
                              (store.cams_dir(run.model, run.seed), store.sanity_dir(run.model, run.seed)))
               if _has_parquet(folder)]
    frames = [read_cams(folder, missing) for folder in folders]
    frames = [f for f in frames if f is not None]
    if not frames:
        return pd.DataFrame(columns=CAM_REQUIRED)
    return pd.concat(frames, ignore_index=True)


def _read_baselines(store: StudyStore, missing: list[str], expected: bool) -> pd.DataFrame:
    """The baselines' rows, when their completion record says they are whole; `expected` (the
    config's baselines.enabled): their absence is listed in `missing`."""
    folder = store.baselines_dir
    if not (folder / StudyStore.CAM_DONE).is_file() or not _has_parquet(folder):
        if expected:
            missing.append("baselines/: absent (run `camstudy explain`): no location prior or image-only rung in "
                           "the ladder")
        return pd.DataFrame(columns=CAM_REQUIRED)
    frame = read_cams(folder, missing)
    return frame if frame is not None else pd.DataFrame(columns=CAM_REQUIRED)


def _read_controls(store: StudyStore, runs: pd.DataFrame, missing: list[str]) -> pd.DataFrame:
    """The faithfulness controls of the runs whose maps are complete; a study scored before them
    has no controls/ folder, and its analysis says the controls were not measured."""
    frames = [read_cams(store.controls_dir(run.model, run.seed), missing) for run in runs.itertuples()
              if _has_parquet(store.controls_dir(run.model, run.seed))]
    frames = [f for f in frames if f is not None]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CAM_REQUIRED)


def read_cams(directory: Path, missing: list[str]) -> Optional[pd.DataFrame]:
    """The CAM rows of one run without the heatmap; None (and a note in `missing`) if malformed."""
    names = set(pq.ParquetDataset(directory).schema.names)
    absent = [c for c in CAM_REQUIRED if c not in names]
    if absent:
        missing.append(f"{directory.name}: CAM Parquet lacks columns {absent}; the run is left out "
                       "(rerun `camstudy explain --force`)")
        return None
    frame = pd.read_parquet(directory, columns=CAM_REQUIRED + [c for c in CAM_OPTIONAL if c in names])
    frame["randomized"] = frame["randomized"].astype(bool)
    return frame


FINAL = "final"  # the layer filter of the paper's layer: the rows whose `final_layer` is true
# Rows per batch when maps are streamed: bounds what one read holds (at 224 px, 256 maps are 51 MB as float32)
MAP_BATCH_ROWS = 256


def map_filter(method: str, layer: str = FINAL, image_ids: Optional[Iterable[str]] = None):
    """The rows of one trained map set: `method` at `layer` (FINAL: the paper's layer, by the
    `final_layer` flag, never by row order), optionally only `image_ids`."""
    import pyarrow.compute as pc

    chosen = (pc.field("cam_method") == method) & (pc.field("randomized") == False)  # noqa: E712 (an expression)
    chosen &= (pc.field("final_layer") == True) if layer == FINAL else (pc.field("cam_layer") == layer)  # noqa: E712
    if image_ids is not None:
        chosen &= pc.field("image_id").isin(list(image_ids))
    return chosen


def iter_heatmaps(store: StudyStore, model: str, seed: int, method: str = PRIMARY_CAM_METHOD,
                  layer: str = FINAL, image_ids: Optional[Iterable[str]] = None,
                  batch_rows: int = MAP_BATCH_ROWS, dtype=np.float32) -> Iterator[tuple[list[str], np.ndarray]]:
    """One run's trained maps (`map_filter`) as (image ids, maps (B, S, S) as `dtype`) batches of at
    most `batch_rows`, read a row group at a time (no read-ahead, no pre-buffering), so memory stays one batch
    whatever the run's size; each batch is a copy, keeping no Arrow buffer alive."""
    import pyarrow.dataset as pads

    directory = store.cams_dir(model, seed)
    if not _has_parquet(directory):
        return
    dataset = pads.dataset(directory, format="parquet")
    # pre_buffer (pyarrow's default) reads ahead every row group the scan will touch: one run's
    # 4,800 maps of 160 px held 242 MB in the Arrow pool with it, 31 MB without (measured)
    scanner = dataset.scanner(columns=["image_id", "heatmap"], filter=map_filter(method, layer, image_ids),
                              batch_size=batch_rows, batch_readahead=0, fragment_readahead=0,
                              fragment_scan_options=pads.ParquetFragmentScanOptions(pre_buffer=False))
    for batch in scanner.to_batches():
        if batch.num_rows:
            maps = batch.column("heatmap").to_numpy_ndarray().astype(dtype, copy=True)
            yield batch.column("image_id").to_pylist(), maps


def read_heatmaps(store: StudyStore, model: str, seed: int, image_ids: Iterable[str],
                  method: str = PRIMARY_CAM_METHOD, layer: str = FINAL) -> dict[str, np.ndarray]:
    """Trained-model heatmaps (float32 S×S) of `image_ids` for one run at `layer`; absent ids are
    left out. For a few images (figures, pass-line pairs): a whole run streams with `iter_heatmaps`."""
    found: dict[str, np.ndarray] = {}
    for ids, maps in iter_heatmaps(store, model, seed, method, layer, image_ids=list(image_ids)):
        found.update(zip(ids, maps))
    return found


def read_backgrounds(store: StudyStore, image_ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """image_id -> (z-scored image float32, mask uint8) from data/cache; {} without a cache."""
    cache = store.cache_dir
    if not (cache / StudyStore.CACHE_INDEX).is_file():
        return {}
    index = pd.read_parquet(cache / StudyStore.CACHE_INDEX, columns=["row", "image_id"])
    rows = index[index["image_id"].isin(image_ids)]
    images = np.load(cache / StudyStore.CACHE_IMAGES, mmap_mode="r")
    masks = np.load(cache / StudyStore.CACHE_MASKS, mmap_mode="r")
    return {r.image_id: (np.asarray(images[r.row], dtype=np.float32), np.asarray(masks[r.row]))
            for r in rows.itertuples()}


def _read_optional_parquet(path: Path, missing: list[str]) -> Optional[pd.DataFrame]:
    if path.is_file():
        return pd.read_parquet(path)
    missing.append(f"{path.parent.name}/{path.name}: absent (run `camstudy prepare`)")
    return None


def _read_optional_json(path: Path, missing: list[str]) -> Optional[dict[str, Any]]:
    if path.is_file():
        return json.loads(path.read_text())
    missing.append(f"{path.parent.name}/{path.name}: absent (run `camstudy prepare`)")
    return None
