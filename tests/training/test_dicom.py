"""DICOM writer and reader: SIIM-style JPEG files, and the LUT/photometric cases of other sources."""

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import generate_uid

from training import dicom
from study.errors import DataError


def gradient(height=64, width=48):
    """Smooth content: JPEG at quality 95 keeps it within a grey level or two."""
    rows, cols = np.mgrid[0:height, 0:width]
    return (40 + 150 * rows / height + 60 * cols / width).astype(np.uint8)


def write_siim(path, pixels):
    dicom.write_jpeg_dicom(path, pixels, sop_uid="1.2.3.4", study_uid="1.2.3.1", series_uid="1.2.3.2",
                           patient_id="patient-1", content_date="20190101")


def write_raw(path, stored, photometric="MONOCHROME2", bits_stored=None, **tags):
    """An uncompressed DICOM (Explicit VR Little Endian) with extra header tags."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = dicom.SECONDARY_CAPTURE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.set_pixel_data(stored, photometric, bits_stored or stored.dtype.itemsize * 8)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_written_file_looks_like_siim(tmp_path):
    path = tmp_path / "study" / "series" / "1.2.3.4.dcm"  # parents created
    write_siim(path, gradient())
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == dicom.JPEG_BASELINE
    assert ds["PixelData"].VR == "OB"
    assert (ds.Modality, ds.PhotometricInterpretation, ds.BitsStored) == ("CR", "MONOCHROME2", 8)
    assert ds.SOPClassUID == dicom.SECONDARY_CAPTURE
    assert str(ds.PatientAge) == "38" and ds.ViewPosition == "PA" and ds.ContentDate == "20190101"


def test_jpeg_round_trip_within_two_grey_levels(tmp_path):
    pixels = gradient()
    write_siim(tmp_path / "a.dcm", pixels)
    decoded = dicom.read_image(tmp_path / "a.dcm")
    assert decoded.dtype == np.uint8 and decoded.shape == pixels.shape
    assert np.abs(decoded.astype(int) - pixels).max() <= 2


def test_read_header(tmp_path):
    write_siim(tmp_path / "a.dcm", gradient(64, 48))
    assert dicom.read_header(tmp_path / "a.dcm") == dicom.DicomHeader("1.2.3.4", 64, 48)


def test_write_refuses_non_uint8(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_siim(tmp_path / "a.dcm", gradient().astype(np.uint16))


STORED_12BIT = np.array([[0, 1000], [2000, 4095]], np.uint16)


def test_unmodified_16bit_is_returned_as_stored(tmp_path):
    decoded = dicom.read_image(write_raw(tmp_path / "a.dcm", STORED_12BIT, bits_stored=12))
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, STORED_12BIT)


def test_unmodified_8bit_raw_is_returned_as_stored(tmp_path):
    stored = np.array([[0, 10], [20, 255]], np.uint8)
    decoded = dicom.read_image(write_raw(tmp_path / "a.dcm", stored))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, stored)


def test_monochrome1_is_inverted(tmp_path):
    decoded = dicom.read_image(write_raw(tmp_path / "a.dcm", STORED_12BIT, "MONOCHROME1", 12))
    assert decoded.dtype == np.uint16
    assert decoded[0, 0] == 65535 and decoded[1, 1] == 0
    assert decoded[0, 1] > decoded[1, 0]  # order reversed


def test_rescale_slope_intercept_applied_then_stretched(tmp_path):
    path = write_raw(tmp_path / "a.dcm", STORED_12BIT, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024)
    decoded = dicom.read_image(path)
    values = STORED_12BIT * 2.0 - 1024  # stretch of a linear map is the stretch of the stored values
    expected = np.round((values - values.min()) / np.ptp(values) * 65535)
    np.testing.assert_array_equal(decoded, expected)


def test_voi_window_applied(tmp_path):
    # window 500..1500: 0 clips to black, 1000 sits mid-grey, 2000 and 4095 clip to white
    path = write_raw(tmp_path / "a.dcm", STORED_12BIT, bits_stored=12, WindowCenter=1000, WindowWidth=1000)
    decoded = dicom.read_image(path)
    assert decoded[0, 0] == 0 and decoded[1, 0] == decoded[1, 1] == 65535
    assert abs(int(decoded[0, 1]) - 32768) < 200


def test_non_dicom_file_error_names_the_path(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("not a dicom file")
    for read in (dicom.read_image, dicom.read_header):
        with pytest.raises(DataError, match=str(path)):
            read(path)


def test_corrupt_file_error_names_the_path(tmp_path):
    path = tmp_path / "a.dcm"
    write_siim(path, gradient())
    path.write_bytes(path.read_bytes()[:-400])  # truncated inside the pixel data
    with pytest.warns(UserWarning, match="End of file"), pytest.raises(DataError, match=f"{path}.*re-download"):
        dicom.read_image(path)


def test_missing_file_error_names_the_path(tmp_path):
    with pytest.raises(DataError, match="missing.dcm.*not found"):
        dicom.read_image(tmp_path / "missing.dcm")


def test_garbled_jpeg_stream_error_names_the_path(tmp_path):
    path = tmp_path / "a.dcm"
    write_siim(path, gradient())
    data = path.read_bytes()
    start = data.index(b"\xff\xd8\xff")  # JPEG start-of-image marker inside PixelData
    path.write_bytes(data[:start] + bytes(40) + data[start + 40:])
    with pytest.raises(DataError, match=f"{path}: pixel data cannot be decoded"):
        dicom.read_image(path)


def test_an_rgb_dicom_is_named_with_what_is_supported(tmp_path):
    path = write_raw(tmp_path / "rgb.dcm", np.zeros((8, 8, 3), np.uint8), photometric="RGB")
    with pytest.raises(DataError, match=f"{path}: a RGB DICOM with 3 sample.*MONOCHROME1 or MONOCHROME2"):
        dicom.read_image(path)


def test_an_rgb_dicom_without_planar_configuration_is_named(tmp_path):
    """The file that used to end in AttributeError: Missing required element (0028,0006)."""
    path = write_raw(tmp_path / "rgb.dcm", np.zeros((8, 8, 3), np.uint8), photometric="RGB")
    ds = pydicom.dcmread(path)
    del ds.PlanarConfiguration
    ds.save_as(path)
    with pytest.raises(DataError, match="RGB DICOM"):
        dicom.read_image(path)


def test_a_multi_frame_dicom_is_named(tmp_path):
    path = write_raw(tmp_path / "frames.dcm", np.zeros((2, 8, 8), np.uint8), NumberOfFrames=2)
    with pytest.raises(DataError, match="with 2 frames"):
        dicom.read_image(path)


@pytest.mark.parametrize("rows", [0, 20_000])
def test_a_header_with_an_impossible_size_is_named(tmp_path, rows):
    path = write_raw(tmp_path / "a.dcm", np.zeros((8, 8), np.uint8))
    ds = pydicom.dcmread(path)
    ds.Rows = rows
    ds.save_as(path)
    with pytest.raises(DataError, match=f"gives a {rows} x 8 image"):
        dicom.read_header(path)
