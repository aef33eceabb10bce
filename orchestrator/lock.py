"""One writer per study: every camstudy command that writes a study holds its lock throughout.

The lock is an advisory `flock` on `<study>/.lock`, so the kernel releases it when the holder
dies (kill -9 included): a dead holder's lock is simply taken by the next command, no stale-lock
cleanup needed. The file also says who holds it (host, PID, start time, command), for the one
line a second command prints when it refuses. flock works across processes of one machine and,
on Linux NFSv4 mounts, across machines; on a filesystem without working locks, run one command
per study at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from training.errors import CamstudyError


class StudyBusy(CamstudyError):
    """Another command is writing this study."""


@contextlib.contextmanager
def study_lock(lock_path: Path, command: str) -> Iterator[None]:
    """Hold the study's lock for the block; raise StudyBusy naming the holder if it is taken."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyBusy(f"{lock_path.parent}: another camstudy command is writing this study "
                            f"({_holder(lock_path)}); wait for it to finish or stop it, then rerun") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command}))
        handle.flush()
        yield
    finally:
        handle.close()  # releases the flock


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text())
        return f"{info['command']!r}, PID {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def command_line() -> str:
    return " ".join(["camstudy", *sys.argv[1:]])
