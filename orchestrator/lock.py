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

from study.errors import CamstudyError


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


# --------------------------------------------------------------------------- object-store studies


STALE_SECONDS = float(os.environ.get("CAMSTUDY_LOCK_STALE_S", "120"))  # a holder silent this long is gone


@contextlib.contextmanager
def object_store_lock(remote, command: str) -> Iterator[None]:
    """The lock of a study in object storage: `<study>/.lock` in the store, created only if
    absent (S3 conditional write, If-None-Match), refreshed every STALE_SECONDS / 4 by its holder
    (If-Match: a stolen lock is noticed), taken over when its holder is gone (a heartbeat older
    than STALE_SECONDS, or a dead PID on this host), deleted on release. A store without
    conditional writes is said so in one line and locked by a write-then-read-back lease."""
    lock = _RemoteLock(remote, command)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


class _RemoteLock:
    def __init__(self, remote, command: str):
        import threading

        self.remote, self.command = remote, command
        self.bucket, _, self.key = remote.remote_path(".lock").partition("/")
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time()}"
        self.etag: str | None = None
        self.stop = threading.Event()
        self.beat: threading.Thread | None = None
        self.conditional = remote.uri.startswith("s3://")

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "heartbeat": time.time(),
                           "token": self.token}).encode()

    @property
    def _s3(self):
        import boto3

        return boto3.client("s3")  # AWS_ENDPOINT_URL, keys and region from the environment

    def acquire(self) -> None:
        if self.conditional:
            try:
                self._acquire_conditional()
            except _NoConditionalWrites:
                print(f"[study] {self.remote.uri}: this object store does not support conditional writes; the study "
                      "is locked by a lease read back after writing instead (two commands starting within a second "
                      "of each other could both pass)", flush=True)
                self.conditional = False
        if not self.conditional:
            self._acquire_lease()
        self._start_heartbeat()

    def _acquire_conditional(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.etag = self._s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), IfNoneMatch="*")["ETag"]
            return
        except ClientError as error:
            _raise_if_unsupported(error)
            if _code(error) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
        held = self._s3.get_object(Bucket=self.bucket, Key=self.key)
        holder = _parse(held["Body"].read())
        if not _gone(holder):
            raise StudyBusy(f"{self.remote.uri}: another camstudy command is writing this study ({_describe(holder)}); "
                            "wait for it to finish or stop it, then rerun")
        try:  # the holder is gone: take over, unless someone else did first
            self.etag = self._s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                            IfMatch=held["ETag"])["ETag"]
            print(f"[study] took over the lock of a command that is gone ({_describe(holder)})", flush=True)
        except ClientError as error:
            _raise_if_unsupported(error)
            raise StudyBusy(f"{self.remote.uri}: another camstudy command took this study's lock just now; "
                            "wait for it to finish, then rerun") from None

    def _acquire_lease(self) -> None:
        holder = self._read()
        if holder and holder.get("token") != self.token and not _gone(holder):
            raise StudyBusy(f"{self.remote.uri}: another camstudy command is writing this study ({_describe(holder)}); "
                            "wait for it to finish or stop it, then rerun")
        self._write()
        time.sleep(1.0)
        holder = self._read()
        if not holder or holder.get("token") != self.token:
            raise StudyBusy(f"{self.remote.uri}: another camstudy command took this study's lock just now "
                            f"({_describe(holder or {})}); wait for it to finish, then rerun")

    def _read(self) -> dict:
        filesystem, _ = self.remote._fs
        try:
            with filesystem.open_input_stream(self.remote.remote_path(".lock")) as source:
                return _parse(source.read())
        except (OSError, FileNotFoundError):
            return {}

    def _write(self) -> None:
        filesystem, _ = self.remote._fs
        with filesystem.open_output_stream(self.remote.remote_path(".lock")) as out:
            out.write(self._body())

    def _start_heartbeat(self) -> None:
        import threading

        def beat() -> None:
            while not self.stop.wait(STALE_SECONDS / 4):
                try:
                    if self.conditional:
                        self.etag = self._s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                                        IfMatch=self.etag)["ETag"]
                    else:
                        self._write()
                except Exception as error:  # noqa: BLE001 (a lost heartbeat must not kill the study's work)
                    print(f"[study] the study lock could not be refreshed ({str(error).splitlines()[0][:160]}); "
                          "another command may take it over", flush=True)
                    return
        self.beat = threading.Thread(target=beat, name="camstudy-lock-heartbeat", daemon=True)
        self.beat.start()

    def release(self) -> None:
        self.stop.set()
        if self.beat is not None:
            self.beat.join(timeout=5)
        if self._read().get("token") == self.token:  # never delete a lock another command took over
            filesystem, _ = self.remote._fs
            filesystem.delete_file(self.remote.remote_path(".lock"))


class _NoConditionalWrites(Exception):
    pass


def _code(error) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _raise_if_unsupported(error) -> None:
    if _code(error) in ("NotImplemented", "InvalidArgument") or error.response.get("ResponseMetadata", {}).get(
            "HTTPStatusCode") == 501:
        raise _NoConditionalWrites() from error


def _parse(data: bytes) -> dict:
    try:
        value = json.loads(data)
        return value if isinstance(value, dict) else {}
    except ValueError:
        return {}


def _gone(holder: dict) -> bool:
    """The holder stopped beating its heart, or was a process of this host that no longer runs."""
    if not holder:
        return True
    if time.time() - float(holder.get("heartbeat", 0)) > STALE_SECONDS:
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):
            return False
    return False


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return (f"{holder.get('command', '?')!r}, PID {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')}")
