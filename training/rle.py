"""SIIM-ACR run-length encoding: relative offsets, column-major, "-1" for an empty mask.

Flat index = col * H + row (the mask is flattened column by column, `mask.T.ravel()`). The
string is pairs `offset length`; the first offset is absolute, each later one counts from the
end (exclusive) of the previous run. Example, 4 rows x 5 columns: runs starting at flat indices
1, 8 and 12 of lengths 2, 1, 2 encode as "1 2 5 1 3 2".
"""

from __future__ import annotations

import numpy as np

EMPTY = "-1"


def decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode one RLE string into a bool mask of shape (height, width)."""
    values = _parse(rle)
    mask = np.zeros(height * width, dtype=bool)
    if values is None:
        return mask.reshape(height, width)
    if len(values) % 2:
        raise ValueError(f"RLE has an odd number of values ({len(values)}); expected offset/length pairs")
    offsets, lengths = values[0::2], values[1::2]
    if (offsets < 0).any():
        raise ValueError(f"RLE offset {int(offsets[offsets < 0][0])} is negative")
    if (lengths <= 0).any():
        raise ValueError(f"RLE run length {int(lengths[lengths <= 0][0])} is not positive")
    starts = np.cumsum(offsets + np.concatenate(([0], lengths[:-1])))
    ends = starts + lengths
    if ends[-1] > height * width:
        raise ValueError(f"RLE run ends at pixel {int(ends[-1])}, beyond the {height}x{width} image "
                         f"({height * width} pixels)")
    # indices of every painted pixel, O(painted) rather than O(H*W)
    run_of_pixel = np.repeat(np.arange(lengths.size), lengths)
    within_run = np.arange(run_of_pixel.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    mask[starts[run_of_pixel] + within_run] = True
    return mask.reshape(width, height).T


def encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (any dtype; nonzero = inside) as an RLE string, "-1" when empty."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"RLE encodes 2-D masks; got shape {mask.shape}")
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


def _parse(rle: str) -> np.ndarray | None:
    """Integers of an RLE string, or None for "-1". Whitespace of any kind is tolerated."""
    if not isinstance(rle, str):
        raise ValueError(f"RLE must be a string, got {type(rle).__name__} {rle!r}")
    text = rle.strip()
    if text == EMPTY:
        return None
    if not text:
        raise ValueError("RLE is empty; a negative image is encoded as '-1'")
    tokens = text.split()
    try:
        return np.array([int(token) for token in tokens], dtype=np.int64)
    except ValueError:
        bad = next(t for t in tokens if not t.lstrip("-").isdigit())
        raise ValueError(f"RLE contains {bad!r}, which is not an integer") from None
