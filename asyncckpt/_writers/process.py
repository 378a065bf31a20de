"""The writer process: serialization and I/O outside the training process, free of its GIL.

The parent stages checkpoints into arenas backed by anonymous shared memory (memfd). Each arena's
descriptor is passed to the writer once (``SCM_RIGHTS`` over the command pipe); after that a
save message carries only the pickled non-tensor skeleton and the tensor layout, and the writer
rebuilds the tensors as views of its own mapping. No tensor bytes go through the pipe.

A remove carries the sequence numbers of the saves it depends on that this writer process runs
(see :func:`asyncckpt._writers.base.failed_save_before`); the process remembers which of its saves
failed and answers :class:`~asyncckpt._writers.messages.SkippedMsg` instead of removing. Saves it
never saw (another writer's) are checked here. The messages both ways are the classes of
:mod:`asyncckpt._writers.messages`.

If the writer process dies, every operation it had in flight fails with
:class:`~asyncckpt.errors.WriterDiedError` (raised once by the next call into the engine) and
their staging slots are freed; the next operation starts a fresh writer process. Nothing hangs.
"""

from __future__ import annotations

import collections
import functools
import gc
import importlib
import inspect
import logging
import mmap
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import threading
import traceback
import weakref
from multiprocessing import reduction
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from .._staging.protocol import collection_paused
from .._threads import start_thread
from ..errors import NotSerializableError, WriterDiedError
from ..redaction import shown
from .base import Operation, WriterGoneError, failed_save_before, perform, skipped_removal
from .messages import (
    AbortMsg,
    DoneMsg,
    DropArenaMsg,
    ImportMainMsg,
    ProcessStateMsg,
    RemoveMsg,
    SaveMsg,
    ShareArenaMsg,
    SkippedMsg,
    StopMsg,
    StoppedMsg,
    UnknownMessageError,
    encode,
)
from .spawn_check import check_main_references, import_main, main_source, mentions_main, start_without_main

log = logging.getLogger("asyncckpt.process_writer")  # the logger's name from before the move: users may configure it


class RemoteWriterError(Exception):
    """An exception from the writer process that could not be pickled back as itself."""


def _portable(err: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a stand-in carrying its text."""
    try:
        clone = pickle.loads(pickle.dumps(err))
        if isinstance(clone, BaseException):
            clone.__notes__ = [shown(f"in the writer process:\n{''.join(traceback.format_exception(err))}")]
            return clone
    except Exception:  # noqa: BLE001 - fall through to the text stand-in
        pass
    return RemoteWriterError(shown(f"{type(err).__name__}: {err}\n{''.join(traceback.format_exception(err))}"))


def check_picklable(checkpoint_io: Any) -> bytes:
    """The pickled IO; a clear error where it cannot travel to the writer process."""
    try:
        return pickle.dumps(checkpoint_io)
    except Exception as err:
        raise TypeError(
            f"writer='process' sends the wrapped checkpoint_io to the writer process, but "
            f"{checkpoint_io!r} cannot be pickled ({err}); use writer='thread' or make it picklable"
        ) from err


def _unpicklable(obj: Any) -> bool:
    try:
        reduction.ForkingPickler.dumps(obj)
    except Exception:  # noqa: BLE001
        return True
    return False


def _options_need_main(op: Operation) -> bool:
    """Whether the save's ``storage_options`` (which travel in its message) hold classes or
    functions of ``__main__``: a message the writer cannot unpickle would end the writer."""
    if op.storage_options is None:
        return False
    try:
        pickled = encode(op.storage_options)
    except Exception:  # noqa: BLE001 - the message's own encoding says what cannot be pickled
        return False
    return check_main_references(pickled, op.path, what=f"the storage_options of checkpoint {op.path!r}")


def current_umask() -> Optional[int]:
    """This process's umask, read from ``/proc/self/status`` (Linux 4.7 and later); None where
    it is not there. ``os.umask`` reads it only by setting it, and a file another thread made
    meanwhile would get the stand-in."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


_State = Tuple[Tuple[Any, ...], Optional[int], Dict[str, str], int]


def _process_state() -> _State:
    """What of this process's state a write in the writer process depends on (see
    :class:`ProcessStateMsg`): ``sys.path``, its relative entries resolved as an import here
    would resolve them now, the umask, the environment and the recursion limit."""
    paths = tuple(os.path.abspath(p) if isinstance(p, str) and not os.path.isabs(p) else p for p in sys.path)
    return paths, current_umask(), dict(os.environ), sys.getrecursionlimit()


_started: "weakref.WeakSet[Any]" = weakref.WeakSet()  # this process's writer processes


def reset_after_fork() -> None:
    """In a child forked (``os.fork``) from a process with a writer process: disown the writer
    processes, which belong to the parent.

    The child inherits ``multiprocessing``'s list of children; at its exit, ``multiprocessing``
    would then terminate the daemonic writer process (seen: the parent's pending save failed as
    lost, its writer killed by SIGTERM). Called by the engine's one fork hook (``asyncckpt._engine.lifecycle``)."""
    # ``multiprocessing.process._children`` is the stdlib's private set of this process's
    # children, which its exit handler terminates; there is no public way to drop one from it.
    # This is the only place that reads it.
    children = getattr(multiprocessing.process, "_children", None)
    for process in list(_started):
        if children is not None:
            children.discard(process)
    _started.clear()


def _has_exited(process: Any) -> bool:
    """Whether ``process`` has exited, from its sentinel (a pipe the child holds open until it
    exits). Not ``is_alive()``: once another waiter has taken the exit status (a launcher's
    reaper, ``SIGCHLD`` ignored), its ``waitpid`` fails and it reports the process alive, and a
    ``kill()`` then could signal an unrelated process that reused the pid."""
    return bool(multiprocessing.connection.wait([process.sentinel], 0))


class ProcessWriter:
    """A persistent spawned process that performs operations in FIFO order.

    Two locks, so that a reply is never held up by a send: ``_send_lock`` orders everything
    written to the pipe (a send may block while the writer is busy and the pipe is full);
    ``_table_lock`` guards the map from sequence numbers to operations, which the reply reader
    uses. The map only routes replies; each operation completes itself exactly once.
    """

    kind = "process"
    arena_kind = "shared"

    def __init__(self, checkpoint_io: Any, *, nice: int = 0) -> None:
        self._io_bytes = check_picklable(checkpoint_io)
        self._nice = nice
        self._send_lock = threading.Lock()
        self._table_lock = threading.Lock()
        self._inflight: Dict[int, Operation] = {}
        self._arenas: Dict[int, "weakref.ref[Any]"] = {}
        self._sent_layouts: Dict[int, Tuple[Any, Any, Any]] = {}  # arena id: layout last sent
        self._process: Optional[multiprocessing.process.BaseProcess] = None
        self._conn: Any = None
        self._reader: Optional[threading.Thread] = None
        self._dead = False
        self._stopping = False
        self._stop_sent = False
        self._began = False  # a send of the hand-over under way has started (under _send_lock)
        # Operations whose hand-over a signal handler's exception cut short after their bytes
        # began to leave: sequence number, the exception's name (for their error, if lost).
        self._cut_short: Dict[int, str] = {}
        self._sent_sizes: Deque[int] = collections.deque(maxlen=64)
        # The writer starts without the training program's main module, and imports it at the
        # first save holding one of its classes (see spawn_check): whether it was told to.
        self._main_source = main_source()
        self._main_sent = False
        # The process state the writer was last told (ProcessStateMsg). None: the first operation
        # tells it all; spawn copies sys.path, the umask and the environment, not the recursion limit.
        self._sent_state: Optional[_State] = None
        self._sent_settings: Optional[Dict[str, Any]] = None  # torch's settings the last save sent

    def message_sizes(self) -> List[int]:
        """The pickled sizes, in bytes, of the last 64 messages sent to the writer process (a
        save's holds its skeleton and, when it changed, its layout; never the tensor bytes)."""
        return list(self._sent_sizes)

    def _send(self, data: bytes) -> None:
        """Send one encoded message (under ``_send_lock``); a whole message or, on error, none."""
        self._began = True
        self._conn.send_bytes(data)
        self._sent_sizes.append(len(data))

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    @property
    def sentinel(self) -> Optional[int]:
        """Ready (for ``multiprocessing.connection.wait``) once the writer process has ended."""
        return self._process.sentinel if self._process is not None else None

    def wait_exited(self, timeout: Optional[float] = None) -> bool:
        """Wait until the writer process has ended; whether it has."""
        if self._process is None:
            return True
        self._process.join(timeout)
        return self._process.exitcode is not None

    def start(self) -> None:
        # A wrapped IO whose class lives in __main__ needs it before anything else.
        main_first = check_main_references(self._io_bytes, "", what="through the wrapped checkpoint_io")
        self._main_sent = main_first
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        first_import = self._main_source if main_first else None
        self._process = ctx.Process(
            target=writer_main,
            args=(child_conn, self._io_bytes, self._nice, _main_module_name(), first_import),
            name="asyncckpt-writer",
            daemon=True,
        )
        with start_without_main():
            self._process.start()
        _started.add(self._process)
        child_conn.close()
        self._conn = parent_conn
        self._reader = start_thread(self._read_replies, name="asyncckpt-writer-replies")

    @property
    def alive(self) -> bool:
        """Whether the process runs and takes operations (exit read as in :func:`_has_exited`)."""
        if self._dead or self._stopping or self._process is None:
            return False
        return not _has_exited(self._process)

    def submit(self, op: Operation) -> None:
        """Send ``op``; an operation that cannot be pickled raises here and nothing is sent."""
        depends_on: Tuple[int, ...] = ()
        if op.kind == "remove":
            depends_on, failed = self._dependencies(op)
            if failed is not None:  # known already: the removal is not sent, and is complete
                op.complete(skipped_removal(op, failed))
                return
        # What a save sends is read here, before the op is registered as in flight: from then on
        # the reply reader may complete it (the writer died) and drop ``op.staged``.
        layout: Optional[Tuple[Any, Any, Any]] = None
        arena: Any = None
        arena_id = 0
        if op.kind == "save":
            staged = op.staged
            arena = staged.arena
            arena_id = arena.id
            layout = (staged.groups, staged.specs, staged.group_locations)
            # A slot whose layout repeats hands over the same groups and specs objects: the
            # writer keeps the last layout per arena, so only a changed one crosses the pipe
            # (pickling 20,000 tensor specs costs about 20 ms of the call).
            sent = self._sent_layouts.get(arena_id)
            same = sent is not None and all(a is b for a, b in zip(sent, layout, strict=True))
            settings = None if op.settings == self._sent_settings else op.settings
            message: Any = SaveMsg(
                op.seq, op.target, op.storage_options, staged.skeleton, arena_id, None if same else layout, settings
            )
        elif op.kind == "remove":
            message = RemoveMsg(op.seq, op.target, depends_on)
        elif op.kind == "abort":
            message = AbortMsg(op.seq, op.target)
        else:
            raise ValueError(f"unknown operation kind {op.kind!r}")
        needs_main = op.kind == "save" and (
            check_main_references(op.staged.skeleton, op.path) or _options_need_main(op)
        )
        state = _process_state()  # at the call, as torch.save here would import and create files
        try:
            # Pickling a new layout's 20,000 specs triggered full collections of the training
            # process's objects (0.3 s of the call, measured); the pause covers the pickling,
            # not the send, which may wait on a busy writer.
            with collection_paused():
                data = encode(message)  # fails here, before any byte is sent
        except Exception as err:
            what = "its storage_options" if _unpicklable(op.storage_options) else "its path"
            raise NotSerializableError(
                f"cannot hand the {op.kind} of {op.path!r} to the writer process: {what} cannot be "
                f"pickled ({type(err).__name__}: {err}); with writer='process' they travel to another "
                "process, so pass picklable values (plain strings, numbers, dicts) or use writer='thread'",
                op.path,
            ) from err
        with self._send_lock:
            hold = op.hold  # the caller's, until the operation takes its slot (Operation.take_over)
            self._began = False  # set as a send of this hand-over starts (see _send)
            registered = False
            try:
                with self._table_lock:
                    if self._dead or self._stopping:
                        raise WriterGoneError("the writer process is not running; it takes no more operations")
                    self._inflight[op.seq] = op  # from here the reader (or the writer's death) completes it
                    registered = True  # (no call between these two stores: no signal handler runs)
                self._drop_released_arenas()
                if arena is not None:
                    self._share_arena(arena)
                if state != self._sent_state:
                    self._send(encode(ProcessStateMsg(*state)))
                    self._sent_state = state
                if needs_main and not self._main_sent and self._main_source is not None:
                    self._send(encode(ImportMainMsg(self._main_source)))
                    self._main_sent = True
                op.take_over(self._send, data)
                if layout is not None:
                    self._sent_layouts[arena_id] = layout
                if op.kind == "save" and op.settings is not None:
                    self._sent_settings = op.settings
            except (OSError, EOFError) as err:
                # The process is gone, and a send that failed delivered no whole message: this
                # operation was never handed over, so it goes to a new writer, unless the reply
                # reader has already failed it with everything else in flight.
                with self._table_lock:
                    self._stopping = True
                    never_sent = self._inflight.pop(op.seq, None) is not None
                if never_sent:
                    op.give_back(hold)
                    raise WriterGoneError(f"the writer process is gone ({err})") from err
                # Failed already by the reader, with everything else in flight (its error is
                # raised at the next call): its slot was freed there, not the caller's to free.
                op.take_over(None)
            except BaseException as err:
                if not registered:
                    raise  # nothing of it happened here
                self._interrupted(op, hold, err)
                raise

    def _interrupted(self, op: Operation, hold: Any, err: BaseException) -> None:
        """The hand-over of ``op`` was cut short by an exception a signal handler raised (Ctrl-C).

        Before any of its bytes left, it is taken back: the caller keeps its slot, and this
        writer goes on. Once they began to leave, whether the writer got a whole message cannot
        be told here (the handler may run as the send returns), so the operation stays the
        writer's, and the writer takes nothing more: its input is shut, it finishes every whole
        message it read (this one too, if it arrived whole), and exits. Either way the operation
        completes once, through its reply or the writer's exit, and frees its slot then: never
        while the writer may still read it, never twice. Freed at once here, the next save
        staged into memory the writer was still writing from (a torn checkpoint), and its
        entry left behind freed the slot a second time when the writer exited.
        """
        with self._table_lock:
            taken_back = not self._began and self._inflight.pop(op.seq, None) is not None
            if not taken_back:
                self._cut_short[op.seq] = type(err).__name__
        if taken_back:
            op.give_back(hold)
            return
        op.take_over(None)  # no-op when the send itself was interrupted: it took the slot already
        self._end_input()

    def _dependencies(self, op: Operation) -> Tuple[Tuple[int, ...], Optional[Operation]]:
        """For a remove: the sequence numbers of the saves it depends on that this writer process
        has been sent and not answered (it checks those itself, in its FIFO), and a save already
        known to have failed (answered, or another writer's: waited for), or None."""
        with self._table_lock:
            mine = tuple(save.seq for save in op.after if save.seq in self._inflight)
        return mine, failed_save_before(save for save in op.after if save.seq not in mine)

    def _end_input(self) -> None:
        """Take nothing more after a send interrupted part-way, without losing what was sent
        whole: the writer's input is shut, so it finishes those operations (their replies still
        come back), reads the partial message as the end of its input, and exits. Killing it
        instead lost the save it was writing, accepted and counted before the interrupted call."""
        with self._table_lock:
            self._stopping = True
        try:
            with socket.fromfd(self._conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):  # not a socket here: its stream cannot be trusted
            self._break()

    def _break(self) -> None:
        """End a writer whose command stream can no longer be trusted."""
        with self._table_lock:
            self._stopping = True
        if self._process is not None and not _has_exited(self._process):
            self._process.kill()

    def _send_stop(self) -> None:
        """Send the stop command once (under ``_send_lock``): the writer finishes what it read,
        then exits. Not to a dead writer; sent once even when a first stop was cut short."""
        with self._table_lock:
            if self._dead or self._stop_sent:
                return
            self._stop_sent = True
        try:
            self._send(encode(StopMsg()))
        except OSError:
            pass

    def _share_arena(self, arena: Any) -> None:
        if arena.id in self._arenas:
            return
        self._send(encode(ShareArenaMsg(arena.id, arena.nbytes)))  # (marks the hand-over as begun)
        reduction.send_handle(self._conn, arena.fd, self._process.pid)
        self._arenas[arena.id] = weakref.ref(arena)

    def _drop_released_arenas(self) -> None:
        for arena_id, ref in list(self._arenas.items()):
            if ref() is None:
                del self._arenas[arena_id]
                self._sent_layouts.pop(arena_id, None)
                self._send(encode(DropArenaMsg(arena_id)))

    def _read_replies(self) -> None:
        try:
            while True:
                try:
                    reply = self._conn.recv()
                except (EOFError, OSError):
                    break
                match reply:
                    case DoneMsg(seq=seq, error=error, write_seconds=write_seconds, kept_staged=kept):
                        with self._table_lock:
                            op = self._inflight.pop(seq, None)
                        if op is None:
                            continue
                        op.write_seconds = write_seconds or 0.0
                        op.kept_staged = kept
                        op.complete(error)
                    case SkippedMsg(seq=seq, failed_seq=failed_seq):  # a remove not carried out: its save failed
                        with self._table_lock:
                            op = self._inflight.pop(seq, None)
                        if op is None:
                            continue
                        op.complete(skipped_removal(op, next((s for s in op.after if s.seq == failed_seq), None)))
                    case StoppedMsg():
                        break
                    case _:
                        raise UnknownMessageError(reply, "training process")
        except BaseException:  # noqa: BLE001 - an unreadable reply: this writer is done for
            log.exception("asyncckpt: could not read a reply from the writer process; stopping it")
            self._break()
        finally:
            self._fail_inflight()

    def _fail_inflight(self) -> None:
        process = self._process
        if process is not None:
            process.join(5)
            if not _has_exited(process):
                process.kill()
                process.join(5)
        with self._table_lock:
            self._dead = True
            lost = sorted(self._inflight.values(), key=lambda op: op.seq)
            self._inflight.clear()
        if not lost:
            return
        code = process.exitcode if process is not None else None
        if code is None:
            how = "exited (another waiter took its exit status)"
        elif code < 0:
            how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        for op in lost:
            cut_short = self._cut_short.get(op.seq)
            if cut_short is not None:
                op.interrupted_by = cut_short
                err = WriterDiedError(
                    f"the {op.kind} of {op.path!r} was not carried out: a {cut_short} interrupted it "
                    "as it was handed to the asyncckpt writer process; the engine starts a new writer "
                    "process for the next operation",
                    op.path,
                )
            else:
                err = WriterDiedError(
                    f"the asyncckpt writer process (pid {self.pid}) {how} before finishing the {op.kind} "
                    f"of {op.path!r}; the engine starts a new writer process for the next operation",
                    op.path,
                )
            op.complete(err)

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Finish what is queued, end the process and reap it (no zombie is left).

        With a ``timeout``, nothing here waits longer: a send blocked on a busy writer holds
        the send lock, and then the process is ended without the stop command.
        """
        if self._process is None:
            return True
        # Marked first: from here it takes nothing more and is not ``alive``, so a stop cut short
        # by a signal handler's exception leaves a writer the engine replaces, never one a save
        # still hands operations to.
        with self._table_lock:
            self._stopping = True
        if timeout is None:
            with self._send_lock:  # 'with': taken and given back in C, whatever interrupts
                self._send_stop()
        else:
            # (a handler's exception just as the lock is taken keeps it taken: the next stop of
            # this writer then waits its timeout and ends the process without the stop command)
            got_lock = False
            try:
                got_lock = self._send_lock.acquire(timeout=timeout)
                if got_lock:
                    self._send_stop()
            finally:
                if got_lock:
                    self._send_lock.release()
        self._process.join(timeout)
        if not _has_exited(self._process):
            self._process.kill()
            self._process.join(5)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5)
        self._conn.close()
        return True


def _main_module_name() -> str:
    """The name the training process's main module has there: ``__main__``, or ``__mp_main__``
    when the training process is itself a spawned child."""
    return str(getattr(sys.modules.get("__main__"), "__name__", "__main__"))


def _main_objects_pickle_as(main_name: str) -> None:
    """In the writer process: make the classes and functions of the re-imported main module
    pickle as ``<main_name>.X``, as ``torch.save`` writes them in the training process.

    Spawn re-imports the main module under the name ``__mp_main__`` (and makes ``__main__`` an
    alias of it), so its objects carry ``__module__ == "__mp_main__"`` and pickle refers to them
    by that name, which ``torch.load`` in the training program (where they are ``__main__.X``)
    cannot find.
    """
    main = sys.modules.get("__mp_main__")
    if main_name == "__mp_main__" or main is None or sys.modules.get("__main__") is not main:
        return
    seen: Set[int] = set()

    def relabel(namespace: Any) -> None:
        for value in list(vars(namespace).values()):
            if not (isinstance(value, type) or inspect.isfunction(value)) or id(value) in seen:
                continue
            seen.add(id(value))
            if getattr(value, "__module__", None) != "__mp_main__":
                continue
            try:
                value.__module__ = main_name
            except (AttributeError, TypeError):  # a type that does not allow it pickles as it did
                continue
            if isinstance(value, type):
                relabel(value)  # nested classes and methods

    relabel(main)


_KIND = {SaveMsg: "save", RemoveMsg: "remove", AbortMsg: "abort"}  # the Operation each message runs


def _reply(conn: Any, message: Any) -> bool:
    """Send ``message`` to the parent; False when the parent is gone (the pipe is closed)."""
    try:
        conn.send(message)
    except OSError:  # BrokenPipeError, ConnectionResetError: nobody reads replies any more
        return False
    return True


def _log_orphaned() -> None:
    log.warning(
        "asyncckpt: the process that started this writer is gone; the writer process exits "
        "without carrying out the operations queued behind its last one"
    )


def writer_main(
    conn: Any, io_bytes: bytes, nice: int, main_name: str = "__main__", main_source: Optional[Tuple[str, str]] = None
) -> None:
    """The writer process's loop: map arenas, rebuild checkpoints from them, write in order.

    It starts without the training program's main module; ``main_source`` (the wrapped IO's
    class lives there) or an :class:`ImportMainMsg` (a checkpoint's do) imports it."""
    # Preemption sends SIGTERM to every process of the job; the parent drains this process
    # before it exits, so the writer must not die first. SIGINT likewise belongs to the parent.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Once the parent is gone (killed), the operation in progress ends (its commit is atomic)
    # and no other starts: a restarted job may be writing the same paths by then, and a late
    # write from this orphan would put an older checkpoint back.
    parent = os.getppid()
    if nice:
        try:
            os.nice(nice)
        except OSError as err:  # e.g. a sandbox that forbids it: write anyway (to stderr: no handler here)
            log.warning("asyncckpt: the writer process keeps its priority (writer_nice not applied: %s)", err)
    import torch

    from .._staging.arena import build_views, reference_counts, still_referenced, storages_in
    from .._staging.locations import locations_of, recorded_as
    from .._staging.skeleton import restore

    torch.set_num_threads(1)
    main_failed: Optional[BaseException] = None
    if main_source is not None:
        import_main(main_source)
        _main_objects_pickle_as(main_name)
    checkpoint_io = pickle.loads(io_bytes)
    arenas: Dict[int, Tuple[mmap.mmap, Any]] = {}
    failed_saves: Set[int] = set()  # sequence numbers of this process's saves that failed
    layouts: Dict[int, Tuple[Any, Any, Any]] = {}  # arena id: the layout of its last save
    settings: Optional[Dict[str, Any]] = None  # torch's settings of the calling thread, as last sent
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break  # the parent is gone; everything it sent has been handled
        match message:
            case ShareArenaMsg(arena_id=arena_id, nbytes=nbytes):
                try:
                    fd = reduction.recv_handle(conn)
                except (EOFError, OSError, RuntimeError):
                    break  # its sender was cut short (see ProcessWriter._interrupted)
                mapping = mmap.mmap(fd, max(nbytes, 1))
                os.close(fd)
                arenas[arena_id] = (mapping, torch.frombuffer(mapping, dtype=torch.uint8)[:nbytes])
            case DropArenaMsg(arena_id=arena_id):
                arenas.pop(arena_id, None)
                layouts.pop(arena_id, None)
            case ProcessStateMsg(import_paths=paths, umask=umask, environment=environment, recursion_limit=limit):
                sys.setrecursionlimit(limit)
                sys.path[:] = list(paths)
                importlib.invalidate_caches()
                if umask is not None:
                    os.umask(umask)
                if environment != os.environ:
                    os.environ.clear()
                    os.environ.update(environment)
            case ImportMainMsg(source=source):
                try:
                    import_main(source)
                    _main_objects_pickle_as(main_name)
                except BaseException as err:  # noqa: BLE001 - the save that needed it reports it
                    main_failed = err
            case StopMsg():
                try:
                    checkpoint_io.teardown()
                except Exception:  # noqa: BLE001 - the parent tears down its own copy and reports
                    log.exception("asyncckpt: teardown of the wrapped IO in the writer process failed")
                _reply(conn, StoppedMsg())
                break
            case RemoveMsg(seq=seq, depends_on=depends_on) if any(s in failed_saves for s in depends_on):
                # Not carried out: a save it depends on failed here (the parent words the error).
                if not _reply(conn, SkippedMsg(seq, next(s for s in depends_on if s in failed_saves))):
                    _log_orphaned()
                    break
            case SaveMsg() | RemoveMsg() | AbortMsg():
                if os.getppid() != parent:
                    _log_orphaned()
                    break
                op = Operation(_KIND[type(message)], str(message.target), message.target, seq=message.seq)
                if isinstance(message, SaveMsg):
                    settings = message.settings if message.settings is not None else settings
                    op.settings = settings
                error: Optional[BaseException] = None
                before: Optional[List[int]] = None
                views: Any = None
                try:
                    checkpoint = None
                    located: Optional[Dict[int, str]] = None
                    if isinstance(message, SaveMsg):
                        op.storage_options = message.storage_options
                        arena_id = message.arena_id
                        # None: the same layout as this arena's last save
                        layout = message.layout if message.layout is not None else layouts[arena_id]
                        layouts[arena_id] = layout
                        groups, specs, group_locations = layout
                        storages = storages_in(arenas[arena_id][1], groups, arenas[arena_id])
                        views = build_views(storages, specs)
                        if group_locations is not None:
                            located = locations_of(storages, group_locations)
                        before = reference_counts(views, storages)
                        if main_failed is not None and mentions_main(message.skeleton):
                            raise RuntimeError(
                                "the writer process could not import the training program's main module, "
                                f"whose classes this checkpoint holds: {type(main_failed).__name__}: {main_failed}"
                            ) from main_failed
                        checkpoint = restore(message.skeleton, views)
                    # the file records each staged storage's original device, as torch.save would
                    with recorded_as(located):
                        perform(checkpoint_io, op, checkpoint)
                except BaseException as err:  # noqa: BLE001 - reported to the parent, never fatal here
                    error = _portable(err)
                    if isinstance(message, SaveMsg):
                        failed_saves.add(op.seq)
                checkpoint = located = None
                # Did the wrapped IO keep any of the views? (Their memory is the slot's, which the
                # next save into it overwrites: the parent then gives the slot new memory.)
                kept = before is not None and still_referenced(
                    before, functools.partial(reference_counts, views, storages)
                )
                views = storages = None
                if not _reply(conn, DoneMsg(op.seq, error, op.write_seconds, kept)):
                    _log_orphaned()
                    break
            case _:
                raise UnknownMessageError(message, "writer process")
    # Every operation it took is written or reported, and the wrapped IO torn down if asked. The
    # interpreter's shutdown would now search the whole heap torch built at import for cycles
    # (about 0.2 s of CPU that teardown and the exit wait for): frozen, it is skipped. Objects
    # are still freed as their modules are cleared; only garbage in cycles is left to the OS.
    gc.freeze()
