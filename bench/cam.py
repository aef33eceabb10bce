"""Grad-CAM throughput against a no-grad forward and pytorch-grad-cam, and the metrics' cost.

    python bench/cam.py [--models resnet50 vgg16 vit_small] [--batch 8] [--size 224]
                        [--repeats 5] [--threads 2]

For each model (random init; weights do not change the cost): images/s of a `torch.no_grad()`
forward, of `explain.cam.compute` (Grad-CAM, autograd from the target layer only), and of
pytorch-grad-cam's default usage (`with GradCAM(model, [layer]) as cam: cam(x, targets)`, which
backpropagates through the whole network into every weight). The three run interleaved, one
call each per round, and the median per call is kept, so load from other processes hits all
three alike. Targets: ours / forward >= 0.85, ours / pytorch-grad-cam >= 2.5.

Layer sweep (docs/STUDY.md §9): the seconds of one `explain.cam.sweep` over every stage layer (one
forward, one autograd call) against one call at the paper's layer, and against one call per
layer. Target for ResNet-50 (4 stages): sweep / one layer <= 1.3.

Metrics: `explain.metrics.score_batch` ms per image on CAM-like maps (bilinear upsampled 7x7
noise, min-max normalised) and blob masks, at the network size and at native 1024 px; and the
pixel-ranking metrics (auprc + auroc_pixel) alone, on the already sorted heat: target <= 1 ms
per image at 224 px.

The machine's load average and the CPUs this process got (CPU time / wall time) are printed:
on a shared machine the absolute numbers move with other processes, the ratios much less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import numpy as np
import torch

from explain import cam
from explain.metrics import score_batch
from training import registry


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"load average {_load()} at start")
    print(f"\n{'model':<10} {'forward':>9} {'ours':>9} {'library':>9} {'ours/fwd':>9} "
          f"{'ours/lib':>9} {'CPUs used':>10}   (images/s, batch {args.batch}, {args.size} px)")
    for name in args.models:
        rates, cpus = _bench_model(name, args)
        print(f"{name:<10} {rates['forward']:9.2f} {rates['ours']:9.2f} {rates['library']:9.2f} "
              f"{rates['ours'] / rates['forward']:9.2f} {rates['ours'] / rates['library']:9.2f} "
              f"{cpus:10.2f}", flush=True)
    print(f"\n{'sweep':<10} {'layers':>7} {'one':>9} {'sweep':>9} {'separate':>9} {'sweep/one':>10} "
          f"{'sep/sweep':>10}   (ms per batch of {args.batch}; sweep/one: the cost of the sweep in one-layer calls)")
    for name in args.models:
        layers, ms = _bench_sweep(name, args)
        print(f"{name:<10} {layers:7d} {ms['one']:9.1f} {ms['sweep']:9.1f} {ms['separate']:9.1f} "
              f"{ms['sweep'] / ms['one']:10.2f} {ms['separate'] / ms['sweep']:10.2f}", flush=True)
    print(f"\n{'metrics':<10} {'median':>9} {'best':>9} {'ranking':>9}   (score_batch, ms per image, every column; "
          f"ranking: auprc + auroc_pixel on the sorted heat)")
    for size, batch in ((args.size, args.batch), (1024, 4)):
        median, best, ranking = _bench_metrics(size, batch, args.repeats * 4)
        print(f"{f'{size} px':<10} {median:9.3f} {best:9.3f} {ranking:9.3f}", flush=True)
    print(f"\nload average {_load()} at the end (1, 5, 15 min; this bench alone adds ~{args.threads})")


def _bench_model(name: str, args: argparse.Namespace) -> tuple[dict[str, float], float]:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    spec = registry.get(name)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = registry.build_model(spec, init="random", image_size=args.size).to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    layer = registry.resolve_layer(model, spec.target_layer)
    reshape = (lambda t: cam.tokens_to_map(model, t)) if spec.token_reshape else None

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def library() -> None:
        with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as explainer:
            explainer(input_tensor=x, targets=[ClassifierOutputTarget(1)] * len(x))

    calls = {"forward": forward, "ours": lambda: cam.compute(model, spec, x, 1), "library": library}
    if device.type == "cuda":  # time finished GPU work, not kernel launches
        calls = {k: _synchronised(call) for k, call in calls.items()}
    seconds, cpus = _interleaved(calls, args.repeats)
    return {k: args.batch / s for k, s in seconds.items()}, cpus


def _bench_sweep(name: str, args: argparse.Namespace) -> tuple[int, dict[str, float]]:
    """Median ms per batch: Grad-CAM at the paper's layer, one sweep over every stage layer, and
    one call per stage layer."""
    import dataclasses

    from study import models

    spec = registry.get(name)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = registry.build_model(spec, init="random", image_size=args.size).to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    layers = models.cam_layers(spec, ("final", "stages"))
    alone = [dataclasses.replace(spec, target_layer=layer) for layer in layers]
    calls = {"one": lambda: cam.compute(model, spec, x, 1),
             "sweep": lambda: cam.sweep(model, spec, x, 1, layers, ["gradcam"]),
             "separate": lambda: [cam.compute(model, single, x, 1) for single in alone]}
    if device.type == "cuda":
        calls = {k: _synchronised(call) for k, call in calls.items()}
    seconds, _ = _interleaved(calls, args.repeats)
    return len(layers), {k: v * 1e3 for k, v in seconds.items()}


def _synchronised(call: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        call()
        torch.cuda.synchronize()
    return run


def _interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], float]:
    """Median wall seconds per call (after one warm-up each), and CPUs used on average."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for k, call in calls.items():
            start = time.perf_counter()
            call()
            times[k].append(time.perf_counter() - start)
    cpus = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    return {k: statistics.median(v) for k, v in times.items()}, cpus


def _bench_metrics(size: int, batch: int, repeats: int) -> tuple[float, float, float]:
    """(median, best) ms per image of score_batch on CAM-like maps and ~3% blob masks, and the
    median ms per image of the pixel-ranking metrics on the heat score_batch has sorted."""
    from explain import metrics

    gen = torch.Generator().manual_seed(0)
    heat = cam.normalise(torch.rand(batch, 7, 7, generator=gen), (size, size)).numpy()
    yy, xx = np.mgrid[:size, :size] / size
    centres = np.random.default_rng(0).uniform(0.3, 0.7, (batch, 2, 1, 1))
    masks = (yy - centres[:, 0]) ** 2 + ((xx - centres[:, 1]) / 1.5) ** 2 < 0.08 ** 2
    score_batch(heat, masks)
    times, ranking = [], []
    ordered = metrics._sorted(heat, masks)
    for _ in range(repeats):
        start = time.perf_counter()
        score_batch(heat, masks)
        times.append((time.perf_counter() - start) * 1e3 / batch)
        start = time.perf_counter()
        metrics._pixel_ranking(ordered)
        ranking.append((time.perf_counter() - start) * 1e3 / batch)
    return statistics.median(times), min(times), statistics.median(ranking)


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16", "vit_small"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per model (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    return parser.parse_args()


if __name__ == "__main__":
    main()
