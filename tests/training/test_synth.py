"""Synthetic SIIM data: stage-1 layout, determinism, counts, lesion realism, resume behaviour."""

import re

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest

from training import rle
from training.dicom import read_image
from study.errors import CamstudyError
from training.synth import DICOM_DIR, LABEL_FILE, PARAMS_FILE, generate, render

SMALL = dict(n=16, size=64, seed=3, unlabelled=3, orphans=2)
UID = re.compile(r"^1\.2\.276\.0\.7230010\.3\.1\.[234]\.8323329\.\d+\.\d{10}\.\d+$")
ROW = re.compile(r"^[0-9.]+, (-1|\d+( \d+)*)$")
LESION_SIZE = 128  # px for lesion statistics: big enough for small lesions, fast to draw


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, generate(out, **SMALL)


@pytest.fixture(scope="module")
def positives():
    """Positive phantoms (with their negative twins' pixels) of one seed, for lesion statistics."""
    return [(render(LESION_SIZE, 0, i, positive=True), render(LESION_SIZE, 0, i, positive=False).pixels)
            for i in range(80)]


def dicom_paths(out):
    return sorted((out / DICOM_DIR).rglob("*.dcm"))


def label_rows(out):
    return pd.read_csv(out / LABEL_FILE)  # pandas defaults, as public loaders read it


# --- layout and counts -----------------------------------------------------------------------


def test_layout_is_stage1_with_realistic_distinct_uids(dataset):
    out, _ = dataset
    uids = set()
    for path in dicom_paths(out):
        study, series = path.parent.parent.name, path.parent.name
        assert path.parent.parent.parent == out / DICOM_DIR
        header = pydicom.dcmread(path, stop_before_pixels=True)
        assert (header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID) == \
            (study, series, path.stem)
        assert all(UID.match(uid) and len(uid) <= 64 for uid in (study, series, path.stem))
        assert len({study, series, path.stem} | uids) == len(uids) + 3  # distinct, also across images
        uids |= {study, series, path.stem}


def test_label_csv_has_stage1_header_and_leading_spaces(dataset):
    out, _ = dataset
    lines = (out / LABEL_FILE).read_text().splitlines()
    assert lines[0] == "ImageId, EncodedPixels"
    assert all(ROW.match(line) for line in lines[1:]), [line[:80] for line in lines if not ROW.match(line)]
    rows = label_rows(out)
    assert list(rows.columns) == ["ImageId", " EncodedPixels"]
    assert (rows[" EncodedPixels"] == " -1").any()


def test_counts_match_the_summary_and_the_files(dataset):
    out, summary = dataset
    rows = label_rows(out)
    stems = {path.stem for path in dicom_paths(out)}
    labelled = set(rows["ImageId"])
    negatives = set(rows.loc[rows[" EncodedPixels"].map(rle.is_empty), "ImageId"])
    assert (summary.positives + summary.negatives, summary.unlabelled, summary.orphans) == (16, 3, 2)
    assert summary.positives == round(16 * 0.5)
    assert len(stems) == 16 + 3 and len(stems - labelled) == 3 and len(labelled - stems) == 2
    assert len(negatives & stems) == summary.negatives
    per_image = rows.groupby("ImageId").size()
    assert (per_image[list(negatives)] == 1).all()
    assert (per_image > 1).sum() >= summary.multi_region  # orphans may be multi-region too
    assert str(summary).startswith("synthetic SIIM data written in")


def test_headers_vary_like_siim(dataset):
    out, _ = dataset
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in dicom_paths(out)]
    assert {h.PatientSex for h in headers} == {"M", "F"}
    assert {h.ViewPosition for h in headers} == {"PA", "AP"}
    assert len({h.PatientID for h in headers}) == len(headers)
    assert all(str(h.PatientAge).isdigit() for h in headers) and len({h.PatientAge for h in headers}) > 3
    spacing = [float(h.PixelSpacing[0]) * SMALL["size"] / 1024 for h in headers]  # as at 1024 px
    assert 0.135 <= min(spacing) < max(spacing) <= 0.175


# --- determinism ------------------------------------------------------------------------------


def test_same_seed_gives_identical_files_and_another_seed_differs(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    generate(again, **SMALL)
    assert (again / LABEL_FILE).read_bytes() == (out / LABEL_FILE).read_bytes()
    first, second = dicom_paths(out), dicom_paths(again)
    assert [p.relative_to(out) for p in first] == [p.relative_to(again) for p in second]
    assert all(np.array_equal(read_image(a), read_image(b)) for a, b in zip(first, second))
    other = tmp_path / "other"
    generate(other, **{**SMALL, "seed": 4})
    assert (other / LABEL_FILE).read_bytes() != (out / LABEL_FILE).read_bytes()
    assert not np.array_equal(read_image(dicom_paths(other)[0]), read_image(first[0]))


def test_an_image_does_not_depend_on_generation_order():
    first = render(64, 7, 5, positive=True).pixels
    render(64, 7, 4, positive=False)
    assert np.array_equal(render(64, 7, 5, positive=True).pixels, first)
    assert not np.array_equal(render(64, 7, 6, positive=True).pixels, first)


# --- lesions ---------------------------------------------------------------------------------


def test_masks_lie_in_the_lungs_along_the_pleura(positives):
    kernel = np.ones((3, 3), np.uint8)
    for phantom, _ in positives:
        lungs = phantom.lungs.astype(np.uint8)
        assert not (phantom.mask & ~phantom.lungs).any()
        rim = cv2.dilate(lungs - cv2.erode(lungs, kernel), kernel).astype(bool)
        assert all((region & rim).any() for region in phantom.regions)  # each touches the pleura
        depth = cv2.distanceTransform(lungs, cv2.DIST_L2, 3)
        assert np.median(depth[phantom.mask]) < np.median(depth[phantom.lungs])
    centroids = [np.nonzero(region)[0].mean() / LESION_SIZE for p, _ in positives for region in p.regions]
    assert np.mean(np.array(centroids) < 0.5) > 0.65  # apical, as ~78% of the real ones


def test_mask_fractions_spread_like_the_real_ones(positives):
    fractions = np.array([phantom.mask.mean() for phantom, _ in positives])
    assert fractions.min() < 0.005 and fractions.max() > 0.03
    assert 0.003 < np.median(fractions) < 0.02  # real median 0.8%


def test_some_positives_have_several_and_overlapping_regions(positives):
    counts = [len(phantom.regions) for phantom, _ in positives]
    assert set(counts) == {1, 2, 3} and counts.count(1) > len(counts) / 2
    overlapping = [p for p, _ in positives if sum(r.sum() for r in p.regions) > p.mask.sum()]
    assert 0 < len(overlapping) < counts.count(2) + counts.count(3)
    for phantom in overlapping:  # the union is the mask, as the OR of the CSV rows
        assert np.array_equal(phantom.mask, np.logical_or.reduce(phantom.regions))


def test_lesions_darken_the_mask_region_but_not_the_whole_image(positives):
    darkening = np.array([twin[phantom.mask].mean() - phantom.pixels[phantom.mask].astype(float).mean()
                          for phantom, twin in positives])
    assert (darkening > 0).all() and 5 < darkening.mean() < 40  # grey levels
    outside = [np.abs(twin[~p.mask].astype(int) - p.pixels[~p.mask]).mean() for p, twin in positives]
    assert np.mean(outside) < 1.0  # only the lesion and its pleural line change
    # across patients the image brightness says nothing about the label
    brightness = [render(LESION_SIZE, 1, i, positive=i % 2 == 0).pixels.mean() for i in range(40)]
    assert abs(np.mean(brightness[0::2]) - np.mean(brightness[1::2])) < np.std(brightness)


def test_contrast_zero_leaves_no_lesion_signal():
    for index in range(6):
        phantom = render(96, 2, index, positive=True, contrast=0.0)
        assert phantom.regions and np.array_equal(phantom.pixels, render(96, 2, index, False, 0.0).pixels)


def test_contrast_scales_the_signal():
    twin = render(96, 2, 0, positive=False).pixels.astype(float)

    def darkening(contrast):
        phantom = render(96, 2, 0, positive=True, contrast=contrast)
        return twin[phantom.mask].mean() - phantom.pixels[phantom.mask].mean()
    assert darkening(0.25) < darkening(0.5) < darkening(1.0)


# --- resume and validation --------------------------------------------------------------------


def test_rerun_on_a_complete_folder_rewrites_nothing(dataset):
    out, summary = dataset
    before = {path: path.stat().st_mtime_ns for path in [out / LABEL_FILE, *dicom_paths(out)]}
    again = generate(out, **SMALL)
    assert again.reused and (again.positives, again.overlapping) == (summary.positives, summary.overlapping)
    assert {path: path.stat().st_mtime_ns for path in before} == before
    assert "already complete" in str(again)


def test_interrupted_or_changed_runs_are_redone(tmp_path):
    out = tmp_path / "data"
    generate(out, **SMALL)
    (out / LABEL_FILE).unlink()  # as if killed before the CSV was written
    assert not generate(out, **SMALL).reused and (out / LABEL_FILE).is_file()
    stale = dicom_paths(out)[0]
    changed = generate(out, **{**SMALL, "n": 8, "orphans": 0})
    assert not changed.reused and not stale.exists() and len(dicom_paths(out)) == 8 + 3


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    (tmp_path / DICOM_DIR).mkdir()
    with pytest.raises(CamstudyError, match=PARAMS_FILE):
        generate(tmp_path, **SMALL)
    assert (tmp_path / DICOM_DIR).is_dir()


@pytest.mark.parametrize("name, value", [("n", 0), ("size", 16), ("seed", -1), ("seed", 1.5),
                                         ("positive_fraction", 1.2), ("contrast", -0.1),
                                         ("unlabelled", -1), ("orphans", True)])
def test_bad_parameters_name_the_parameter(tmp_path, name, value):
    with pytest.raises(CamstudyError, match=name):
        generate(tmp_path, **{**SMALL, name: value})
    assert not any(tmp_path.iterdir())


def test_cli_writes_a_dataset(tmp_path, capsys):
    from orchestrator.cli import main

    assert main(["synth", "--out", str(tmp_path), "--n", "4", "--size", "64", "--contrast", "0.6"]) == 0
    assert "2 positive" in capsys.readouterr().out and (tmp_path / LABEL_FILE).is_file()


def test_the_generator_and_the_cli_take_their_defaults_from_the_config():
    import dataclasses
    import inspect

    from orchestrator.cli import _parser
    from study.config import SyntheticData

    default = SyntheticData()
    parameters = inspect.signature(generate).parameters
    for field in dataclasses.fields(SyntheticData):  # prepare calls generate(**asdict(data.synthetic))
        assert parameters[field.name].default == getattr(default, field.name), field.name
    args = _parser().parse_args(["synth", "--out", "x"])
    for key in ("n", "size", "seed", "contrast", "positive_fraction", "lesion_scale"):
        assert getattr(args, key) == getattr(default, key), key


# --- the real reader ---------------------------------------------------------------------------


def test_reads_back_with_load_siim(dataset):
    data = pytest.importorskip("training.data", reason="training.data.load_siim not written yet")
    if not hasattr(data, "load_siim"):
        pytest.skip("training.data.load_siim not written yet")
    out, summary = dataset
    index = data.load_siim(out)
    images = index.images
    assert (images["label"].sum(), (images["label"] == 0).sum()) == (summary.positives, summary.negatives)
    assert (len(index.unlabelled), len(index.orphans)) == (summary.unlabelled, summary.orphans)
    rows = label_rows(out)
    for image in images.itertuples():
        parts = [rle.decode(text, image.height, image.width)
                 for text in rows.loc[rows["ImageId"] == image.image_id, " EncodedPixels"]]
        union = np.logical_or.reduce(parts)
        assert np.array_equal(rle.decode(image.mask_rle, image.height, image.width), union)


def test_lesion_scale_enlarges_lesions_and_defaults_to_the_real_distribution():
    def median_fraction(scale):
        return np.median([render(LESION_SIZE, 3, i, positive=True, lesion_scale=scale).mask.mean()
                          for i in range(12)])

    real, enlarged = median_fraction(1.0), median_fraction(8.0)
    assert 4 < enlarged / real < 12
    assert np.array_equal(render(64, 3, 1, positive=True).pixels,
                          render(64, 3, 1, positive=True, lesion_scale=1.0).pixels)
    with pytest.raises(CamstudyError, match="lesion_scale"):
        generate("/nonexistent-camstudy-test", n=10, size=64, lesion_scale=0)
