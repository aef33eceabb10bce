"""Studies in object storage: `storage: s3://bucket/prefix` (or another `pyarrow.fs` URI).

Every stage reads and writes its study folder with plain file I/O. A study whose storage is a
URI is worked on in a node-local mirror (`mirror_path`: `$CAMSTUDY_STAGING`, default
`~/.cache/camstudy/staging`, then the URI's scheme and path), and the object store holds it:

- **Uploads**: the atomic-write helpers (`study.atomic`) call `after_write` for what they have
  just renamed into place; a path inside an active mirror is uploaded at once (a folder replaces
  its remote copy, its completion records `done.json`/`_done.json` last). So the object store
  only ever holds complete files, as the local folder does, and a killed command loses at most
  what it was writing. `remove` deletes locally and remotely.
- **Pulls**: a command pulls the study when it opens it; a Ray worker on another node pulls what
  it reads (the preprocessing cache, staged to its disk once; a run's folder); the driver pulls a
  run's folder when the run ends. The object store is the authority and the mirror only a cache:
  a pull fetches every file the mirror does not hold as the same object (missing, another size,
  another modification time: each mirror copy is stamped with its object's time when it is
  uploaded or fetched), and deletes the mirror's files the object store does not hold (a mirror
  left by an older study of the same URI, an upload that never happened). A stage whose output
  was deleted so is redone: its completion record, or a file that record vouches for, is gone.

Standard AWS settings apply (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`/`AWS_REGION`): pyarrow reads them, and boto3 (the study lock) too.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from study.errors import ConfigError

RECORDS = ("done.json", "_done.json")  # a folder's completion records: uploaded after everything else
SKIP = ("ray",)  # Ray Train's own state lives at its URI directly (RunConfig.storage_path)
LOCK = ".lock"  # the study's lock: an object of its own (orchestrator.lock), never a mirrored file
SAME_TIME_S = 1.0  # a listing and a HEAD of one object may give its time at different precisions
_URI = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<path>.+)$")


def is_uri(storage: str) -> bool:
    return _URI.match(str(storage)) is not None


def mirror_path(uri: str) -> Path:
    """The node-local folder a URI's study is worked on in (the same on every node)."""
    match = _URI.match(uri)
    staging = Path(os.environ.get("CAMSTUDY_STAGING", "~/.cache/camstudy/staging")).expanduser()
    return staging / match["scheme"] / match["path"].strip("/")


@dataclass(frozen=True)
class Synced:
    """What a pull did: files fetched, and the mirror's files (relative paths) the object store
    does not hold, deleted from the mirror."""

    fetched: int
    dropped: list[str]


@dataclass(frozen=True)
class Remote:
    """A study at `uri`, mirrored at `local`."""

    uri: str
    local: Path

    @functools.cached_property
    def _fs(self):
        import pyarrow.fs as pafs

        filesystem, base = pafs.FileSystem.from_uri(self.uri)
        return filesystem, base.rstrip("/")

    def remote_path(self, relative: str | Path = "") -> str:
        filesystem, base = self._fs
        relative = str(relative).strip("/")
        return f"{base}/{relative}" if relative and relative != "." else base

    def upload(self, path: Path) -> None:
        """The file or folder at `path` (inside `local`) onto its remote place, replacing it."""
        relative = Path(path).resolve().relative_to(self.local.resolve())
        target = self.remote_path(relative)
        if Path(path).is_dir():
            self._delete(target)
            files = sorted((p for p in Path(path).rglob("*") if p.is_file()), key=lambda p: p.name in RECORDS)
            for file in files:
                self._put(file, f"{target}/{file.relative_to(path).as_posix()}")
        elif Path(path).is_file():
            self._put(Path(path), target)

    def _put(self, file: Path, target: str) -> None:
        filesystem, _ = self._fs
        filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with open(file, "rb") as source, filesystem.open_output_stream(target) as out:
            while chunk := source.read(1 << 24):
                out.write(chunk)
        info = filesystem.get_file_info(target)
        if info.mtime is not None:  # a later pull compares times: the local copy is this object
            stamp = info.mtime.timestamp()
            os.utime(file, (stamp, stamp))

    def _delete(self, target: str) -> None:
        import pyarrow.fs as pafs

        filesystem, _ = self._fs
        info = filesystem.get_file_info(target)
        if info.type == pafs.FileType.Directory:
            filesystem.delete_dir(target)
        elif info.type == pafs.FileType.File:
            filesystem.delete_file(target)

    def remove(self, relative: str | Path) -> None:
        self._delete(self.remote_path(relative))

    def pull(self, *relatives: str | Path) -> int:
        """`sync` these folders or files (default: the whole study but SKIP); how many were fetched."""
        return self.sync(*relatives).fetched

    def sync(self, *relatives: str | Path) -> Synced:
        """Make the mirror under `relatives` (default: the whole study but SKIP) a copy of what the
        object store holds there: fetch every remote file the mirror does not hold as the same
        object, delete every mirror file the object store does not hold."""
        import pyarrow.fs as pafs

        filesystem, _ = self._fs
        fetched, dropped = 0, []
        for relative in relatives or ("",):
            top = self.remote_path(relative)
            info = filesystem.get_file_info(top)
            infos = [] if info.type == pafs.FileType.NotFound else [info] if info.type == pafs.FileType.File else (
                filesystem.get_file_info(pafs.FileSelector(top, recursive=True)))
            held = set()
            for item in infos:
                if item.type == pafs.FileType.File and _mirrored(self._relative(item)):
                    held.add(self._relative(item))
                    fetched += self._get(item)
            dropped += self._drop_unheld(self.local / relative, held)
        return Synced(fetched, dropped)

    def _relative(self, item) -> str:
        return item.path[len(self.remote_path()) + 1:]

    def _drop_unheld(self, local: Path, held: set[str]) -> list[str]:
        """Delete the mirror's files under `local` that are not in `held` (relative paths)."""
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else []
        dropped = []
        for file in files:
            relative = file.relative_to(self.local).as_posix()
            if _mirrored(relative) and relative not in held:
                file.unlink(missing_ok=True)
                dropped.append(relative)
                _remove_empty_parents(file, self.local)
        return dropped

    def _get(self, item) -> int:
        filesystem, _ = self._fs
        local = self.local / self._relative(item)
        stamp = item.mtime.timestamp() if item.mtime is not None else None
        if local.is_file() and local.stat().st_size == item.size and (
                stamp is None or abs(local.stat().st_mtime - stamp) < SAME_TIME_S):
            return 0
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.tmp-{os.getpid()}")
        with filesystem.open_input_stream(item.path) as source, open(partial, "wb") as out:
            while chunk := source.read(1 << 24):
                out.write(chunk)
        os.replace(partial, local)
        if stamp is not None:
            os.utime(local, (stamp, stamp))
        return 1


def _remove_empty_parents(file: Path, root: Path) -> None:
    """Folders emptied by a drop go too: a writer may take an existing folder for its own output
    (the synthetic source refuses a folder it did not make)."""
    for folder in file.parents:
        if folder == root or root not in folder.parents:
            return
        try:
            folder.rmdir()
        except OSError:  # not empty
            return


def _mirrored(relative: str) -> bool:
    """Whether a study file (a path relative to the study) belongs in the mirror: not Ray's own
    state, not the lock, not a writer's temporary."""
    parts = relative.split("/")
    return bool(relative) and parts[0] not in SKIP and relative != LOCK and not any(map(is_temporary, parts))


_ACTIVE: dict[Path, Remote] = {}  # local mirror root -> its remote, in this process


def open_remote(uri: str) -> Remote:
    """The remote study at `uri`, its mirror made and activated in this process (writes under
    the mirror are uploaded from now on)."""
    remote = Remote(uri.rstrip("/"), mirror_path(uri))
    try:
        remote._fs  # noqa: B018 (resolves the URI: an unknown scheme or a bad bucket fails here)
    except (OSError, ValueError) as error:
        raise ConfigError(f"storage {uri}: cannot be opened ({str(error).splitlines()[0][:200]}); check the "
                          "URI and the credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)") from None
    remote.local.mkdir(parents=True, exist_ok=True)
    _ACTIVE[remote.local.resolve()] = remote
    return remote


def _owner(path: Path) -> Optional[Remote]:
    resolved = Path(path).resolve()
    for root, remote in _ACTIVE.items():
        if resolved == root or root in resolved.parents:
            return remote
    return None


def after_write(path: str | Path) -> None:
    """Upload `path` if it lies in an active mirror (called by the atomic-write helpers)."""
    remote = _owner(Path(path))
    if remote is not None and not _skipped(remote, Path(path)):
        remote.upload(Path(path))


def remove(paths: Iterable[str | Path]) -> None:
    """Delete each path locally and, in an active mirror, remotely."""
    import shutil

    for path in map(Path, paths):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        remote = _owner(path)
        if remote is not None:
            remote.remove(path.resolve().relative_to(remote.local.resolve()))


def _skipped(remote: Remote, path: Path) -> bool:
    """Ray's own folder, and anything inside a temporary folder (its rename uploads it whole)."""
    relative = path.resolve().relative_to(remote.local.resolve())
    return bool(relative.parts) and (relative.parts[0] in SKIP or any(map(is_temporary, relative.parts)))


_TEMPORARY = re.compile(r"^\..+\.tmp-\d+$")  # study.atomic's temporary siblings


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is a writer's temporary (`.<name>.tmp-<pid>`, study.atomic)."""
    return _TEMPORARY.match(name) is not None
