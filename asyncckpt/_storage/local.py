"""Durable, atomic file storage: temp file beside the target, fsync, rename, fsync the folder.

At every instant the target path holds either the previous complete file or the new complete
file. A crash leaves at most a temp file, recognisable by its name (see :func:`is_temp_file`),
which :func:`cleanup_temp_files` removes once the process that wrote it is gone.

A temp name carries the writer's host identity (:data:`HOST_ID`) beside its pid: in a folder
shared by several hosts (NFS, Lustre, a multi-node job) or containers (other PID namespaces),
a pid means something only on the host that wrote it, so the sweep removes only files of this
host whose process is gone, never another's.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import uuid
from contextlib import contextmanager, suppress
from typing import Any, BinaryIO, Callable, Iterator, List, Optional, Tuple

from .paths import resolved_entry

log = logging.getLogger("asyncckpt.storage")  # the name users configure; kept from before the move

TEMP_MARKER = ".asyncckpt-tmp-"
# ``<host>-<pid>-<random>``; names of older versions had no ``<host>`` (never swept now).
_TEMP_RE = re.compile(
    r"^\.(?P<name>.+)" + re.escape(TEMP_MARKER) + r"(?:(?P<host>[0-9a-f]{8})-)?(?P<pid>\d+)-[0-9a-f]{8}$"
)


def _host_identity() -> str:
    """8 hex digits naming this host and PID namespace: the scope in which a pid is meaningful.

    Built from the host name, the kernel's boot id (a reboot reuses pids) and the PID namespace
    (containers on one host number their processes apart).
    """
    parts = [socket.gethostname()]
    for source in ("/proc/sys/kernel/random/boot_id",):
        try:
            with open(source) as f:
                parts.append(f.read().strip())
        except OSError:
            pass
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


#: This host's identity in temp file names (see the module docstring).
HOST_ID = _host_identity()


_NAME_MAX = 255


def temp_path_for(target: str) -> str:
    """A unique temp file name in the target's folder, so the final rename stays on one filesystem.

    The name is ``.<name>.asyncckpt-tmp-<host>-<pid>-<hex8>``; where that would exceed the filesystem's
    255-byte name limit (a target name that ``torch.save`` itself could still write), ``<name>``
    is shortened, so any name that fits on its own can be written.
    """
    folder, name = os.path.split(target)
    suffix = f"{TEMP_MARKER}{HOST_ID}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    room = _NAME_MAX - 1 - len(suffix.encode())
    encoded = os.fsencode(name)
    if len(encoded) > room:
        name = os.fsdecode(encoded[:room].decode("utf-8", "ignore").encode()) or "ckpt"
    return os.path.join(folder, f".{name}{suffix}")


def is_temp_file(filename: str) -> bool:
    """True when ``filename`` (a base name) is one of asyncckpt's temp files."""
    return _TEMP_RE.match(filename) is not None


def fsync_folder(folder: str) -> None:
    """Make a rename or unlink in ``folder`` durable."""
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems cannot fsync a directory; the data is still fsynced
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A file that appears at ``target`` complete or not at all (THE atomic write).

    The bytes go to :attr:`tmp`, a temp file beside ``target`` (same filesystem, so the rename
    is atomic); :meth:`commit` fsyncs it, renames it over ``target`` and fsyncs the folder. Any
    failure before the rename removes the temp file and leaves ``target`` as it was::

        with AtomicFile(path) as atomic:          # makedirs + sweep of crashed runs' temp files
            with atomic.open() as f:              # fsynced on close when durable
                f.write(data)
            atomic.commit()                       # or write to atomic.tmp yourself, then commit()

    Leaving the ``with`` block by an exception discards the temp file; leaving it normally keeps
    an uncommitted temp file, so a caller may commit later (a deferred rename) or adopt it after
    a crash (:meth:`adopt`). ``temp_name`` gives the temp file a caller's own name in the target's
    folder (for callers whose sweeps or crash recovery read their names); the default is
    :func:`temp_path_for`, which :func:`cleanup_temp_files` recognises.

    ``keep_on_failed_commit`` keeps the temp file when :meth:`commit` fails (a failed write in
    the ``with`` block still discards it): for a deferred rename whose temp file already belongs
    to a committed save, which crash recovery must still find (Lightning's pending ``meta.pt``).
    """

    def __init__(
        self,
        target: str,
        *,
        durable: bool = True,
        temp_name: Optional[str] = None,
        keep_on_failed_commit: bool = False,
    ) -> None:
        self.target = target
        entry = resolved_entry(target)  # the name the rename replaces, its folder's links resolved
        self.folder = os.path.dirname(entry)
        self.durable = durable
        self.keep_on_failed_commit = keep_on_failed_commit
        self.tmp = os.path.join(self.folder, temp_name) if temp_name else temp_path_for(entry)
        #: True once the temp file is fsynced (:meth:`open` on close, :meth:`sync`, :meth:`adopt`):
        #: :meth:`commit` then does not fsync it again.
        self.synced = False
        self.committed = False

    @classmethod
    def adopt(cls, tmp: str, target: str, *, durable: bool = True, keep_on_failed_commit: bool = False) -> "AtomicFile":
        """The complete, already fsynced temp file ``tmp`` (left by an interrupted commit), ready
        to :meth:`commit` over ``target`` (``tmp`` must be in ``target``'s folder)."""
        atomic = cls(
            target, durable=durable, temp_name=os.path.basename(tmp), keep_on_failed_commit=keep_on_failed_commit
        )
        atomic.tmp = tmp
        atomic.synced = True
        return atomic

    def __enter__(self) -> "AtomicFile":
        os.makedirs(self.folder, exist_ok=True)
        sweep_stale_temp_files_once(self.folder)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.discard()

    @contextmanager
    def open(self, mode: str = "wb") -> Iterator[BinaryIO]:
        """The temp file, opened for writing; flushed and (when durable) fsynced on close."""
        with open(self.tmp, mode) as f:
            yield f
            f.flush()
            if self.durable:
                os.fsync(f.fileno())
                self.synced = True

    def sync(self) -> None:
        """fsync the temp file now, for a caller that wrote :attr:`tmp` itself (an async write);
        :meth:`commit` then does not fsync it again."""
        fsync_file(self.tmp)
        self.synced = True

    def commit(self, before: Optional[Callable[[str], None]] = None) -> int:
        """Move the complete temp file over the target; returns its size in bytes.

        ``before(tmp)``, if given, runs once the temp file is complete (and fsynced) and before
        the rename, with the previous file still at the target (a checksum record is committed
        there). A failure up to the rename discards the temp file (unless ``keep_on_failed_commit``)
        and leaves the target as it was.
        """
        try:
            if self.durable and not self.synced:
                fsync_file(self.tmp)
            size = os.path.getsize(self.tmp)
            if before is not None:
                before(self.tmp)
            os.replace(self.tmp, self.target)
        except BaseException:
            if not self.keep_on_failed_commit:
                self.discard()
            raise
        self.committed = True
        if self.durable:
            fsync_folder(self.folder)
        return size

    def discard(self) -> None:
        """Remove the temp file (nothing after a commit)."""
        if not self.committed:
            with suppress(FileNotFoundError):
                os.unlink(self.tmp)


def atomic_write(
    path: str,
    write: Callable[[str], None],
    *,
    durable: bool = True,
    before_commit: Optional[Callable[[str], None]] = None,
) -> int:
    """Run ``write(temp_path)``, then move the finished temp file over ``path`` (an :class:`AtomicFile`).

    ``before_commit(temp_path)``, if given, runs after the temp file is complete (and fsynced)
    and before the rename; the checksum record is committed there. Returns the size in bytes of
    the committed file. On any failure, the temp file is removed and the target is untouched.
    """
    with AtomicFile(path, durable=durable) as atomic:
        write(atomic.tmp)
        return atomic.commit(before_commit)


def remove_path(path: str) -> bool:
    """Remove a file (or a folder, as Lightning's IO does); returns whether anything was there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
    fsync_folder(os.path.dirname(resolved_entry(path)))
    return True


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process; a zombie (dead, not yet reaped) counts as gone.

    Zombies matter in containers whose init does not reap orphans: a killed writer process
    would otherwise keep its temp files "live" forever.
    """
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def find_temp_files(folder: str) -> List[Tuple[str, Optional[str], int]]:
    """asyncckpt temp files in ``folder``, each with the host id (None in older names) and the
    pid of the process that wrote it."""
    found = []
    with suppress(FileNotFoundError, NotADirectoryError):
        for name in os.listdir(folder):
            match = _TEMP_RE.match(name)
            if match:
                found.append((os.path.join(folder, name), match.group("host"), int(match.group("pid"))))
    return found


def cleanup_temp_files(folder: str, *, include_live: bool = False) -> List[str]:
    """Remove temp files that crashed writers of this host left in ``folder``; returns them.

    A file is removed only when its name proves it was written on this host (and PID
    namespace) by a process that is gone; another host's files, and names without a host id,
    are kept, since their writer may be running elsewhere. ``include_live`` removes every
    asyncckpt temp file in the folder: only for a folder no writer anywhere is using.
    """
    removed = []
    for tmp, host, pid in find_temp_files(folder):
        if include_live or (host == HOST_ID and not _pid_alive(pid)):
            with suppress(FileNotFoundError):
                os.unlink(tmp)
                removed.append(tmp)
    if removed:
        log.info("asyncckpt: removed %d stale temp file(s) in %s", len(removed), folder)
    return removed


_swept_folders: set = set()


def sweep_stale_temp_files_once(folder: str) -> None:
    """Clean a crashed run's temp files the first time this process writes into ``folder``."""
    if folder in _swept_folders:
        return
    _swept_folders.add(folder)
    cleanup_temp_files(folder)
