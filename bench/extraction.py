"""CAM extraction: the Ray Data pipeline vs a plain loop over the same images, in one run.

    python bench/extraction.py [--config configs/demo.yaml] [--models resnet18,vgg16] [--set k=v ...]
                               [--section-11]

Needs a study whose train stage finished (e.g. after `make demo`); every finished run is used
unless --models picks some. Both paths use the same `CamScorer` (a run's checkpoint loaded
once, trained + randomised copy, every metric): the plain loop calls it run by run and batch by
batch in this process with all CPUs for torch; the Ray path is the explain stage's
`extract_runs` (one Ray Data pipeline over all the runs, an actor per CPU, Parquet written per
run) into a scratch folder. Ray start-up is excluded (paid once per study); the pipeline's own
start-up (actor processes, imports, model builds, Parquet writes) is included. Faithfulness and
robustness (docs/STUDY.md §11) are turned off for both paths: the plain loop runs the CAM actor
alone, so the comparison is of the CAM work (bench/faithfulness.py measures ROAD). With
--section-11 the Ray path runs once more with them as configured, and the stage's added seconds
are printed (the demo's time budget includes them).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import ray
import torch

from explain.extract import CamScorer, extract_runs, run_work
from orchestrator.ray_setup import init_ray
from study.config import load_config, parse_override
from study.runs import is_finished, plan_runs
from study.store import StudyStore


class _ScratchCams(StudyStore):
    """The study's store, but CAM output goes to a scratch study's folders (the real ones stay untouched)."""

    def __init__(self, root: Path, scratch: Path):
        super().__init__(root)
        self.scratch = StudyStore(scratch)

    def cams_dir(self, model: str, seed: int) -> Path:
        return self.scratch.cams_dir(model, seed)

    def sanity_dir(self, model: str, seed: int, permuted: bool = False) -> Path:
        return self.scratch.sanity_dir(model, seed, permuted)

    def controls_dir(self, model: str, seed: int) -> Path:
        return self.scratch.controls_dir(model, seed)


def plain_loop(config, store, plans) -> tuple[float, int]:
    """Seconds and heatmaps for scoring every plan's rows in this process."""
    start, images = time.perf_counter(), 0
    runs = {plan.key: (plan.spec.name, plan.seed, str(plan.run_dir), plan.permuted) for plan in plans}
    scorer = CamScorer(config, runs, str(store.cache_dir))
    for plan in plans:
        work = run_work(config, store.cache_dir, plan)
        for begin in range(0, len(work), config.cam.batch_size):
            images += len(scorer(work.iloc[begin:begin + config.cam.batch_size]))
    return time.perf_counter() - start, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--models", help="comma-separated subset of the study's models (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--section-11", action="store_true",
                        help="also time the pipeline with faithfulness and robustness as configured")
    args = parser.parse_args()
    configured = load_config(args.config, dict(parse_override(text) for text in args.set))
    config = dataclasses.replace(configured, faithfulness=dataclasses.replace(configured.faithfulness, enabled=False),
                                 robustness=dataclasses.replace(configured.robustness, enabled=False))
    store = StudyStore(config.study_dir)
    wanted = set(args.models.split(",")) if args.models else None
    plans = [plan for plan in plan_runs(config, store) if is_finished(plan)
             and (wanted is None or plan.spec.name in wanted)]
    if not plans:
        raise SystemExit(f"no finished training run in {store.root}; run `make demo` first")
    init_ray(config)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    torch.set_num_threads(cpus)
    loop_seconds, images = plain_loop(config, store, plans)
    ray_seconds = ray_pipeline(config, store, plans, cpus)
    print(f"\n{len(plans)} run(s), {images} heatmaps (scored test positives x trained/randomised), {cpus} CPUs")
    print(f"  plain loop      {images / loop_seconds:7.1f} images/s ({loop_seconds:.1f} s, {cpus} torch threads)")
    print(f"  Ray Data        {images / ray_seconds:7.1f} images/s ({ray_seconds:.1f} s, {min(cpus, len(plans))} "
          "actors, Parquet written)")
    print(f"ratio Ray Data / plain loop: {loop_seconds / ray_seconds:.2f}x")
    if args.section_11:
        with_section_11 = ray_pipeline(configured, store, plans, cpus)
        print(f"  with faithfulness and robustness as configured: {with_section_11:.1f} s "
              f"(+{with_section_11 - ray_seconds:.1f} s, x{with_section_11 / ray_seconds:.2f})")


def ray_pipeline(config, store, plans, cpus: int) -> float:
    """Seconds of the explain stage's pipeline over `plans`, written into a scratch folder."""
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        extract_runs(config, _ScratchCams(store.root, Path(scratch)), plans, actors=min(cpus, len(plans)),
                     gpus_per_actor=0)
        return time.perf_counter() - start


if __name__ == "__main__":
    main()
