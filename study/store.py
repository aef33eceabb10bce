"""The study store: every folder and file name of a study, and the run keys that name its runs
(torch-free). No other module spells a store path; `study.records` says when what is stored is complete.

- **Run keys**: `run_key("resnet50", 2) == "resnet50-seed2"` (a label-permutation run:
  `run_key("resnet50", 0, permuted=True) == "resnet50-seed0-permuted"`), and `parse_run_key` back.
- **The store layout**: `StudyStore` names every folder and file a stage reads or writes.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Optional

from study import objectstore
from study.atomic import write_text_atomic

# --------------------------------------------------------------------------- run keys

PERMUTED = "-permuted"  # the run key's suffix of a run trained on permuted labels (docs/STUDY.md §10)
_RUN_KEY = re.compile(r"^(?P<model>[A-Za-z0-9_.]+)-seed(?P<seed>\d+)(?P<permuted>-permuted)?$")


def run_key(model: str, seed: int, permuted: bool = False) -> str:
    """The one name of a (model, seed) run: its folders, its MLflow child, its log lines."""
    return f"{model}-seed{seed}{PERMUTED if permuted else ''}"


def parse_run_key(name: str) -> Optional[tuple[str, int, bool]]:
    """("resnet50", 2, False) for "resnet50-seed2"; None for a name of another form."""
    match = _RUN_KEY.match(name)
    return (match["model"], int(match["seed"]), bool(match["permuted"])) if match else None


# --------------------------------------------------------------------------- the store


class StudyStore:
    """One folder per study (docs/ARCHITECTURE.md, "Stages and the study store"). Nothing is written in place:
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
    # the checkpoint of the selected epoch so far (a hard link to CHECKPOINT), and a glob of all of them
    BEST_CHECKPOINT, BEST_CHECKPOINTS = "best-e{epoch:04d}.pt", "best-e*.pt"
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
        store and is worked on in a node-local mirror (`study.objectstore`), which is `root`."""
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

    STUDY_FILE = "study.json"  # the study's id: also what marks a folder as a study's
    study_path = property(lambda self: self.root / self.STUDY_FILE)
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

    train_root = property(lambda self: self.root / "train")  # every run's folder (run_dir) is in here
    cams_root = property(lambda self: self.root / "cams")  # every run's cams_dir is in here
    sanity_root = property(lambda self: self.root / "sanity")  # every run's sanity_dir is in here
    controls_root = property(lambda self: self.root / "controls")  # every run's controls_dir is in here

    def run_dir(self, model: str, seed: int, permuted: bool = False) -> Path:
        return self.train_root / run_key(model, seed, permuted)

    def cams_dir(self, model: str, seed: int) -> Path:
        return self.cams_root / run_key(model, seed)

    def sanity_dir(self, model: str, seed: int, permuted: bool = False) -> Path:
        return self.sanity_root / run_key(model, seed, permuted)

    def controls_dir(self, model: str, seed: int) -> Path:
        """The faithfulness controls of a trained run (docs/STUDY.md §11), scored with its model."""
        return self.controls_root / run_key(model, seed)

    def maps_dir(self, model: str, seed: int, permuted: bool = False) -> Path:
        """Where a run's explain output is complete (its _done.json): cams/ for a trained run,
        sanity/ for a label-permutation run (every map of it is a sanity map)."""
        return self.sanity_dir(model, seed, True) if permuted else self.cams_dir(model, seed)

    baselines_dir = property(lambda self: self.root / "baselines")

    def stage_record(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def study_id(self) -> str:
        """The study's id, made once with the store: what tells two studies of one name apart."""
        try:
            record = json.loads(self.study_path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: a new id
            record = None
        if isinstance(record, dict) and isinstance(record.get("id"), str):
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
