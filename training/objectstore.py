"""Studies in object storage: `storage: s3://bucket/prefix` (or another `pyarrow.fs` URI).

Every stage reads and writes its study folder with plain file I/O. A study whose storage is a
URI is worked on in a node-local mirror (`mirror_path`: `$CAMSTUDY_STAGING`, default
`~/.cache/camstudy/staging`, then the URI's scheme and path), and the object store holds it:

- **Uploads**: the atomic-write helpers (`training.atomic`) call `after_write` for what they have
  just renamed into place; a path inside an active mirror is uploaded at once (a folder replaces
  its remote copy, its completion records `done.json`/`_done.json` last). So the object store
  only ever holds complete files, as the local folder does, and a killed command loses at most
  what it was writing. `remove` deletes locally and remotely.
- **Pulls**: a command pulls the study when it opens it; a Ray worker on another node pulls what
  it reads (the preprocessing cache, staged to its disk once; a run's folder); the driver pulls a
  run's folder when the run ends. A pull fetches what is missing locally or newer remotely.

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

from training.errors import ConfigError

RECORDS = ("done.json", "_done.json")  # a folder's completion records: uploaded after everything else
SKIP = ("ray",)  # Ray Train's own state lives at its URI directly (RunConfig.storage_path)
_URI = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<path>.+)$")


def is_uri(storage: str) -> bool:
    return _URI.match(str(storage)) is not None


def mirror_path(uri: str) -> Path:
    """The node-local folder a URI's study is worked on in (the same on every node)."""
    match = _URI.match(uri)
    staging = Path(os.environ.get("CAMSTUDY_STAGING", "~/.cache/camstudy/staging")).expanduser()
    return staging / match["scheme"] / match["path"].strip("/")


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
        """Fetch every remote file under `relatives` (default: the whole study but SKIP) that is
        missing locally, of another size or newer; returns how many were fetched."""
        import pyarrow.fs as pafs

        filesystem, _ = self._fs
        fetched = 0
        for relative in relatives or ("",):
            top = self.remote_path(relative)
            info = filesystem.get_file_info(top)
            if info.type == pafs.FileType.NotFound:
                continue
            infos = [info] if info.type == pafs.FileType.File else filesystem.get_file_info(
                pafs.FileSelector(top, recursive=True))
            for item in infos:
                if item.type == pafs.FileType.File and self._wanted(item):
                    fetched += self._get(item)
        return fetched

    def _wanted(self, item) -> bool:
        relative = item.path[len(self.remote_path()) + 1:]
        return relative.split("/", 1)[0] not in SKIP

    def _get(self, item) -> int:
        filesystem, _ = self._fs
        local = self.local / item.path[len(self.remote_path()) + 1:]
        stamp = item.mtime.timestamp() if item.mtime is not None else None
        if local.is_file() and local.stat().st_size == item.size and (stamp is None or local.stat().st_mtime >= stamp):
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
    return bool(relative.parts) and (relative.parts[0] in SKIP or any(_TEMPORARY.match(part) for part in relative.parts))


_TEMPORARY = re.compile(r"^\..+\.tmp-\d+$")  # training.atomic's temporary siblings
