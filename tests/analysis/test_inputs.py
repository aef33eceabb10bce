"""The analysis reads maps by an explicit filter and in bounded pieces (analysis/inputs.py,
analysis/reliability.py): a run's Parquet written with the paper's layer first gives the same
stability table and Figure 1 as the natural order, a stability table equals a naive all-in-memory
computation, and the analysis' peak memory does not grow with the number of maps."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import compute, figures, reliability, stats
from analysis.inputs import StudyInputs
from explain.similarity import MEASURES, similarity
from explain.sink import ROW_GROUP_BYTES, rows_per_group
from study.config import StudyConfig
from study.store import StudyStore
from tests.conftest import ROOT

LAYERS = ["layer2", "layer3", "layer4"]  # layer4: the paper's layer (final_layer)
RUNS = [("resnet18", 0), ("resnet18", 1), ("resnet34", 0)]
ALPHA = StudyConfig().statistics.alpha


def smooth_maps(rng, n: int, size: int) -> np.ndarray:
    """Blobs at random places: maps alike enough that SSIM and ranks vary."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    centres = rng.random((n, 2))
    heat = np.exp(-((yy[None] - centres[:, :1, None]) ** 2 + (xx[None] - centres[:, 1:, None]) ** 2) / 0.05)
    return (heat + 0.2 * rng.random((n, size, size))).clip(0, 1).astype(np.float16)


def write_store(study: Path, images: int, size: int, final_first: bool = False, seed: int = 0,
                runs=RUNS, layers=LAYERS, group_bytes: int = ROW_GROUP_BYTES) -> pd.DataFrame:
    """cams/<run>/ with one row per image x layer (the paper's layer last, as explain writes them,
    or first) in row groups of at most `group_bytes` (explain's bound, `explain.sink`), and the
    trained rows (paper's layer) an analysis would hand the readers."""
    store, rng = StudyStore(study), np.random.default_rng(seed)
    ids = [f"img{i:05d}" for i in range(images)]
    order = list(reversed(layers)) if final_first else layers
    trained = []
    for model, run_seed in runs:
        maps = {layer: smooth_maps(rng, images, size) for layer in layers}
        folder = store.cams_dir(model, run_seed)
        folder.mkdir(parents=True)
        writer = None
        for layer in order:
            table = pa.table({"image_id": ids, "model": [model] * images, "seed": [run_seed] * images,
                              "cam_method": ["gradcam"] * images, "randomized": [False] * images,
                              "cam_layer": [layer] * images, "final_layer": [layer == layers[-1]] * images,
                              "heatmap": pa.FixedShapeTensorArray.from_numpy_ndarray(maps[layer])})
            writer = writer or pq.ParquetWriter(folder / StudyStore.CAM_PART, table.schema)
            writer.write_table(table, row_group_size=rows_per_group(table.schema, group_bytes))
        writer.close()
        trained.append(pd.DataFrame({"image_id": ids, "model": model, "seed": run_seed, "cam_method": "gradcam",
                                     "mask_fraction": np.linspace(0.01, 0.2, images)}))
    return pd.concat(trained, ignore_index=True)


def test_final_layer_rows_first_give_the_same_stability_and_figure1(tmp_path, monkeypatch):
    natural, first = tmp_path / "natural", tmp_path / "first"
    trained = write_store(natural, 12, 24)
    write_store(first, 12, 24, final_first=True)
    a = reliability.stability_table(StudyStore(natural), trained, "gradcam", ALPHA)
    b = reliability.stability_table(StudyStore(first), trained, "gradcam", ALPHA)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 3 * len(MEASURES) and set(a["kind"]) == {"repeatability", "reproducibility"}

    drawn = {}
    monkeypatch.setattr(compute, "read_backgrounds",
                        lambda store, ids: {i: (np.zeros((24, 24), np.float32), np.zeros((24, 24), np.uint8))
                                            for i in ids})
    monkeypatch.setattr(figures, "heatmap_grid", lambda backgrounds, heatmaps, ids, models, path, *rest, **options:
                        drawn.setdefault(Path(path).parent.parent.name, heatmaps))
    for study in (natural, first):
        (study / "out").mkdir()
        inputs = StudyInputs(store=StudyStore(study), config=StudyConfig(),
                             models=pd.DataFrame({"model": ["resnet18", "resnet34"]}),
                             runs=pd.DataFrame(), test_metrics=pd.DataFrame(), predictions=pd.DataFrame(),
                             cams=pd.DataFrame())
        compute._figure1(inputs, trained, study / "out" / "figure1.png", "gradcam", [], degenerate=[])
    assert set(drawn) == {"natural", "first"}
    final = pq.read_table(StudyStore(natural).cams_dir("resnet34", 0), filters=[("final_layer", "=", True)])
    final = dict(zip(final.column("image_id").to_pylist(), final.column("heatmap").combine_chunks().to_numpy_ndarray()))
    for model in ("resnet18", "resnet34"):
        assert drawn["natural"][model].keys() == drawn["first"][model].keys() and len(drawn["first"][model]) == 3
        for image, heat in drawn["first"][model].items():
            np.testing.assert_array_equal(heat, drawn["natural"][model][image])
            if model == "resnet34":  # the paper's layer's map, not whichever row came last
                np.testing.assert_array_equal(heat, final[image].astype(np.float32))


def test_stability_equals_a_naive_all_in_memory_comparison(tmp_path, monkeypatch):
    trained = write_store(tmp_path, 30, 20)
    trained = trained[~((trained["model"] == "resnet34") & (trained["image_id"] < "img00005"))]  # partial overlap
    monkeypatch.setattr(reliability, "STABILITY_BUDGET_BYTES", 3 * 20 * 20 * 49 * 7)  # 7 images per chunk
    found = reliability.stability_table(StudyStore(tmp_path), trained, "gradcam", ALPHA).set_index(
        ["model_a", "seed_a", "model_b", "seed_b", "measure"])
    table = pq.read_table(tmp_path / "cams", filters=[("final_layer", "=", True)]).to_pandas()
    for (ma, sa), (mb, sb) in itertools.combinations(RUNS, 2):
        ids_a = set(trained.loc[(trained["model"] == ma) & (trained["seed"] == sa), "image_id"])
        ids_b = set(trained.loc[(trained["model"] == mb) & (trained["seed"] == sb), "image_id"])
        common = sorted(ids_a & ids_b)
        pick = lambda m, s: np.stack([np.asarray(table[(table["model"] == m) & (table["seed"] == s) &  # noqa: E731
                                                       (table["image_id"] == i)]["heatmap"].iloc[0], np.float32).reshape(20, 20)
                                      for i in common])
        naive = similarity(pick(ma, sa), pick(mb, sb))
        for measure, column in MEASURES.items():
            row = found.loc[(ma, sa, mb, sb, measure)]
            mean, lo, hi = stats.mean_ci(naive[column], ALPHA)
            assert row["n"] == len(common) and row["mean"] == pytest.approx(mean, rel=1e-12)
            assert (row["lo"], row["hi"]) == pytest.approx((lo, hi), rel=1e-12)


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child would report its parent's peak
CHILD = """
import json, sys
import pandas as pd
from analysis import reliability
from analysis.inputs import read_cams
from study.config import StudyConfig
from study.store import StudyStore
study, trained = sys.argv[1], pd.read_parquet(sys.argv[2])
peak = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
before = peak()
table = reliability.stability_table(StudyStore(study), trained, "gradcam", StudyConfig().statistics.alpha)
lines = reliability.pass_lines(StudyStore(study), trained, "gradcam", 50)
scores = [read_cams(folder, []) for folder in sorted((__import__("pathlib").Path(study) / "cams").iterdir())]
print(json.dumps({"imports_kib": before, "peak_kib": peak(),
                  "pairs": int(len(table) / 3)}))
"""


# Row groups scaled down from explain's 64 MiB bound so that both sizes span several: a reader holds
# one row group, so below the bound its memory grows with the file (it stops growing at ~1,300
# maps of 160 px at the real bound: a difference of row-group size, not of the number of maps)
TEST_GROUP_BYTES = 4 << 20


@pytest.mark.slow
def test_analysis_memory_does_not_grow_with_the_number_of_maps(tmp_path):
    """Four times the maps (4 runs x 150 vs 600 images of 160 px, row groups bounded as explain
    writes them): the peak RSS of the map readers grows by less than a quarter of what holding the
    450 extra images' maps of every run at once would add (~180 MB as float32; measured: 3 MB
    alone, 18 MB with the rest of the suite running; the Arrow pool's own bound is the next test's)."""
    peaks = {}
    runs = RUNS + [("resnet34", 1)]
    for images in (150, 600):
        study = tmp_path / f"n{images}"
        trained = write_store(study, images, 160, runs=runs, layers=["layer4"], group_bytes=TEST_GROUP_BYTES)
        trained.to_parquet(tmp_path / f"trained{images}.parquet")
        done = subprocess.run([sys.executable, "-c", CHILD, str(study), str(tmp_path / f"trained{images}.parquet")],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        peaks[images] = json.loads(done.stdout.strip().splitlines()[-1])
        assert peaks[images]["pairs"] == 6
    held_at_once_kib = (600 - 150) * len(runs) * 160 * 160 * 4 / 1024
    growth_kib = peaks[600]["peak_kib"] - peaks[150]["peak_kib"]
    assert growth_kib < held_at_once_kib / 4, (growth_kib, held_at_once_kib, peaks)


POOL_CHILD = """
import json, sys
import pyarrow as pa
from analysis.inputs import iter_heatmaps
from study.store import StudyStore
rows = sum(len(ids) for ids, _ in iter_heatmaps(StudyStore(sys.argv[1]), "resnet18", 0))
print(json.dumps({"rows": rows, "pool_max": pa.default_memory_pool().max_memory()}))
"""


def test_a_run_is_streamed_without_buffering_its_row_groups_ahead(tmp_path):
    """Arrow's pool peak while one run's maps are read does not follow the run's size: from 1,000
    to 4,000 maps (row groups of 1 MiB) it grows by under a quarter of what the file grows by
    (measured: 0.1-2.4 MB of 22 MB). pyarrow's default pre-buffering read every row group ahead:
    the pool then grew with the file (24 MB here; 242 MB for 4,800 maps of 160 px)."""
    group_bytes, pool, file_bytes = 1 << 20, {}, {}
    for images in (1000, 4000):
        study = tmp_path / str(images)
        write_store(study, images, 64, runs=[("resnet18", 0)], layers=["layer4"], group_bytes=group_bytes)
        file_bytes[images] = sum(f.stat().st_size for f in (study / "cams").rglob("*.parquet"))
        done = subprocess.run([sys.executable, "-c", POOL_CHILD, str(study)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        found = json.loads(done.stdout.strip().splitlines()[-1])
        assert found["rows"] == images
        pool[images] = found["pool_max"]
    assert pool[4000] - pool[1000] < (file_bytes[4000] - file_bytes[1000]) / 4, (pool, file_bytes)
