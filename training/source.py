"""A real data source checked before any command creates the study (the config loader's
`checks`): it reads a directory listing and the label CSV, never an image."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from study.config import DataConfig, StudyConfig
from study.errors import CamstudyError, ConfigError

# data.source -> the training.data layout it names
LAYOUT_OF_SOURCE = {"siim-dicom": "dicom", "siim-png": "png"}


def check_data_source(config: StudyConfig) -> None:
    """A real data source that cannot be read is refused: data.root missing or not a folder, no
    SIIM layout below it (training.data's own detection), the other layout than data.source
    names, no label file, or a split larger than the label file's images. Reads a directory
    listing and the label CSV, never an image: what only the images can settle (a DICOM without
    a label row, duplicates, the exact positive/negative split) stays with prepare, which
    reports it in one line too."""
    data = config.data
    if data.source == "synthetic":
        return
    from training import (
        data as siim,  # cv2 and pydicom: imported only for a real source
    )

    root = Path(data.root)
    wanted = siim.LAYOUTS[LAYOUT_OF_SOURCE[data.source]]
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise ConfigError(f"data.root: {root} {what}; set data.root to the folder of your SIIM download, the one "
                          f"with {wanted.looks_for}")
    with _as_data_root_error():
        layout = siim._detect_layout(root)
    if layout is not wanted:
        other = next(source for source, name in LAYOUT_OF_SOURCE.items() if name == layout.name)
        raise ConfigError(f"data.source: {data.source!r}, but {root} holds the {layout.name} layout; set data.source: "
                          f"{other!r}, or point data.root at {wanted.looks_for}")
    positive, total, label_file = _label_counts(data, root, siim)
    split = config.split
    held_out = split.n_val + split.n_test
    if held_out >= total:
        raise ConfigError(f"split.n_val + split.n_test = {split.n_val} + {split.n_test} = {held_out}, "
                          f"but {label_file} labels {total} images ({positive} positive), leaving none to train on; "
                          "lower split.n_val and split.n_test")
    if split.balance == "exact" and isinstance(split.n_positive, int) and split.n_positive > positive:
        raise ConfigError(f"split.n_positive: {split.n_positive} positive images requested, but {label_file} labels "
                          f"{positive} positive images; lower split.n_positive (at most {positive}, or 'all') or set "
                          "split.balance: max-available to use what exists")


def _label_counts(data: DataConfig, root: Path, siim: Any) -> tuple[int, int, str]:
    """(positive, all) images the label file lists, and the file: an upper bound on what prepare
    can select (it keeps only the listed images that are on disk)."""
    from training import rle

    if data.source == "siim-png":
        if data.labels is not None:
            raise ConfigError(f"data.labels: the PNG layout takes its labels from png_masks/ and "
                              f"{' / '.join(siim.PNG_LISTS)}; remove data.labels")
        with _as_data_root_error():
            listing = siim._read_png_listing(root)
        return int((listing["has_pneumo"] == "1").sum()), len(listing), f"the image lists of {root}"
    if data.labels is not None:
        label_file = Path(data.labels)
        if not label_file.is_file():
            raise ConfigError(f"data.labels: {label_file} is not a file; set data.labels to the label CSV "
                              f"(train-rle.csv or stage_2_train.csv), or remove it to use {root / siim.STAGE1_LABELS}")
    else:
        try:
            label_file = siim._stage1_label_file(root)
        except CamstudyError:
            raise ConfigError(f"data.root: {root} holds DICOMs but no {siim.STAGE1_LABELS}; put it there, or set "
                              "data.labels to the label CSV (train-rle.csv or stage_2_train.csv)") from None
    rows = siim._read_label_rows(label_file)
    positive = rows.loc[rows["rle"] != rle.EMPTY, "image_id"].nunique()
    return int(positive), int(rows["image_id"].nunique()), str(label_file)


@contextlib.contextmanager
def _as_data_root_error():
    """What training.data says of the data root, as the config error of `data.root`."""
    try:
        yield
    except CamstudyError as error:
        raise ConfigError(f"data.root: {error}") from None
