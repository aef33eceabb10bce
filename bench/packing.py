"""Do runs packed on one GPU keep their speed? Aggregate training throughput of k runs sharing a
device against one run alone, measured in one go (what bench/schedule.py assumes).

    python bench/packing.py [--models resnet18,resnet50,vit_small] [--runs 2] [--size 224]
                            [--images 512] [--device cuda]

For each model: images/s of `training.loop.train_epoch` alone on the device (bf16 autocast and
channels-last as the study trains on CUDA), then of `--runs` processes training the same model
at once on that device; prints both, the aggregate / alone ratio and the per-run slowdown.
A ratio near `--runs` means packing multiplies throughput (the GPU was underused); near 1, the
runs only share it. Runs on CPU too (to try it; there the cores are what is shared).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import train as train_bench  # noqa: E402  (bench/train.py)

from study.config import load_config  # noqa: E402
from training import registry  # noqa: E402


def measure(args: dict, start, results) -> None:
    torch.set_num_threads(args["threads"])
    config = load_config(args["config"], {"models.init": "random", "preprocess.image_size": args["size"],
                                          "storage": "/tmp/camstudy-bench"})
    split = train_bench.synthetic_split(args["images"], args["size"])
    start.wait()  # every run starts timing together
    results.put(train_bench.model_images_per_s(registry.get(args["model"]), config, split, torch.device(args["device"])))


def concurrent(args: dict, runs: int) -> list[float]:
    context = mp.get_context("spawn")
    start, results = context.Barrier(runs), context.Queue()
    processes = [context.Process(target=measure, args=(args, start, results)) for _ in range(runs)]
    for process in processes:
        process.start()
    rates = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/paper.yaml")
    parser.add_argument("--models", default="resnet18,resnet50,vit_small")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (CPU)")
    args = parser.parse_args()
    print(f"device {args.device}, {args.size} px, {args.images} images per run, {args.runs} runs packed")
    print(f"{'model':<10} {'alone':>9} {'packed':>9} {'ratio':>6} {'per-run':>8}   (images/s; ratio = packed / alone)")
    for model in args.models.split(","):
        common = {"config": args.config, "model": model, "size": args.size, "images": args.images,
                  "device": args.device, "threads": args.threads}
        alone = concurrent(common, 1)[0]
        packed = sum(concurrent(common, args.runs))
        print(f"{model:<10} {alone:9.1f} {packed:9.1f} {packed / alone:6.2f} {packed / args.runs / alone:8.2f}",
              flush=True)


if __name__ == "__main__":
    main()
