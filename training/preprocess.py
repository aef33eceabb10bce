"""Image and mask preprocessing (docs/STUDY.md §2): decode -> CLAHE -> resize -> per-image z-score.

Pure NumPy/OpenCV functions; no Ray. The caller decides OpenCV's thread count (`cv2.setNumThreads`
is process-global), so a serial loop and a pool of single-threaded workers are compared fairly.
"""

from __future__ import annotations

import cv2
import numpy as np

from study.config import PreprocessConfig
from study.errors import DataError

INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}
# a constant image has std 0; below this the z-score only subtracts the mean (the result is all 0)
MIN_STD = 1e-6


def preprocess_image(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """A decoded grey image (uint8 or uint16, (H, W)) -> float16 (S, S), S = cfg.image_size.

    With `zscore: false` the output is the intensity scaled to [0, 1] by the dtype's maximum
    (uint16 values would overflow float16, whose maximum is 65504).
    """
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise DataError(f"preprocess_image expects a 2-D uint8 or uint16 image; got {pixels.dtype} "
                        f"{pixels.shape} (decode DICOMs with training.data.read_image)")
    if cfg.clahe:
        tiles = (cfg.clahe_tiles, cfg.clahe_tiles)
        # OpenCV CLAHE accepts CV_8UC1 and CV_16UC1; for 16-bit the histogram has 65536 bins
        pixels = cv2.createCLAHE(clipLimit=cfg.clahe_clip_limit, tileGridSize=tiles).apply(
            np.ascontiguousarray(pixels))
    scale = float(np.iinfo(pixels.dtype).max)
    size = (cfg.image_size, cfg.image_size)  # cv2 takes (width, height)
    # resize in float32 so area averaging is not rounded back to integers
    image = cv2.resize(pixels.astype(np.float32), size, interpolation=INTERPOLATION[cfg.interpolation])
    if cfg.zscore:
        image = _zscore(image)
    else:
        image = image / scale
    return image.astype(np.float16)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A 2-D boolean (or 0/1) mask -> uint8 (size, size) of 0/1, nearest neighbour."""
    if mask.ndim != 2:
        raise ValueError(f"resize_mask expects a 2-D mask; got shape {mask.shape}")
    # INTER_NEAREST_EXACT samples at pixel centres and equals PIL's NEAREST (tested); plain
    # INTER_NEAREST is shifted by up to half a source pixel. scikit-image's resize(order=0) rounds
    # sample positions differently and disagrees on many pixels at 256 -> 96: the two are not
    # interchangeable, and a re-implementation must use this rule to reproduce the stored masks
    return cv2.resize((np.asarray(mask) != 0).astype(np.uint8), (size, size),
                      interpolation=cv2.INTER_NEAREST_EXACT)


def _zscore(image: np.ndarray) -> np.ndarray:
    mean = float(image.mean())
    std = float(image.std())
    return (image - mean) / (std if std > MIN_STD else 1.0)
