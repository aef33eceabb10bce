"""ROAD (docs/STUDY.md §11): explain/faithfulness.py against pytorch-grad-cam's own ROAD loop.

    python bench/faithfulness.py [--model resnet18] [--size 64] [--maps 16] [--rounds 1]
                                 [--threads 2] [--paper-size 224] [--paper-maps 130000]

At the bench size (random weights; they do not change the cost), the same maps and model, noise 0:

- ours: `faithfulness.impute` (the study's grey images, C = 1, as the CPU stage would run it)
  and `faithfulness.road_scores` (the B x 9 x 2 perturbed images and the B unperturbed ones in
  batches of 256, grey expanded to 3 channels), timed apart;
- pytorch-grad-cam 1.5.7 as its docs show it: for each percentile, `ROADMostRelevantFirst(p)`
  and `ROADLeastRelevantFirst(p)` called on the batch (`metric(input_tensor, cams, targets,
  model)`, default `return_diff=True`), with `perturbation.imputer.noise = 0`; its forward time
  is measured by a wrapper around the model and its imputation is the rest;
- the largest difference between its per-step scores (p_k - p_0) and ours, and the ratio
  (target: ours >= 3x faster at equal results).

The maps are a smooth field's ranks (bilinear-upsampled 7x7 noise, values made distinct), so
that pytorch-grad-cam's threshold removes exactly our pixel sets (no ties; see the module).
The two run alternately, `--chunk` maps at a time (pytorch-grad-cam's batch: 16, all maps at
once, by default), `--rounds` times (one by default: about a minute on 2 quiet cores, most of it
pytorch-grad-cam's loop). Wall and CPU time (of this process) are both printed: on a shared
machine the CPU time is what another process's load does not move.

At the paper's size (224 px) the imputation alone, ours against NoisyLinearImputer called as
RemoveMostRelevantFirst/LeastRelevantFirst call it, on `--paper-measured` maps, and a projection
for `--paper-maps` maps (docs/STUDY.md §11: model maps and the controls): the CPU imputation in
core-hours (measured here), and the GPU forward time at an ASSUMED forward rate: the harmonic
mean of bench/throughput.csv's H100 training rates times bench/paper_size.py's
FORWARD_PER_TRAIN_STEP (a no-grad forward against a training step). That rate is not measured:
the projection needs a GPU measurement of `road_scores`. The unperturbed forward (p_0) is not
counted: the explain stage has it already.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as TF
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench.paper_size, as bench/scale.py imports it

from explain import faithfulness as F  # noqa: E402
from training import registry  # noqa: E402

ROAD_FORWARDS_PER_MAP = 2 * len(F.STEPS)


class Timed(nn.Module):
    """The model, with the wall and CPU seconds spent in its forward counted."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.seconds = model, np.zeros(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        started = _clocks()
        out = self.model(x)
        self.seconds += _clocks() - started
        return out


def _clocks() -> np.ndarray:
    """(wall, CPU of this process) seconds: CPU time is what a loaded machine takes from wall time."""
    return np.array([time.perf_counter(), time.process_time()])


def distinct_maps(b: int, size: int, seed: int = 0) -> np.ndarray:
    """CAM-like maps (upsampled 7x7 noise) replaced by their ranks / (N - 1): no ties, same order."""
    rng = np.random.default_rng(seed)
    coarse = torch.as_tensor(rng.random((b, 1, 7, 7)), dtype=torch.float32)
    field = TF.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    flat = field.reshape(b, -1)
    ranks = np.empty_like(flat)
    order = np.argsort(flat, axis=1, kind="stable")
    np.put_along_axis(ranks, order, np.arange(flat.shape[1], dtype=np.float32)[None].repeat(b, 0), axis=1)
    return (ranks / (flat.shape[1] - 1)).reshape(b, size, size).astype(np.float32)


def expand(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1)


def ours(model: nn.Module, grey: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """(imputation seconds, forward seconds) each as (wall, CPU), and the scores."""
    started = _clocks()
    perturbed = F.impute(grey, maps, noise=0.0, keys=range(len(maps)))
    imputed = _clocks()
    scores = F.road_scores(model, perturbed, batch_size=256, prepare=expand, images=grey)
    return imputed - started, _clocks() - imputed, scores


def theirs(model: nn.Module, grey: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    timed = Timed(model)
    x = torch.from_numpy(grey).expand(-1, 3, -1, -1).contiguous()
    targets = [ClassifierOutputSoftmaxTarget(1)] * len(maps)
    found = {"morf": [], "lerf": []}
    started = _clocks()
    for k in F.STEPS:
        for cls, name in ((ROADMostRelevantFirst, "morf"), (ROADLeastRelevantFirst, "lerf")):
            metric = cls(percentile=100 - k)  # its percentile p removes the top (100 - p)%: our step k
            metric.perturbation.imputer.noise = 0.0
            found[name].append(metric(x, maps, targets, timed))
    total = _clocks() - started
    return total - timed.seconds, timed.seconds, {n: np.stack(v, axis=1) for n, v in found.items()}


def library_imputation(grey: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """NoisyLinearImputer (noise 0) on the pixel sets RemoveMost/LeastRelevantFirst choose."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    imputer = NoisyLinearImputer(noise=0.0)
    out = np.empty((len(maps), len(F.STEPS), 2, *grey.shape[1:]), np.float32)
    for i, m in enumerate(maps):
        for j, k in enumerate(F.STEPS):
            for order, ranked in ((F.MORF, m), (F.LERF, 1 - m)):
                keep = np.float32(ranked < np.percentile(ranked, 100 - k))
                out[i, j, order] = imputer(torch.from_numpy(grey[i]), torch.from_numpy(keep)).numpy()
    return out


def assumed_gpu_forward_rate() -> float:
    from bench.paper_size import FORWARD_PER_TRAIN_STEP, throughput

    rates = list(throughput().values())
    return len(rates) / sum(1.0 / r for r in rates) * FORWARD_PER_TRAIN_STEP


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, load average {_load()} at start")
    torch.manual_seed(0)
    model = registry.build_model(registry.get(args.model), init="random", image_size=args.size).eval()
    rng = np.random.default_rng(1)
    grey = rng.normal(size=(args.maps, 1, args.size, args.size)).astype(np.float32)
    maps = distinct_maps(args.maps, args.size)
    ours(model, grey[:1], maps[:1])  # warm-up: torch's first calls, the nested-dissection order
    theirs(model, grey[:1], maps[:1])
    # alternated a chunk of maps at a time, so that another process's load hits both alike
    spent = {"ours": np.zeros((2, 2)), "theirs": np.zeros((2, 2))}  # [imputation, forwards] x [wall, CPU]
    found: dict[str, list] = {"ours": [], "theirs": []}
    for _ in range(args.rounds):
        for start in range(0, args.maps, args.chunk):
            part = slice(start, start + args.chunk)
            for who, run in (("ours", ours), ("theirs", theirs)):
                impute_s, forward_s, scores = run(model, grey[part], maps[part])
                spent[who] += np.stack([impute_s, forward_s])
                found[who].append(scores)
    ours_scores = {n: np.concatenate([f[n] for f in found["ours"]]) for n in ("morf", "lerf", "probability")}
    their_scores = {n: np.concatenate([f[n] for f in found["theirs"]]) for n in ("morf", "lerf")}
    p0 = ours_scores["probability"][:, None]
    diff = max(float(np.abs((ours_scores[n] - p0) - their_scores[n]).max()) for n in ("morf", "lerf"))
    ms = {who: 1000 * v / (args.maps * args.rounds) for who, v in spent.items()}  # ms per map
    forwards = args.maps * args.rounds * (ROAD_FORWARDS_PER_MAP + 1)
    cpu_rate = forwards / (spent["ours"][1, 0])
    print(f"\nROAD, {args.model} random weights, {args.size} px, {args.maps} maps x {args.rounds} round(s), "
          f"9 steps x MoRF/LeRF, noise 0; ms per map, wall (CPU time of this process)")
    print(f"{'':<20} {'imputation':>16} {'forwards':>16} {'total':>16}")
    for who, label in (("ours", "ours"), ("theirs", "pytorch-grad-cam")):
        t = ms[who]
        print(f"{label:<20} {t[0, 0]:8.1f} ({t[0, 1]:6.1f}) {t[1, 0]:8.1f} ({t[1, 1]:6.1f}) "
              f"{t[:, 0].sum():8.1f} ({t[:, 1].sum():6.1f})")
    r = ms["theirs"] / ms["ours"]
    total = ms["theirs"].sum(axis=0) / ms["ours"].sum(axis=0)
    print(f"{'theirs / ours':<20} {r[0, 0]:8.2f} ({r[0, 1]:6.2f}) {r[1, 0]:8.2f} ({r[1, 1]:6.2f}) "
          f"{total[0]:8.2f} ({total[1]:6.2f})   target >= 3 at equal results")
    print(f"max |difference| of the per-step scores p_k - p_0: {diff:.2e}; CPU forward rate (ours, batch 256, "
          f"{args.threads} threads): {cpu_rate:.0f} img/s")

    size = args.paper_size
    big_grey = rng.normal(size=(args.paper_measured, 1, size, size)).astype(np.float32)
    big_maps = distinct_maps(args.paper_measured, size, seed=2)
    started = _clocks()
    ours_images = F.impute(big_grey, big_maps, noise=0.0)
    ours_s = (_clocks() - started) / args.paper_measured
    started = _clocks()
    their_images = library_imputation(big_grey, big_maps)
    their_s = (_clocks() - started) / args.paper_measured
    image_diff = float(np.abs(ours_images - their_images).max())
    print(f"\nimputation alone at {size} px ({args.paper_measured} map(s), 18 systems each), s per map, wall (CPU): "
          f"ours {ours_s[0]:.2f} ({ours_s[1]:.2f}), NoisyLinearImputer {their_s[0]:.2f} ({their_s[1]:.2f}): "
          f"{their_s[0] / ours_s[0]:.2f}x ({their_s[1] / ours_s[1]:.2f}x); max |difference| {image_diff:.1e}")
    ours_s = ours_s[1]  # the projection counts CPU seconds: on a core of its own a solve takes its CPU time

    rate = assumed_gpu_forward_rate()
    cpu_hours = args.paper_maps * ours_s / 3600
    gpu_hours = args.paper_maps * ROAD_FORWARDS_PER_MAP / rate / 3600
    print(f"\nprojection for {args.paper_maps:,} maps at {size} px:")
    print(f"  imputation: {cpu_hours:.1f} CPU core-hours (this machine's CPU time per map; one core per solve)")
    print(f"  forwards: {args.paper_maps * ROAD_FORWARDS_PER_MAP:,} images at an ASSUMED {rate:,.0f} img/s per H100 "
          f"(harmonic mean of bench/throughput.csv's training rates x FORWARD_PER_TRAIN_STEP; not measured: "
          f"needs a GPU run of road_scores) = {60 * gpu_hours:.0f} GPU-minutes")
    print(f"  CPU cores per GPU to keep its ROAD forwards fed: {ours_s * rate / ROAD_FORWARDS_PER_MAP:.0f}; "
          f"with 16 cores per GPU the added explain time is ~{cpu_hours / 16:.1f} h per GPU node "
          f"(imputation-bound), {cpu_hours / 16 / max(gpu_hours, 1e-9):.0f}x the GPU's share")
    print(f"load average {_load()} at the end")


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--maps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=16,
                        help="maps per alternation; pytorch-grad-cam's batch, so keep it at a batch its users pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paper-size", type=int, default=224)
    parser.add_argument("--paper-measured", type=int, default=1)
    parser.add_argument("--paper-maps", type=int, default=130_000)
    return parser.parse_args()


if __name__ == "__main__":
    main()
