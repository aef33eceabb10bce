"""DICOM in and out: SIIM-style JPEG Baseline files for tests and synthetic data, a general reader.

The SIIM files are 8-bit MONOCHROME2 Secondary Capture images stored as JPEG Baseline with no
rescale or window tags; other sources may be MONOCHROME1, 12/16-bit, or carry LUTs, so the reader
applies whatever the header asks for.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from study.atomic import write_atomic
from study.errors import DataError

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
JPEG_QUALITY = 95

# What a truncated or garbled file raises inside pydicom and its JPEG plugins (AttributeError:
# an element the decoder needs is missing, e.g. PlanarConfiguration).
_READ_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, RuntimeError, KeyError, TypeError,
                AttributeError, IndexError, OverflowError)
GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
MAX_SIDE = 16_384  # pixels per side; SIIM images are 1024


@dataclass(frozen=True)
class DicomHeader:
    sop_uid: str
    rows: int
    columns: int


def write_jpeg_dicom(path: str | Path, pixels: np.ndarray, *, sop_uid: str, study_uid: str,
                     series_uid: str, patient_id: str, patient_sex: str = "M",
                     patient_age: str = "38", view_position: str = "PA",
                     pixel_spacing: float = 0.168,
                     content_date: str | dt.date | None = None) -> None:
    """Write `pixels` (H, W) uint8 as a DICOM file shaped like the SIIM-ACR ones.

    Parent folders are created; the file appears atomically.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"write_jpeg_dicom takes a 2-D uint8 image; got {pixels.dtype} {pixels.shape}")
    ds = _siim_dataset(pixels, sop_uid, study_uid, series_uid)
    ds.PatientID = patient_id
    ds.PatientSex = patient_sex
    ds.ViewPosition = view_position
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    if content_date is not None:
        ds.ContentDate = content_date.strftime("%Y%m%d") if isinstance(content_date, dt.date) else content_date
    # SIIM stores a bare number ('38'), which the AS VR forbids; pydicom 3 warns or raises.
    with pydicom.config.disable_value_validation():
        ds.PatientAge = patient_age
        write_atomic(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))


def _siim_dataset(pixels: np.ndarray, sop_uid: str, study_uid: str, series_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEG_BASELINE
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate([_jpeg_bytes(pixels)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True  # encapsulated data must be written undefined-length
    return ds


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def read_header(path: str | Path) -> DicomHeader:
    """SOPInstanceUID and size of a DICOM file, without reading the pixel data."""
    wanted = ["SOPInstanceUID", "Rows", "Columns"]
    ds = _dcmread(path, stop_before_pixels=True, specific_tags=wanted)
    missing = [tag for tag in wanted if tag not in ds]
    if missing:
        raise DataError(f"{path}: DICOM header lacks {', '.join(missing)}; "
                        "re-export the file with a complete image header or remove it")
    rows, columns = ds.Rows, ds.Columns
    if not all(isinstance(side, int) and 1 <= side <= MAX_SIDE for side in (rows, columns)):
        raise DataError(f"{path}: DICOM header gives a {rows!r} x {columns!r} image; expected 1 to "
                        f"{MAX_SIDE} rows and columns: the header is damaged, re-export or remove the file")
    return DicomHeader(str(ds.SOPInstanceUID), rows, columns)


def read_image(path: str | Path) -> np.ndarray:
    """Decoded pixels (H, W) in display orientation: bright = dense.

    The header's modality LUT / rescale, then its first VOI LUT / window, are applied, and
    MONOCHROME1 is inverted. Rule for the output type: if none of these changed a value, the
    stored pixels come back as they are (uint8 for 8-bit, uint16 for 9-16-bit unsigned);
    otherwise (or for signed pixels) the result is min-max stretched to the full uint16 range
    0..65535 (a constant image becomes all zeros).
    """
    ds = _dcmread(path)
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data (truncated, or not an image); "
                        "re-download it, or remove it if it is not an image")
    _check_greyscale(ds, path)
    stored = _decode(ds, path)
    display = _apply_luts(stored, ds)
    if display is stored and stored.dtype.kind == "u":
        return stored if stored.dtype == np.uint8 else stored.astype(np.uint16)
    return _stretch_to_uint16(display)


def _dcmread(path: str | Path, **kwargs) -> Dataset:
    try:
        return pydicom.dcmread(path, **kwargs)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the data root or rescan the folder") from None
    except _READ_ERRORS as error:
        raise DataError(f"{path}: not a readable DICOM file ({error}); "
                        "re-download or replace it, or remove it from the data folder") from None


def _check_greyscale(ds: Dataset, path: str | Path) -> None:
    """Only what the study can use: one greyscale frame, so an RGB, palette or multi-frame file is
    named before a decoder fails on it with a message about a missing element."""
    photometric = str(ds.get("PhotometricInterpretation", "(none)")).strip()
    samples, frames = ds.get("SamplesPerPixel", 1), ds.get("NumberOfFrames", 1)
    if photometric not in GREYSCALE or samples != 1:
        raise DataError(f"{path}: a {photometric} DICOM with {samples} sample(s) per pixel; camstudy reads "
                        "greyscale X-rays (MONOCHROME1 or MONOCHROME2, 1 sample per pixel): convert it to "
                        "greyscale or remove it")
    if str(frames).strip() not in ("1", ""):
        raise DataError(f"{path}: a DICOM with {frames} frames; camstudy reads single-frame X-rays: "
                        "export the frame you want or remove the file")


def _decode(ds: Dataset, path: str | Path) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except _READ_ERRORS as error:
        raise DataError(f"{path}: pixel data cannot be decoded ({error}); the file is corrupt or "
                        "needs a decoder plugin (pylibjpeg-libjpeg, python-gdcm); re-download it") from None
    if pixels.ndim != 2:
        raise DataError(f"{path}: expected one greyscale frame, got pixel array of shape "
                        f"{pixels.shape}; convert the file to a single-frame greyscale image")
    return pixels


def _apply_luts(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> display values; returns `stored` itself when nothing changed."""
    values = apply_modality_lut(stored, ds)
    values = apply_voi_lut(values, ds, index=0)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        values = -values.astype(np.float64)  # only the order matters: the stretch fixes the range
    elif np.array_equal(values, stored):
        return stored
    return values


def _stretch_to_uint16(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    low, high = values.min(), values.max()
    if high == low:
        return np.zeros(values.shape, dtype=np.uint16)
    return np.round((values - low) * (65535.0 / (high - low))).astype(np.uint16)
