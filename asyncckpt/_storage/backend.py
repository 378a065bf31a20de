"""THE local-versus-URL decision: :func:`backend_for` maps a checkpoint path to the backend that
stores it, so callers ask the backend instead of branching on the path's kind.

* :class:`LocalFiles`: a plain path, or a ``file://`` / ``local://`` URL (see
  :func:`~asyncckpt._storage.paths.local_path_of`); written with :class:`~asyncckpt._storage.local.AtomicFile`.
* :class:`S3Files`: an ``s3://`` URL through ``s3fs``; written with :class:`~asyncckpt._storage.s3.S3Upload`.
* :class:`FsspecFiles`: any other fsspec URL; written inside an fsspec transaction.

The operations here are single requests; callers that talk to object storage run them inside a
:class:`~asyncckpt._storage.retry.Retry`.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO, List, Mapping, Optional, Protocol, Union

from .fsspec import invalidate, is_s3, url_to_fs
from .hashing import CHUNK_BYTES, sha256_stream
from .local import cleanup_temp_files, remove_path
from .paths import local_path_of
from .s3 import abort_stale_uploads
from .secrets import secret_values

#: The checksum record of a checkpoint is the file (or object) ``<path>.sha256``.
RECORD_SUFFIX = ".sha256"


class Backend(Protocol):
    """Where one checkpoint path lives, and the single requests on it."""

    url: str
    is_local: bool
    is_s3: bool
    local_path: Optional[str]

    def exists(self) -> bool: ...
    def isdir(self) -> bool: ...
    def size(self) -> int: ...
    def open_read(self) -> BinaryIO: ...
    def sha256(self) -> str: ...
    def read_record_text(self) -> Optional[str]: ...
    def remove(self) -> bool: ...
    def cleanup(self, older_than_s: float) -> List[str]: ...


class LocalFiles:
    """A file of the local filesystem."""

    is_local = True
    is_s3 = False

    def __init__(self, url: str, local_path: str) -> None:
        self.url = url
        self.local_path = local_path
        self.secrets: List[str] = []

    def exists(self) -> bool:
        return os.path.exists(self.local_path)

    def isdir(self) -> bool:
        return os.path.isdir(self.local_path)

    def size(self) -> int:
        return os.path.getsize(self.local_path)

    def open_read(self) -> BinaryIO:
        return open(self.local_path, "rb")

    def sha256(self) -> str:
        with self.open_read() as f:
            return sha256_stream(f)

    def read_record_text(self) -> Optional[str]:
        try:
            with open(self.local_path + RECORD_SUFFIX, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def remove(self) -> bool:
        """Remove the file (or a folder, as Lightning's IO does) and its record; whether the file was there."""
        removed = remove_path(self.local_path)
        if os.path.exists(self.local_path + RECORD_SUFFIX):
            remove_path(self.local_path + RECORD_SUFFIX)
        return removed

    def cleanup(self, older_than_s: float = 0.0) -> List[str]:
        """Remove the temp files crashed writers of this host left in this folder (any age)."""
        return cleanup_temp_files(self.local_path)


class FsspecFiles:
    """An object behind an fsspec URL (``memory://``, ``gs://``, ``az://`` ...)."""

    is_local = False
    is_s3 = False
    local_path: Optional[str] = None

    def __init__(self, url: str, storage_options: Optional[Mapping[str, Any]], fs: Any, fs_path: str) -> None:
        self.url = url
        self.storage_options = storage_options
        self.fs = fs
        self.fs_path = fs_path
        self.secrets = secret_values(storage_options, url)

    def invalidate(self) -> None:
        """Forget cached listings, so the next look-up asks the server."""
        invalidate(self.fs, self.fs_path)

    def exists(self) -> bool:
        self.invalidate()
        return self.fs.exists(self.fs_path)

    def isdir(self) -> bool:
        return self.fs.isdir(self.fs_path)

    def size(self) -> int:
        return self.fs.size(self.fs_path)

    def open_read(self) -> BinaryIO:
        return self.fs.open(self.fs_path, "rb", block_size=CHUNK_BYTES)

    def sha256(self) -> str:
        with self.open_read() as f:
            return sha256_stream(f)

    def read_record_text(self) -> Optional[str]:
        try:
            return self.fs.cat_file(self.fs_path + RECORD_SUFFIX).decode("utf-8", "replace")
        except FileNotFoundError:
            return None

    def remove(self) -> bool:
        """Remove the object (recursively, for a folder) and its record; whether it was there."""
        self.invalidate()
        removed = self.fs.exists(self.fs_path)
        if removed:
            self.fs.rm(self.fs_path, recursive=True)
        if self.fs.exists(self.fs_path + RECORD_SUFFIX):
            self.fs.rm_file(self.fs_path + RECORD_SUFFIX)
        self.invalidate()
        return removed

    def cleanup(self, older_than_s: float) -> List[str]:
        """Abort the multipart uploads a killed writer left under this prefix (S3 only: raises
        ``ValueError`` for other protocols, which leave nothing behind)."""
        return abort_stale_uploads(self.url, older_than_s, self.storage_options)


class S3Files(FsspecFiles):
    """An object behind an ``s3://`` URL (``s3fs``): written with a streaming multipart upload."""

    is_s3 = True


def is_local_path(path: str) -> bool:
    """Whether ``path`` names a local file (what :func:`backend_for` decides, without opening a
    filesystem: for bookkeeping that must not connect anywhere)."""
    return local_path_of(path) is not None


def backend_for(path: str, storage_options: Optional[Mapping[str, Any]] = None) -> Union[LocalFiles, FsspecFiles]:
    """The backend storing ``path``: :class:`LocalFiles` for a local path (also ``file://`` and
    ``local://`` URLs), else the URL's filesystem, opened with ``storage_options`` (errors
    redacted): :class:`S3Files` for ``s3fs``, :class:`FsspecFiles` for the rest."""
    local = local_path_of(path)
    if local is not None:
        return LocalFiles(path, local)
    fs, fs_path = url_to_fs(path, storage_options)
    return (S3Files if is_s3(fs) else FsspecFiles)(path, storage_options, fs, fs_path)
