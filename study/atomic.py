"""Atomic writes: a temporary sibling renamed into place, so a crash never leaves a half file.

In a study whose storage is an object store, what is renamed into place is then uploaded
(`study.objectstore.after_write`): the remote copy, too, only ever holds complete files.

A full disk (ENOSPC, or a quota: EDQUOT) while writing is a `StoreError` naming the output: the
temporary is removed, so nothing partial is visible, and the same command rerun once space is
freed redoes only what was not finished (no completion record was written for it)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from study import objectstore
from study.errors import StoreError


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_atomic(path: str | Path, writer: Callable[[Path], Any]) -> None:
    """Call `writer(tmp_path)`, then rename tmp_path to `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(tmp)
        os.replace(tmp, path)
    except OSError as error:
        _raise_if_disk_full(error, path)
        raise
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as error:  # also one the block raised while writing into tmp
        _raise_if_disk_full(error, path)
        raise
    except DiskFull:  # a nested atomic write into tmp: name the output, not its temporary
        raise DiskFull(_disk_full_message(path)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    objectstore.after_write(path)


class DiskFull(StoreError):
    """No space (or no quota) left while writing an output."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _raise_if_disk_full(error: OSError, path: Path) -> None:
    """A full disk is the user's to fix, not a bug: one line naming the output, no traceback.
    (pyarrow's IO errors carry no errno, only the C library's message.)"""
    if error.errno in _DISK_FULL or "No space left on device" in str(error):
        raise DiskFull(_disk_full_message(path)) from None


def _disk_full_message(path: Path) -> str:
    return (f"{path}: no space left on the device while writing it (nothing partial was kept); "
            "free space there and rerun the same command: finished work is kept")
