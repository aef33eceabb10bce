"""Numbers in sentences: one rounding rule for every number a generated sentence states (the
report's summary and conclusions, the degenerate reasons, MLflow descriptions), so a sentence
never disagrees with its table by a hand-chosen number of digits."""

from __future__ import annotations

from typing import Any

import numpy as np


def prose(value: Any) -> str:
    """A number as every sentence writes it: three significant digits ("n/a" when undefined)."""
    if value is None or not np.isfinite(float(value)):
        return "n/a"
    return f"{float(value):.3g}"


def interval(row: Any, column: str) -> str:
    """"value [lo, hi]" of a table row's `column`, `column_lo`, `column_hi`."""
    return f"{prose(row[column])} [{prose(row[f'{column}_lo'])}, {prose(row[f'{column}_hi'])}]"
