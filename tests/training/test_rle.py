"""SIIM RLE: the worked example, round trips, malformed input, and the real stage-2 labels."""

import numpy as np
import pandas as pd
import pytest

from training import rle

# docs/DATA_FORMATS.md: 4 rows x 5 columns, runs start at column-major flat indices 1, 8 and 12.
EXAMPLE_MASK = np.array([[0, 0, 1, 1, 0],
                         [1, 0, 0, 1, 0],
                         [1, 0, 0, 0, 0],
                         [0, 0, 0, 0, 0]], dtype=bool)
EXAMPLE_RLE = "1 2 5 1 3 2"


def test_worked_example_encodes():
    assert rle.encode(EXAMPLE_MASK) == EXAMPLE_RLE


def test_worked_example_decodes():
    np.testing.assert_array_equal(rle.decode(EXAMPLE_RLE, 4, 5), EXAMPLE_MASK)


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (16, 16), (33, 50)])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.95])
def test_random_masks_round_trip(shape, density):
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    for _ in range(20):
        mask = rng.random(shape) < density
        np.testing.assert_array_equal(rle.decode(rle.encode(mask), *shape), mask)


def test_encode_accepts_0_255_masks():
    assert rle.encode(EXAMPLE_MASK.astype(np.uint8) * 255) == EXAMPLE_RLE


def test_empty_mask_is_minus_one():
    assert rle.encode(np.zeros((4, 5), np.uint8)) == rle.EMPTY
    assert not rle.decode(rle.EMPTY, 4, 5).any()
    assert rle.is_empty(" -1 ") and not rle.is_empty(EXAMPLE_RLE)


def test_full_mask_is_one_run_to_the_last_pixel():
    assert rle.encode(np.ones((4, 5), bool)) == "0 20"
    assert rle.decode("0 20", 4, 5).all()


def test_whitespace_is_tolerated():
    np.testing.assert_array_equal(rle.decode(" 1 2  5 1\t3 2\n", 4, 5), EXAMPLE_MASK)
    assert not rle.decode(" -1", 4, 5).any()


@pytest.mark.parametrize("text, problem", [
    ("1 2 5", "odd number"),
    ("-3 2", "negative"),
    ("1 0", "must be positive"),
    ("1 2 15 4", "beyond"),
    ("1 2 x 1", "not an integer"),
    ("1.5 2", "not an integer"),
    ("", "empty"),
    ("   ", "empty"),
])
def test_malformed_rle_raises_value_error_naming_the_problem(text, problem):
    with pytest.raises(ValueError, match=problem):
        rle.decode(text, 4, 5)


def test_encode_refuses_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(np.zeros((2, 2, 2)))


# --- the real stage-2 label file -------------------------------------------------------------

SIIM_SIZE = 1024


@pytest.fixture(scope="module")
def real_rows(stage2_labels):
    rows = pd.read_csv(stage2_labels, dtype=str, keep_default_na=False)
    rows.columns = rows.columns.str.strip()
    return rows.apply(lambda column: column.str.strip())


@pytest.fixture(scope="module")
def decoded_regions(real_rows):
    """Per positive row: re-encoding identical?, centroid row; per image: do its regions overlap?"""
    identical, centroid_rows, painted_of_image = [], [], {}
    positives = real_rows[real_rows["EncodedPixels"] != rle.EMPTY]
    several = set(positives.loc[positives["ImageId"].duplicated(), "ImageId"])
    for image_id, text in zip(positives["ImageId"], positives["EncodedPixels"]):
        mask = rle.decode(text, SIIM_SIZE, SIIM_SIZE)
        identical.append(rle.encode(mask) == text)
        centroid_rows.append(np.average(np.arange(SIIM_SIZE), weights=mask.sum(axis=1)))
        if image_id in several:
            painted_of_image.setdefault(image_id, np.zeros(mask.shape, np.uint8))
            painted_of_image[image_id] += mask
    overlapping = {image_id for image_id, painted in painted_of_image.items() if painted.max() > 1}
    return np.array(identical), np.array(centroid_rows), overlapping


def test_real_label_counts(real_rows):
    positive = real_rows["EncodedPixels"] != rle.EMPTY
    assert len(real_rows) == 12_954
    assert real_rows["ImageId"].nunique() == 12_047
    assert real_rows.loc[positive, "ImageId"].nunique() == 2_669
    assert positive.sum() == 3_576


@pytest.mark.slow
def test_every_real_row_round_trips(decoded_regions):
    identical, _, _ = decoded_regions
    assert identical.size == 3_576 and identical.all()


@pytest.mark.slow
def test_real_overlapping_regions(decoded_regions):
    _, _, overlapping = decoded_regions
    assert len(overlapping) == 183


@pytest.mark.slow
def test_real_regions_are_mostly_apical_proving_the_transpose(decoded_regions):
    # without the column-major transpose the masks mirror across the diagonal and this drops to ~50%
    _, centroid_rows, _ = decoded_regions
    assert (centroid_rows < SIIM_SIZE / 2).mean() > 0.7
