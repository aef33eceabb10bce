"""SIIM-ACR run-length encoding: relative offsets, column-major, "-1" for an empty mask.

Flat index = col * H + row (the mask is flattened column by column, `mask.T.ravel()`). The
string is pairs `offset length`; the first offset is absolute, each later one counts from the
end (exclusive) of the previous run. Example, 4 rows x 5 columns: runs starting at flat indices
1, 8 and 12 of lengths 2, 1, 2 encode as "1 2 5 1 3 2".

A label file is hostile input: `decode` parses with Python integers (ASCII digits only, ASCII
whitespace between them), bounds every run by H*W before numpy sees a number, and raises one
`ValueError` naming the problem for anything else. It never wraps int64 (a row of huge offsets
once made numpy write out of bounds) and never allocates more than the image.
"""

from __future__ import annotations

import re

import numpy as np

EMPTY = "-1"
MAX_PIXELS = 1 << 28  # 16384 x 16384; SIIM images are 1024 x 1024
_SEPARATORS = re.compile(r"[ \t\r\n\f\v]+")
_NATURAL = re.compile(r"[0-9]+", re.ASCII)


def decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode one RLE string into a bool mask of shape (height, width)."""
    pixels = _pixel_count(height, width)
    mask = np.zeros(pixels, dtype=bool)
    for start, length in _runs(rle, pixels, f"{height}x{width}"):
        mask[start:start + length] = True
    return mask.reshape(width, height).T


def encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (bool or numbers; nonzero = inside) as an RLE string, "-1" when empty."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"RLE encodes 2-D masks; got shape {mask.shape}")
    if mask.dtype.kind not in "biuf":
        raise ValueError(f"RLE encodes boolean or numeric masks; got dtype {mask.dtype}")
    if mask.dtype.kind == "f" and not np.isfinite(mask).all():
        raise ValueError("the mask holds NaN or infinite values; inside/outside is undefined there")
    _pixel_count(*mask.shape)
    painted = np.flatnonzero(mask.T.ravel())  # column-major flat indices of mask pixels
    if painted.size == 0:
        return EMPTY
    breaks = np.flatnonzero(np.diff(painted) > 1)
    starts = painted[np.concatenate(([0], breaks + 1))]
    ends = painted[np.concatenate((breaks, [painted.size - 1]))] + 1
    offsets = starts - np.concatenate(([0], ends[:-1]))
    pairs = np.empty(2 * starts.size, dtype=np.int64)
    pairs[0::2], pairs[1::2] = offsets, ends - starts
    return " ".join(map(str, pairs.tolist()))


def is_empty(rle: str) -> bool:
    """True for the negative marker "-1" (surrounding whitespace tolerated)."""
    return str(rle).strip() == EMPTY


def _pixel_count(height, width) -> int:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"image {name} must be a positive integer, got {value!r}")
    if int(height) * int(width) > MAX_PIXELS:
        raise ValueError(f"a {height}x{width} image has more than {MAX_PIXELS} pixels; not a chest X-ray mask")
    return int(height) * int(width)


def _runs(rle: str, pixels: int, shape: str) -> list[tuple[int, int]]:
    """(absolute start, length) of each run, each checked to lie inside the image."""
    values = _naturals(rle, pixels)
    if values is None:
        return []
    if len(values) % 2:
        raise ValueError(f"RLE has an odd number of values ({len(values)}); expected offset/length pairs")
    runs, end = [], 0
    for offset, length in zip(values[0::2], values[1::2]):
        if length == 0:
            raise ValueError(f"RLE run {len(runs) + 1} has length 0; run lengths must be positive")
        start = end + offset
        end = start + length
        if end > pixels:
            raise ValueError(f"RLE run {len(runs) + 1} ends at pixel {end}, beyond the {shape} image "
                             f"({pixels} pixels)")
        runs.append((start, length))
    return runs


def _naturals(rle: str, pixels: int) -> list[int] | None:
    """The non-negative integers of an RLE string, or None for "-1". A value with more digits
    than the pixel count cannot lie inside the image and is refused before it is converted."""
    if not isinstance(rle, str):
        raise ValueError(f"RLE must be a string, got {type(rle).__name__} {_shown(rle)}")
    text = rle.strip(" \t\r\n\f\v")
    if text == EMPTY:
        return None
    if not text:
        raise ValueError("RLE is empty; a negative image is encoded as '-1'")
    limit = len(str(pixels))
    values = []
    for token in _SEPARATORS.split(text):
        if not _NATURAL.fullmatch(token):
            problem = "is negative" if token[:1] == "-" and _NATURAL.fullmatch(token[1:]) else \
                "is not an integer (ASCII digits 0-9 only)"
            raise ValueError(f"RLE value {_shown(token)} {problem}")
        digits = token.lstrip("0") or "0"
        if len(digits) > limit:
            raise ValueError(f"RLE value {_shown(token)} is larger than the image ({pixels} pixels)")
        values.append(int(digits))
    return values


def _shown(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
