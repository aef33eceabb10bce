"""How long would the paper study train on N GPUs? The train stage's own scheduling, simulated.

    python bench/schedule.py [--config configs/paper.yaml] [--gpus 8] [--seeds 3]
                             [--throughput bench/throughput.csv] [--train-images 3338]

Builds every run of the config (models x seeds) with the train stage's own GPU shares
(`orchestrator.train_runs.run_demands`: memory at the configured batch and image size,
whole GPUs for big and long runs) and its own ordering and packing (`orchestrator.schedule`:
longest first, best fit), each run lasting epochs x (training images + validation images / 3)
/ its measured training throughput alone on one GPU (`bench/throughput.csv`: H100, bf16, 224 px,
batch 32). Prints, for 1, 4, 8 and 16 GPUs and 1 and `--seeds` seeds, the predicted makespan,
the lower bound max(longest run, total GPU-seconds / GPUs) and their ratio; the last line is the
requested shape and ends with its ratio (target at 8 GPUs x 3 seeds: <= 1.15).

The model's one assumption: runs sharing a GPU keep their speed alone (their shares are sized so
that they do not contend for memory; whether they contend for compute is what
bench/gpu_checks.sh measures on a GPU). --train-images: the paper preset's training split on the
real data (2 x 2,669 positive-matched images - 1,000 validation - 1,000 test = 3,338).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path

from orchestrator import schedule
from orchestrator.train_runs import run_demands
from study.config import load_config
from study.runs import plan_runs
from study.store import StudyStore
from training import registry

ROOT = Path(__file__).resolve().parents[1]


def throughput(path: Path) -> dict[str, float]:
    with open(path, newline="") as handle:
        return {row["model"]: float(row["images_per_s"]) for row in csv.DictReader(handle)}


def demands(config, rates: dict[str, float], train_images: int) -> list[schedule.Demand]:
    """The train stage's demands, with durations from the throughput table."""
    store = StudyStore(Path("/nonexistent") / config.study)  # no measured memory: the estimates

    def seconds(plan, cfg) -> float:
        epochs = registry.recipe_for(plan.spec, cfg.recipes).epochs
        return epochs * (train_images + cfg.split.n_val / 3) / rates[plan.spec.name]

    return list(run_demands(config, store, plan_runs(config, store), duration=seconds).values())


def row(config, rates: dict[str, float], train_images: int, seeds: int, gpus: int) -> tuple[float, float, float]:
    shaped = dataclasses.replace(config, training=dataclasses.replace(config.training, seeds=tuple(range(seeds))))
    runs = demands(shaped, rates, train_images)
    makespan, bound = schedule.simulate(runs, gpus), schedule.lower_bound(runs, gpus)
    return makespan, bound, makespan / bound


def main() -> None:
    args = _arguments()
    config = load_config(args.config, {"storage": "/tmp", "resources.gpus_per_run": "auto"})
    rates = throughput(args.throughput)
    print(f"{config.study}: {len(config.models.names)} models, training split {args.train_images} images, "
          f"GPUs of {config.resources.gpu_memory_gb:g} GB; throughput from {args.throughput}")
    print(f"{'seeds':>5} {'GPUs':>5} {'makespan h':>11} {'bound h':>9} {'ratio':>6}")
    shapes = [(s, g) for s in sorted({1, args.seeds}) for g in (1, 4, 8, 16)]
    for seeds, gpus in shapes + [(args.seeds, args.gpus)]:
        makespan, bound, ratio = row(config, rates, args.train_images, seeds, gpus)
        print(f"{seeds:5d} {gpus:5d} {makespan / 3600:11.2f} {bound / 3600:9.2f} {ratio:6.3f}")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "paper.yaml"))
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--throughput", type=Path, default=ROOT / "bench" / "throughput.csv")
    parser.add_argument("--train-images", type=int, default=3338)
    return parser.parse_args()


if __name__ == "__main__":
    main()
