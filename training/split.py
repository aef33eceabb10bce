"""Selection and split (STUDY.md §1): by image, stratified by label, seeded.

Each random draw has its own stream (`default_rng([seed, stream])`), so for one seed the positives drawn do
not depend on the negative count, and the test set is taken before validation, so changing
`n_val` leaves the test set unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.config import SplitConfig
from training.errors import ConfigError, DataError


SPLITS = ("train", "val", "test")
# random streams of one seed (never reorder: a stream's number fixes its draws)
_PICK_POSITIVE, _PICK_NEGATIVE, _SPLIT_POSITIVE, _SPLIT_NEGATIVE = range(4)


@dataclass(frozen=True)
class Selection:
    """How many images of each label are used and where they go."""

    n_positive: int
    n_negative: int
    val_positive: int
    val_negative: int
    test_positive: int
    test_negative: int
    rule: str  # the selection rule actually used, in words
    notes: tuple[str, ...] = ()  # what `balance: max-available` shrank

    @property
    def counts(self) -> dict[str, tuple[int, int]]:
        """split -> (positives, negatives)."""
        return {
            "train": (self.n_positive - self.val_positive - self.test_positive,
                      self.n_negative - self.val_negative - self.test_negative),
            "val": (self.val_positive, self.val_negative),
            "test": (self.test_positive, self.test_negative),
        }


def plan_selection(available_positive: int, available_negative: int, cfg: SplitConfig) -> Selection:
    """Decide the counts; a request the data cannot satisfy is a ConfigError saying what exists."""
    if available_positive == 0 or available_negative == 0:
        raise DataError(f"the labelled images are {available_positive} positive and {available_negative} "
                        "negative; both labels are needed to train and evaluate a classifier")
    notes: list[str] = []
    n_pos = _want_positive(available_positive, available_negative, cfg, notes)
    n_pos, n_neg = _want_negative(n_pos, available_positive, available_negative, cfg, notes)
    total = n_pos + n_neg
    if cfg.n_val + cfg.n_test >= total:
        raise ConfigError(
            f"split.n_val + split.n_test = {cfg.n_val} + {cfg.n_test} = {cfg.n_val + cfg.n_test} leaves no "
            f"training images from a selection of {total} ({n_pos} positive, {n_neg} negative; the data "
            f"has {available_positive} positive and {available_negative} negative); lower split.n_val and "
            "split.n_test, or select more images (split.n_positive / split.n_negative)")
    val_pos, test_pos = _share(cfg.n_val, n_pos, n_neg), _share(cfg.n_test, n_pos, n_neg)
    val_neg, test_neg = cfg.n_val - val_pos, cfg.n_test - test_pos
    if val_pos + test_pos >= n_pos or val_neg + test_neg >= n_neg:
        raise ConfigError(
            f"split.n_val/split.n_test ({cfg.n_val}/{cfg.n_test}) take {val_pos + test_pos} of the {n_pos} "
            f"positive and {val_neg + test_neg} of the {n_neg} negative images, leaving a training label "
            "empty; lower split.n_val and split.n_test")
    rule = (f"n_positive={cfg.n_positive} -> {n_pos} of {available_positive} positive; "
            f"n_negative={cfg.n_negative} -> {n_neg} of {available_negative} negative; "
            f"balance={cfg.balance}; seed={cfg.seed}; test {cfg.n_test} and val {cfg.n_val} "
            f"at the selection's positive share ({n_pos / total:.1%}), the rest train")
    return Selection(n_pos, n_neg, val_pos, val_neg, test_pos, test_neg, rule, tuple(notes))


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


def _want_positive(avail_pos: int, avail_neg: int, cfg: SplitConfig, notes: list[str]) -> int:
    if cfg.n_positive == "all" or cfg.n_positive <= avail_pos:
        return avail_pos if cfg.n_positive == "all" else cfg.n_positive
    if cfg.balance == "exact":
        raise ConfigError(
            f"split.n_positive: {cfg.n_positive} positive images requested, but the data has "
            f"{avail_pos} unique positive images (and {avail_neg} negative); lower split.n_positive "
            f"(at most {avail_pos}, or 'all') or set split.balance: max-available to use what exists")
    notes.append(f"split.n_positive: {cfg.n_positive} requested, {avail_pos} exist; using {avail_pos} "
                 "(balance: max-available)")
    return avail_pos


def _want_negative(n_pos: int, avail_pos: int, avail_neg: int, cfg: SplitConfig,
                   notes: list[str]) -> tuple[int, int]:
    wanted = {"all": avail_neg, "match": n_pos}.get(cfg.n_negative, cfg.n_negative)  # type: ignore[arg-type]
    if wanted <= avail_neg:
        return n_pos, wanted
    what = ("'match' needs as many negative images as positives" if cfg.n_negative == "match"
            else f"{wanted} negative images requested")
    if cfg.balance == "exact":
        remedy = ("lower split.n_positive, give split.n_negative a number" if cfg.n_negative == "match"
                  else "lower split.n_negative")
        raise ConfigError(
            f"split.n_negative: {what} ({wanted}), but the data has {avail_neg} negative images (and "
            f"{avail_pos} positive); {remedy} (at most {avail_neg}), or set split.balance: max-available "
            "to use what exists")
    if cfg.n_negative == "match":  # keep the balance: both labels shrink to the smaller count
        notes.append(f"split.n_negative: 'match' needs {wanted}, {avail_neg} exist; using {avail_neg} "
                     f"of each label (balance: max-available)")
        return avail_neg, avail_neg
    notes.append(f"split.n_negative: {wanted} requested, {avail_neg} exist; using {avail_neg} "
                 "(balance: max-available)")
    return n_pos, avail_neg


def _share(n: int, n_pos: int, n_neg: int) -> int:
    """Positives among `n` at the selection's positive share; at least one of each label (n >= 2)."""
    k = int(np.floor(n * n_pos / (n_pos + n_neg) + 0.5))
    return min(max(k, 1), n - 1)


def _permutation(n: int, seed: int, stream: int) -> np.ndarray:
    return np.random.default_rng([seed, stream]).permutation(n)
