"""Which build and which machine produced an output: stated beside every generated result that is
quoted elsewhere (the MLflow runs' source tags, the analysis' summary.md that the README quotes)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Optional


def git_commit() -> Optional[str]:
    """HEAD of the checkout camstudy runs from, or None (an installed wheel, a job's copied folder)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine() -> str:
    """e.g. "2-core x86_64 Linux, Python 3.11.7"."""
    return (f"{os.cpu_count()}-core {platform.machine()} {platform.system()}, "
            f"Python {platform.python_version()}")
