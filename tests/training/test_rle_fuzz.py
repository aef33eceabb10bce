"""The RLE decoder on hostile rows: property-based (Hypothesis), against a naive reference.

Every generated row must give either a `ValueError` or exactly the mask a naive pure-Python
decoder paints (docs/DATA_FORMATS.md: relative offsets, column-major). Each run generates at least
10,000 rows: int64 and pixel-count edges, Unicode digits and separators, signs, junk.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training import rle

HEIGHT, WIDTH = 23, 36
PIXELS = HEIGHT * WIDTH
ROWS_PER_EXAMPLE, EXAMPLES = 10, 1_000  # >= 10,000 rows per run

EDGES = [0, 1, 2, PIXELS - 1, PIXELS, PIXELS + 1, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63,
         2**63 + 1, 2**64 - 1, 2**64, 10**21, 4611686018427387909, 9223372036854775793]
SEPARATORS = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", "\x1c", "\x85", ",", ""]
ODD_TOKENS = ["-1", "-0", "--3", "+3", "²", "٣", "１", "3.0", "1e3", "0x1f", "nan", "∞", "", "−2"]

numbers = st.one_of(st.integers(0, PIXELS + 2), st.sampled_from(EDGES), st.integers(-2**65, 2**65))
tokens = st.one_of(numbers.map(str), st.sampled_from(ODD_TOKENS), st.text(max_size=4))
structured = st.lists(st.tuples(tokens, st.sampled_from(SEPARATORS)), max_size=12).map(
    lambda pairs: "".join(token + separator for token, separator in pairs))
plausible = st.lists(st.tuples(st.integers(0, 60), st.integers(1, 60)), min_size=1, max_size=12).map(
    lambda pairs: " ".join(f"{offset} {length}" for offset, length in pairs))
rows = st.one_of(structured, plausible, st.text(max_size=40), st.just("-1"), st.just(" -1 "))


def naive_decode(text: str, height: int, width: int) -> np.ndarray | None:
    """The mask a plain reading of the convention paints, or None where the row is invalid."""
    text = text.strip(" \t\r\n\f\v")
    if text == "-1":
        return np.zeros((height, width), bool)
    words = text.replace("\t", " ").replace("\r", " ").replace("\n", " ").replace("\f", " ") \
        .replace("\v", " ").split(" ")
    words = [word for word in words if word != ""]
    if not words or len(words) % 2 or not all(word.isascii() and word.isdigit() for word in words):
        return None
    flat, position = [False] * (height * width), 0
    for offset, length in zip(words[0::2], words[1::2]):
        position += int(offset)
        if int(length) < 1 or position + int(length) > height * width:
            return None
        for pixel in range(position, position + int(length)):
            flat[pixel] = True
        position += int(length)
    return np.array(flat).reshape(width, height).T


def check_row(text: str) -> None:
    expected = naive_decode(text, HEIGHT, WIDTH)
    try:
        mask = rle.decode(text, HEIGHT, WIDTH)
    except ValueError:
        assert expected is None, f"{text!r} is valid but was refused"
        return
    assert expected is not None, f"{text!r} is invalid but was decoded"
    np.testing.assert_array_equal(mask, expected)
    if not rle.is_empty(text):
        lengths = [int(word) for word in text.split()[1::2]]
        assert mask.sum() == sum(lengths)  # runs never overlap: painted pixels = sum of lengths
    np.testing.assert_array_equal(rle.decode(rle.encode(mask), HEIGHT, WIDTH), mask)


@pytest.mark.slow  # 10,000 random rows
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(rows, min_size=ROWS_PER_EXAMPLE, max_size=ROWS_PER_EXAMPLE))
def test_any_row_decodes_to_the_naive_mask_or_raises_value_error(batch):
    for text in batch:
        check_row(text)


@settings(max_examples=1_000, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_any_mask_round_trips(height, width, density, seed):
    mask = np.random.default_rng(seed).random((height, width)) < density
    text = rle.encode(mask)
    decoded = rle.decode(text, height, width)
    np.testing.assert_array_equal(decoded, mask)
    assert decoded.sum() == (0 if text == rle.EMPTY else sum(int(v) for v in text.split()[1::2]))


@pytest.mark.parametrize("text", [
    # the row that made the int64 decoder write out of bounds (SIGSEGV)
    "41 48 4611686018427387909 9223372036854775793 4611686018427387900 9223372036854775795",
    "284525022675132481536 3", "10 --3", "10 ²", "1 2 ٣ 4", "1\u20032", "9" * 5000, "1 " * 100_001,
])
def test_rows_that_crashed_the_old_decoder_raise_value_error(text):
    with pytest.raises(ValueError, match="RLE"):
        rle.decode(text, HEIGHT, WIDTH)


def test_the_segfault_row_cannot_crash_a_fresh_interpreter():
    """Memory corruption may only show up at exit, so run it where a crash is visible."""
    code = ("from training import rle\n"
            "try:\n    rle.decode('41 48 4611686018427387909 9223372036854775793 4611686018427387900 "
            "9223372036854775795', 36, 23)\nexcept ValueError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "larger than the image" in done.stdout, done.stderr


@pytest.mark.parametrize("height, width", [(0, 5), (-1, 5), (5, True), (2.0, 3), (10**6, 10**6)])
def test_bad_image_shapes_raise_value_error(height, width):
    with pytest.raises(ValueError, match="image"):
        rle.decode("0 1", height, width)


@pytest.mark.parametrize("mask, problem", [
    (np.zeros((2, 2, 2)), "2-D"), (np.array([["a", "b"]]), "dtype"),
    (np.array([[0.0, np.nan]]), "NaN"), (np.zeros((0, 3)), "positive"),
])
def test_encode_refuses_what_has_no_mask(mask, problem):
    with pytest.raises(ValueError, match=problem):
        rle.encode(mask)
