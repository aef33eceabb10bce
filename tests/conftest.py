"""Shared fixtures: keep this file small, tests own their helpers."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def stage2_labels() -> Path:
    """The real SIIM-ACR stage-2 label file (12,954 rows), skipped where it is not checked out."""
    path = SHARED_DATA / "siim-acr-stage2-train-rle.csv.gz"
    if not path.is_file():
        pytest.skip(f"real label file {path} absent (it lives in the shared data folder)")
    return path
