"""The prepare stage: selection and split, the preprocessing pass, manifest, cache and report."""

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from study.config import PreprocessConfig, SplitConfig, load_config
from orchestrator.stages import stage_prepare
from training import rle
from training.cache import load_split, read_index
from study.errors import ConfigError, DataError
from training.data_report import data_report, format_report
from training.prepare import MANIFEST_COLUMNS, prepare_data, process_batch, union_mask
from training.row_mapper import map_rows
from training.split import SPLITS, select_and_split
from study.selection import plan_selection
from study.store import StudyStore
from tests.conftest import ROOT

DEMO = ROOT / "configs" / "demo.yaml"


def _images(n_pos: int, n_neg: int) -> pd.DataFrame:
    ids = [f"1.2.276.{i:04d}" for i in range(n_pos + n_neg)]
    labels = [1] * n_pos + [0] * n_neg
    return pd.DataFrame({"image_id": ids, "label": labels}).sample(frac=1, random_state=3)


# --------------------------------------------------------------------------- selection and split


def test_split_is_stratified_with_exact_counts_and_disjoint():
    split = select_and_split(_images(100, 300), SplitConfig(n_val=20, n_test=30))
    counts = split.groupby(["split", "label"]).size().to_dict()
    assert counts == {("test", 0): 15, ("test", 1): 15, ("val", 0): 10, ("val", 1): 10,
                      ("train", 0): 75, ("train", 1): 75}
    assert split["image_id"].is_unique and set(split["split"]) == set(SPLITS)


def test_unbalanced_selection_keeps_its_positive_share_in_val_and_test():
    split = select_and_split(_images(100, 300), SplitConfig(n_negative="all", n_val=40, n_test=20))
    counts = split.groupby(["split", "label"]).size().to_dict()
    assert (counts[("val", 1)], counts[("val", 0)]) == (10, 30)
    assert (counts[("test", 1)], counts[("test", 0)]) == (5, 15)
    assert len(split) == 400


def test_split_is_seeded_and_independent_of_input_order():
    images = _images(60, 90)
    cfg = SplitConfig(n_val=10, n_test=10)
    first = select_and_split(images, cfg)
    pd.testing.assert_frame_equal(first, select_and_split(images.iloc[::-1], cfg))
    other = select_and_split(images, SplitConfig(n_val=10, n_test=10, seed=1))
    assert not first["split"].equals(other["split"])


def test_changing_n_val_keeps_the_test_set():
    images = _images(60, 60)
    small = select_and_split(images, SplitConfig(n_val=10, n_test=10))
    large = select_and_split(images, SplitConfig(n_val=30, n_test=10))
    assert set(small.loc[small["split"] == "test", "image_id"]) == set(large.loc[large["split"] == "test", "image_id"])


def test_asking_for_more_positives_than_exist_says_what_exists_and_the_remedy():
    with pytest.raises(ConfigError) as caught:
        plan_selection(2669, 9378, SplitConfig(n_positive=3600))
    message = str(caught.value)
    for fact in ("split.n_positive", "3600", "2669 unique positive", "at most 2669", "balance: max-available"):
        assert fact in message


def test_match_needs_enough_negatives():
    with pytest.raises(ConfigError, match=r"split\.n_negative: 'match'.*\(50\).*has 30 negative.*max-available"):
        plan_selection(50, 30, SplitConfig(n_val=4, n_test=4))


def test_val_and_test_must_leave_training_images():
    with pytest.raises(ConfigError, match=r"split\.n_val \+ split\.n_test = 60 \+ 60 = 120 leaves no training"):
        plan_selection(50, 50, SplitConfig(n_val=60, n_test=60))


def test_max_available_shrinks_and_says_so():
    shrunk = plan_selection(2669, 9378, SplitConfig(n_positive=3600, balance="max-available"))
    assert (shrunk.n_positive, shrunk.n_negative) == (2669, 2669)
    assert any("3600 requested, 2669 exist" in note for note in shrunk.notes)
    balanced = plan_selection(80, 50, SplitConfig(n_val=10, n_test=10, balance="max-available"))
    assert (balanced.n_positive, balanced.n_negative) == (50, 50)  # 'match' keeps the balance
    assert balanced.counts["train"] == (40, 40)


def test_paper_preset_on_the_real_counts():
    plan = plan_selection(2669, 9378, load_config(DEMO.with_name("paper.yaml")).split)
    assert plan.counts == {"train": (1669, 1669), "val": (500, 500), "test": (500, 500)}


def test_duplicate_image_rows_are_refused():
    images = pd.concat([_images(10, 10), _images(1, 0)])
    with pytest.raises(DataError, match="more than one row"):
        select_and_split(images, SplitConfig(n_val=2, n_test=2))


def test_union_mask_is_the_or_of_the_rows():
    a, b = np.zeros((8, 6), bool), np.zeros((8, 6), bool)
    a[1:4, 1:3], b[2:6, 2:5] = True, True
    np.testing.assert_array_equal(union_mask([rle.encode(a), rle.encode(b)], 8, 6), a | b)
    assert not union_mask(rle.EMPTY, 8, 6).any()
    with pytest.raises(DataError, match="bad mask RLE"):
        union_mask("5 1000", 8, 6, where="x.dcm")


# --------------------------------------------------------------------------- preprocessing pass


@pytest.fixture(scope="module")
def png_rows(tmp_path_factory) -> pd.DataFrame:
    """24 small PNGs with rectangle masks: rows as load_siim gives them."""
    folder = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    records = []
    for i in range(24):
        mask = np.zeros((80, 96), bool)
        if i % 2:
            mask[10:10 + i, 20:60] = True
        if i == 7:
            mask[60:62, 70:72] = True  # a second region
        path = folder / f"img{i:02d}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (80, 96), dtype=np.uint8))
        records.append((f"img{i:02d}", str(path), i % 2, rle.encode(mask), float(i % 2), 80, 96))
    return pd.DataFrame(records, columns=["image_id", "path", "label", "mask_rle", "rle_rows", "height", "width"])


def test_manifest_has_its_columns_and_native_mask_fractions(png_rows):
    prepared = prepare_data(png_rows, SplitConfig(n_val=4, n_test=4), PreprocessConfig(image_size=16), workers=0)
    manifest = prepared.manifest
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert prepared.images.shape == (24, 16, 16) and prepared.images.dtype == np.float16
    assert prepared.masks.shape == (24, 16, 16) and set(np.unique(prepared.masks)) <= {0, 1}
    row = manifest.set_index("image_id").loc["img05"]
    assert row["mask_fraction"] == pytest.approx(5 * 40 / (80 * 96))
    assert (row["height"], row["width"]) == (80, 96)
    assert len(row["content_hash"]) == 64 and manifest["content_hash"].is_unique
    assert (manifest.loc[manifest["label"] == 0, "mask_fraction"] == 0).all()
    # lesion covariates at native resolution: a 5 x 40 rectangle is one region, 40/5 = 8 times longer
    assert (row["n_regions"], row["rle_rows"]) == (1, 1) and row["elongation"] == pytest.approx(8.0)
    two = manifest.set_index("image_id").loc["img07"]
    assert two["n_regions"] == 2 and two["elongation"] == pytest.approx((40 / 7 * 280 + 1 * 4) / 284)
    negatives = manifest[manifest["label"] == 0]
    assert (negatives["n_regions"] == 0).all() and negatives["elongation"].isna().all()


def test_report_counts_and_quantiles(png_rows):
    prepared = prepare_data(png_rows, SplitConfig(n_val=4, n_test=4), PreprocessConfig(image_size=16), workers=0)
    report = data_report(prepared, ["u1"], ["o1", "o2"], "png", "test")
    assert report["counts"]["total"] == {"positive": 12, "negative": 12, "images": 24}
    assert report["counts"]["val"] == {"positive": 2, "negative": 2, "images": 4}
    assert (report["unlabelled"]["count"], report["orphans"]["count"]) == (1, 2)
    assert list(report["mask_fraction_positive_quantiles"]) == ["5%", "25%", "50%", "75%", "95%"]
    json.dumps(report)  # plain values only
    assert "mask fraction of positives" in format_report(report)


def test_pixel_duplicates_are_dropped_and_reported(png_rows, tmp_path):
    copy = png_rows.iloc[[3]].assign(image_id="zz-copy-of-img03")
    images = pd.concat([png_rows, copy], ignore_index=True)
    prepared = prepare_data(images, SplitConfig(n_val=4, n_test=4), PreprocessConfig(image_size=16),
                            workers=0, dedupe_pixels=True)
    assert prepared.duplicates.to_dict("records") == [{"image_id": "zz-copy-of-img03", "duplicate_of": "img03"}]
    assert "zz-copy-of-img03" not in set(prepared.manifest["image_id"])


@pytest.mark.slow  # on the session's local Ray (Ray Data)
def test_ray_data_path_equals_the_serial_path(png_rows, ray_session):
    cfg = PreprocessConfig(image_size=16)
    serial = map_rows(png_rows, process_batch, 0, "serial", cfg=cfg)
    parallel = map_rows(png_rows, process_batch, 2, "ray", cfg=cfg)
    for key, values in serial.items():
        np.testing.assert_array_equal(values, parallel[key], err_msg=key)


@pytest.mark.slow  # on the session's local Ray (Ray Data)
@pytest.mark.parametrize("workers", [0, 2], ids=["serial", "ray"])
def test_an_unreadable_image_is_a_data_error_naming_the_file(png_rows, tmp_path, workers, ray_session):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows = pd.concat([png_rows, png_rows.iloc[[0]].assign(image_id="zz", path=str(broken))], ignore_index=True)
    with pytest.raises(DataError) as caught:
        map_rows(rows, process_batch, workers, "broken", cfg=PreprocessConfig(image_size=16))
    assert str(caught.value).startswith(f"{broken}: not a readable PNG")  # no worker traceback


# --------------------------------------------------------------------------- the stage, end to end


def _tiny(storage: Path, **more) -> dict:
    """configs/demo.yaml shrunk: 24 synthetic 64-px DICOMs, 32-px network input."""
    return {"storage": str(storage), "data.synthetic.n": 24, "data.synthetic.size": 64,
            "split.n_val": 4, "split.n_test": 4, "preprocess.image_size": 32, **more}


def prepare_stage(config, force: bool = False) -> StudyStore:
    """The prepare stage on the config's study store, which it returns."""
    store = StudyStore(config.study_dir)
    stage_prepare(config, store, force=force)
    return store


def _outputs(store) -> dict[Path, int]:
    paths = [store.manifest_path, store.data_report_path, *sorted(store.cache_dir.iterdir())]
    return {path: path.stat().st_mtime_ns for path in paths}


@pytest.mark.slow  # on the session's local Ray (Ray Data)
def test_prepare_stage_end_to_end_and_rerun_is_a_no_op(tmp_path, ray_session, capsys):
    config = load_config(DEMO, _tiny(tmp_path))
    store = prepare_stage(config)
    manifest = pd.read_parquet(store.manifest_path)
    assert list(manifest.columns) == MANIFEST_COLUMNS and len(manifest) == 24
    assert store.config_path.read_text().startswith("study: demo")
    report = json.loads(store.data_report_path.read_text())
    assert report["counts"]["test"] == {"positive": 2, "negative": 2, "images": 4}
    assert (report["unlabelled"]["count"], report["orphans"]["count"]) == (3, 2)  # demo.yaml's synthetic set
    for split, n in (("train", 16), ("val", 4), ("test", 4)):
        cached = load_split(store.cache_dir, split)
        assert len(cached) == n and cached.images.shape == (n, 1, 32, 32) and cached.masks.shape == (n, 32, 32)
        rows = manifest[manifest["split"] == split]
        assert cached.image_ids == rows["image_id"].tolist()
        assert cached.labels.tolist() == rows["label"].tolist()
    assert "data report" in capsys.readouterr().out

    before = _outputs(store)
    prepare_stage(config)
    assert _outputs(store) == before
    assert "up to date" in capsys.readouterr().out

    # the in-process path rebuilds the same cache (prepare_actors is not part of the hash: force)
    images, masks, index = (np.load(store.cache_dir / "images.npy"), np.load(store.cache_dir / "masks.npy"),
                            read_index(store.cache_dir))
    prepare_stage(load_config(DEMO, _tiny(tmp_path, **{"resources.prepare_actors": 0})), force=True)
    np.testing.assert_array_equal(np.load(store.cache_dir / "images.npy"), images)
    np.testing.assert_array_equal(np.load(store.cache_dir / "masks.npy"), masks)
    pd.testing.assert_frame_equal(read_index(store.cache_dir), index)


def test_a_changed_preprocess_section_rebuilds(tmp_path):
    store = prepare_stage(load_config(DEMO, _tiny(tmp_path, **{"resources.prepare_actors": 0})))
    prepare_stage(load_config(DEMO, _tiny(tmp_path, **{"resources.prepare_actors": 0,
                                                       "preprocess.image_size": 16})))
    assert load_split(store.cache_dir, "val").images.shape[-1] == 16


def test_over_asking_the_synthetic_data_fails_before_any_output(tmp_path):
    """Refused when the config is loaded (the split is planned from the synthetic settings), so no
    stage starts and the study folder is never made."""
    with pytest.raises(ConfigError, match="100 positive images requested, but the data has 12"):
        load_config(DEMO, _tiny(tmp_path, **{"split.n_positive": 100, "resources.prepare_actors": 0}))
    assert not any(tmp_path.rglob("data"))


def test_source_kind_must_match_the_layout_found(tmp_path):
    synthetic = prepare_stage(load_config(DEMO, _tiny(tmp_path / "a", **{"resources.prepare_actors": 0})))
    config = load_config(DEMO, _tiny(tmp_path / "b", **{"data.source": "siim-png",
                                                        "data.root": str(synthetic.source_dir)}))
    with pytest.raises(ConfigError, match="data.source is 'siim-png' but .* holds the dicom layout"):
        prepare_stage(config)


@pytest.mark.slow
def test_a_corrupt_dicom_under_ray_data_is_one_line_and_its_trace_is_in_the_study_log(tmp_path):
    """Through the real CLI: no Ray traceback on the console, the full one in <study>/camstudy.log."""
    import subprocess
    import sys

    from training.synth import generate

    source = tmp_path / "siim"
    generate(source, n=24, size=64, seed=0)
    broken = sorted(source.rglob("*.dcm"))[3]
    broken.write_bytes(broken.read_bytes()[:len(broken.read_bytes()) // 2])  # truncated at half
    overrides = {**_tiny(tmp_path / "store"), "data.source": "siim-dicom", "data.root": str(source)}
    command = [sys.executable, "-m", "orchestrator", "prepare", str(DEMO)]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"camstudy: error: {broken}: DICOM file has no pixel data (truncated, or not an image); "
                      "re-download it, or remove it if it is not an image"], done.stderr
    assert "Traceback" not in done.stderr + done.stdout and done.stderr.rstrip().endswith("not an image")
    log = (tmp_path / "store" / "demo" / "camstudy.log").read_text()
    assert "Traceback" in log and str(broken) in log
