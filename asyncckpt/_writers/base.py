"""Operations and what every writer shares: the work item, the writer interface, and running one.

Every save or remove is an :class:`Operation` that carries its own state, as a
``concurrent.futures`` work item carries its Future: it is completed exactly once (by the writer
that ran it, or by the writer's death), and its completion is what ``flush``,
``load_checkpoint`` and the exit drain wait on. A single worker per engine keeps the order
contract trivially true: a remove queued after a save to the same path runs after that save
commits, and a save queued after a remove re-creates the file.

A remove also depends on every save queued before it, on any path (:func:`failed_save_before`):
if one of them failed, the writer does not remove, and completes the remove with
:class:`~asyncckpt.errors.RemoveSkippedError`. A rotation that removes the old checkpoint after
saving the new one then keeps the old one when the new one could not be written.

Both writers implement :class:`Writer`: :class:`asyncckpt._writers.thread.ThreadWriter` runs the
wrapped ``CheckpointIO`` on a thread, :class:`asyncckpt._writers.process.ProcessWriter` in a
separate process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, List, Optional, Protocol, Sequence

from .._staging.arena import still_referenced
from .._staging.locations import recorded_as
from .._storage.torch_zip import serialization_config
from ..errors import RemoveSkippedError
from ..redaction import shown

# torch.save's settings (see torch_settings), where this torch can copy and patch them
_CONFIG = (
    serialization_config
    if hasattr(serialization_config, "get_config_copy") and hasattr(serialization_config, "patch")
    else None
)

log = logging.getLogger("asyncckpt.writer")  # the logger's name from before the move: users may configure it


class WriterGoneError(RuntimeError):
    """``submit`` on a writer that has stopped or died: nothing was handed over, start another."""


class Agreement:
    """One collective call's agreement on this rank (a save or remove of a collective IO).

    The engine makes it before the ranks agree; the IO's ``agree_to_save`` stores ``number``
    (the call's number, the same on every rank) as the last step of an agreement that every
    rank makes the operation; the operation that carries it to the writer sets ``queued`` as
    it is handed over (:meth:`Operation.take_over`). Every other rank's writer will run this
    call's collective, so this rank's must too: a call that fails or is interrupted between
    those two points still queues a stand-in (the abort of the save, or the agreed remove).
    The writer runs the operation under ``number``, never under a later call's, so a stand-in
    that never went out makes the next save's token differ from the other ranks' (refused,
    loudly) instead of pairing two saves' shards into one checkpoint.
    """

    __slots__ = ("number", "queued", "error", "thread", "decided")

    def __init__(self) -> None:
        self.number: Optional[int] = None
        self.queued = False
        #: Once decided: None when every rank makes the call, else the error this rank raises
        #: (its own refusal, another rank's, or what the agreement itself raised).
        self.error: Optional[BaseException] = None
        #: The thread that runs the agreement (held before it starts), and its end. It decides
        #: off the caller's thread, where no signal handler's exception can cut it between the
        #: ranks' exchange and ``number`` (the other ranks would have agreed, unknown to this one).
        self.thread: Optional[threading.Thread] = None
        self.decided = threading.Event()

    def wait_decided(self) -> None:
        """Wait until the agreement, if it started, has decided: only then is it known whether
        this rank owes the call. For a caller already raising an interrupt; a further one
        meanwhile is dropped (the agreement ends within the collective IO's timeout). Waits on
        an event, not ``Thread.join``: a join cut short by an interrupt marks the thread ended
        (CPython 3.11) while it still runs."""
        thread = self.thread
        if thread is None or self.decided.is_set():
            return
        if thread not in threading.enumerate() and not self.decided.is_set():
            return  # never started (interrupted before its start): it never decides
        while True:
            try:
                self.decided.wait()
                return
            except BaseException:  # noqa: BLE001 - the first interrupt is the one being raised
                continue

    @property
    def owes_stand_in(self) -> bool:
        """Agreed by every rank, and no operation of this rank carries it yet."""
        return self.number is not None and not self.queued


class Operation:
    """One unit of background work: a save or a remove of ``path`` (or the abort of a collective
    save this rank could not stage; ``staged`` is then its error).

    ``path`` is the normalized key used for ordering; ``target`` is the path handed to the
    wrapped IO. :meth:`complete` runs the done callbacks and wakes waiters, once; later calls
    (a writer's death racing its last reply, say) do nothing. ``after`` (removes only) holds the
    saves queued before it whose outcome the engine did not know yet: the remove is skipped if
    one of them failed.
    """

    def __init__(
        self,
        kind: str,
        path: str,
        target: Any,
        *,
        storage_options: Any = None,
        staged: Any = None,
        slot: Any = None,
        seq: int = 0,
    ) -> None:
        self.seq = seq
        self.kind = kind
        self.path = path
        self.target = target
        self.storage_options = storage_options
        self.staged = staged
        self.slot = slot
        # The caller's hold on ``slot`` (``asyncckpt._engine.slots.SlotHold``), emptied as the
        # writer takes the operation (take_over), and whether it did: an exception a signal
        # handler raises around the hand-over then cannot leave the slot with two owners or none.
        self.hold: Any = None
        self.handed_over = False
        #: The name of the exception (a signal handler's) that cut this operation's hand-over
        #: short, when it then failed for that reason: the caller was told by that exception, so
        #: the failure is logged, not raised again.
        self.interrupted_by: Optional[str] = None
        #: A collective IO's call: the ranks' :class:`Agreement` this operation carries.
        self.agreement: Optional[Agreement] = None
        #: torch's serialization settings as the calling thread saw them (:func:`torch_settings`).
        self.settings: Optional[Dict[str, Any]] = None
        self.wait_seconds = 0.0
        self.blocking_seconds = 0.0
        self.write_seconds = 0.0
        #: The wrapped IO kept references into the staging memory of this save after it returned
        #: (or its failure's traceback does): the slot must not write into that memory again.
        self.kept_staged = False
        self.error: Optional[BaseException] = None
        self.after: Sequence["Operation"] = ()
        self._lock = threading.Lock()
        self._completed = False
        self._event = threading.Event()
        self._callbacks: List[Callable[["Operation"], None]] = []

    def add_done_callback(self, fn: Callable[["Operation"], None]) -> None:
        """Run ``fn(op)`` at completion (at once if already complete), on the completing thread."""
        with self._lock:
            if not self._completed:
                self._callbacks.append(fn)
                return
        fn(self)

    def take_over(self, hand_over: Optional[Callable[..., Any]], *args: Any) -> Any:
        """The writer's hand-over of this operation: ``hand_over(*args)``, the call that queues
        or sends it, made here as the last step, right after the operation takes its slot
        from the caller's hold. Between those stores and that call no signal handler runs
        (CPython runs them as a call returns, at a function's start, at a loop's jump): an
        exception one raises leaves the operation handed over and owning its slot, or neither.
        ``hand_over=None``: the writer owns it already (part of it was sent), only the stores."""
        hold, self.hold = self.hold, None
        self.handed_over = True
        if hold is not None:
            hold.slot = None
        if self.agreement is not None:
            self.agreement.queued = True
        return hand_over(*args) if hand_over is not None else None

    def give_back(self, hold: Any) -> None:
        """Undo :meth:`take_over` (a send that delivered nothing): the caller's ``hold`` owns
        the slot again."""
        self.handed_over = False
        if hold is not None:
            hold.slot = self.slot
        if self.agreement is not None:
            self.agreement.queued = False
        self.hold = hold

    def complete(self, error: Optional[BaseException] = None) -> bool:
        """Record the outcome, run the callbacks, wake the waiters; True the first time only."""
        with self._lock:
            if self._completed:
                return False
            self._completed = True
            self.error = error
            callbacks, self._callbacks = self._callbacks, []
        try:
            for fn in callbacks:
                try:
                    fn(self)
                except Exception:  # noqa: BLE001 - one failing callback must not skip the others
                    log.exception("asyncckpt: internal error while completing %s of %s", self.kind, shown(self.path))
        finally:
            self._event.set()
        return True

    def done(self) -> bool:
        """Whether the operation has completed (its callbacks may still be running)."""
        return self._completed

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until completed and its callbacks have run; returns False on timeout."""
        return self._event.wait(timeout)

    def __repr__(self) -> str:
        state = "done" if self._completed else "pending"
        return f"Operation(#{self.seq} {self.kind} {shown(self.path)!r}, {state})"


class Writer(Protocol):
    """What the engine needs of a writer; :class:`ThreadWriter` and ``ProcessWriter`` provide it.

    ``submit`` either hands the operation over (the writer then completes it exactly once, by
    running it or, if the writer dies first, with :class:`WriterDiedError`) or raises and keeps
    nothing; it raises :class:`WriterGoneError` when the writer is no longer running.
    """

    kind: str
    arena_kind: str

    def start(self) -> None: ...

    @property
    def alive(self) -> bool: ...

    @property
    def pid(self) -> Optional[int]:
        """The writer process's id; None for a thread."""
        ...

    @property
    def sentinel(self) -> Optional[int]:
        """Ready (``multiprocessing.connection.wait``) when the writer process ends; None for a thread."""
        ...

    def submit(self, op: Operation) -> None:
        """Take ``op``, making the call that queues or sends it through ``op.take_over`` (the
        engine counts the operation, and leaves its slot to it, once that ran)."""
        ...

    def stop(self, timeout: Optional[float] = None) -> bool: ...

    def wait_exited(self, timeout: Optional[float] = None) -> bool:
        """Wait until the writer thread or process has ended; whether it has."""
        ...


def torch_settings() -> Optional[Dict[str, Any]]:
    """torch's serialization settings as the calling thread sees them, for the save it queues.

    torch keeps user settings of ``torch.utils.serialization.config`` per thread: a
    ``config.save.storage_alignment = 4096`` in the training thread shapes that thread's
    ``torch.save`` files, and no other thread's. The writer applies them (:func:`using_torch_settings`),
    so the file is the one ``torch.save`` would have written at the call."""
    return None if _CONFIG is None else _CONFIG.get_config_copy()


@contextlib.contextmanager
def using_torch_settings(settings: Optional[Dict[str, Any]]) -> Iterator[None]:
    """``settings`` (from :func:`torch_settings`) on this thread while the block runs."""
    here = None if settings is None or _CONFIG is None else _CONFIG.get_config_copy()
    changes = {} if here is None else {k: v for k, v in settings.items() if k in here and here[k] != v}
    if not changes:
        yield
        return
    with _CONFIG.patch(changes):
        yield


def perform(checkpoint_io: Any, op: Operation, checkpoint: Any = None) -> None:
    """Run ``op`` against ``checkpoint_io``; for a save, ``checkpoint`` is the rebuilt object."""
    if op.kind == "save":
        started = time.perf_counter()
        with as_agreed(checkpoint_io, op), using_torch_settings(op.settings):
            checkpoint_io.save_checkpoint(checkpoint, op.target, storage_options=op.storage_options)
        op.write_seconds = time.perf_counter() - started
    elif op.kind == "remove":
        with as_agreed(checkpoint_io, op):
            checkpoint_io.remove_checkpoint(op.target)
    elif op.kind == "abort":  # a save agreed on by every rank that this rank could not stage
        abort_collective_save(checkpoint_io, op, op.staged)
    else:
        raise ValueError(f"unknown operation kind {op.kind!r}")


def perform_save(
    checkpoint_io: Any, op: Operation, around_io: Callable[[], ContextManager[Any]] = contextlib.nullcontext
) -> None:
    """Write the staged save ``op`` through ``checkpoint_io`` on this thread.

    The checkpoint is rebuilt from staging memory and handed over with each storage's original
    device recorded (the file loads onto the devices ``torch.save``'s would); ``around_io`` wraps
    the wrapped IO's call. Sets ``op.kept_staged`` when the IO kept anything viewing the staging
    memory once it returned (or its failure's traceback does): that memory must not be reused.
    """
    staged = op.staged
    try:
        staged.wait()
        before = staged.references()
        checkpoint = staged.materialize()
    except Exception as err:
        abort_collective_save(checkpoint_io, op, err)
        raise
    try:
        with recorded_as(staged.locations), around_io():
            perform(checkpoint_io, op, checkpoint)
    finally:
        checkpoint = None  # the staged views: not kept past their operation
        op.kept_staged = still_referenced(before, staged.references)


def failed_save_before(saves: Iterable[Operation]) -> Optional[Operation]:
    """For a remove: the first of the saves it depends on (its ``after``) that failed, else None.

    Waits for each to complete. In one writer's FIFO they are done already; one still held by a
    writer that died is completed by that writer's death (every operation completes), soon.
    """
    for save in saves:
        save.wait()
        if save.error is not None:
            return save
    return None


def skipped_removal(op: Operation, save: Optional[Operation]) -> RemoveSkippedError:
    """The error a remove completes with when ``save``, queued before it, failed."""
    failed = save.path if save is not None else "an earlier checkpoint"
    cause = save.error if save is not None else None
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    err = RemoveSkippedError(
        f"checkpoint {op.path!r} was kept, not removed: the save of {failed!r} queued before the removal "
        f"failed{why}, so {op.path!r} may be the last good checkpoint; remove it yourself once a later "
        "save has succeeded",
        op.path,
        failed_save=save.path if save is not None else None,
    )
    err.__cause__ = cause
    return err


def abort_collective_save(checkpoint_io: Any, op: Operation, error: BaseException) -> None:
    """A collective IO (one save = one collective across ranks) must still take part in a save
    this rank cannot write, so that the other ranks fail it too instead of waiting for this one."""
    abort = getattr(checkpoint_io, "abort_save", None)
    if abort is None:
        return
    try:
        with as_agreed(checkpoint_io, op):
            abort(op.target, error)
    except Exception:  # noqa: BLE001 - the original error is the one reported
        log.exception("asyncckpt: could not fail the collective save of %r on the other ranks", shown(op.path))


def as_agreed(checkpoint_io: Any, op: Operation) -> ContextManager[Any]:
    """The wrapped IO's ``running_agreed(number)`` around the run of ``op``, a collective call
    the ranks agreed on (the IO names its collective after that call, not after its own count);
    nothing for any other operation or IO."""
    agreement = op.agreement
    run = getattr(checkpoint_io, "running_agreed", None)
    if agreement is None or agreement.number is None or run is None:
        return contextlib.nullcontext()
    return run(agreement.number)


def lower_this_threads_priority(nice: int) -> None:
    """Add ``nice`` to the calling thread's niceness, and to nothing else (Linux: a thread is
    a task of its own to the scheduler, so the training threads keep theirs). Threads this one
    starts later inherit it."""
    tid = threading.get_native_id()
    current = os.getpriority(os.PRIO_PROCESS, tid)
    os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
