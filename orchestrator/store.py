"""The study store: one folder per study, written atomically, with per-stage completion markers.

Layout (ARCHITECTURE.md):
    <storage>/<study>/config.yaml             resolved config, as run
    <storage>/<study>/source/                 synthetic SIIM-format data (data.source: synthetic)
    <storage>/<study>/data/manifest.parquet   the manifest and split
    <storage>/<study>/data/cache/             preprocessed images and masks
    <storage>/<study>/data/report.json        the data report
    <storage>/<study>/train/<model>-seed<k>/  checkpoints + test predictions
    <storage>/<study>/cams/<model>-seed<k>/   CAM Parquet
    <storage>/<study>/analysis/               tables, statistics, figures, report.html
    <storage>/<study>/stages/<stage>.json     completion marker: the config hash it was made with

Nothing is written in place: files go to a temporary sibling and are renamed, so a crash never
leaves a half file under a final name.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from training.atomic import write_text_atomic
from training.errors import ConfigError


class StudyStore:
    def __init__(self, study_dir: str | Path):
        if "://" in str(study_dir):
            raise ConfigError(f"storage {study_dir}: remote URIs are not supported yet; "
                              "mount the shared storage (NFS, s3fs) and give its local path")
        self.root = Path(study_dir)

    config_path = property(lambda self: self.root / "config.yaml")
    source_dir = property(lambda self: self.root / "source")
    data_dir = property(lambda self: self.root / "data")
    manifest_path = property(lambda self: self.root / "data" / "manifest.parquet")
    cache_dir = property(lambda self: self.root / "data" / "cache")
    data_report_path = property(lambda self: self.root / "data" / "report.json")
    analysis_dir = property(lambda self: self.root / "analysis")
    mlflow_db = property(lambda self: self.root / "mlflow.db")

    def run_dir(self, model: str, seed: int) -> Path:
        return self.root / "train" / f"{model}-seed{seed}"

    def cams_dir(self, model: str, seed: int) -> Path:
        return self.root / "cams" / f"{model}-seed{seed}"

    # ------------------------------------------------------------------ stage markers

    def _marker(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def stage_done(self, stage: str, config_hash: str) -> bool:
        """True when `stage` finished with the same config hash."""
        marker = self._marker(stage)
        if not marker.is_file():
            return False
        return json.loads(marker.read_text()).get("config_hash") == config_hash

    def mark_done(self, stage: str, config_hash: str, **info: Any) -> None:
        record = {"stage": stage, "config_hash": config_hash, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        write_text_atomic(self._marker(stage), json.dumps(record, indent=2))

    def clear_stage(self, stage: str) -> None:
        self._marker(stage).unlink(missing_ok=True)
