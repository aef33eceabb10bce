"""The split's counts, planned from how many positive and negative images exist (torch- and
numpy-free): what prepare selects and what the config loader checks a synthetic dataset against,
by the same rule. `training.split` draws the images."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from study.errors import ConfigError, DataError

if TYPE_CHECKING:  # for annotations only: study.config imports this module (its load check plans the split)
    from study.config import SplitConfig


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
    k = math.floor(n * n_pos / (n_pos + n_neg) + 0.5)
    return min(max(k, 1), n - 1)
