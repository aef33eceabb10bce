"""The explain stage: Ray Data CAM extraction and scoring into Parquet, per trained (model, seed).

One pipeline per run: the scored test images (rows of the preprocessing cache) × {trained,
randomised copy} -> `map_batches` with an actor class that loads the checkpoint once and keeps
both models, computes CAMs on its device and scores them -> `write_parquet` into a temporary
folder renamed to `cams/<model>-seed<k>/` when complete, so a finished run is never half
written and a rerun skips it.

Columns: image_id, model, seed, label, probability, correct, mask_fraction, randomized,
cam_method, cam_layer, heatmap (float16 FixedShapeTensorArray, readable by plain pyarrow via
`.to_numpy_ndarray()`), and every metric of `explain.metrics.score_batch`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from training import registry
from training.atomic import atomic_dir
from training.cache import read_index
from training.errors import DataError


def scored_images(config, cache_dir: Path, run_dir: Path) -> pd.DataFrame:
    """Test positives (or true positives) with their cache row, prediction and correctness."""
    index = read_index(cache_dir)
    test = index[(index["split"] == "test") & (index["label"] == 1)]
    predictions = pd.read_parquet(run_dir / "predictions.parquet")[["image_id", "probability"]]
    rows = test.merge(predictions, on="image_id", how="left", validate="one_to_one")
    if rows["probability"].isna().any():
        missing = rows.loc[rows["probability"].isna(), "image_id"].head(3).tolist()
        raise DataError(f"{run_dir / 'predictions.parquet'}: no prediction for test images {missing}; "
                        "the run's predictions do not match the cache — rerun `camstudy train` with --force train")
    rows["correct"] = rows["probability"] >= config.training.threshold
    if config.cam.images == "true-positives":
        rows = rows[rows["correct"]]
    return rows.reset_index(drop=True)


class CamScorer:
    """Ray Data actor: builds the trained model and its randomised twin once, then scores batches."""

    def __init__(self, config, model_name: str, seed: int, run_dir: str, cache_dir: str):
        import torch

        self.torch = torch
        self.config, self.seed = config, seed
        self.spec = registry.get_spec(config.models, model_name)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.models = {False: self._trained(Path(run_dir)), True: self._randomised()}
        self.images = np.load(Path(cache_dir) / "images.npy", mmap_mode="r")
        self.masks = np.load(Path(cache_dir) / "masks.npy", mmap_mode="r")

    def _trained(self, run_dir: Path):
        from training.loop import load_trained_model

        return load_trained_model(self.spec, self.config, run_dir).to(self.device).eval()

    def _randomised(self):
        # Adebayo et al. 2018 model-parameter randomisation: same architecture, fresh weights
        self.torch.manual_seed(10_000 + self.seed)
        return registry.build_model(self.spec, init="random", image_size=self.config.preprocess.image_size
                                    ).to(self.device).eval()

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        parts = [self._score(batch[batch["randomized"] == flag], flag, method)
                 for flag in (False, True) if (batch["randomized"] == flag).any()
                 for method in self.config.cam.methods]
        return pa.concat_tables(parts)

    def _score(self, rows: pd.DataFrame, randomized: bool, method: str) -> pa.Table:
        from explain.cam import compute
        from explain.metrics import score_batch

        torch = self.torch
        take = rows["row"].to_numpy()
        images = torch.from_numpy(np.ascontiguousarray(self.images[take])).to(self.device)
        images = images.float()[:, None].expand(-1, 3, -1, -1).contiguous()
        heat = compute(self.models[randomized], self.spec, images, target_class=1, method=method)
        masks = torch.from_numpy(np.ascontiguousarray(self.masks[take])).to(self.device).bool()
        scores = score_batch(heat, masks, self.config.metrics)
        return _rows_table(rows, self.spec, self.seed, method, heat.float().cpu().numpy(), scores)


def _rows_table(rows, spec, seed, method, heat: np.ndarray, scores: dict) -> pa.Table:
    columns = {
        "image_id": rows["image_id"].to_numpy(), "model": [spec.name] * len(rows), "seed": [seed] * len(rows),
        "label": rows["label"].to_numpy(), "probability": rows["probability"].to_numpy(),
        "correct": rows["correct"].to_numpy(), "mask_fraction": rows["mask_fraction"].to_numpy(),
        "randomized": rows["randomized"].to_numpy(), "cam_method": [method] * len(rows),
        "cam_layer": [spec.target_layer] * len(rows),
        **{name: np.asarray(values) for name, values in scores.items()},
    }
    table = pa.table(columns)
    heatmaps = pa.FixedShapeTensorArray.from_numpy_ndarray(heat.astype(np.float16))
    return table.append_column("heatmap", heatmaps)


def extract_run(config, store, plan, actors: int, gpus_per_actor: float, cpus_per_actor: float = 1.0) -> Path:
    """Score one trained run into `cams/<model>-seed<k>/`; skip it when already complete."""
    import ray

    out = store.cams_dir(plan.spec.name, plan.seed)
    done = out / "_done.json"
    if done.is_file() and json.loads(done.read_text()).get("fingerprint") == plan.fingerprint:
        print(f"[explain] {plan.key}: finished earlier, skipped")
        return out
    rows = scored_images(config, store.cache_dir, plan.run_dir)
    flags = [False, True] if config.cam.sanity_randomized else [False]
    work = pd.concat([rows.assign(randomized=flag) for flag in flags], ignore_index=True)
    started = time.time()
    with atomic_dir(out) as tmp:
        dataset = ray.data.from_pandas(work).map_batches(
            CamScorer, batch_format="pandas", batch_size=config.cam.batch_size,
            fn_constructor_kwargs={"config": config, "model_name": plan.spec.name, "seed": plan.seed,
                                   "run_dir": str(plan.run_dir), "cache_dir": str(store.cache_dir)},
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus_per_actor, num_cpus=0 if gpus_per_actor else cpus_per_actor)
        dataset.write_parquet(str(tmp))
        (tmp / "_done.json").write_text(json.dumps({"fingerprint": plan.fingerprint, "rows": len(work)}))
    print(f"[explain] {plan.key}: {len(work)} heatmaps in {time.time() - started:.0f}s -> {out}")
    return out
