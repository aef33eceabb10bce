"""SIIM data layer: label CSV variants, one record per image, layout detection, unmatched files."""

import gzip

import cv2
import numpy as np
import pytest

from training import rle
from training.data import COLUMNS, load_labels, load_siim, read_image
from training.dicom import write_jpeg_dicom
from study.errors import DataError

SIZE = (16, 12)  # height, width: non-square so a transposed mask would not fit
POSITIVE, NEGATIVE, OVERLAPPING = "1.2.3.1", "1.2.3.2", "1.2.3.3"


def region(rows, cols, shape=SIZE):
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


UPPER, LOWER = region(slice(2, 6), slice(3, 5)), region(slice(4, 9), slice(4, 7))  # overlap at rows 4-5, col 4


def write_dicom(root, image_id, folder="dicom-images-train", shape=SIZE):
    path = root / folder / f"{image_id}.9" / f"{image_id}.8" / f"{image_id}.dcm"
    write_jpeg_dicom(path, np.full(shape, 90, np.uint8), sop_uid=image_id, study_uid=f"{image_id}.9",
                     series_uid=f"{image_id}.8", patient_id=image_id)
    return path


def write_labels(path, rows, header="ImageId,EncodedPixels", value_space=""):
    text = "\n".join([header] + [f"{image_id},{value_space}{value}" for image_id, value in rows]) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


LABEL_ROWS = [(POSITIVE, rle.encode(UPPER)), (NEGATIVE, "-1"),
              (OVERLAPPING, rle.encode(UPPER)), (OVERLAPPING, rle.encode(LOWER))]


@pytest.fixture
def stage1(tmp_path):
    """A stage-1 tree: three labelled DICOMs (train and test folders) and train-rle.csv with spaces."""
    for image_id in (POSITIVE, NEGATIVE):
        write_dicom(tmp_path, image_id)
    write_dicom(tmp_path, OVERLAPPING, folder="dicom-images-test")
    write_labels(tmp_path / "train-rle.csv", LABEL_ROWS, header="ImageId, EncodedPixels", value_space=" ")
    return tmp_path


def test_stage1_layout_one_record_per_image(stage1):
    index = load_siim(stage1)
    images = index.images
    assert index.layout == "dicom" and index.unlabelled == [] and index.orphans == []
    assert list(images.columns) == COLUMNS
    assert list(images["image_id"]) == [POSITIVE, NEGATIVE, OVERLAPPING]  # sorted
    assert list(images["label"]) == [1, 0, 1]
    assert list(images["mask_rle"][:2]) == [rle.encode(UPPER), "-1"]
    assert (images["height"] == SIZE[0]).all() and (images["width"] == SIZE[1]).all()
    assert images["path"].iloc[2].endswith(f"dicom-images-test/{OVERLAPPING}.9/{OVERLAPPING}.8/{OVERLAPPING}.dcm")


def test_overlapping_rows_are_ored_not_summed(stage1):
    images = load_siim(stage1).images.set_index("image_id")
    union = rle.decode(images.loc[OVERLAPPING, "mask_rle"], *SIZE)
    np.testing.assert_array_equal(union, UPPER | LOWER)


def test_stage2_file_passed_as_labels(stage1, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("labels") / "stage_2_train.csv.gz"
    write_labels(elsewhere, LABEL_ROWS)
    by_stage2 = load_siim(stage1, labels=elsewhere).images
    assert by_stage2.equals(load_siim(stage1).images)


@pytest.mark.parametrize("header", ["ImageId,EncodedPixels", "ImageId, EncodedPixels"])
@pytest.mark.parametrize("value_space", ["", " "])
def test_every_whitespace_combination_reads_the_same(tmp_path, header, value_space):
    path = write_labels(tmp_path / "labels.csv", LABEL_ROWS, header, value_space)
    labels = load_labels(path, shape=SIZE)
    assert list(labels.columns) == ["image_id", "mask_rle", "label", "rle_rows"]
    assert list(labels["rle_rows"]) == [1, 0, 2]  # the overlapping image has two RLE rows
    assert list(labels["label"]) == [1, 0, 1]
    assert labels["mask_rle"].iloc[1] == "-1"
    assert labels["mask_rle"].iloc[2] == rle.encode(UPPER | LOWER)


def test_unlabelled_and_orphans_are_excluded_and_listed(stage1):
    write_dicom(stage1, "1.2.3.7")  # no label row
    with open(stage1 / "train-rle.csv", "a") as csv:
        csv.write("1.2.3.8, -1\n1.2.3.9, 1 2\n")  # no DICOM
    index = load_siim(stage1)
    assert index.unlabelled == ["1.2.3.7"]
    assert index.orphans == ["1.2.3.8", "1.2.3.9"]
    assert list(index.images["image_id"]) == [POSITIVE, NEGATIVE, OVERLAPPING]


def test_strict_refuses_unmatched_with_counts_and_ids(stage1):
    write_dicom(stage1, "1.2.3.7")
    with open(stage1 / "train-rle.csv", "a") as csv:
        csv.write("1.2.3.8, -1\n")
    with pytest.raises(DataError, match=r"1 images without a label row \(first: 1\.2\.3\.7\); "
                                        r"1 label rows without an image \(first: 1\.2\.3\.8\)"):
        load_siim(stage1, strict=True)
    assert load_siim(stage1, strict=False).unlabelled == ["1.2.3.7"]


def test_image_mixing_negative_and_rle_rows_is_an_error(tmp_path):
    path = write_labels(tmp_path / "labels.csv", [(POSITIVE, "-1"), (POSITIVE, "1 2")])
    with pytest.raises(DataError, match=rf"labels.csv: image {POSITIVE} has both '-1' and RLE rows \(lines 2, 3\)"):
        load_labels(path)


def test_malformed_rle_row_names_the_line_and_image(tmp_path):
    path = write_labels(tmp_path / "labels.csv", [(NEGATIVE, "-1"), (POSITIVE, "1 2 3")])
    with pytest.raises(DataError, match=rf"labels.csv line 3, image {POSITIVE}: .*odd number"):
        load_labels(path)


def test_rle_past_the_dicom_size_is_an_error(stage1):
    write_labels(stage1 / "train-rle.csv", [(POSITIVE, f"0 {SIZE[0] * SIZE[1] + 1}")])
    with pytest.raises(DataError, match=rf"line 2, image {POSITIVE}: .*beyond the 16x12 image"):
        load_siim(stage1)


def test_missing_columns_name_found_and_expected(tmp_path):
    path = write_labels(tmp_path / "labels.csv", [(POSITIVE, "-1")], header="Id,Pixels")
    with pytest.raises(DataError, match=r"columns \['Id', 'Pixels'\] found, \['ImageId', 'EncodedPixels'\] expected"):
        load_labels(path)


def test_duplicate_stems_name_both_paths(stage1):
    copy = write_dicom(stage1, POSITIVE, folder="dicom-images-test")
    with pytest.raises(DataError, match=rf"share the image id {POSITIVE}: .*dicom-images-test.* and .*{copy.name}"):
        load_siim(stage1)


def test_dicoms_without_label_csv_say_how_to_pass_one(tmp_path):
    write_dicom(tmp_path, POSITIVE)
    with pytest.raises(DataError, match="no label CSV .*labels="):
        load_siim(tmp_path)


def test_unknown_layout_says_what_was_looked_for(tmp_path):
    (tmp_path / "stuff.txt").write_text("hello")
    with pytest.raises(DataError, match=r"no SIIM-ACR data found. Looked for \*\.dcm .*png_images/"):
        load_siim(tmp_path)


# --- PNG re-release ------------------------------------------------------------------------------


@pytest.fixture
def png_release(tmp_path):
    (tmp_path / "png_images").mkdir()
    (tmp_path / "png_masks").mkdir()
    listing = {"stage_1_train_images.csv": [("0_train_1_.png", POSITIVE, UPPER | LOWER),
                                            ("1_train_0_.png", NEGATIVE, np.zeros(SIZE, bool))],
               "stage_1_test_images.csv": [("0_test_1_.png", OVERLAPPING, LOWER)]}
    for csv_name, entries in listing.items():
        lines = ["new_filename,ImageId,has_pneumo"]
        for filename, image_id, mask in entries:
            cv2.imwrite(str(tmp_path / "png_images" / filename), np.full(SIZE, 80, np.uint8))
            cv2.imwrite(str(tmp_path / "png_masks" / filename), mask.astype(np.uint8) * 255)
            lines.append(f"{filename},{image_id},{int(mask.any())}")
        (tmp_path / csv_name).write_text("\n".join(lines) + "\n")
    return tmp_path


def test_png_layout(png_release):
    index = load_siim(png_release)
    images = index.images
    assert index.layout == "png" and list(images.columns) == COLUMNS
    assert list(images["image_id"]) == [POSITIVE, NEGATIVE, OVERLAPPING]
    assert list(images["label"]) == [1, 0, 1]
    assert list(images["mask_rle"]) == [rle.encode(UPPER | LOWER), "-1", rle.encode(LOWER)]
    assert images["path"].iloc[0].endswith("png_images/0_train_1_.png")
    assert (images["height"] == SIZE[0]).all() and (images["width"] == SIZE[1]).all()


def test_png_unlisted_and_missing_images(png_release):
    cv2.imwrite(str(png_release / "png_images" / "9_train_0_.png"), np.zeros(SIZE, np.uint8))
    (png_release / "png_images" / "0_test_1_.png").unlink()
    index = load_siim(png_release)
    assert index.unlabelled == ["9_train_0_"]  # no ImageId known: the file stem
    assert index.orphans == [OVERLAPPING]


def test_png_label_disagreeing_with_mask_is_an_error(png_release):
    csv = png_release / "stage_1_train_images.csv"
    csv.write_text(csv.read_text().replace(f"{NEGATIVE},0", f"{NEGATIVE},1"))
    with pytest.raises(DataError, match="line 3: has_pneumo=1 but the mask .*1_train_0_.png is empty"):
        load_siim(png_release)


# --- read_image dispatch and the real labels ----------------------------------------------------


def test_read_image_dispatches_by_suffix(tmp_path, png_release):
    dicom_path = write_dicom(tmp_path / "d", POSITIVE)
    assert read_image(dicom_path).shape == SIZE
    png = read_image(png_release / "png_images" / "0_train_1_.png")
    assert png.shape == SIZE and png.dtype == np.uint8 and (png == 80).all()
    with pytest.raises(DataError, match=r"unsupported image type '\.jpg'"):
        read_image(tmp_path / "x.jpg")


def test_read_image_colour_png_becomes_grey(tmp_path):
    cv2.imwrite(str(tmp_path / "c.png"), np.full((*SIZE, 3), 70, np.uint8))
    assert read_image(tmp_path / "c.png").shape == SIZE


def test_real_stage2_labels_one_row_per_image(stage2_labels):
    labels = load_labels(stage2_labels)
    assert len(labels) == 12_047 and labels["image_id"].is_unique
    assert labels["label"].sum() == 2_669


def test_blank_lines_do_not_shift_the_quoted_line(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text(f"ImageId,EncodedPixels\n{NEGATIVE},-1\n\n{POSITIVE},1 2 3\n\n")
    with pytest.raises(DataError, match=rf"labels.csv line 4, image {POSITIVE}"):
        load_labels(path)


def test_header_only_csv_gives_no_labels(tmp_path):
    path = write_labels(tmp_path / "labels.csv", [])
    assert load_labels(path).empty


def test_png_image_listed_twice_is_an_error(png_release):
    with open(png_release / "stage_1_test_images.csv", "a") as csv:
        csv.write(f"1_train_0_.png,{NEGATIVE},0\n")
    with pytest.raises(DataError, match=rf"image {NEGATIVE} is listed twice .*train_images.csv line 3 "
                                        r"and .*test_images.csv line 3"):
        load_siim(png_release)
