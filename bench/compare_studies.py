"""Do two finished studies hold the same results? Checks that a change to the code (a refactor, a
dependency upgrade) moved no number: run `make demo` before and after, then

    .venv/bin/python bench/compare_studies.py BEFORE/studies/demo AFTER/studies/demo

It compares
- every CSV under analysis/tables/ (same files; each cell equal as text, or as numbers to --rtol and --atol),
- analysis/statistics.json (every key and value, numbers to --rtol and --atol; keys naming a time left out),
- every Parquet dataset of maps and predictions (data/manifest.parquet, train/*/predictions.parquet,
  cams/*/, sanity/*/, controls/*/, baselines/): the same rows (by its key columns) and, column by column,
  equal values (floats to --rtol and --atol; NaN equals NaN); the heatmaps too unless --skip-heatmaps,
- each run's test_metrics.json.

It prints one line per compared file and ends with `equal: N files` or the differences, exiting 1
when any. The default tolerance is 0: a refactor should change no bit.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from study.store import StudyStore

TIME_KEYS = ("finished", "created", "started", "time", "timestamp", "duration", "seconds", "built")
MAP_KEYS = ("model", "seed", "image_id", "cam_method", "cam_layer", "variant", "sanity", "step")



@dataclass(frozen=True)
class Tolerance:
    """How far two numbers may be apart and still count as equal (0, 0: every bit)."""

    rtol: float = 0.0
    atol: float = 0.0

    def close(self, a: np.ndarray, b: np.ndarray) -> bool:
        return bool(np.all((a == b) | (np.isnan(a) & np.isnan(b)) | np.isclose(a, b, rtol=self.rtol, atol=self.atol)))


def _numbers_equal(a: Any, b: Any, tol: Tolerance) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isnan(a) and math.isnan(b):
            return True
        return a == b or math.isclose(a, b, rel_tol=tol.rtol, abs_tol=tol.atol)
    return a == b


def json_differences(a: Any, b: Any, tol: Tolerance, where: str = "") -> Iterator[str]:
    """Every path at which two JSON values differ (keys naming a time are skipped)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if any(word in key.lower() for word in TIME_KEYS):
                continue
            if key not in a or key not in b:
                yield f"{where}.{key}: only in {'after' if key not in a else 'before'}"
            else:
                yield from json_differences(a[key], b[key], tol, f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield f"{where}: {len(a)} items before, {len(b)} after"
        else:
            for index, (x, y) in enumerate(zip(a, b)):
                yield from json_differences(x, y, tol, f"{where}[{index}]")
    elif not _numbers_equal(a, b, tol):
        yield f"{where}: {a!r} before, {b!r} after"


def csv_differences(before: Path, after: Path, tol: Tolerance) -> list[str]:
    a, b = pd.read_csv(before, dtype=str, keep_default_na=False), pd.read_csv(after, dtype=str, keep_default_na=False)
    if list(a.columns) != list(b.columns) or a.shape != b.shape:
        return [f"columns/shape {list(a.columns)} {a.shape} before, {list(b.columns)} {b.shape} after"]
    found = []
    for column in a.columns:
        for row, (x, y) in enumerate(zip(a[column], b[column])):
            if x == y:
                continue
            try:
                same = _numbers_equal(float(x), float(y), tol)
            except ValueError:
                same = False
            if not same:
                found.append(f"row {row} {column}: {x} before, {y} after")
    return found


def _frame(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas() if path.is_file() else pq.ParquetDataset(path).read().to_pandas()


def _equal_cells(x: pd.Series, y: pd.Series, tol: Tolerance) -> bool:
    if x.dtype.kind == "f" or y.dtype.kind == "f":
        a, b = x.to_numpy(dtype=float), y.to_numpy(dtype=float)
        return tol.close(a, b)
    if x.dtype == object:
        return all(_cell_equal(p, q, tol) for p, q in zip(x, y))
    return bool((x.to_numpy() == y.to_numpy()).all())


def _cell_equal(p: Any, q: Any, tol: Tolerance) -> bool:
    if isinstance(p, (bytes, str)) or p is None:
        return p == q
    if isinstance(p, (np.ndarray, list)):
        a, b = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
        return a.shape == b.shape and tol.close(a, b)
    return _numbers_equal(p, q, tol)


def parquet_differences(before: Path, after: Path, tol: Tolerance, skip_heatmaps: bool) -> tuple[list[str], int]:
    a, b = _frame(before), _frame(after)
    if skip_heatmaps:
        a, b = a.drop(columns=["heatmap"], errors="ignore"), b.drop(columns=["heatmap"], errors="ignore")
    if sorted(a.columns) != sorted(b.columns):
        return [f"columns differ: {sorted(set(a.columns) ^ set(b.columns))}"], 0
    keys = [k for k in MAP_KEYS if k in a.columns] or [c for c in a.columns if a[c].dtype == object][:1]
    if keys:
        a = a.sort_values(keys, kind="stable").reset_index(drop=True)
        b = b.sort_values(keys, kind="stable").reset_index(drop=True)
    if len(a) != len(b):
        return [f"{len(a)} rows before, {len(b)} after"], 0
    found = [f"column {column} differs" for column in a.columns if not _equal_cells(a[column], b[column], tol)]
    return found, len(a.columns)


def compared_files(before: Path) -> Iterator[tuple[str, str]]:
    """(kind, path relative to the study) of everything compared, found in the `before` study."""
    store = StudyStore(before)

    def relative(path: Path) -> str:
        return path.relative_to(before).as_posix()

    for path in sorted((store.analysis_dir / "tables").glob("*.csv")):
        yield "csv", relative(path)
    yield "json", relative(store.analysis_dir / "statistics.json")
    yield "parquet", relative(store.manifest_path)
    for path in sorted(store.train_root.glob(f"*/{StudyStore.PREDICTIONS}")):
        yield "parquet", relative(path)
    for path in sorted(store.train_root.glob(f"*/{StudyStore.TEST_METRICS}")):
        yield "json", relative(path)
    for folder in (store.cams_root, store.sanity_root, store.controls_root):
        for path in sorted(folder.glob("*/")):
            if any(path.glob("*.parquet")):
                yield "parquet", relative(path)
    if store.baselines_dir.is_dir():
        yield "parquet", relative(store.baselines_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance for numbers (default 0: equal)")
    parser.add_argument("--atol", type=float, default=0.0, help="absolute tolerance for numbers (default 0)")
    parser.add_argument("--skip-heatmaps", action="store_true", help="leave the heatmap column out")
    args = parser.parse_args(argv)
    tolerance = Tolerance(args.rtol, args.atol)
    differences, compared = [], 0
    tables_before, tables_after = (StudyStore(study).analysis_dir / "tables" for study in (args.before, args.after))
    extra = sorted(p.name for p in tables_after.glob("*.csv") if not (tables_before / p.name).exists())
    if extra:
        differences.append(f"analysis/tables: only after: {', '.join(extra)}")
    for kind, relative in compared_files(args.before):
        before, after = args.before / relative, args.after / relative
        if not after.exists():
            differences.append(f"{relative}: missing after")
            continue
        if kind == "csv":
            found, detail = csv_differences(before, after, tolerance), "cells"
        elif kind == "json":
            values = json.loads(before.read_text()), json.loads(after.read_text())
            found, detail = list(json_differences(*values, tolerance)), "values"
        else:
            found, columns = parquet_differences(before, after, tolerance, args.skip_heatmaps)
            detail = f"{columns} columns"
        compared += 1
        print(f"{'equal' if not found else 'DIFFERENT'}  {relative} ({detail})")
        differences += [f"{relative}: {line}" for line in found[:20]]
    if differences:
        print(f"\n{len(differences)} difference(s):", *differences, sep="\n  ")
        return 1
    print(f"\nequal: {compared} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
