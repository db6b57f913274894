"""The storage root: where every durable artifact lives (datasets, the stage cache, trial results, Ray Tune and
Train checkpoints), on a local or shared-mount path (NFS, EFS, Lustre) or an object store (``s3://bucket/prefix``,
``gs://``; S3-compatible servers through ``?endpoint_override=``). It goes through ``pyarrow.fs``, as Ray does.

A ``Location`` is only a URI string, so it pickles to any node, where its filesystem is built again from the URI
and the node's own credentials (environment variables or an instance profile). Object stores have no rename:
a directory is published by writing its files first and its marker (a manifest, a metrics file) last, and a
reader treats an entry without its marker as absent. Readers on a node whose filesystem is not local fetch an
entry once into a node-local cache (``localize``), under a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow.fs as pafs

from segsde.errors import SegSDEError

STORAGE_ENV = "SEGSDE_STORAGE"
NODE_CACHE_ENV = "SEGSDE_NODE_CACHE"
FETCHED = ".segsde-fetched.json"  # in a node-local copy: the remote listing it was made from


def open_root(uri: str) -> Location:
    """The storage root at ``uri``, reached once: an unknown scheme, a bucket that cannot be reached or
    credentials that are refused become one line (the URI masked), before anything starts."""
    root = Location(uri)
    try:
        root.exists()
    except SegSDEError:
        raise
    except Exception as exc:  # pyarrow raises OSError and ArrowInvalid variants with the store's reason
        raise SegSDEError(f"cannot reach the storage root {root} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}): "
                          "check --storage (or SEGSDE_STORAGE) and the credentials in the environment") from None
    return root


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a local file whole or not at all (a temporary sibling, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def as_location(where: Location | str | os.PathLike) -> Location:
    return where if isinstance(where, Location) else Location(str(where))


def cache_key(config: dict) -> str:
    """A short hash of a JSON-able configuration: the name of a stage's cache entry."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def storage_uri(storage: str | os.PathLike | None, out: str | os.PathLike) -> str:
    """The storage root a command uses: ``--storage``, else ``$SEGSDE_STORAGE``, else its output directory."""
    given = storage or os.environ.get(STORAGE_ENV) or out
    return str(given) if "://" in str(given) else str(Path(given).absolute())


@dataclass(frozen=True)
class Location:
    """A file or directory under a storage root, named by its URI: an absolute local path, or
    ``scheme://bucket/key[?query]`` (the query, e.g. ``endpoint_override=``, configures the filesystem)."""
    uri: str

    def __post_init__(self):
        if "://" not in self.uri and not os.path.isabs(self.uri):
            object.__setattr__(self, "uri", str(Path(self.uri).absolute()))

    def __str__(self) -> str:
        """The URI for log lines and MLflow params, with any credentials in it (``s3://KEY:SECRET@bucket``) masked."""
        scheme, sep, rest = self.uri.partition("://")
        authority, slash, tail = rest.partition("/")
        return f"{scheme}{sep}***@{authority.rpartition('@')[2]}{slash}{tail}" if sep and "@" in authority else self.uri

    @property
    def _base_query(self) -> tuple[str, str]:
        base, _, query = self.uri.partition("?")
        return base, query

    @cached_property
    def _fs_path(self) -> tuple[pafs.FileSystem, str]:
        if self.is_local:
            return pafs.LocalFileSystem(), self.uri.removeprefix("file://")
        try:
            return pafs.FileSystem.from_uri(self.uri)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a bad scheme or unknown options
            reason = str(exc).replace(self.uri, str(self))
            raise SegSDEError(f"storage {self} cannot be opened ({reason}): use a local path, s3://bucket/prefix or gs://bucket/prefix") from None

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self._fs_path[0]

    @property
    def path(self) -> str:
        """The path inside ``filesystem`` (no scheme, no query): what Ray's ``storage_path`` takes with it."""
        return self._fs_path[1]

    @property
    def is_local(self) -> bool:
        return "://" not in self.uri or self.uri.startswith("file://")

    @property
    def name(self) -> str:
        return self._base_query[0].rstrip("/").rsplit("/", 1)[-1]

    def child(self, *parts: str) -> Location:
        base, query = self._base_query
        joined = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
        return Location(joined + (f"?{query}" if query else ""))

    @property
    def parent(self) -> Location:
        base, query = self._base_query
        return Location(base.rstrip("/").rsplit("/", 1)[0] + (f"?{query}" if query else ""))

    def with_name(self, name: str) -> Location:
        return self.parent.child(name)

    # -- reading -------------------------------------------------------------------------------------------
    def _info(self) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        try:
            with self.filesystem.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise SegSDEError(f"{self} does not exist") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def listing(self) -> dict[str, tuple[int, int]]:
        """{relative path: (size, mtime in ns)} of every file below this directory, hidden ones left out."""
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        out = {}
        for info in self.filesystem.get_file_info(selector):
            rel = info.path[len(self.path.rstrip("/")) + 1:]
            if info.type == pafs.FileType.File and not any(part.startswith(".") for part in rel.split("/")):
                out[rel] = (info.size, info.mtime_ns or 0)
        return out

    def children(self) -> list[str]:
        """The names directly below this directory."""
        selector = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        return sorted(info.base_name for info in self.filesystem.get_file_info(selector))

    # -- writing -------------------------------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        """Write the whole file at once: a rename on a local disk, one upload (complete or absent) on an object store."""
        if self.is_local:
            atomic_write_bytes(Path(self.path), data)
            return
        parent = self.path.rstrip("/").rsplit("/", 1)[0]
        self.filesystem.create_dir(parent, recursive=True)
        with self.filesystem.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def delete(self) -> None:
        """Remove this file or directory and everything below it; nothing there is fine."""
        info = self._info()
        if info.type == pafs.FileType.Directory:
            self.filesystem.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.filesystem.delete_file(self.path)

    def upload_dir(self, local: Path, marker: str | None = None) -> None:
        """Publish the local directory ``local`` here: a local root gets a copy renamed into place; an object
        store gets every file, then ``marker`` last, so a reader never sees a partial entry as complete."""
        local = Path(local)
        if self.is_local:
            target = Path(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(local, staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
            return
        files = sorted(p for p in local.rglob("*") if p.is_file())
        for p in sorted(files, key=lambda p: p.relative_to(local).as_posix() == marker):
            self.child(p.relative_to(local).as_posix()).write_bytes(p.read_bytes())

    def upload_file(self, local: Path) -> None:
        self.write_bytes(Path(local).read_bytes())


def node_cache_root() -> Path:
    return Path(os.environ.get(NODE_CACHE_ENV) or Path(tempfile.gettempdir()) / "segsde-node-cache")


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def localize(location: Location | str, verify=None) -> Path:
    """A local path with the contents of ``location`` (a directory or a file). On a local or shared-mount
    root that is the path itself; on an object store, a copy in this node's cache, fetched under a file lock
    and refreshed file by file when the remote listing changed (a pseudo-depth column added to a dataset).
    ``verify(path)`` checks a fresh copy (a dataset's shard checksums) before it is used."""
    location = as_location(location)
    if location.is_local:
        return Path(location.path)
    key = hashlib.sha256(location.uri.encode()).hexdigest()[:16]
    target = node_cache_root() / f"{key}-{location.name}"
    with _locked(target.with_name(target.name + ".lock")):
        info = location._info()
        if info.type == pafs.FileType.File:
            stamp = target.with_name(target.name + FETCHED)
            now = json.dumps([info.size, info.mtime_ns or 0])
            if not (target.is_file() and stamp.is_file() and stamp.read_text() == now):
                _fetch_file(location, target)
                stamp.write_text(now)
            return target
        if info.type == pafs.FileType.NotFound:
            raise SegSDEError(f"{location} does not exist on this node's view of the storage root: check --storage")
        remote = location.listing()
        stamp = target / FETCHED
        had = {k: tuple(v) for k, v in json.loads(stamp.read_text()).items()} if stamp.is_file() else {}
        if had == remote:
            return target
        for rel, meta in remote.items():
            if had.get(rel) != meta or not (target / rel).is_file():
                _fetch_file(location.child(rel), target / rel)
        for rel in set(had) - set(remote):
            (target / rel).unlink(missing_ok=True)
        if verify is not None:
            verify(target)
        stamp.write_text(json.dumps(remote))
        return target


def _fetch_file(location: Location, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
    with location.filesystem.open_input_stream(location.path) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, target)
