"""CAM extraction: the Ray Data pipeline vs a plain loop over the same images, in one run.

    python bench/extraction.py [--config configs/demo.yaml] [--model resnet18] [--seed 0]

Needs a study whose train stage finished for that model (e.g. after `make demo`). Both paths
use the same `CamScorer` (checkpoint loaded once, trained + randomised copy, every metric); the
plain loop calls it batch by batch in this process, the Ray path is `extract_run` (Ray Data
map_batches with an actor, Parquet written). Ray start-up is excluded (paid once per study);
the pipeline's own start-up (actor, model load, Parquet write) is included, as a study pays it
per run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from explain.extract import CamScorer, extract_run, scored_images
from orchestrator.config import load_config
from orchestrator.ray_setup import init_ray
from orchestrator.store import StudyStore
from orchestrator.train_runs import is_finished, plan_runs


class _ScratchCams(StudyStore):
    """The study's store, but CAM output goes to a scratch folder (the real one stays untouched)."""

    def __init__(self, root: Path, scratch: Path):
        super().__init__(root)
        self.scratch = scratch

    def cams_dir(self, model: str, seed: int) -> Path:
        return self.scratch / f"{model}-seed{seed}"


def plain_loop(config, store, plan) -> tuple[float, int]:
    rows = scored_images(config, store.cache_dir, plan.run_dir)
    work = pd.concat([rows.assign(randomized=flag) for flag in (False, True)], ignore_index=True)
    start = time.perf_counter()
    scorer = CamScorer(config, plan.spec.name, plan.seed, str(plan.run_dir), str(store.cache_dir))
    for begin in range(0, len(work), config.cam.batch_size):
        scorer(work.iloc[begin:begin + config.cam.batch_size])
    return time.perf_counter() - start, len(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = load_config(args.config)
    store = StudyStore(config.study_dir)
    plan = next((p for p in plan_runs(config, store) if p.spec.name == args.model and p.seed == args.seed), None)
    if plan is None or not is_finished(plan):
        raise SystemExit(f"{args.model}-seed{args.seed}: no finished training run in {store.root}; run `make demo` first")
    loop_seconds, images = plain_loop(config, store, plan)
    init_ray(config)
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        extract_run(config, _ScratchCams(store.root, Path(scratch)), plan, actors=1, gpus_per_actor=0)
        ray_seconds = time.perf_counter() - start
    print(f"{plan.key}: {images} heatmaps (scored test positives x trained/randomised)")
    print(f"  plain loop      {images / loop_seconds:7.1f} images/s ({loop_seconds:.1f} s)")
    print(f"  Ray Data        {images / ray_seconds:7.1f} images/s ({ray_seconds:.1f} s, Parquet written)")
    print(f"ratio Ray Data / plain loop: {loop_seconds / ray_seconds:.2f}x")


if __name__ == "__main__":
    main()
