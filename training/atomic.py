"""Atomic writes: a temporary sibling renamed into place, so a crash never leaves a half file.

In a study whose storage is an object store, what is renamed into place is then uploaded
(`training.objectstore.after_write`): the remote copy, too, only ever holds complete files."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from training import objectstore


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_atomic(path: str | Path, writer: Callable[[Path], Any]) -> None:
    """Call `writer(tmp_path)`, then rename tmp_path to `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    objectstore.after_write(path)


def link_atomic(source: str | Path, path: str | Path) -> None:
    """Make `path` a hard link to `source` (no bytes written), atomically replacing any old `path`;
    a copy where the filesystem has no hard links. The link keeps the content even after
    `source` is replaced by a rename."""
    def link(tmp: Path) -> None:
        try:
            os.link(source, tmp)
        except OSError:  # e.g. some network or FUSE filesystems
            shutil.copyfile(source, tmp)

    write_atomic(path, link)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces `path` only when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    objectstore.after_write(path)
