"""How each stage grows with the number of scored maps: studies that differ only in test images.

    python bench/scale.py [--positives 100,400,1600] [--image-size 96] [--models resnet18]
                          [--seeds 0,1,2] [--out bench/scale.csv] [--project configs/paper.yaml]

Builds one study per size from the demo's config (synthetic SIIM-format data, the demo's layer
sweep and cascade, random init, one epoch on a fixed 100-image training set and 40 validation
images), whose test set holds `positives` positive and as many negative images; the studies
differ in nothing else. Runs `camstudy prepare`, `train`, `explain` and `analyze` on each, each
stage as its own process, and prints per stage: seconds, seconds per scored map, the driver's
peak RSS, the summed peak RSS of the Ray workers (every `ray::` process under the driver,
each one's VmHWM sampled every 0.2 s), and the bytes the stage wrote. Then the growth
exponent b of each (cost ∝ maps^b) from the smallest to the largest size. Training is not
measured (it does not grow with the test set). Its last line: the worst time exponent and the
analyze peak-memory exponent. Targets: time b <= 1.1 for every stage; analyze peak memory
b <= 0.2.

With --project, it also prints the paper's size on paper (README, "The paper's size"): maps
per dataset for that config at 1 and 3 seeds (counted by the explain stage's own
`maps_per_row`), bytes on disk (this run's bytes per map, scaled by pixels), the analysis'
time and peak RSS on this machine (its per-row and per-map costs measured here; the stability
step timed on maps of the config's size), and explain time per GPU (bench/throughput.csv's
training throughput with bench/RESULTS.md's measured CAM / forward ratio).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("prepare", "explain", "analyze")


def stage_outputs(store) -> dict[str, tuple[Path, ...]]:
    """The folders each measured stage writes (a `study.store.StudyStore`'s)."""
    return {"prepare": (store.data_dir, store.source_dir),
            "explain": (store.cams_root, store.sanity_root, store.baselines_dir), "analyze": (store.analysis_dir,)}


def vm_hwm_kib(pid: int, field: str = "VmHWM") -> int:
    """A process's peak resident set (VmHWM, KiB), or another /proc status field such as RssAnon
    (its private memory now); 0 once it is gone. Not ru_maxrss: Linux keeps that across exec, so a
    child would report its parent's peak."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (from /proc: no psutil needed)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, up in parent.items() if up in frontier]
        found += children
        frontier = children
    return found


def is_ray_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            text = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return text.startswith("ray::") or "default_worker.py" in text


class PeakSampler:
    """The driver's peak RSS and, summed, the peaks of the Ray worker processes under it."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every = pid, every
        self.driver_kib, self.workers = 0, {}  # workers: pid -> peak KiB
        # the driver's private memory (RssAnon) apart: its VmHWM also counts the pages of Ray's
        # shared-memory object store it has read, which are the store's, not the driver's
        self.driver_private_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.driver_kib = max(self.driver_kib, vm_hwm_kib(self.pid))
            self.driver_private_kib = max(self.driver_private_kib, vm_hwm_kib(self.pid, "RssAnon"))
            for child in descendants(self.pid):
                if is_ray_worker(child):
                    self.workers[child] = max(self.workers.get(child, 0), vm_hwm_kib(child))
            self._stop.wait(self.every)

    def stop(self) -> tuple[float, float, float]:
        self._stop.set()
        self._thread.join()
        return self.driver_kib / 1024, self.driver_private_kib / 1024, sum(self.workers.values()) / 1024


def folder_bytes(folders: tuple[Path, ...]) -> int:
    return sum(f.stat().st_size for folder in folders if folder.exists() for f in folder.rglob("*") if f.is_file())


def stored_maps(store) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for folder in (store.cams_root, store.sanity_root)
               for f in folder.rglob("*.parquet"))


def overrides(storage: Path, positives: int, args) -> list[str]:
    train, val = 100, 40  # fixed: only the test set grows
    settings = {"storage": storage, "data.synthetic.n": 2 * positives + train + val,
                "split.n_test": 2 * positives, "split.n_val": val, "preprocess.image_size": args.image_size,
                "models.names": f"[{args.models}]", "training.seeds": f"[{args.seeds}]",
                "recipes.resnet.epochs": 1, "recipes.vgg.epochs": 1, "recipes.vit.epochs": 1}
    return [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]


def run_stage(stage: str, config: Path, sets: list[str], log: Path) -> tuple[float, float, float, float]:
    """(seconds, driver peak MiB, driver private peak MiB, summed worker peak MiB) of one
    `camstudy STAGE` process."""
    started = time.perf_counter()
    with open(log, "a") as out:
        process = subprocess.Popen([sys.executable, "-m", "orchestrator", stage, str(config), *sets],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            sampler = PeakSampler(process.pid)
            code = process.wait()
        finally:  # the bench stopped (Ctrl-C, an error): its stage must not go on writing the study
            if process.poll() is None:
                process.terminate()
                process.wait()
    seconds = time.perf_counter() - started
    driver, private, workers = sampler.stop()
    if code:
        raise SystemExit(f"scale: `camstudy {stage}` failed (exit {code}); see {log}")
    return seconds, driver, private, workers


def exponent(small: tuple[float, float], large: tuple[float, float]) -> float:
    """b of cost ∝ maps^b between two (maps, cost) points."""
    (m0, c0), (m1, c1) = small, large
    if min(m0, m1, c0, c1) <= 0 or m0 == m1:
        return math.nan
    return math.log(c1 / c0) / math.log(m1 / m0)


def measure(args) -> list[dict]:
    from study.config import load_config, parse_override
    from study.store import StudyStore

    rows = []
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for positives in args.positives:
        storage = work / f"p{positives}"
        sets = overrides(storage, positives, args)
        log = work / f"p{positives}.log"
        store = StudyStore(load_config(args.config, dict(parse_override(text) for text in sets[1::2])).study_dir)
        print(f"[scale] {positives} positives per run: {store.root} (log {log})", flush=True)
        measured = {}
        for stage in ("prepare", "train", "explain", "analyze"):
            before = folder_bytes(stage_outputs(store).get(stage, ()))
            seconds, driver, private, workers = run_stage(stage, args.config, sets, log)
            written = folder_bytes(stage_outputs(store).get(stage, ())) - before
            measured[stage] = (seconds, driver, private, workers, written)
        maps = stored_maps(store)
        for stage in STAGES:
            seconds, driver, private, workers, written = measured[stage]
            rows.append({"positives": positives, "maps": maps, "stage": stage, "seconds": round(seconds, 2),
                         "ms_per_map": round(1000 * seconds / maps, 3), "driver_peak_mib": round(driver, 1),
                         "driver_private_peak_mib": round(private, 1),
                         "workers_peak_mib": round(workers, 1), "bytes_written": written,
                         "bytes_per_map": round(written / maps, 1)})
            print(f"[scale]   {stage:8s} {seconds:7.1f}s  {1000 * seconds / maps:7.2f} ms/map  driver "
                  f"{driver:7.0f} MiB  workers {workers:7.0f} MiB  wrote {written / 2**20:8.1f} MiB", flush=True)
    return rows


def report(rows: list[dict]) -> dict:
    private = all("driver_private_peak_mib" in r for r in rows)  # older CSVs lack it
    print("\n| positives/run | maps | stage | seconds | ms/map | driver peak MiB |"
          + (" driver private peak MiB |" if private else "") + " workers peak MiB (sum) | MiB written |")
    print("|---:|---:|---|---:|---:|---:|" + ("---:|" if private else "") + "---:|---:|")
    for r in rows:
        print(f"| {r['positives']:.0f} | {r['maps']:.0f} | {r['stage']} | {r['seconds']:.1f} | {r['ms_per_map']:.2f} | "
              f"{r['driver_peak_mib']:.0f} | " + (f"{r['driver_private_peak_mib']:.0f} | " if private else "")
              + f"{r['workers_peak_mib']:.0f} | {r['bytes_written'] / 2**20:.1f} |")
    sizes = sorted({r["positives"] for r in rows})
    low, high = sizes[0], sizes[-1]
    found = {}
    print(f"\ngrowth exponent b (cost ∝ maps^b), {low} -> {high} positives per run:")
    for stage in STAGES:
        a = next(r for r in rows if r["positives"] == low and r["stage"] == stage)
        z = next(r for r in rows if r["positives"] == high and r["stage"] == stage)
        found[stage] = {name: exponent((a["maps"], a[name]), (z["maps"], z[name]))
                        for name in ("seconds", "driver_peak_mib", "driver_private_peak_mib", "workers_peak_mib",
                                     "bytes_written") if name in a}
        private = found[stage].get("driver_private_peak_mib")
        print(f"  {stage:8s} time {found[stage]['seconds']:.2f}  driver peak {found[stage]['driver_peak_mib']:.2f}"
              + (f" (private {private:.2f})" if private is not None else "") + "  "
              f"workers peak {found[stage]['workers_peak_mib']:.2f}  bytes {found[stage]['bytes_written']:.2f}")
    worst = max(STAGES, key=lambda s: found[s]["seconds"])
    print(f"worst time exponent {found[worst]['seconds']:.2f} ({worst}; target <= 1.1); analyze peak-memory "
          f"exponent {found['analyze']['driver_peak_mib']:.2f} (target <= 0.2)")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positives", default="100,400,1600", type=lambda s: [int(x) for x in s.split(",")],
                        help="positive test images per run, one study per size (default 100,400,1600)")
    parser.add_argument("--image-size", type=int, default=96, help="network input and map size (demo: 96)")
    parser.add_argument("--models", default="resnet18", help="comma-separated (default resnet18)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated (default 0,1,2: three runs, three pairs)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--work", default="/tmp/camstudy-scale", help="where the studies are built")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "scale.csv", help="the measured rows (CSV)")
    parser.add_argument("--from-csv", type=Path, help="report (and project) from an earlier run's CSV")
    parser.add_argument("--project", type=Path, help="print the paper's size on paper for this config")
    args = parser.parse_args()
    if args.from_csv:
        with open(args.from_csv) as source:
            rows = [{k: (float(v) if k not in ("stage",) else v) for k, v in row.items()}
                    for row in csv.DictReader(source)]
    else:
        rows = measure(args)
        with open(args.out, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"[scale] rows -> {args.out}")
    if args.project:
        from bench.paper_size import project

        project(args.project, rows, args.image_size)
    report(rows)


if __name__ == "__main__":
    main()
