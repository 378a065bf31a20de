"""``TorchCheckpointIO``: ``torch.save`` / ``torch.load``, durable and atomic.

Local paths stream straight into a temp file beside the target (no in-memory copy of the whole
checkpoint), which is fsynced and renamed over the target. fsspec URLs go through
:mod:`asyncckpt._storage.s3`: ``s3://`` streams into a multipart upload that appears only when
complete; other protocols are written inside an fsspec transaction. Requests are retried on
transient errors; credentials never appear in messages or ``repr``. ``storage_options`` given at
construction apply to every URL, and a URL saved with its own ``storage_options`` is loaded and
removed with them again, since ``load_checkpoint`` and ``remove_checkpoint`` take none.

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
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from .._diagnose import describe_unpicklable
from ..checkpoint_io import CheckpointIO, PathLike
from ..errors import InvalidPathError, NotSerializableError
from ..redaction import describe_options, shown
from .backend import Backend, FsspecFiles, backend_for, is_local_path
from .hashing import CHUNK_BYTES, sha256_stream
from .integrity import (
    RECORD_SUFFIX,
    commit_with_record,
    digests_to_commit,
    explain_unreadable,
    format_record,
    parse_record,
    put_local_record,
    sha256_file,
    verify_file,
)
from .local import AtomicFile
from .paths import check_names, check_target, resolved_entry
from .retry import RetryPolicy, call_with_retries
from .s3 import S3Upload, pending_aborts, retry_pending_aborts
from .spare import SpareFile
from .torch_zip import crc_threads, save_to_file

log = logging.getLogger("asyncckpt.torch_io")  # the name users configure; kept from before the move

_PICKLING_ERRORS = (pickle.PicklingError, TypeError, AttributeError)
#: Load failures that say something about the file, not the connection: raised as they are.
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError)


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

    def fileno(self) -> int:
        return self._file.fileno()


def torch_save_to_file(checkpoint: Any, path: str) -> None:
    """``torch.save`` into ``path`` (the same bytes, with the CRC32 of the records computed on
    helper threads: :mod:`asyncckpt._storage.torch_zip`); a failed write raises its real
    ``OSError`` (errno kept).

    An existing file at ``path`` is written over from its start and cut where the archive ends,
    not emptied first: a spare file linked there (:mod:`asyncckpt._storage.spare`) keeps the
    pages allocated for it.
    """
    with open(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+b") as f:
        recorder = _WriteErrorRecorder(f)
        try:
            save_to_file(checkpoint, recorder, crc_threads())
        except Exception:
            if recorder.error is not None:
                raise recorder.error  # noqa: B904 - torch's RuntimeError stays as __context__
            raise


def explain_os_error(err: OSError, target: str) -> OSError:
    """``err`` with a message saying what to do, for errors people can act on; else ``err`` itself.

    The result has the same type, errno and filename as ``err``, so ``except PermissionError``
    and ``err.errno`` checks keep working.
    """
    folder = os.path.dirname(resolved_entry(target))
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


def load_on_cpu(storage: Any, location: str) -> Any:
    """``map_location`` that loads every storage onto the CPU (Lightning's default too)."""
    return storage


class TorchCheckpointIO(CheckpointIO):
    """Saves with ``torch.save`` and loads with ``torch.load``; files are ordinary torch files.

    Paths are local paths or fsspec URLs (``s3://bucket/run/last.ckpt``, ``gs://``, ``az://``,
    ``memory://``); see docs/object-storage.md.

    Args:
        durable: fsync the file and its folder before the save counts as done (default). Turn
            off only where losing the newest checkpoint in a power cut is acceptable.
        checksum: keep a SHA-256 record ``<path>.sha256`` beside each local checkpoint, committed
            so that the file at the path always matches it, even across a crash; checked by
            ``asyncckpt verify`` and ``load_checkpoint(..., verify=True)``. Off by default, so
            a folder holds exactly the files the plain ``torch.save`` would leave. Works for
            URLs too (the record is the object ``<url>.sha256``).
        storage_options: fsspec options for every URL (endpoint, credentials ...); options given
            to ``save_checkpoint`` are laid over them for that save, and remembered for later
            ``load_checkpoint`` and ``remove_checkpoint`` calls on the same URL. Without any,
            the filesystem's own defaults apply (e.g. ``AWS_*`` environment variables).
        retry: how often a request to object storage is tried on transient errors.
        part_bytes: size of each part of an S3 multipart upload (at least 5 MiB).
        max_inflight_parts: parts uploading at once while serialization goes on; memory held
            by one S3 save is about ``(max_inflight_parts + 1) * part_bytes``.
        spare_file: after a save into a folder on tmpfs (``/dev/shm``), allocate an unnamed file
            of that checkpoint's size there in the background, so that the next save writes
            into pages that exist (about half the time of a fresh write). It holds the room the
            next file takes anyway, is made only while as much stays free besides it (in the
            filesystem, the machine's memory and the process's memory cgroup), and is freed by
            ``teardown`` or when the process ends. ``False``: never. See docs/index.md.
    """

    def __init__(
        self,
        *,
        durable: bool = True,
        checksum: bool = False,
        storage_options: Optional[Mapping[str, Any]] = None,
        retry: Optional[RetryPolicy] = None,
        part_bytes: int = 16 * 1024 * 1024,
        max_inflight_parts: int = 4,
        spare_file: bool = True,
    ) -> None:
        self.durable = durable
        self.checksum = checksum
        self.storage_options = dict(storage_options) if storage_options else None
        self.retry = retry if retry is not None else RetryPolicy()
        self.part_bytes = part_bytes
        self.max_inflight_parts = max_inflight_parts
        self._url_options: Dict[str, Dict[str, Any]] = {}
        self.spare_file = spare_file
        self._spare = SpareFile()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # A copy's spare file pickles as None (a descriptor and a thread stay in their process);
        # a version without one pickled neither attribute.
        state.setdefault("spare_file", True)
        if state.get("_spare") is None:
            state["_spare"] = SpareFile()
        self.__dict__.update(state)

    # -- storage options --------------------------------------------------------------------

    def remember_storage_options(self, path: PathLike, storage_options: Optional[Mapping[str, Any]]) -> None:
        """Keep the options ``path`` is saved with, so a later load or remove of it needs none.

        The engine calls this when a save is submitted, so the copy of this IO that loads
        (in the training process) knows them even when another copy (the writer process)
        does the save.
        """
        if storage_options is None or not isinstance(path, (str, os.PathLike)):
            return
        target = os.fspath(path)
        if not is_local_path(target):
            self._url_options[target] = dict(storage_options)

    def _options_for(self, url: str, given: Optional[Mapping[str, Any]] = None) -> Optional[Dict[str, Any]]:
        merged = dict(self.storage_options or {})
        extra = given if given is not None else self._url_options.get(url)
        if extra:
            merged.update(extra)
        return merged or None

    def check_path(self, path: PathLike) -> str:
        """Validate ``path`` and return it as a string; raises :class:`InvalidPathError`."""
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidPathError(
                f"checkpoint path must be a str or os.PathLike, not {type(path).__name__}", None
            )
        text = os.fspath(path)
        check_target(text)
        return text

    def check_storage_options(self, path: PathLike, storage_options: Optional[Any]) -> None:
        """Raise ``TypeError`` for ``storage_options`` this IO would refuse (they apply to URLs only)."""
        if storage_options is not None and is_local_path(os.fspath(path)):
            raise TypeError(
                f"storage_options={describe_options(storage_options)} is only used for fsspec URLs; "
                f"{os.fspath(path)!r} is a local path, so pass storage_options=None"
            )

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], path: PathLike, storage_options: Optional[Any] = None
    ) -> None:
        target = self.check_path(path)
        try:
            backend = self._backend_for_save(target, storage_options)
            if backend.is_local:
                try:
                    self._save_local(checkpoint, backend.local_path)
                except OSError as err:
                    explained = explain_os_error(err, target)
                    if explained is err:
                        raise
                    raise explained from err
            elif backend.is_s3:
                self._save_s3(checkpoint, backend)
            else:
                call_with_retries("writing checkpoint", target, lambda: self._save_fsspec(checkpoint, backend),
                                  self.retry, backend.secrets,
                                  passthrough=(*_PICKLING_ERRORS, pickle.PicklingError, InvalidPathError))
        except Exception as err:
            if _is_pickling_error(err):
                raise NotSerializableError(describe_unpicklable(checkpoint, target, err), target) from err
            raise
        log.debug("asyncckpt: wrote %s", shown(target))

    def _save_local(self, checkpoint: Dict[str, Any], local: str) -> None:
        with AtomicFile(local, durable=self.durable) as atomic:
            spares: Optional[SpareFile] = getattr(self, "_spare", None)  # None: a subclass without our __init__
            if spares is not None:
                spares.take_as(atomic.folder, atomic.tmp)
            torch_save_to_file(checkpoint, atomic.tmp)

            def digests_before() -> List[str]:
                # The new file is complete in ``tmp`` and the previous one still at ``local``.
                return digests_to_commit(local, sha256_file(atomic.tmp)) if self.checksum else []

            size = commit_with_record(
                atomic.commit, digests_before,
                lambda digests: put_local_record(local, digests, durable=self.durable),
                shown_target=local,
            )
        if spares is not None and self.spare_file:
            spares.prepare(atomic.folder, size)

    def _backend_for_save(self, target: str, storage_options: Optional[Any]) -> Backend:
        """The backend ``target`` is saved to, with the save's options checked and remembered."""
        if is_local_path(target):
            self.check_storage_options(target, storage_options)
            return backend_for(target)
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise TypeError(f"storage_options must be a dict of fsspec options, not {type(storage_options).__name__}")
        self.remember_storage_options(target, storage_options)
        return backend_for(target, self._options_for(target, storage_options))

    def _save_fsspec(self, checkpoint: Dict[str, Any], backend: FsspecFiles) -> None:
        """Any fsspec protocol: an fsspec transaction commits the file only if the write succeeds."""
        fs, fs_path, url = backend.fs, backend.fs_path, backend.url
        parent = os.path.dirname(fs_path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        if fs.isdir(fs_path):
            raise InvalidPathError(f"checkpoint path {url!r} is an existing folder; pass a file path inside it", url)
        with fs.transaction:
            with fs.open(fs_path, "wb") as f:
                torch.save(checkpoint, f)
        digests = [backend.sha256()] if self.checksum else []
        self._write_remote_record(backend, digests)

    def _save_s3(self, checkpoint: Dict[str, Any], backend: FsspecFiles) -> None:
        """Stream ``torch.save`` into a multipart upload; the object appears only when it is complete."""
        fs, fs_path, url, secrets = backend.fs, backend.fs_path, backend.url, backend.secrets
        retry_pending_aborts()
        backend.invalidate()  # exists() below must not answer from a stale listing
        upload = S3Upload(fs, url, fs_path, policy=self.retry, part_bytes=self.part_bytes,
                          max_inflight=self.max_inflight_parts, secrets=secrets, sha256=self.checksum)

        def digests_before() -> List[str]:
            # Every byte is uploaded; the previous object is still the one at the URL.
            if not self.checksum:
                return []
            accepted = self._remote_record(backend)
            if accepted is None:
                accepted = [backend.sha256()] if fs.exists(fs_path) else []
            new = upload.sha256()
            return [new] + [d for d in accepted if d != new]

        def commit(before: Callable[[], None]) -> None:
            try:
                try:
                    torch.save(checkpoint, upload)
                except Exception:
                    if upload.error is not None:
                        raise upload.error  # noqa: B904 - torch's RuntimeError stays as __context__
                    raise
                upload.commit(before_complete=before)
            except BaseException:
                upload.abort()
                raise
            finally:
                backend.invalidate()

        commit_with_record(
            commit, digests_before, lambda digests: self._write_remote_record(backend, digests),
            shown_target=url, prune_errors=(),  # a failed prune of a remote record fails the save, as before
        )

    def _remote_record(self, backend: FsspecFiles) -> Optional[List[str]]:
        text = call_with_retries("reading the checksum record of", backend.url, backend.read_record_text,
                                 self.retry, backend.secrets)
        return None if text is None else parse_record(text)

    def _write_remote_record(self, backend: FsspecFiles, digests: List[str]) -> None:
        """Write the record listing ``digests``, or remove a stale one when there are none."""
        fs, fs_path, url, secrets = backend.fs, backend.fs_path, backend.url, backend.secrets
        record = fs_path + RECORD_SUFFIX
        if digests:
            data = format_record(fs_path, digests)
            call_with_retries("writing the checksum record of", url, lambda: fs.pipe_file(record, data),
                              self.retry, secrets)
            return

        def remove_stale() -> None:
            try:
                fs.rm_file(record)
            except FileNotFoundError:
                pass

        if backend.is_s3 or fs.exists(record):  # an S3 delete of a missing key succeeds: no look-up first
            call_with_retries("removing the stale checksum record of", url, remove_stale, self.retry, secrets)

    def load_checkpoint(
        self,
        path: PathLike,
        map_location: Optional[Any] = load_on_cpu,
        weights_only: Optional[bool] = None,
        verify: bool = False,
    ) -> Dict[str, Any]:
        """``torch.load`` the file at ``path``, onto the CPU unless ``map_location`` says otherwise
        (as Lightning's ``TorchCheckpointIO`` does; ``map_location=None`` keeps the saved devices).

        With ``verify=True`` the whole file is checked first (its checksum record, or the CRC32
        of every zip record) and :class:`asyncckpt.IntegrityError` is raised for a damaged file.
        """
        target = os.fspath(path)
        check_names(target)
        backend = backend_for(target, self._options_for(target))
        if not backend.is_local:
            return self._load_url(backend, map_location, weights_only, verify)
        local = backend.local_path
        if verify:
            if not os.path.exists(local):
                raise FileNotFoundError(f"checkpoint file not found: {target}")
            verify_file(local)
        if os.path.isdir(local):
            raise InvalidPathError(f"checkpoint path {target!r} is a folder, not a checkpoint file", target)
        if not os.path.exists(local):
            raise FileNotFoundError(f"checkpoint file not found: {target}")
        try:
            return torch.load(local, map_location=map_location, weights_only=weights_only)
        except Exception as err:
            explain_unreadable(err, local)
            raise

    def _load_url(self, backend: FsspecFiles, map_location: Any, weights_only: Optional[bool],
                  verify: bool) -> Dict[str, Any]:
        url, secrets = backend.url, backend.secrets
        if not call_with_retries("looking up checkpoint", url, backend.exists, self.retry, secrets):
            raise FileNotFoundError(f"checkpoint file not found: {shown(url)}")
        if verify:
            verify_file(url, storage_options=backend.storage_options)

        def load() -> Dict[str, Any]:
            with backend.fs.open(backend.fs_path, "rb") as f:
                return torch.load(f, map_location=map_location, weights_only=weights_only)

        return call_with_retries("loading checkpoint", url, load, self.retry, secrets, passthrough=_LOAD_ERRORS)

    def remove_checkpoint(self, path: PathLike) -> None:
        target = os.fspath(path)
        check_names(target)
        backend = backend_for(target, self._options_for(target))
        if backend.is_local:
            if backend.remove():  # the file (or folder) and its checksum record
                log.debug("asyncckpt: removed %s", shown(target))
            return
        call_with_retries("removing checkpoint", target, backend.remove, self.retry, backend.secrets)
        log.debug("asyncckpt: removed %s", shown(target))

    def teardown(self) -> None:
        """Free the spare file, if any; abort uploads that failed while the server was
        unreachable, if it is back."""
        spares: Optional[SpareFile] = getattr(self, "_spare", None)
        if spares is not None:
            spares.release()
        if pending_aborts() and retry_pending_aborts():
            log.warning(
                "asyncckpt: unfinished uploads could not be aborted (server unreachable): %s; their parts cost "
                "storage until aborted (a bucket lifecycle rule AbortIncompleteMultipartUpload removes them)",
                ", ".join(shown(url) for url in pending_aborts()),
            )

    def __repr__(self) -> str:
        extra = ", checksum=True" if self.checksum else ""
        if not getattr(self, "spare_file", True):
            extra += ", spare_file=False"
        if self.storage_options:
            extra += f", storage_options={describe_options(self.storage_options)}"
        return f"{type(self).__name__}(durable={self.durable}{extra})"


# Pickles (the Lightning plugin's state, users' own) name this path: keep it across the move.
TorchCheckpointIO.__module__ = "asyncckpt.torch_io"


def sha256_url(fs: Any, fs_path: str) -> str:
    """Hex SHA-256 of the object at ``fs_path``, streamed."""
    with fs.open(fs_path, "rb", block_size=CHUNK_BYTES) as f:
        return sha256_stream(f)
