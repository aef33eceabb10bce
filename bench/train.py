"""Training throughput per model vs the data path alone, measured in one run on this machine.

    python bench/train.py [--config configs/demo.yaml] [--images 96] [--models resnet18,vgg16]

For each registry model: images/s of `training.loop.train_epoch` (augmentation + forward +
backward + optimiser step, the demo's image size, batch size and recipe, random init). Then the
data path alone: cache rows gathered into batches, augmented and prepared exactly as
`train_epoch` does, without the model. The data path must be >= 2x the fastest model, or the
GPUs/CPUs would wait on data. Prints one table and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from study.config import load_config
from training import augment, registry
from training.loop import (
    RunState,
    Split,
    batch_indices,
    make_model,
    make_optimizer,
    prepare_input,
    train_epoch,
)


def synthetic_split(n: int, size: int) -> Split:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, size, size, generator=generator).half()
    return Split([f"img{i}" for i in range(n)], images, torch.arange(n) % 2)


def model_images_per_s(spec, config, split: Split, device: torch.device = torch.device("cpu")) -> float:
    split = Split(split.image_ids, split.images.to(device), split.labels.to(device))
    model = make_model(spec, config, device)
    state = RunState(model, make_optimizer(model, registry.recipe_for(spec, config.recipes)),
                     torch.Generator().manual_seed(0), torch.Generator().manual_seed(1), weights="random")
    train_epoch(state, Split(split.image_ids[:config.training.batch_size * 2],
                             split.images[:config.training.batch_size * 2],
                             split.labels[:config.training.batch_size * 2]), config, False, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    _, seen = train_epoch(state, split, config, device.type == "cuda" and not spec.token_reshape, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def data_path_images_per_s(config, split: Split, repeats: int = 5) -> float:
    generator, seen = torch.Generator().manual_seed(0), 0
    start = time.perf_counter()
    for _ in range(repeats):
        for index in batch_indices(len(split.labels), config.training.batch_size, generator, drop_last=True):
            images = augment.augment(split.images[index].float(), config.augment, generator)
            prepare_input(images, config.preprocess.channels, False)
            seen += len(index)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--images", type=int, default=96, help="training images per model (default 96)")
    parser.add_argument("--models", help="comma-separated subset (default: all nine)")
    args = parser.parse_args()
    config = load_config(args.config, {"models.init": "random"})
    split = synthetic_split(args.images, config.preprocess.image_size)
    names = args.models.split(",") if args.models else registry.names()
    print(f"torch threads {torch.get_num_threads()}, image size {config.preprocess.image_size}, "
          f"batch {config.training.batch_size}, {args.images} images per model")
    rates = {}
    for name in names:
        rates[name] = model_images_per_s(registry.get(name), config, split)
        print(f"  {name:10s} train  {rates[name]:8.1f} images/s", flush=True)
    data_rate = data_path_images_per_s(config, split)
    fastest = max(rates, key=rates.get)
    print(f"  data path (gather + augment + prepare)  {data_rate:8.1f} images/s")
    print(f"ratio data path / fastest model ({fastest}): {data_rate / rates[fastest]:.1f}x (target >= 2x)")


if __name__ == "__main__":
    main()
