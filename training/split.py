"""Selection and split (docs/STUDY.md §1): by image, stratified by label, seeded.

Each random draw has its own stream (`default_rng([seed, stream])`), so for one seed the positives drawn do
not depend on the negative count, and the test set is taken before validation, so changing
`n_val` leaves the test set unchanged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from study.config import SplitConfig
from study.errors import DataError
from study.selection import Selection, plan_selection

SPLITS = ("train", "val", "test")
# random streams of one seed (never reorder: a stream's number fixes its draws)
_PICK_POSITIVE, _PICK_NEGATIVE, _SPLIT_POSITIVE, _SPLIT_NEGATIVE = range(4)


def select_and_split(images: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """The selected rows of `images` (image_id, label 0/1, ...) with a `split` column, by image_id."""
    return apply_selection(images, plan_selection(*available(images), cfg), cfg.seed)


def available(images: pd.DataFrame) -> tuple[int, int]:
    """(positive, negative) image counts; one row per image is required."""
    duplicated = images["image_id"][images["image_id"].duplicated()]
    if not duplicated.empty:
        raise DataError(f"{len(duplicated)} image ids occur in more than one row (first: "
                        f"{duplicated.iloc[0]!r}); the manifest needs one row per image")
    positive = int((images["label"] == 1).sum())
    return positive, len(images) - positive


def apply_selection(images: pd.DataFrame, selection: Selection, seed: int) -> pd.DataFrame:
    ordered = images.sort_values("image_id", kind="stable")
    parts = []
    for label, n, pick, split_stream, (test_n, val_n) in (
        (1, selection.n_positive, _PICK_POSITIVE, _SPLIT_POSITIVE,
         (selection.test_positive, selection.val_positive)),
        (0, selection.n_negative, _PICK_NEGATIVE, _SPLIT_NEGATIVE,
         (selection.test_negative, selection.val_negative)),
    ):
        pool = ordered[ordered["label"] == label]
        chosen = pool.iloc[_permutation(len(pool), seed, pick)[:n]].sort_values("image_id", kind="stable")
        split = np.full(n, "train", dtype=object)
        order = _permutation(n, seed, split_stream)
        split[order[:test_n]] = "test"
        split[order[test_n:test_n + val_n]] = "val"
        parts.append(chosen.assign(split=split))
    return pd.concat(parts).sort_values("image_id", kind="stable").reset_index(drop=True)








def _permutation(n: int, seed: int, stream: int) -> np.ndarray:
    return np.random.default_rng([seed, stream]).permutation(n)
