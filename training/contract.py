"""The study contract: every fact that more than one stage relies on, stated once (torch-free).

- **Run keys**: `run_key("resnet50", 2) == "resnet50-seed2"` (a label-permutation run:
  `run_key("resnet50", 0, permuted=True) == "resnet50-seed0-permuted"`), and `parse_run_key` back.
- **The store layout**: `StudyStore` names every folder and file a stage reads or writes; no
  other module spells a store path.
- **The completion rule**: a stage's output (the prepared data, one run's CAMs, the analysis)
  carries a record of the *inputs* it was made from: the config keys it depends on, the
  fingerprints of what it read from upstream, and `SCORING_VERSION`. It is reused only when the
  fingerprint of the inputs the config asks for now is the recorded one; otherwise it is redone
  and `record_reason` says which dotted keys changed ("cam.methods changed"). A training run's
  `done.json` follows the same rule, but a changed run is refused rather than retrained (hours of
  GPU time): `--force train` says so explicitly.
- **What a record vouches for**: the record also lists the files it vouches for, each with its
  size, SHA-256 and modification time (`vouched_files`), and the output is reused only while each
  is still there with its size and content (`damaged_file`: the hash is recomputed only when the
  modification time moved, so a rerun over a large store costs a stat per file). A truncated or
  changed file is a reason like any other ("cams/resnet18-seed0/part-00000.parquet is 1,234
  bytes, recorded 2,468 (truncated or changed)"): the stage redoes what produced it; a damaged
  training output is refused like a changed run.

Execution settings (batch sizes of inference, worker counts, actor counts) are not inputs:
they change how fast a result comes, not the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from training import objectstore
from training.atomic import write_text_atomic
from training.errors import StoreError, TrainingError

# Bump when the prepared data gains or changes a column: the prepare stage is redone (its inputs
# include this), the training runs are not (theirs name the config sections, not this).
PREPARE_VERSION = 2  # 2: rle_rows and the lesion covariates in the manifest and the cache index
# Bump when a metric definition or the CAM post-processing changes (STUDY.md §4-5): every
# run's CAM output is then recomputed, and the analysis after it.
SCORING_VERSION = 3  # 3: layer sweep, auprc/auroc_pixel, tuned thresholds, lesion covariates
# Bump when a table, statistic or the report changes: the analysis is redone.
ANALYSIS_VERSION = 4  # 4: layer_vs_final, calls at the threshold, cascade step verdicts, summary.md, runs table in MLflow

# --------------------------------------------------------------------------- run keys

PERMUTED = "-permuted"  # the run key's suffix of a run trained on permuted labels (STUDY.md §10)
_RUN_KEY = re.compile(r"^(?P<model>[A-Za-z0-9_.]+)-seed(?P<seed>\d+)(?P<permuted>-permuted)?$")


def run_key(model: str, seed: int, permuted: bool = False) -> str:
    """The one name of a (model, seed) run: its folders, its MLflow child, its log lines."""
    return f"{model}-seed{seed}{PERMUTED if permuted else ''}"


def parse_run_key(name: str) -> Optional[tuple[str, int, bool]]:
    """("resnet50", 2, False) for "resnet50-seed2"; None for a name of another form."""
    match = _RUN_KEY.match(name)
    return (match["model"], int(match["seed"]), bool(match["permuted"])) if match else None


# --------------------------------------------------------------------------- the completion rule


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able mapping (key order does not matter)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(inputs: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"cam": {"methods": [...]}} -> {"cam.methods": [...]}: the names a reason line uses."""
    flat: dict[str, Any] = {}
    for key, value in inputs.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two input records (added and removed ones too)."""
    before, after = flatten(old), flatten(new)
    same = lambda key: json.dumps(before.get(key), default=str) == json.dumps(after.get(key), default=str)
    return [key for key in dict.fromkeys([*before, *after]) if key not in before or key not in after or not same(key)]


def write_record(path: Path, inputs: Mapping[str, Any], *, vouches_for: Iterable[Path] = (),
                 own_folder: bool = True, **info: Any) -> None:
    """The completion record of an output: written last, after the output is in place.

    It vouches for every regular file in its own folder (`own_folder`; the record itself and
    writers' temporaries excepted) and for the files and folders in `vouches_for`, as they are
    now (`vouched_files`). A record written in a temporary folder that is then renamed into place
    stays right: each file is named relative to the record's folder."""
    record = {"fingerprint": fingerprint(inputs), "inputs": inputs,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info,
              FILES: vouched_files(path, vouches_for, own_folder)}
    write_text_atomic(path, json.dumps(record, indent=2, default=str))


def read_record(path: Path) -> Optional[dict[str, Any]]:
    """The record at `path`, or None when there is none (or it cannot be read: redo the work)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def record_reason(path: Path, inputs: Mapping[str, Any]) -> Optional[str]:
    """None when the output at `path` was made from exactly `inputs` and every file its record
    vouches for is intact; else why it must be redone (one line). A record written before records
    listed their files vouches for nothing: it is judged by its inputs alone, as it was."""
    record = read_record(path)
    if record is None:
        return "not done yet"
    if record.get("fingerprint") == fingerprint(inputs):
        return damaged_file(path, record)
    if not isinstance(record.get("inputs"), Mapping):
        return "made by an older camstudy that did not record its inputs"
    keys = changed_keys(record["inputs"], inputs)
    shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    return f"{shown} changed" if keys else "its inputs changed"


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


def require_intact(path: Path, remedy: str) -> None:
    """A StoreError (one line: the file, then `remedy`) when the record at `path` vouches for a
    damaged file; nothing when it has no record (whether it is needed is its reader's business)."""
    record = read_record(path)
    damage = damaged_file(path, record) if record is not None else None
    if damage is not None:
        raise StoreError(f"{damage}; {remedy}")


# --------------------------------------------------------------------------- what a record vouches for

FILES = "files"  # a record's key: {path relative to the record's folder: {"bytes", "sha256", "mtime_ns"}}
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, hashed once per process


def vouched_files(record: Path, vouches_for: Iterable[Path] = (), own_folder: bool = True) -> dict[str, dict]:
    """Each regular file in the record's folder (with `own_folder`) and in `vouches_for` (files,
    or folders: every file below them), keyed by its path relative to the record's folder, with
    its size, SHA-256 and modification time. Hashing reads each file once (~1.6 GB/s): a small
    share of the stage that wrote it. Skipped: the record itself, writers' temporaries, and a
    path of `vouches_for` that does not exist (nothing to vouch for)."""
    record = Path(record).absolute()
    folder = record.parent
    files: dict[str, dict] = {}
    for top in ([folder] if own_folder else []) + [Path(p).absolute() for p in vouches_for]:
        below = sorted(top.rglob("*")) if top.is_dir() else [top] if top.is_file() else []
        for file in below:
            if file == record or not file.is_file() or any(map(objectstore.is_temporary, file.relative_to(top).parts)):
                continue
            info = file.stat()
            files[Path(os.path.relpath(file, folder)).as_posix()] = {
                "bytes": info.st_size, "sha256": _digest(file, info), "mtime_ns": info.st_mtime_ns}
    return files


def damaged_file(path: Path, record: Mapping[str, Any]) -> Optional[str]:
    """One line naming the first file the record at `path` vouches for that is missing or differs
    from the record, None when every one is intact (or the record lists none)."""
    files = record.get(FILES)
    if not isinstance(files, Mapping):
        return None
    folder = Path(path).parent
    for name, recorded in files.items():
        file = Path(os.path.normpath(folder / name))
        try:
            info = file.stat()
        except OSError:
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):
            return f"{_shown(file)} is missing (recorded {recorded.get('bytes', 0):,} bytes)"
        if info.st_size != recorded.get("bytes"):
            return (f"{_shown(file)} is {info.st_size:,} bytes, recorded {recorded.get('bytes', 0):,} "
                    "(truncated or changed)")
        if info.st_mtime_ns != recorded.get("mtime_ns") and _digest(file, info) != recorded.get("sha256"):
            return f"{_shown(file)} has changed since it was recorded (same size, another SHA-256)"
    return None


def _digest(file: Path, info: os.stat_result) -> str:
    key = (str(file), info.st_size, info.st_mtime_ns)
    if key not in _DIGESTS:
        with open(file, "rb") as handle:
            _DIGESTS[key] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _DIGESTS[key]


def _shown(file: Path) -> str:
    """A file as a reason line names it: relative to its study (the folder holding study.json),
    else in full."""
    for folder in list(file.parents)[:4]:
        if (folder / "study.json").is_file():
            return file.relative_to(folder).as_posix()
    return str(file)


# --------------------------------------------------------------------------- what each stage depends on


def prepare_inputs(config: Any) -> dict[str, Any]:
    """The prepared data (manifest, split, cache) depends on these config sections only."""
    plain = config.to_dict()
    return {**{section: plain[section] for section in ("data", "split", "preprocess")},
            "prepare_version": PREPARE_VERSION}


def explain_inputs(config: Any, train_fingerprint: str) -> dict[str, Any]:
    """One run's CAM output: the trained run, which maps are made at which layers on which images,
    how they are scored, and the prepared data (validation positives tune the IoU threshold; the
    lesion covariates come from the cache index). (`cam.batch_size` changes only the speed.)"""
    cam, plain = config.cam, config.to_dict()
    return {"train": {"fingerprint": train_fingerprint},
            "cam": {"methods": list(cam.methods), "layers": list(cam.layers), "images": cam.images,
                    "sanity_randomized": cam.sanity_randomized},
            "sanity": {"cascade": plain["sanity"]["cascade"]},
            "prepare": fingerprint(prepare_inputs(config)),
            "metrics": plain["metrics"], "scoring_version": SCORING_VERSION}


def baselines_inputs(config: Any) -> dict[str, Any]:
    """The baseline maps (location prior, image-only): the prepared data, their settings, the scoring."""
    plain = config.to_dict()
    return {"prepare": fingerprint(prepare_inputs(config)), "baselines": plain["baselines"],
            "metrics": plain["metrics"], "scoring_version": SCORING_VERSION}


def analyze_inputs(config: Any, store: "StudyStore", runs: list[tuple]) -> dict[str, Any]:
    """The analysis: the CAM output and training run of every run the config names (each by its
    record's fingerprint; None when it has none), the baselines, the prepared data, the statistics settings,
    the decision threshold the report quotes, and where results are logged."""
    plain = config.to_dict()
    recorded = lambda path: (read_record(path) or {}).get("fingerprint")  # noqa: E731
    cams = {run_key(*run): recorded(store.maps_dir(*run) / StudyStore.CAM_DONE) for run in runs}
    trained = {run_key(*run): recorded(store.run_dir(*run) / StudyStore.DONE) for run in runs}
    return {"cams": cams, "train": trained, "prepare": fingerprint(prepare_inputs(config)),
            "baselines": recorded(store.baselines_dir / StudyStore.CAM_DONE),
            "statistics": plain["statistics"], "sanity": plain["sanity"], "tuning": plain["tuning"],
            "training": {"threshold": plain["training"]["threshold"]},
            "tracking": plain["tracking"], "analysis_version": ANALYSIS_VERSION}


# --------------------------------------------------------------------------- the store


class StudyStore:
    """One folder per study (ARCHITECTURE.md, "the study store"). Nothing is written in place:
    files go to a temporary sibling `.<name>.tmp-<pid>` and are renamed. With object storage
    the folder is a node-local mirror whose writes are uploaded as they complete.

        study.json                       the study's id (made with the store) and creation time
        gpu_memory.json                  measured peak GPU memory per model and settings
        config.yaml                      resolved config, as last run
        source/                          synthetic SIIM-format data (data.source: synthetic)
        data/manifest.parquet, report.json, cache/{index.parquet, images.npy, masks.npy}
        train/<run key>/                 checkpoint.pt, best-eNNNN.pt, model.pt, predictions.parquet,
                                         test_metrics.json, attempt.json, error.json, done.json (last)
        cams/<run key>/                  part-00000.parquet (trained-model maps only), _tuning.json, _done.json (last)
        sanity/<run key>/                part-00000.parquet: the weight-randomised twin's and the cascade's maps
        sanity/<run key>-permuted/       a label-permutation run's maps, _tuning.json, _done.json (last)
        baselines/                       part-00000.parquet: location prior and image-only maps, same
                                         columns; _tuning.json, _done.json (last)
        analysis/                        tables, statistics, figures, report.html
        tune/<family>/<trial>/, tune/ray/ `camstudy tune`'s trial runs and Ray Tune's own state
        stages/<stage>.json              completion records of prepare and analyze
        camstudy.log                     full traces of failed Ray tasks (the console gets one line)
        .lock                            held by the one command writing the study
    """

    CHECKPOINT, MODEL, DONE = "checkpoint.pt", "model.pt", "done.json"
    PREDICTIONS, TEST_METRICS = "predictions.parquet", "test_metrics.json"
    ATTEMPT = "attempt.json"  # the MLflow child of the attempt a checkpoint belongs to
    ERROR = "error.json"  # camstudy's own error in a run's worker, for the driver (not retried)
    CAM_PART, CAM_DONE = "part-00000.parquet", "_done.json"
    # the IoU thresholds tuned on validation positives and the images they came from ("_": Parquet
    # dataset readers skip the file)
    CAM_TUNING = "_tuning.json"
    CACHE_INDEX, CACHE_IMAGES, CACHE_MASKS = "index.parquet", "images.npy", "masks.npy"  # in data/cache/
    # the cache index: `row` indexes the arrays; mask_fraction and the lesion covariates (rle_rows,
    # n_regions, elongation: training.lesions) are measured at native resolution by prepare
    CACHE_INDEX_COLUMNS = ("row", "image_id", "split", "label", "mask_fraction", "rle_rows", "n_regions",
                           "elongation")

    def __init__(self, study_dir: str | Path):
        """A local folder, or a URI (`s3://bucket/prefix/study`): then the study lives in the object
        store and is worked on in a node-local mirror (`training.objectstore`), which is `root`."""
        self.remote = objectstore.open_remote(str(study_dir)) if objectstore.is_uri(str(study_dir)) else None
        self.root = self.remote.local if self.remote else Path(study_dir)

    @property
    def location(self) -> str:
        """Where the study lives: its URI, or its folder."""
        return self.remote.uri if self.remote else str(self.root)

    @property
    def ray_storage(self) -> str:
        """Ray Train's storage_path: the object store itself for a remote study (Ray writes there
        through pyarrow.fs), the store's folder otherwise."""
        return f"{self.remote.uri}/ray" if self.remote else str(self.ray_dir)

    def shown(self, path: str | Path) -> str:
        """How the console names a study file: for a study in object storage its URI, which is the
        authority, and where the local copy is; else its path."""
        if self.remote is None:
            return str(path)
        relative = Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        return f"{self.remote.uri}/{relative} (local copy: {path})"

    def pull(self, *paths: Path) -> int:
        """Fetch these folders or files (default: the whole study) from the object store into the
        mirror when newer there; nothing for a local study. Returns how many files came."""
        if self.remote is None:
            return 0
        return self.remote.pull(*(Path(p).resolve().relative_to(self.root.resolve()) for p in paths))

    def push(self, *paths: Path) -> None:
        """Upload files written without the atomic helpers (MLflow's SQLite file, the log)."""
        if self.remote is not None:
            for path in paths:
                if Path(path).exists():
                    self.remote.upload(Path(path))

    study_path = property(lambda self: self.root / "study.json")
    config_path = property(lambda self: self.root / "config.yaml")
    source_dir = property(lambda self: self.root / "source")
    data_dir = property(lambda self: self.root / "data")
    manifest_path = property(lambda self: self.root / "data" / "manifest.parquet")
    cache_dir = property(lambda self: self.root / "data" / "cache")
    data_report_path = property(lambda self: self.root / "data" / "report.json")
    analysis_dir = property(lambda self: self.root / "analysis")
    mlflow_db = property(lambda self: self.root / "mlflow.db")
    log_path = property(lambda self: self.root / "camstudy.log")
    lock_path = property(lambda self: self.root / ".lock")
    ray_dir = property(lambda self: self.root / "ray")  # Ray Train's own run state (storage_path)
    tune_dir = property(lambda self: self.root / "tune")  # `camstudy tune`: trial runs, Ray Tune's state
    # measured peak GPU memory per model and settings (orchestrator.schedule sizes GPU shares by it)
    gpu_memory_path = property(lambda self: self.root / "gpu_memory.json")
    host_memory_path = property(lambda self: self.root / "host_memory.json")  # measured peak RAM, likewise

    def run_dir(self, model: str, seed: int, permuted: bool = False) -> Path:
        return self.root / "train" / run_key(model, seed, permuted)

    def cams_dir(self, model: str, seed: int) -> Path:
        return self.root / "cams" / run_key(model, seed)

    def sanity_dir(self, model: str, seed: int, permuted: bool = False) -> Path:
        return self.root / "sanity" / run_key(model, seed, permuted)

    def maps_dir(self, model: str, seed: int, permuted: bool = False) -> Path:
        """Where a run's explain output is complete (its _done.json): cams/ for a trained run,
        sanity/ for a label-permutation run (every map of it is a sanity map)."""
        return self.sanity_dir(model, seed, True) if permuted else self.cams_dir(model, seed)

    baselines_dir = property(lambda self: self.root / "baselines")

    def stage_record(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def study_id(self) -> str:
        """The study's id, made once with the store: what tells two studies of one name apart."""
        record = read_record(self.study_path)
        if record and isinstance(record.get("id"), str):
            return record["id"]
        study_id = uuid.uuid4().hex[:12]
        write_text_atomic(self.study_path, json.dumps(
            {"id": study_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "name": self.root.name}, indent=2))
        return study_id

    def sweep_temporary(self) -> list[Path]:
        """Remove what writers killed mid-write left (`.<name>.tmp-<pid>`); call it with the lock
        held, before the stage starts any writer of its own."""
        import shutil

        swept = list(self.root.rglob(".*.tmp-*"))
        for path in swept:  # one inside a swept folder is already gone
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return swept
