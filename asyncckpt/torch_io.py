"""``TorchCheckpointIO``: ``torch.save`` / ``torch.load``, durable and atomic.

Local paths stream straight into a temp file beside the target (no in-memory copy of the whole
checkpoint), which is fsynced and renamed over the target. fsspec URLs (``memory://``,
``file://``, any installed protocol) are written inside an fsspec transaction, so a failed write
commits nothing.

Local writes go through a file object that records the ``OSError`` of a failed write, because
``torch.save`` replaces it with an opaque ``RuntimeError`` ("unexpected pos ..."). Permission,
read-only, no-space and file-size errors are re-raised as the same ``OSError`` type and errno
with a message that says what to do; the original error is chained as ``__cause__``.

``checksum=True`` also keeps a crash-consistent SHA-256 record beside each file (see
:mod:`asyncckpt.integrity`); ``load_checkpoint(..., verify=True)`` checks a file before loading.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil
from typing import Any, Dict, List, Optional

import torch

from ._pickling import describe_unpicklable
from .checkpoint_io import CheckpointIO, PathLike
from .errors import InvalidPathError, NotSerializableError
from .integrity import format_record, read_record, record_path, sha256_file, verify_file
from .storage import atomic_write, check_target, local_path_of, remove_path

log = logging.getLogger(__name__)

_PICKLING_ERRORS = (pickle.PicklingError, TypeError, AttributeError)


def _is_pickling_error(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, pickle.PicklingError) or (
        isinstance(err, _PICKLING_ERRORS) and ("pickle" in text or "Can't get local object" in text)
    )


class _WriteErrorRecorder:
    """The file object handed to ``torch.save``: keeps the ``OSError`` of a failed write."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self._file.flush()


def _torch_save_to_file(checkpoint: Any, path: str) -> None:
    """``torch.save`` into ``path``; a failed write raises its real ``OSError`` (errno kept)."""
    with open(path, "wb") as f:
        recorder = _WriteErrorRecorder(f)
        try:
            torch.save(checkpoint, recorder)
        except Exception:
            if recorder.error is not None:
                raise recorder.error  # noqa: B904 - torch's RuntimeError stays as __context__
            raise


def explain_os_error(err: OSError, target: str) -> OSError:
    """``err`` with a message saying what to do, for errors people can act on; else ``err`` itself.

    The result has the same type, errno and filename as ``err``, so ``except PermissionError``
    and ``err.errno`` checks keep working.
    """
    folder = os.path.dirname(os.path.abspath(target))
    code = err.errno
    if code in (errno.EACCES, errno.EPERM):
        advice = (
            f"permission denied: this process (uid {os.geteuid()}) may not create files in {folder!r}; "
            "make the folder writable for this user or choose another checkpoint folder"
        )
    elif code == errno.EROFS:
        advice = (
            f"the filesystem holding {folder!r} is mounted read-only; remount it read-write or choose "
            "a checkpoint folder on a writable filesystem"
        )
    elif code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(folder).free} bytes free"
        except OSError:
            free = "free space unknown"
        what = "disk quota exceeded" if code == errno.EDQUOT else "no space left"
        advice = (
            f"{what} on the filesystem holding {folder!r} ({free}); free space (delete old checkpoints, "
            "keep fewer of them) or choose a checkpoint folder with more room"
        )
    elif code == errno.EFBIG:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            advice = (
                f"file too large: this process may write files of at most {limit} bytes (RLIMIT_FSIZE, "
                "'ulimit -f'); raise the limit (e.g. 'ulimit -f unlimited') or save a smaller checkpoint"
            )
        else:
            advice = "file too large for the filesystem; choose a checkpoint folder on another filesystem"
    else:
        return err
    message = f"cannot write checkpoint {target!r}: {advice}. The previous file at this path, if any, is intact"
    try:
        return type(err)(code, message, err.filename)
    except Exception:  # noqa: BLE001 - an OSError subclass with its own constructor
        return OSError(code, message, err.filename)


class TorchCheckpointIO(CheckpointIO):
    """Saves with ``torch.save`` and loads with ``torch.load``; files are ordinary torch files.

    Args:
        durable: fsync the file and its folder before the save counts as done (default). Turn
            off only where losing the newest checkpoint in a power cut is acceptable.
        checksum: keep a SHA-256 record ``<path>.sha256`` beside each local checkpoint, committed
            so that the file at the path always matches it, even across a crash; checked by
            ``asyncckpt verify`` and ``load_checkpoint(..., verify=True)``. Off by default, so
            a folder holds exactly the files the plain ``torch.save`` would leave.
    """

    def __init__(self, *, durable: bool = True, checksum: bool = False) -> None:
        self.durable = durable
        self.checksum = checksum

    def check_path(self, path: PathLike) -> str:
        """Validate ``path`` and return it as a string; raises :class:`InvalidPathError`."""
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidPathError(
                f"checkpoint path must be a str or os.PathLike, not {type(path).__name__}", None
            )
        text = os.fspath(path)
        check_target(text)
        return text

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], path: PathLike, storage_options: Optional[Any] = None
    ) -> None:
        target = self.check_path(path)
        try:
            local = local_path_of(target)
            if local is None:
                self._save_url(checkpoint, target, storage_options)
            else:
                if storage_options is not None:
                    raise TypeError(
                        f"storage_options={storage_options!r} is only used for fsspec URLs; "
                        f"{target!r} is a local path, so pass storage_options=None"
                    )
                try:
                    self._save_local(checkpoint, local)
                except OSError as err:
                    explained = explain_os_error(err, target)
                    if explained is err:
                        raise
                    raise explained from err
        except Exception as err:
            if _is_pickling_error(err):
                raise NotSerializableError(describe_unpicklable(checkpoint, target, err), target) from err
            raise
        log.debug("asyncckpt: wrote %s", target)

    def _save_local(self, checkpoint: Dict[str, Any], local: str) -> None:
        digests: List[str] = []

        def before_commit(tmp: str) -> None:
            # Runs with the new file complete in ``tmp`` and the previous one still at ``local``.
            if not self.checksum:
                if os.path.exists(record_path(local)):  # a record from an earlier checksum=True save
                    os.unlink(record_path(local))
                return
            new = sha256_file(tmp)
            accepted = read_record(local)
            if accepted is None:
                accepted = [sha256_file(local)] if os.path.isfile(local) else []
            digests[:] = [new] + [d for d in accepted if d != new]
            self._write_record(local, digests)

        atomic_write(local, lambda tmp: _torch_save_to_file(checkpoint, tmp), durable=self.durable,
                     before_commit=before_commit)
        if self.checksum and len(digests) > 1:
            try:
                self._write_record(local, digests[:1])
            except OSError as err:  # the record still lists the new digest; it stays valid
                log.warning("asyncckpt: could not prune the checksum record of %s: %s", local, err)

    def _write_record(self, local: str, digests: List[str]) -> None:
        data = format_record(local, digests)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        atomic_write(record_path(local), write, durable=self.durable)

    def _save_url(self, checkpoint: Dict[str, Any], url: str, storage_options: Optional[Any]) -> None:
        import fsspec

        fs, fs_path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        parent = os.path.dirname(fs_path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        if fs.isdir(fs_path):
            raise InvalidPathError(f"checkpoint path {url!r} is an existing folder; pass a file path inside it", url)
        with fs.transaction:
            with fs.open(fs_path, "wb") as f:
                torch.save(checkpoint, f)

    def load_checkpoint(
        self,
        path: PathLike,
        map_location: Optional[Any] = None,
        weights_only: Optional[bool] = None,
        verify: bool = False,
    ) -> Dict[str, Any]:
        """``torch.load`` the file at ``path``.

        With ``verify=True`` the whole file is checked first (its checksum record, or the CRC32
        of every zip record) and :class:`asyncckpt.IntegrityError` is raised for a damaged file.
        """
        target = os.fspath(path)
        local = local_path_of(target)
        if verify:
            if local is None:
                raise ValueError(f"verify=True checks local files only; {target!r} is a URL")
            if not os.path.exists(local):
                raise FileNotFoundError(f"checkpoint file not found: {target}")
            verify_file(local)
        if local is None:
            import fsspec

            fs, fs_path = fsspec.core.url_to_fs(target)
            if not fs.exists(fs_path):
                raise FileNotFoundError(f"checkpoint file not found: {target}")
            with fs.open(fs_path, "rb") as f:
                return torch.load(f, map_location=map_location, weights_only=weights_only)
        if os.path.isdir(local):
            raise InvalidPathError(f"checkpoint path {target!r} is a folder, not a checkpoint file", target)
        if not os.path.exists(local):
            raise FileNotFoundError(f"checkpoint file not found: {target}")
        return torch.load(local, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: PathLike) -> None:
        target = os.fspath(path)
        local = local_path_of(target)
        if local is None:
            import fsspec

            fs, fs_path = fsspec.core.url_to_fs(target)
            if fs.exists(fs_path):
                fs.rm(fs_path, recursive=True)
            return
        removed = remove_path(local)
        if os.path.exists(record_path(local)):
            remove_path(record_path(local))
        if removed:
            log.debug("asyncckpt: removed %s", target)

    def __repr__(self) -> str:
        extra = ", checksum=True" if self.checksum else ""
        return f"{type(self).__name__}(durable={self.durable}{extra})"
