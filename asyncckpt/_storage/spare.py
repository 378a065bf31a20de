"""A spare file for the next save into a tmpfs folder, its pages allocated between saves.

On tmpfs (``/dev/shm``, a RAM-backed checkpoint tier, or a node-local RAM disk) a write is two
passes over the bytes: the kernel allocates and clears each page, then copies the data in. For
1 GiB here a fresh ``write`` took 0.42-0.45 s, a ``write`` into pages allocated beforehand
0.22-0.25 s. So after a save into such a folder commits, :class:`SpareFile` allocates a file of
that checkpoint's size there on a background thread, and the next save into the folder writes
into it (:meth:`SpareFile.take_as`): its page allocation is done before its call, not inside its
time to durable.

What the spare holds, and why it is bounded:

- One file per :class:`SpareFile` (one per ``TorchCheckpointIO``), the size of the last
  checkpoint written, in the folder of that checkpoint: the room the next save's file takes
  anyway. A save into another folder releases it.
- Made only on tmpfs (elsewhere allocating blocks ahead saves nothing: the page cache is filled
  at the write either way), for files of at least :data:`MIN_BYTES`, and only while at least as
  much stays free besides it: in the filesystem, in the machine's available memory, and under
  the memory limit of the process's cgroup (a container's), since tmpfs pages are memory.
- It has no name (``O_TMPFILE``): nothing appears in the folder, and the kernel frees it when
  the process ends, however it ends. A forked child closes its copy of the descriptor, so a
  DataLoader worker never keeps a checkpoint's pages alive. ``teardown`` releases it.
- A save that finds the spare still being allocated stops the allocation and takes what is
  there: the rest of its file is allocated as it is written, as without a spare.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import queue
import sys
import threading
import weakref
from typing import Any, Dict, List, Optional, Tuple

from .._threads import start_thread

log = logging.getLogger("asyncckpt.storage")

#: Below this size a spare saves a few milliseconds (16 MiB: about 3 ms here), not worth a thread.
MIN_BYTES = 16 << 20
#: Bytes allocated per step, between looks at whether a save wants the spare now.
STEP = 16 << 20
#: ``statfs`` type of tmpfs (and of ``/dev/shm``).
TMPFS_MAGIC = 0x01021994


def _statfs_type(folder: str) -> Optional[int]:
    """The filesystem type number of ``folder`` (``statfs(2)``'s ``f_type``), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
        if libc.statfs(os.fsencode(folder), buffer) != 0:
            return None
        return ctypes.c_long.from_buffer(buffer).value  # f_type is its first field, a long
    except Exception:  # noqa: BLE001 - no C library to ask: not known to be tmpfs
        return None


_tmpfs_folders: Dict[str, bool] = {}


def on_tmpfs(folder: str) -> bool:
    """Whether ``folder`` is on tmpfs (remembered per folder); False where the system has no
    ``O_TMPFILE`` (not Linux) or cannot tell."""
    known = _tmpfs_folders.get(folder)
    if known is None:
        known = hasattr(os, "O_TMPFILE") and sys.platform.startswith("linux") and _statfs_type(folder) == TMPFS_MAGIC
        _tmpfs_folders[folder] = known
    return known


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (cgroup v2): no limit


def _cgroup_headroom(root: str = "/sys/fs/cgroup") -> Optional[int]:
    """Bytes this process's memory cgroup (and those above it) may still charge, or None where
    no limit is set or none can be read. tmpfs pages are charged to the cgroup of the process
    that allocates them, and cannot be reclaimed without swap: a spare past the limit would
    bring the container's OOM killer."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    rooms: List[int] = []  # limit less usage, of each group with a limit
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: memory.max of this group and every parent
            base = root if os.path.exists(os.path.join(root, "cgroup.controllers")) else os.path.join(root, "unified")
            while True:
                folder = os.path.join(base, path.lstrip("/"))
                limit = _read_int(os.path.join(folder, "memory.max"))
                used = _read_int(os.path.join(folder, "memory.current"))
                if limit is not None and used is not None:
                    rooms.append(limit - used)
                if path in ("/", ""):
                    break
                path = os.path.dirname(path)
        elif "memory" in controllers.split(","):  # cgroup v1: the hierarchical limit
            folder = os.path.join(root, "memory", path.lstrip("/"))
            limits = [_read_int(os.path.join(folder, "memory.limit_in_bytes"))]
            used = _read_int(os.path.join(folder, "memory.usage_in_bytes"))
            try:
                with open(os.path.join(folder, "memory.stat")) as f:
                    limits += [int(stat.split()[1]) for stat in f if stat.startswith("hierarchical_memory_limit ")]
            except (OSError, ValueError):
                pass
            limit = min((value for value in limits if value is not None), default=None)
            if limit is not None and used is not None and limit < (1 << 60):  # 2^63 - a page: none
                rooms.append(limit - used)
    return min(rooms, default=None)


def _memory_available() -> Optional[int]:
    """``MemAvailable`` of ``/proc/meminfo``, in bytes, or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _room_for(folder: str, nbytes: int) -> bool:
    """Whether at least ``nbytes`` stay free once a spare of ``nbytes`` is made: in the
    filesystem, in the machine's available memory and under this process's memory cgroup limit
    (tmpfs pages are memory)."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    rooms = [stats.f_bavail * stats.f_frsize, _memory_available(), _cgroup_headroom()]
    return all(room is None or room >= 2 * nbytes for room in rooms)


def link_into(fd: int, path: str) -> bool:
    """Give the unnamed file ``fd`` the name ``path`` (in the folder it was made in); False
    where the kernel or the sandbox does not allow it (no ``/proc``), and nothing changed."""
    folder, name = os.path.split(path)
    try:
        dir_fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        # linkat(..., AT_SYMLINK_FOLLOW) through /proc: what links an O_TMPFILE file without
        # CAP_DAC_READ_SEARCH. A dir_fd makes os.link use linkat (bare, it calls link(2)).
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
    except OSError as err:
        log.debug("asyncckpt: cannot link the spare file as %s (%s); writing a new file", path, err)
        return False
    finally:
        os.close(dir_fd)
    return True


_instances: "weakref.WeakSet[SpareFile]" = weakref.WeakSet()


class _Spare:
    """One spare file, made and allocated on a thread of its own, which then waits to be told
    what becomes of it: taken by a save, released, or dropped with its owner.

    The descriptor is opened on that thread, which no Ctrl-C reaches, and held in a raw
    ``io.FileIO``. The thread closes it itself when the spare is released or its owner is
    collected: the owner's weak reference calls :attr:`_wanted`'s ``put`` (C, so no Python code
    runs inside a collection, where a Ctrl-C would be swallowed), which also stops an
    allocation nobody will use. Only a save interrupted between taking the spare and closing
    it leaves the file to ``FileIO``'s own deallocation (C too). A fork waits for the thread to
    finish opening it (:func:`_before_fork`), so a child sees it either open and held, or not
    open.
    """

    def __init__(self, owner: "SpareFile", folder: str, nbytes: int) -> None:
        self.folder = folder
        self.nbytes = nbytes
        self.finished = threading.Event()
        self.lock = threading.Lock()
        self._began = False
        self._file: Optional[io.FileIO] = None
        #: What becomes of the spare: "take", "release", or the owner's dead weak reference.
        self._wanted: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._owner = weakref.ref(owner, self._wanted.put)

    def start(self) -> None:
        start_thread(self._run, name="asyncckpt-spare")

    def _decided(self) -> Any:
        try:
            return self._wanted.get_nowait()
        except queue.Empty:
            return None

    def _run(self) -> None:
        wanted: Any = None
        try:
            with self.lock:
                wanted = self._decided()
                if wanted is not None:
                    return  # decided before the thread ran: nothing to make
                self._began = True
                # The mode a plain open() gives: the umask applies to O_TMPFILE too.
                fd = os.open(self.folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o666)
                self._file = io.FileIO(fd, "r+")
            for start in range(0, self.nbytes, STEP):
                wanted = self._decided()
                if wanted is not None:
                    return
                os.posix_fallocate(fd, start, min(STEP, self.nbytes - start))
            threading.current_thread().name = "asyncckpt-spare-ready"  # allocated: what a debugger shows
            wanted = self._wanted.get()  # the GIL released until a save, a release or the collector
        except OSError as err:  # no O_TMPFILE there, or ENOSPC: the room was taken meanwhile
            log.debug("asyncckpt: no spare file in %s (%s)", self.folder, err)
        finally:
            if wanted != "take":  # released, its owner gone, or failed: nobody will use it
                self.close()
            self.finished.set()

    def finish(self, wanted: str) -> Optional[BaseException]:
        """Tell the thread ``wanted`` ("take" or "release") and wait until it is done (within
        one :data:`STEP` of allocation), whatever interrupts the wait; returns the interruption
        (a Ctrl-C's ``KeyboardInterrupt``) for the caller to raise once the file is dealt with.
        A save must not write before then: a step ending after the file was cut to its archive
        would leave zeros after the archive."""
        self._wanted.put(wanted)
        with self.lock:
            began = self._began  # not begun: the thread, if it runs, finds the answer and stops
        interrupted: Optional[BaseException] = None
        while began and not self.finished.is_set():
            try:
                self.finished.wait()
            except BaseException as err:  # noqa: BLE001 - raised by the caller once the file is safe
                interrupted = interrupted or err
        return interrupted

    def hand_over(self) -> Optional[io.FileIO]:
        """The file (once taken), now the caller's; None if none was made."""
        with self.lock:
            file, self._file = self._file, None
        return file

    def close(self) -> None:
        file = self.hand_over()
        if file is not None:
            file.close()

    def forget_after_fork(self) -> None:
        """In a forked child, where the thread does not run: close the child's copy."""
        self.lock = threading.Lock()
        self.finished.set()
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()


class SpareFile:
    """At most one spare file, for the folder saved into last (see the module docstring).

    Safe to use from several threads: a spare is taken by one save at most, and a new one
    replaces the old one whole.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spare: Optional[_Spare] = None
        _instances.add(self)

    def prepare(self, folder: str, nbytes: int) -> None:
        """Start making a spare of ``nbytes`` in ``folder`` (a checkpoint of that size was just
        committed there), unless one is there already; releases a spare of another folder."""
        wanted = nbytes >= MIN_BYTES and on_tmpfs(folder)
        old: Optional[_Spare] = None
        try:
            with self._lock:
                if wanted and self._spare is not None and self._spare.folder == folder:
                    return  # not taken since (a save elsewhere, or by a copy of this IO)
                old, self._spare = self._spare, None
                if wanted and _room_for(folder, nbytes):
                    self._spare = _Spare(self, folder, nbytes)
                    self._spare.start()
        finally:
            if old is not None:
                _close(old)

    def take(self, folder: str) -> Optional[io.FileIO]:
        """The spare (a raw file at position 0), now the caller's, if one was made for
        ``folder``; else None. An allocation still running stops first."""
        with self._lock:
            spare = self._spare
            if spare is None or spare.folder != folder:
                return None
            self._spare = None
        interrupted = spare.finish("take")
        if interrupted is not None:
            spare.close()  # the save is interrupted: the spare is not left open behind it
            raise interrupted
        return spare.hand_over()

    def take_as(self, folder: str, path: str) -> bool:
        """Give the spare made for ``folder``, if any, the name ``path`` (a new temp file there)
        and let go of it; whether ``path`` now exists. A spare that cannot be linked is freed."""
        file: Optional[io.FileIO] = None
        try:
            file = self.take(folder)
            return file is not None and link_into(file.fileno(), path)
        finally:
            if file is not None:
                file.close()

    def release(self) -> None:
        """Free the spare, if any (teardown)."""
        with self._lock:
            old, self._spare = self._spare, None
        if old is not None:
            _close(old)

    def __reduce__(self) -> Tuple[Any, Tuple[()]]:
        """A copy (an IO pickled for a writer process or by Lightning, ``copy.deepcopy``) holds
        no spare: a descriptor and a thread belong to this process. It unpickles as None, so a
        pickle names no module of ours; ``TorchCheckpointIO`` makes a new one."""
        return (type(None), ())

    def forget_after_fork(self) -> None:
        """In a forked child: the child's copy of the descriptor closed, a new lock."""
        self._lock = threading.Lock()
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.forget_after_fork()


def _close(spare: _Spare) -> None:
    interrupted = spare.finish("release")
    spare.close()  # closed by its thread already, unless the thread never ran
    if interrupted is not None:
        raise interrupted


_forking = threading.local()


def _before_fork() -> None:
    # Hold every spare's lock across the fork, so that no spare thread is between opening its
    # descriptor and recording it; released in the parent, replaced in the child.
    held = [owner._spare for owner in list(_instances) if owner._spare is not None]
    for spare in held:
        spare.lock.acquire()
    _forking.held = held


def _after_fork_in_parent() -> None:
    for spare in getattr(_forking, "held", ()):
        spare.lock.release()
    _forking.held = []


def _after_fork_in_child() -> None:
    _forking.held = []
    for owner in list(_instances):
        owner.forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
