"""The paper's size on paper: `bench/scale.py --project configs/paper.yaml` prints it.

From the growth measured by bench/scale.py (rows of bench/scale.csv) and two micro-benchmarks
run here at the config's map size, for the config at 1 and 3 seeds, as configured and with the
layer sweep (cam.layers [final, stages, matched]):

- maps per dataset: cams/ (trained maps) and sanity/ (cascade steps and the twin), counted by the
  explain stage's own `maps_per_row` for each model, times the scored positives per run
  (split.n_test / 2: the paper's split balances positives and negatives);
- bytes on disk: the measured bytes per stored map, scaled by pixels (float16 maps compress
  alike at both sizes; an estimate);
- analyze time on this machine: the fixed cost and the per-map cost fitted to the measured
  analyze times (smallest and largest size), plus the stability step at the config's map size
  (pairs of runs x images x the measured cost of one comparison, plus each run's maps prepared
  once) and the maps it reads;
- analyze peak RSS: the measured peak at the largest size plus the measured growth per map
  (the score table) times the extra maps; the stability chunk is bounded (128 MiB) at any size;
- explain time per GPU: each run's CAM calls (one sweep over the configured layers per image,
  one call per cascade step) at the GPU throughput of bench/throughput.csv (training images/s
  on an H100, bf16, 224 px) times FORWARD_PER_TRAIN_STEP (a no-grad forward against a training
  step) times CAM_PER_FORWARD (bench/RESULTS.md: Grad-CAM against a forward on the H100), plus
  the CPU scoring of every map in the actor (SCORE_SECONDS_PER_MAP), validation maps included.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# bench/RESULTS.md, "CAM, H100, 224 px, batch 64": ours / forward 0.76 (resnet50), 0.71 (vgg16), 0.73 (vit_small)
CAM_PER_FORWARD = 0.73
# a training step is a forward and a backward (about two forwards) and the optimizer: an assumption
FORWARD_PER_TRAIN_STEP = 3.0
# bench/RESULTS.md, layer sweep: one sweep over every stage costs 1.8-1.9 calls at one layer
SWEEP_PER_CALL = 1.9
SWEEP = ["final", "stages", "matched"]
# bench/RESULTS.md, metrics (all columns): 0.6-1.5 ms per map at 224 px on one CPU core; the actor
# scores its maps between GPU calls, so this adds to the GPU time unless scoring is moved off the actor
SCORE_SECONDS_PER_MAP = 1.0e-3


def comparison_costs(size: int, runs: int = 6, images: int = 12) -> tuple[float, float, float]:
    """(seconds to prepare one map, seconds per compared pair of maps, seconds to read one map)
    at `size` px, measured here as the stability step runs them."""
    from explain.similarity import Prepared, compare

    rng = np.random.default_rng(0)
    maps = [rng.random((images, size, size)).astype(np.float16) for _ in range(runs)]
    started = time.perf_counter()
    prepared = [Prepared(m) for m in maps]
    prepare = (time.perf_counter() - started) / (runs * images)
    pairs = [(a, b) for a in range(runs) for b in range(a + 1, runs)]
    started = time.perf_counter()
    for a, b in pairs:
        compare(prepared[a], prepared[b])
    pair = (time.perf_counter() - started) / (len(pairs) * images)
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "maps.parquet"
        pq.write_table(pa.table({"heatmap": pa.FixedShapeTensorArray.from_numpy_ndarray(np.concatenate(maps))}), path)
        started = time.perf_counter()
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            batch.column("heatmap").to_numpy_ndarray().astype(np.float32)
        read = (time.perf_counter() - started) / (runs * images)
    return prepare, pair, read


def throughput() -> dict[str, float]:
    with open(ROOT / "bench" / "throughput.csv") as source:
        return {row["model"]: float(row["images_per_s"]) for row in csv.DictReader(source)}


def dataset_sizes(config, seeds: int) -> dict:
    from explain.extract import cascade_units, copies_of, maps_per_row
    from study.models import cam_layers
    from training import registry

    positives = config.split.n_test // 2
    val_positives = config.split.n_val // 2
    found = {"runs": 0, "cams": 0, "sanity": 0, "gpu_seconds": 0.0, "positives": positives}
    speed = throughput()
    for name in config.models.names:
        spec = registry.get_spec(config.models, name)
        trained = maps_per_row(spec, config, False, False)
        every = maps_per_row(spec, config, False, True)
        found["runs"] += seeds
        found["cams"] += seeds * positives * trained
        found["sanity"] += seeds * positives * (every - trained)
        layers = len(cam_layers(spec, config.cam.layers))
        sweep = SWEEP_PER_CALL if layers > 1 else 1.0
        steps = len(cascade_units(spec, config)) + 1 if copies_of(config, False)["cascade"] else 0
        calls = (positives + val_positives) * sweep + positives * steps  # in units of one single-layer call
        scored = (positives + val_positives) * trained + positives * (every - trained)
        if name in speed:
            found["gpu_seconds"] += seeds * (calls / (speed[name] * FORWARD_PER_TRAIN_STEP * CAM_PER_FORWARD)
                                             + scored * SCORE_SECONDS_PER_MAP)
    return found


def project(config_path: Path, rows: list[dict], bench_size: int) -> None:
    from study.config import load_config

    base = load_config(config_path)
    size = base.preprocess.image_size
    prepare, pair, read = comparison_costs(size)
    analyze = sorted((r for r in rows if r["stage"] == "analyze"), key=lambda r: r["maps"])
    explain = sorted((r for r in rows if r["stage"] == "explain"), key=lambda r: r["maps"])
    small, large = analyze[0], analyze[-1]
    per_map = max(0.0, (large["seconds"] - small["seconds"]) / (large["maps"] - small["maps"]))
    fixed = small["seconds"] - per_map * small["maps"]
    rss_per_map = max(0.0, (large["driver_peak_mib"] - small["driver_peak_mib"]) / (large["maps"] - small["maps"]))
    bytes_per_map = explain[-1]["bytes_written"] / explain[-1]["maps"] * (size / bench_size) ** 2
    print(f"\nThe paper's size on paper ({config_path}; {base.split.n_test // 2} scored positives per run, "
          f"maps {size} px; measured here: stability {1000 * pair:.2f} ms per pair of maps, {1000 * prepare:.2f} ms "
          f"to prepare a map, {1000 * read:.2f} ms to read one; analyze {1000 * per_map:.3f} ms per map beyond a "
          f"fixed {fixed:.0f} s and {1024 * rss_per_map:.1f} KiB of peak RSS per map, at {bench_size} px)")
    print("\n| config | seeds | runs | maps in cams/ | maps in sanity/ | on disk | analyze time (2 cores) | "
          "analyze peak RSS | explain, 1 H100 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, layers in (("as configured", None), ("with the layer sweep", SWEEP)):
        config = base if layers is None else load_config(config_path, {"cam.layers": layers})
        for seeds in (1, 3):
            sizes = dataset_sizes(config, seeds)
            maps = sizes["cams"] + sizes["sanity"]
            runs, positives = sizes["runs"], sizes["positives"]
            stability = runs * (runs - 1) / 2 * positives * pair + runs * positives * (prepare + read)
            seconds = fixed + per_map * maps + stability
            peak = large["driver_peak_mib"] + rss_per_map * max(0, maps - large["maps"])
            print(f"| {label} | {seeds} | {runs} | {sizes['cams']:,} | {sizes['sanity']:,} | "
                  f"{maps * bytes_per_map / 1e9:.1f} GB | {seconds / 60:.0f} min | {peak / 1024:.1f} GiB | "
                  f"{sizes['gpu_seconds'] / 60:.0f} min |")
