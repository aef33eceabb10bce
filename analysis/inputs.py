"""Reading the study store for the analyze stage (ARCHITECTURE.md, "Stages and the study store").

    train/<model>-seed<k>/  done.json (finished), predictions.parquet, test_metrics.json
    cams/<model>-seed<k>/   Parquet parts, one row per scored image × {trained, randomised} × method
    data/                   manifest.parquet, report.json, cache/ (Figure 1 backgrounds)

Plain pandas and pyarrow only: the analysis runs without torch, timm or Ray. A run without
done.json is unfinished or failed; everything it left is ignored and listed in `missing`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

# The one fallback table of family and depth (layers as the paper counts them; both ViT-S and
# ViT-B have 12 blocks). training.registry holds the same facts; it imports torch and timm, so
# the analysis takes them from here, from config `models.extra`, or from a mapping passed in.
BUILTIN_MODELS: dict[str, tuple[str, int]] = {
    "vgg16": ("vgg", 16), "vgg19": ("vgg", 19),
    "resnet18": ("resnet", 18), "resnet34": ("resnet", 34), "resnet50": ("resnet", 50),
    "resnet101": ("resnet", 101),
    "vit_small": ("vit", 12), "vit_base": ("vit", 12), "vit_large": ("vit", 24),
}
FAMILY_ORDER = ("vgg", "resnet", "vit")
PRIMARY_CAM_METHOD = "gradcam"
CAM_REQUIRED = ["image_id", "model", "seed", "diff_gradcam", "randomized", "cam_method"]
CAM_OPTIONAL = ["label", "probability", "correct", "mask_fraction", "ehr_auc", "ehr_auc_chance",
                "ehr_auc_oracle", "ehr_auc_norm", "ehr_auc_inputiba", "ehr_auc_inputiba_chance",
                "ehr_auc_inputiba_oracle", "ehr_auc_inputiba_norm", "energy_in_mask", "pointing_hit",
                "iou_otsu", "cam_all_zero", "cam_layer"]
_RUN_KEY = re.compile(r"^(?P<model>.+)-seed(?P<seed>\d+)$")


def run_key(model: str, seed: int) -> str:
    return f"{model}-seed{seed}"


def parse_run_key(name: str) -> Optional[tuple[str, int]]:
    """("resnet50", 2) for "resnet50-seed2"; None for a name of another form."""
    match = _RUN_KEY.match(name)
    return (match["model"], int(match["seed"])) if match else None


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


def known_from_config(config: Mapping[str, Any]) -> dict[str, tuple[str, int]]:
    """family/depth of the config's `models.extra` entries."""
    extra = (config.get("models") or {}).get("extra") or {}
    return {name: (spec["family"], int(spec["depth"])) for name, spec in extra.items()}


@dataclass
class StudyInputs:
    """Everything the analysis reads, plus what it looked for and did not find."""

    root: Path
    config: dict[str, Any]
    models: pd.DataFrame  # model, family, depth (plot order)
    runs: pd.DataFrame  # run_key, model, seed, finished, has_predictions, has_metrics, has_cams
    test_metrics: pd.DataFrame  # model, seed, accuracy(_lo/_hi), precision..., auc...
    predictions: pd.DataFrame  # model, seed, image_id, label, probability
    cams: pd.DataFrame  # CAM rows without the heatmap column
    manifest: Optional[pd.DataFrame] = None
    data_report: Optional[dict[str, Any]] = None
    missing: list[str] = field(default_factory=list)

    @property
    def model_order(self) -> list[str]:
        return self.models["model"].tolist()


def load_study(study_dir: str | Path, config: Mapping[str, Any],
               known_models: Optional[Mapping[str, tuple[str, int]]] = None) -> StudyInputs:
    """Read every finished run of the store; list each expected piece that is absent."""
    root = Path(study_dir)
    missing: list[str] = []
    runs = _survey_runs(root, config)
    finished = runs[runs["finished"]]
    inputs = StudyInputs(
        root=root, config=dict(config),
        models=model_table(runs["model"].tolist(), {**known_from_config(config), **(known_models or {})}),
        runs=runs,
        test_metrics=_read_test_metrics(root, finished[finished["has_metrics"]]),
        predictions=_read_predictions(root, finished[finished["has_predictions"]]),
        cams=_read_all_cams(root, finished[finished["has_cams"]], missing),
        manifest=_read_optional_parquet(root / "data" / "manifest.parquet", missing),
        data_report=_read_optional_json(root / "data" / "report.json", missing),
    )
    inputs.missing = _run_problems(runs) + missing
    return inputs


def _expected_runs(config: Mapping[str, Any]) -> list[tuple[str, int]]:
    names = (config.get("models") or {}).get("names") or []
    seeds = (config.get("training") or {}).get("seeds") or []
    return [(m, int(s)) for m in names for s in seeds]


def _survey_runs(root: Path, config: Mapping[str, Any]) -> pd.DataFrame:
    """One row per expected or present (model, seed) with what exists for it."""
    found = [parse_run_key(p.name) for sub in ("train", "cams") if (root / sub).is_dir()
             for p in sorted((root / sub).iterdir())
             if p.is_dir() and not p.name.startswith(".")]  # .<name>.tmp-<pid>: being written
    keys = list(dict.fromkeys(_expected_runs(config) + [k for k in found if k is not None]))
    rows = []
    for model, seed in keys:
        train = root / "train" / run_key(model, seed)
        rows.append({"run_key": run_key(model, seed), "model": model, "seed": seed,
                     "train_dir": train.is_dir(), "finished": (train / "done.json").is_file(),
                     "has_predictions": (train / "predictions.parquet").is_file(),
                     "has_metrics": (train / "test_metrics.json").is_file(),
                     "has_cams": _has_parquet(root / "cams" / run_key(model, seed))})
    return pd.DataFrame(rows, columns=["run_key", "model", "seed", "train_dir", "finished",
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
                (run.has_cams, f"no CAM Parquet (cams/{run.run_key}/)")) if not flag]
    return problems


def _read_test_metrics(root: Path, runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run in runs.itertuples():
        values = json.loads((root / "train" / run.run_key / "test_metrics.json").read_text())
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        rows.append({"model": run.model, "seed": run.seed, **numbers})
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["model", "seed"])


def _read_predictions(root: Path, runs: pd.DataFrame) -> pd.DataFrame:
    frames = [pd.read_parquet(root / "train" / run.run_key / "predictions.parquet",
                              columns=["image_id", "label", "probability"]).assign(model=run.model, seed=run.seed)
              for run in runs.itertuples()]
    if not frames:
        return pd.DataFrame(columns=["image_id", "label", "probability", "model", "seed"])
    return pd.concat(frames, ignore_index=True)


def _read_all_cams(root: Path, runs: pd.DataFrame, missing: list[str]) -> pd.DataFrame:
    frames = [read_cams(root / "cams" / run.run_key, missing) for run in runs.itertuples()]
    frames = [f for f in frames if f is not None]
    if not frames:
        return pd.DataFrame(columns=CAM_REQUIRED)
    return pd.concat(frames, ignore_index=True)


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


def read_heatmaps(study_dir: str | Path, model: str, seed: int, image_ids: list[str],
                  method: str = PRIMARY_CAM_METHOD) -> dict[str, np.ndarray]:
    """Trained-model heatmaps (float32 S×S) of `image_ids` for one run; absent ids are left out."""
    directory = Path(study_dir) / "cams" / run_key(model, seed)
    if not _has_parquet(directory):
        return {}
    table = pq.read_table(directory, columns=["image_id", "heatmap", "randomized", "cam_method"],
                          filters=[("image_id", "in", list(image_ids)), ("randomized", "=", False),
                                   ("cam_method", "=", method)])
    heat = table.column("heatmap").combine_chunks().to_numpy_ndarray().astype(np.float32)
    return dict(zip(table.column("image_id").to_pylist(), heat))


def read_backgrounds(study_dir: str | Path, image_ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """image_id -> (z-scored image float32, mask uint8) from data/cache; {} without a cache."""
    cache = Path(study_dir) / "data" / "cache"
    if not (cache / "index.parquet").is_file():
        return {}
    index = pd.read_parquet(cache / "index.parquet", columns=["row", "image_id"])
    rows = index[index["image_id"].isin(image_ids)]
    images = np.load(cache / "images.npy", mmap_mode="r")
    masks = np.load(cache / "masks.npy", mmap_mode="r")
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
