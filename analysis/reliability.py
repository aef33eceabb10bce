"""Are the maps themselves reliable? (docs/STUDY.md §10): the cascade, its pass line, and stability.

- **Cascade** (`cascade_table`): the similarity (Spearman, SSIM, top-10% IoU; `explain.similarity`)
  of each cascade step's map to the trained map of the same image, mean and 95% CI over images
  per (model, step). Step 0 is the untouched copy (similarity 1 unless the copy was not restored).
- **Pass line** (`pass_lines`, Arun et al. 2021): the mean similarity of trained maps of
  `sanity.pass_line_pairs` random pairs of different images (seeded; the same pairs for every
  model). A randomised map passes the sanity check when it is shown to be less similar to the
  trained map than two unrelated images' maps are: the CI's upper bound lies below the line.
  Arun et al. define it for SSIM; the same construction is given for every measure.
- **Stability** (`stability_table`): for every pair of runs, the similarity of their maps of the
  same image over the images both scored: repeatability (one architecture, two seeds) and
  reproducibility (two architectures).

Every comparison reads the maps as stored (the paper's layer, the primary CAM method).
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from analysis import stats
from analysis.inputs import iter_heatmaps, read_heatmaps
from explain.similarity import MEASURES, Prepared, compare, similarity
from study.store import StudyStore

CASCADE_COLUMNS = ["model", "stages_randomized", "randomized_from", "measure", "n", "mean", "lo", "hi", "pass_line",
                   "passes", "degenerate"]
STABILITY_COLUMNS = ["model_a", "seed_a", "model_b", "seed_b", "kind", "measure", "n", "mean", "lo", "hi"]
PAIR_SEED = 0  # the pass line's image pairs: the same for every model and every rerun


def pass_lines(store: StudyStore, trained: pd.DataFrame, method: str, pairs: int) -> pd.DataFrame:
    """model -> mean similarity (per measure) of its trained maps of `pairs` random pairs of
    different images (its first seed; the images every model scored, so all use the same pairs).
    Only the maps of those images are read."""
    common = sorted(set.intersection(*(set(part["image_id"]) for _, part in trained.groupby("model", observed=True))))
    if len(common) < 2:
        return pd.DataFrame(columns=["model", *MEASURES])
    rng = np.random.default_rng(PAIR_SEED)
    first = rng.integers(0, len(common), pairs)
    second = (first + rng.integers(1, len(common), pairs)) % len(common)  # never the same image
    needed = sorted({common[i] for i in np.concatenate([first, second])})
    rows = []
    for model, part in trained.groupby("model", observed=True, sort=False):
        maps = read_heatmaps(store, str(model), int(part["seed"].min()), needed, method)
        a = np.stack([maps[common[i]] for i in first])
        b = np.stack([maps[common[j]] for j in second])
        found = similarity(a, b)
        rows.append({"model": str(model), **{m: float(np.nanmean(found[c])) for m, c in MEASURES.items()}})
    return pd.DataFrame(rows)


def cascade_table(sanity: pd.DataFrame, lines: pd.DataFrame, flags: dict[str, str],
                  alpha: float) -> pd.DataFrame:
    """One row per (model, cascade step, measure): mean and CI over images (seed-averaged), the
    pass line and whether the step is shown to lie below it."""
    rows = sanity[sanity["randomization"] == "cascade"] if "randomization" in sanity else sanity.iloc[0:0]
    if rows.empty:
        return pd.DataFrame(columns=CASCADE_COLUMNS)
    line = lines.set_index("model") if len(lines) else pd.DataFrame()
    found = []
    keys = ["model", "stages_randomized", "randomized_from"]
    for (model, step, unit), part in rows.groupby(keys, observed=True, sort=False):
        for measure, column in MEASURES.items():
            values = part.groupby("image_id")[column].mean()
            mean, lo, hi = stats.mean_ci(values, alpha)
            level = float(line.loc[str(model), measure]) if str(model) in line.index else math.nan
            found.append({"model": str(model), "stages_randomized": int(step), "randomized_from": unit,
                          "measure": measure, "n": int(values.notna().sum()), "mean": mean, "lo": lo, "hi": hi,
                          "pass_line": level, "passes": bool(hi < level) if np.isfinite(hi) and np.isfinite(level)
                          else False, "degenerate": flags.get(str(model), "")})
    return pd.DataFrame(found, columns=CASCADE_COLUMNS).sort_values(["model", "measure", "stages_randomized"],
                                                                     kind="stable").reset_index(drop=True)


def cascade_verdicts(cascade: pd.DataFrame) -> pd.DataFrame:
    """Per valid model, from its SSIM steps against the pass line: the fully randomised step's
    SSIM and verdict, the first step shown below the line (None: never), and every later step
    that is not shown below it (`back_above`: a cascade that is not monotone), with the highest
    SSIM among them."""
    ssim = cascade[(cascade["measure"] == "ssim") & (cascade["degenerate"] == "")]
    rows = []
    for model, part in ssim.groupby("model", sort=False):
        part = part.sort_values("stages_randomized")
        passing = part[part["passes"]]
        last = part.iloc[-1]
        first = int(passing["stages_randomized"].iloc[0]) if len(passing) else None
        later = part[(part["stages_randomized"] > first) & ~part["passes"]] if first is not None else part.iloc[0:0]
        rows.append({"model": model, "full_ssim": last["mean"], "full_lo": last["lo"], "full_hi": last["hi"],
                     "pass_line": last["pass_line"], "passes": bool(last["passes"]),
                     "first_step_below": first,
                     "first_unit_below": passing["randomized_from"].iloc[0] if len(passing) else None,
                     "steps": int(part["stages_randomized"].max()),
                     "back_above": [int(step) for step in later["stages_randomized"]],
                     "back_above_max_ssim": float(later["mean"].max()) if len(later) else None,
                     "monotone": first is not None and later.empty})
    return pd.DataFrame(rows)


# What the stability comparison holds at once: every run's maps of one chunk of images, prepared
# for the three measures (~49 bytes per pixel). The chunk shrinks as runs or map size grow.
STABILITY_BUDGET_BYTES = 128 << 20
PREPARED_BYTES_PER_PIXEL = 49  # 6 float64 arrays (map, local means, ranks) and a bool top set


def stability_table(store: StudyStore, trained: pd.DataFrame, method: str,
                    alpha: float) -> pd.DataFrame:
    """Every pair of runs (model, seed) of `trained` (the paper's layer, one method): the mean
    similarity of their maps of the same image, over the images both scored, with its CI.

    Streams: each run's maps are read once, a batch at a time, into a flat float16 file in the
    order of the images (`_RunMaps`); then the images are taken a chunk at a time, every run's
    maps of the chunk prepared once (`explain.similarity.Prepared`) and every pair compared. The
    memory held is one chunk of every run (`STABILITY_BUDGET_BYTES`), whatever the number of
    images; the time is (pairs of runs) x (images)."""
    runs = sorted({(str(m), int(s)) for m, s in trained[["model", "seed"]].drop_duplicates().itertuples(index=False)},
                  key=_order(trained))
    if len(runs) < 2:
        return pd.DataFrame(columns=STABILITY_COLUMNS)
    images = sorted(set(trained["image_id"]))
    position = {image: i for i, image in enumerate(images)}
    pairs = list(itertools.combinations(runs, 2))
    values: dict[tuple, list[dict[str, np.ndarray]]] = {pair: [] for pair in pairs}
    with tempfile.TemporaryDirectory(prefix=".stability-", suffix=f".tmp-{os.getpid()}", dir=store.root) as folder:
        model = trained["model"].astype(str)
        spilled = {run: _RunMaps.spill(Path(folder), store, run, position, method,
                                       set(trained.loc[(model == run[0]) & (trained["seed"] == run[1]), "image_id"]))
                   for run in runs}
        size = {maps.pixels for maps in spilled.values() if maps.pixels}
        if len(size) > 1:
            raise ValueError(f"stability: the runs' maps differ in size ({sorted(size)} pixels); "
                             "maps of one study are stored at the input size")
        pixels = size.pop() if size else 1
        chunk = max(1, STABILITY_BUDGET_BYTES // (len(runs) * pixels * PREPARED_BYTES_PER_PIXEL))
        for start in range(0, len(images), chunk):
            rows = slice(start, min(start + chunk, len(images)))
            prepared = {run: maps.prepared(rows) for run, maps in spilled.items()}
            for a, b in pairs:
                (ia, pa_), (ib, pb) = prepared[a], prepared[b]
                both = np.intersect1d(ia, ib)  # the chunk's images both runs scored, in image order
                if len(both):
                    values[(a, b)].append(compare(pa_.take(np.searchsorted(ia, both)),
                                                  pb.take(np.searchsorted(ib, both))))
    found = []
    for (a, b), parts in values.items():
        if not parts:
            continue
        kind = "repeatability" if a[0] == b[0] else "reproducibility"
        for measure, column in MEASURES.items():
            measured = np.concatenate([part[column] for part in parts])
            mean, lo, hi = stats.mean_ci(measured, alpha)
            found.append({"model_a": a[0], "seed_a": a[1], "model_b": b[0], "seed_b": b[1], "kind": kind,
                          "measure": measure, "n": int(np.isfinite(measured).sum()), "mean": mean, "lo": lo,
                          "hi": hi})
    return pd.DataFrame(found, columns=STABILITY_COLUMNS)


class _RunMaps:
    """One run's maps in a flat float16 file, row i = the i-th image of the comparison (unwritten
    rows are images the run did not score), read back a chunk of rows at a time with plain file
    reads (not a memory map, whose touched pages would count against the process)."""

    def __init__(self, path: Path, scored: np.ndarray, shape: tuple[int, ...]):
        self.path, self.scored, self.shape = path, scored, shape

    @property
    def pixels(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 0

    @classmethod
    def spill(cls, folder: Path, store: StudyStore, run: tuple[str, int], position: dict[str, int], method: str,
              own: set[str]) -> "_RunMaps":
        path, scored, shape = folder / f"{run[0]}-{run[1]}.f16", np.zeros(len(position), bool), ()
        with open(path, "wb") as out:
            for ids, maps in iter_heatmaps(store, run[0], run[1], method, dtype=np.float16):
                shape = maps.shape[1:]
                for image, heat in zip(ids, maps):
                    if image in own:  # the images this run's rows say it scored
                        out.seek(position[image] * heat.nbytes)
                        out.write(heat.tobytes())
                        scored[position[image]] = True
        return cls(path, scored, shape)

    def prepared(self, rows: slice) -> tuple[np.ndarray, Optional[Prepared]]:
        """(positions of the chunk's scored images, their maps prepared for every measure)."""
        chosen = np.flatnonzero(self.scored[rows]) + rows.start
        if not len(chosen):
            return chosen, None
        maps = np.empty((len(chosen), *self.shape), np.float16)
        with open(self.path, "rb") as source:
            for i, row in enumerate(chosen):
                source.seek(int(row) * maps[i].nbytes)
                maps[i] = np.frombuffer(source.read(maps[i].nbytes), np.float16).reshape(self.shape)
        return chosen, Prepared(maps)


def _order(trained: pd.DataFrame):
    order = {str(m): i for i, m in enumerate(stats.levels(trained["model"]))}
    return lambda run: (order.get(run[0], len(order)), run[1])


def stability_summary(stability: pd.DataFrame, measure: str = "ssim") -> Optional[dict[str, Any]]:
    """Mean repeatability (same architecture, different seeds) beside mean reproducibility (two
    architectures) for one measure (None for a kind without pairs); None without any pair."""
    part = stability[stability["measure"] == measure]
    if part.empty:
        return None
    kinds = part.groupby("kind")["mean"].mean()
    return {"measure": measure, **{kind: float(kinds[kind]) if kind in kinds.index else None
                                   for kind in ("repeatability", "reproducibility")},
            "pairs": {k: int(v) for k, v in part.groupby("kind").size().items()}}
