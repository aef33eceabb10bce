"""Preprocessing throughput: the in-process loop vs Ray Data, on 1024-px synthetic DICOMs.

    python bench/prepare.py [--n 200] [--size 1024] [--data DIR] [--repeats 2]

Both paths run the same batch function (decode, file hash, CLAHE, resize, z-score, mask) with
OpenCV limited to one thread per process, so the ratio measures process parallelism alone (with
OpenCV's own threads the serial loop would use every core for CLAHE and resize, but not for
decode, hashing or RLE). Ray is started and warmed up (workers spawned, modules imported) before
timing, since a study pays that once. Runs alternate and the best of each is kept.

On a shared machine the ratio is only as good as the idle CPUs: Linux shares CPU time between
sessions (autogroup) before processes, so when other sessions keep every core busy, two Ray
workers get no more CPU than the one serial process. The bench therefore also prints the CPU
time per image (equal on both paths = no Ray overhead per image) and how many CPUs' worth of
time other processes used during each measurement.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from study.config import PreprocessConfig
from training.data import load_siim
from training.prepare import process_batch
from training.row_mapper import BATCH_SIZE, map_rows
from training.synth import generate


@dataclass
class Timing:
    rate: float  # images per wall-clock second
    cpu_ms: float  # CPU milliseconds per image spent in the batch function (all processes)
    others: float  # CPUs' worth of time other processes used meanwhile (from /proc/stat)


def main() -> None:
    args = _arguments()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.data or Path(scratch) / "siim"
        start = time.perf_counter()
        print(generate(root, n=args.n, size=args.size, seed=0, unlabelled=0, orphans=0),
              f"({time.perf_counter() - start:.0f} s)")
        rows = load_siim(root).images
        serial, parallel = _measure(rows, PreprocessConfig(image_size=args.image_size), args)
    print(f"\n{len(rows)} images {args.size} px -> {args.image_size} px, {os.cpu_count()} CPUs "
          "(best of the repeats)")
    for name, timing in (("serial (1 OpenCV thread)", serial), (f"Ray Data ({args.workers} tasks)", parallel)):
        print(f"{name:<26} {timing.rate:7.1f} img/s  {timing.cpu_ms:6.1f} CPU ms/img  "
              f"other processes meanwhile: {timing.others:.1f} CPUs")
    print(f"{'ratio Ray / serial':<26} {parallel.rate / serial.rate:7.2f}x")
    if max(serial.others, parallel.others) > 0.25:
        print("note: other processes were using the CPUs, and Linux shares CPU time between sessions "
              "(autogroup) before processes, so the ratio understates what Ray gains on an idle machine")


def _measure(rows, cfg: PreprocessConfig, args) -> tuple[Timing, Timing]:
    import ray

    from orchestrator.ray_setup import local_data_context

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    local_data_context(progress=False)
    try:
        map_rows(rows.iloc[:2 * BATCH_SIZE], _timed_batch, args.workers, "warm-up", cfg=cfg)
        _match_worker_niceness()
        serial, parallel = [], []
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats}, load average {os.getloadavg()[0]:.1f}")
            serial.append(_time(rows, 0, cfg))
            parallel.append(_time(rows, args.workers, cfg))
    finally:
        ray.shutdown()
    return max(serial, key=lambda t: t.rate), max(parallel, key=lambda t: t.rate)


def _match_worker_niceness() -> None:
    """Run this process (the serial loop) at the niceness Ray gives its workers (15 by default).

    Where processes compete as equals, niced Ray workers would lose CPU to other users'
    processes that a serial loop at niceness 0 holds its own against.
    """
    import ray

    worker = ray.get(ray.remote(lambda: os.nice(0)).remote())
    os.nice(max(0, worker - os.nice(0)))
    print(f"Ray workers run at niceness {worker}; this process now at {os.nice(0)}")


def _time(rows, workers, cfg: PreprocessConfig) -> Timing:
    busy_before, start, driver_cpu = _machine_busy(), time.perf_counter(), time.process_time()
    columns = map_rows(rows, _timed_batch, workers, "serial" if workers == 0 else "ray", cfg=cfg)
    wall = time.perf_counter() - start
    ours = time.process_time() - driver_cpu  # the serial loop, or the Ray Data driver
    if workers != 0:
        ours += columns["cpu"].sum()  # Ray workers (Ray's own daemons count as others)
    others = max(0.0, (_machine_busy() - busy_before - ours) / wall)
    return Timing(len(rows) / wall, 1000 * columns["cpu"].sum() / len(rows), others)


def _timed_batch(batch, cfg: PreprocessConfig) -> dict:
    """process_batch plus the CPU seconds it took, spread over its rows."""
    start = time.process_time()
    out = process_batch(batch, cfg)
    out["cpu"] = np.full(len(batch), (time.process_time() - start) / len(batch))
    return out


def _machine_busy() -> float:
    """CPU seconds all processes have used since boot (user + nice + system + irq)."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="synthetic images (default 200)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--image-size", type=int, default=224, help="network input (default 224)")
    parser.add_argument("--data", type=Path, help="keep the synthetic set here and reuse it")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", default="auto", type=lambda v: v if v == "auto" else int(v),
                        help="Ray Data tasks in flight (default auto: one per CPU)")
    return parser.parse_args()


if __name__ == "__main__":
    main()
