"""``AsyncCheckpointIO``: the engine's verbs. Each save is admitted (a free staging slot,
:mod:`.slots`), staged into host memory on the caller's thread, and submitted to the writer,
which commits queued operations in order; :mod:`.ops` keeps the pending operations, the errors
and the stats. Background failures are logged when they happen and raised once by the next call
into the engine. The optional hooks of the wrapped IO are looked up in :mod:`.wrapped`, the
options checked in :mod:`.options`, the async face is :mod:`.aio`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import weakref
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

import torch

from .._staging.copier import default_staging_threads
from .._staging.eager import EagerStager
from .._staging.lazy import LazyStager
from .._staging.protocol import Stager, StagingSlot, collection_paused
from .._staging.reserve import fill_slot, fill_slot_bytes, tensors_of
from .._storage.secrets import redact, safe_cause, secret_values
from .._storage.torch_io import TorchCheckpointIO
from .._threads import new_thread, start
from .._writers.base import Agreement, Operation, Writer, WriterGoneError, perform_save, torch_settings
from .._writers.process import ProcessWriter, check_picklable
from .._writers.thread import ThreadWriter
from ..checkpoint_io import CheckpointIO, PathLike, load_options
from ..errors import (
    AsyncCheckpointError,
    CheckpointRemoveError,
    CheckpointSaveError,
    RemoveSkippedError,
    TensorModifiedError,
    WriterDiedError,
)
from ..redaction import shown
from ..stats import SaveStats
from . import lifecycle
from .aio import AsyncFace
from .condition import EngineCondition
from .ops import ErrorInbox, OpTable, SaveHandle, StatsLog, wait_limit
from .options import EngineOptions, options_of
from .reserve import Reservation, ReservationJob, check_request
from .slots import SlotHold, SlotPool, StagingBuffer
from .wrapped import WrappedIO, absolute_target, key_and_target, path_key_of, read_keys_of

log = logging.getLogger("asyncckpt")


class _WriterHolder:
    """Holds the engine's current writer, so that the engine's finalizer stops whichever writer
    is current then, without keeping old writers (or the engine) alive."""

    def __init__(self) -> None:
        self.writer: Optional[Writer] = None

    def stop(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.stop(5)


class _ExitView:
    """The engine as :mod:`.lifecycle` sees it: exit, SIGTERM and fork, through public methods.

    Held by its engine, weakly by the lifecycle registry, and holding the engine weakly: an
    engine nobody uses any more leaves the registry with its view.
    """

    __slots__ = ("_engine", "__weakref__")

    def __init__(self, engine: "AsyncCheckpointIO") -> None:
        self._engine = weakref.ref(engine)

    @property
    def exit_timeout(self) -> float:
        engine = self._engine()
        return engine.exit_timeout if engine is not None else 0.0

    @property
    def collective(self) -> bool:
        engine = self._engine()
        return engine is not None and engine._is_collective()

    def drain_before_exit(self, reason: str, deadline: Optional[float] = None) -> None:
        engine = self._engine()
        if engine is not None:
            engine._drain_before_exit(reason, deadline)

    def stop_writer_before_exit(self) -> None:
        engine = self._engine()
        if engine is not None:
            engine._stop_writer_before_exit()

    def hands_over_on(self, thread_id: int) -> List[str]:
        engine = self._engine()
        return engine._hands_over_on(thread_id) if engine is not None else []

    def locked_here(self) -> bool:
        engine = self._engine()
        return engine._locked_here() if engine is not None else False

    def adopt_after_fork(self) -> None:
        engine = self._engine()
        if engine is not None:
            engine._adopt_after_fork()


class AsyncCheckpointIO(AsyncFace, CheckpointIO):
    """Saves checkpoints in the background, through any ``CheckpointIO``.

    Args:
        checkpoint_io: the IO that does the actual writing: ours, a subclass of yours, or
            a framework's. Defaults to :class:`asyncckpt.TorchCheckpointIO`. The tensors it is
            given live in staging memory; one that keeps them after ``save_checkpoint`` returns
            is given that memory (the next save into the slot allocates anew, with a warning).
        max_pending: how many staged checkpoints may exist at once (staging memory is at most
            this times the checkpoint's tensor bytes). One more save waits for a slot.
        when_full: ``"wait"`` (block until a slot frees) or ``"raise"`` (raise
            :class:`QueueFullError` at once, nothing staged).
        writer: ``"thread"`` (a background thread; ``torch.save`` releases the GIL while it
            writes tensor bytes) or ``"process"`` (a persistent spawned process writing from
            shared memory, so serialization never competes with training for the GIL; the
            wrapped IO must be picklable). If the writer process dies, the operations it had
            in flight fail with :class:`WriterDiedError` and the next operation starts a new one.
        writer_nice: niceness added to the writer (0 to 19), so the OS favours training when
            both want a core: the writer process's, or the writer thread's alone (Linux sets
            niceness per thread; the training threads keep theirs). The writes then take
            longer on a busy machine, and a save waits when ``max_pending`` are still writing.
        staging_threads: threads that share the host-to-host copy while the caller waits
            (default: the cores this process may use, divided among the ranks of this
            machine (``LOCAL_WORLD_SIZE``), up to 4; 1 copies on the caller alone).
        exit_timeout: seconds allowed at interpreter exit or on SIGTERM to write pending saves.
        handle_sigterm: install a SIGTERM handler that writes pending saves before the process
            ends, then hands the signal on (see :mod:`asyncckpt._engine.lifecycle`).
        staging: ``"eager"`` (``save_checkpoint`` copies every tensor before it returns) or
            ``"lazy"`` (it copies small tensors, starts a background copy of the rest and
            returns; an optimizer step pre-hook and every call into the engine wait for that
            copy, and version counters prove nothing modified it meanwhile, else that save
            fails with :class:`asyncckpt.lazy.TensorModifiedError`). See :mod:`asyncckpt.lazy`.
    """

    #: With no ``checkpoint_io``, ours is used at once; a framework plugin that receives its base
    #: IO later (a trainer's strategy fills it in) sets this, and the writer starts at first use.
    base_io_comes_later = False

    def __init__(
        self,
        checkpoint_io: Optional[Any] = None,
        *,
        max_pending: int = 2,
        when_full: str = "wait",
        writer: str = "thread",
        writer_nice: int = 0,
        staging_threads: Optional[int] = None,
        exit_timeout: float = 300.0,
        handle_sigterm: bool = True,
        staging: str = "eager",
    ) -> None:
        opts = EngineOptions.validate(
            max_pending=max_pending,
            when_full=when_full,
            writer=writer,
            writer_nice=writer_nice,
            staging_threads=staging_threads,
            exit_timeout=exit_timeout,
            handle_sigterm=handle_sigterm,
            staging=staging,
        )
        self._checkpoint_io = checkpoint_io
        self.max_pending = opts.max_pending
        self.when_full = opts.when_full
        self.writer_kind = opts.writer
        self.writer_nice = opts.writer_nice
        self.exit_timeout = opts.exit_timeout
        self._staging_threads_chosen = opts.staging_threads_chosen
        self.staging_threads = opts.staging_threads
        self.staging = opts.staging
        self._fresh_state()
        self._holder = _WriterHolder()
        weakref.finalize(self, self._holder.stop)  # the holder, not the engine, knows the writer
        self._handover_tokens = 0
        self._said_kept = False  # the warning that the wrapped IO keeps staged tensors, given once
        if writer == "process" and (checkpoint_io is not None or not self.base_io_comes_later):
            check_picklable(self.wrapped_io())
            self._writer = self._new_writer()  # its interpreter starts while training runs
        self._exit_view = _ExitView(self)  # lives as long as this engine; lifecycle holds it weakly
        lifecycle.register(self._exit_view)
        self.handle_sigterm = handle_sigterm
        if handle_sigterm:
            lifecycle.install_sigterm_handler()

    def start_handling_sigterm(self) -> bool:
        """Install the draining SIGTERM handler now, as ``handle_sigterm=True`` does at
        construction (for a framework plugin that learns only at its first save that no
        framework handler will stop the process gracefully). False where it could not be
        installed: off the main thread."""
        self.handle_sigterm = True
        return lifecycle.install_sigterm_handler()

    def _fresh_state(self) -> None:
        """The engine's state, new: at construction, and in a forked child (see :meth:`_adopt_after_fork`)."""
        self._cond = EngineCondition()  # the one lock and condition; see _locked_here
        self._cv = self._cond  # the same object: its ``with`` is the C lock's
        # Submission is serialized by its own lock, never the condition's: a send to a busy
        # writer process may block, and completions (which take ``_cv``) must go on meanwhile.
        self._submit_lock = threading.RLock()
        self._local = threading.local()  # ``holding``: this thread holds a slot in stage_and_submit
        eager = EagerStager(self.staging_threads)
        self._eager_stager = eager  # the lazy stager's own, shared; for save_here's copy
        self._stager: Stager = LazyStager(eager) if self.staging == "lazy" else eager
        finish_lazy = self._stager.finish if self._stager.defers_copies else None
        self._errors = ErrorInbox(self._cond)  # failures not yet raised to the caller
        self._table = OpTable(self._cond, finish_lazy)  # handed to the writer, not yet complete
        self._stats = StatsLog(self._cond)
        arena_kind = "shared" if self.writer_kind == "process" else "plain"
        self._slots = SlotPool(self._cond, self.max_pending, arena_kind, self.when_full, self._errors, finish_lazy)
        self._exit_deadline: Optional[float] = None  # set when the interpreter starts to exit
        # Saves and removes between admission and being counted in the table (staging, hand-over):
        # token -> (path key, thread id, set when it ends). The exit drain waits for them too.
        self._handovers: Dict[int, "tuple[str, int, threading.Event]"] = {}
        self._reserve_lock = threading.Lock()  # guards ``_reservation``, the last reserve()'s
        self._reservation: Optional[Reservation] = None

    def _adopt_after_fork(self) -> None:
        """In a child forked from the process that made this engine, start afresh as the
        child's own engine (``ddp_fork`` trains in such children with the parent's plugin).

        The parent's pending saves stay the parent's: its writer did not survive the fork here,
        and the child must neither wait for nor redo them. Its locks may have been copied while
        held. Its staging memory may be shared with the parent's writer process (a memfd), so
        the child stages into new memory of its own.
        """
        self._holder.writer = None  # the parent's: never stopped or used from here
        self._fresh_state()

    def share_cores_among(self, local_ranks: int) -> None:
        """With the default ``staging_threads``, copy with this rank's share of the machine's
        cores, ``local_ranks`` ranks running on it (for launchers that do not set
        ``LOCAL_WORLD_SIZE``). A count given at construction is kept."""
        if self._staging_threads_chosen:
            return
        self.staging_threads = default_staging_threads(max(1, int(local_ranks)))
        self._stager.copier.threads = self.staging_threads

    @property
    def stager(self) -> Stager:
        """The staging strategy (eager or lazy; see :mod:`asyncckpt._staging.protocol`), read-only."""
        return self._stager

    def options(self) -> Dict[str, Any]:
        """The keyword options this engine was built with (to build an equal one elsewhere)."""
        return options_of(self)

    # -- the wrapped IO -------------------------------------------------------------------

    @property
    def checkpoint_io(self) -> Optional[Any]:
        """The IO that writes; ``None`` until one is given or first needed."""
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: Any) -> None:
        # The writer owns the IO it started with: let it finish what it has (keeping order),
        # then the next operation starts a writer with the new IO.
        if self.writer_kind == "process" and io is not None:
            check_picklable(io)
        with self._submit_lock:
            writer, self._writer = self._writer, None
            ops = self._table.pending()
        if writer is not None:
            try:
                self._table.wait(ops, None)
            finally:  # interrupted, too: no longer the engine's, it would run on unstopped
                writer.stop()
        self._checkpoint_io = io

    def replace_base_io(self, io: Any) -> None:
        """Swap the wrapped IO the way the engine's own ``checkpoint_io`` setter does (the
        operations queued for the old IO are written first), also where a subclass's
        ``checkpoint_io`` property has other semantics (a framework plugin's)."""
        AsyncCheckpointIO.checkpoint_io.fset(self, io)  # type: ignore[attr-defined]

    def wrapped_io(self) -> Any:
        """The IO that writes, filling in :class:`TorchCheckpointIO` when none was given."""
        if self.checkpoint_io is None:
            self._checkpoint_io = TorchCheckpointIO()
        return self.checkpoint_io

    # -- public API -----------------------------------------------------------------------

    def reserve(
        self, state_or_nbytes: Union[Mapping[str, Any], int], *, wait: bool = False, pinned: Optional[bool] = None
    ) -> Reservation:
        """Allocate the staging memory of the first saves now, and touch every page of it, on a
        background thread, so that the first ``save_checkpoint`` costs what a later one does.

        Without it the first save of each slot allocates its memory and takes a page fault per
        page inside the call (256 MB on CPU: about 5x a warm save; 8 GiB pinned on a GPU: seconds).

        Args:
            state_or_nbytes: a checkpoint like the ones you will save (preferred: its exact
                layout is planned, and a save of the same layout finds its slot ready), or its
                tensor bytes (an arena a little larger, which the first save adopts when it
                fits). A state is read on the background thread: its tensors may change in place
                meanwhile (only shapes and storages matter), its containers must not.
            wait: block until the memory is ready (and raise why it could not be made).
            pinned: for a byte count, reserve pinned memory (CUDA sources, ``writer="thread"``).

        Every free slot (up to ``max_pending``) is filled, so a second save that overlaps the
        first one's write is as cheap too; a slot holding a checkpoint being written keeps its
        memory. A save arriving meanwhile waits for the first slot ready, never allocates
        beside it: staging memory stays within ``max_pending`` slots throughout. A failed
        reservation is logged and raised by the returned :class:`Reservation` only: the first
        save then allocates, as without one. ``teardown()`` stops a reservation still running
        and frees its memory; a later ``reserve()`` works again.
        """
        state, nbytes = check_request(state_or_nbytes, pinned, self.writer_kind)
        if lifecycle.exiting():
            raise AsyncCheckpointError("cannot reserve staging memory: the interpreter is exiting")
        if state is not None:
            hooks = WrappedIO(self.wrapped_io())
            rules = hooks.writes_with_torch_save
            source: List[Any] = []  # split once, on the job's thread, for every slot

            def fill(slot: StagingSlot, stop: Any) -> None:
                if not source:
                    source.append(tensors_of(hooks.stageable_form(state), "reserve()"))
                fill_slot(slot, source[0], "reserve()", torch_save_rules=rules, copier=self._stager.copier, stop=stop)

        else:

            def fill(slot: StagingSlot, stop: Any) -> None:
                fill_slot_bytes(slot, nbytes, bool(pinned), stop)

        with self._reserve_lock:
            running = self._reservation
            if running is not None and not running.done():
                raise AsyncCheckpointError(
                    "reserve(): a reservation is still running; wait for it (its .result()) before reserving again"
                )
            handle = Reservation()
            job = ReservationJob(self._slots, fill, handle)
            self._reservation = handle
            try:
                job.start()  # returns once the job holds the slots
            except BaseException as err:
                # (Ctrl-C as it starts) a job that will not run is settled here, so that a later
                # reserve() and teardown do not wait for it; one that runs settles it when done
                if job.abandon():
                    handle.settle(error=AsyncCheckpointError(
                        f"reserve() was interrupted ({type(err).__name__}) as it started; call it again"
                    ))
                raise
        if wait:
            handle.result()
        return handle

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], path: PathLike, storage_options: Optional[Any] = None
    ) -> SaveHandle:
        """Stage ``checkpoint`` into host memory, queue its write, and return its handle.

        The file will hold the checkpoint exactly as it is now; later in-place changes to its
        tensors or containers do not reach it. The returned :class:`SaveHandle` (a
        ``concurrent.futures.Future``) completes when the write does; its failure is still
        raised once by the next call into the engine.
        """
        hooks = WrappedIO(self.wrapped_io())
        agree = hooks.agree_to_save
        if agree is not None and not getattr(self._local, "holding", False):
            return self._save_agreed(agree, checkpoint, path, storage_options)
        key, target = hooks.check_save(path, storage_options)
        if getattr(self._local, "holding", False):
            return self._save_now(checkpoint, key, target, storage_options)
        if lifecycle.exiting():
            with self._in_progress(key):  # a SIGTERM meanwhile is handled once it is written
                return self._save_now(checkpoint, key, target, storage_options)
        self._finish_lazy()
        self.raise_pending_errors()
        if storage_options is not None:  # this copy of the IO loads it; a writer process saves it
            hooks.remember_storage_options(path, storage_options)
        started = time.perf_counter()
        checkpoint = hooks.stageable_form(checkpoint)
        with self._in_progress(key):  # from here a SIGTERM drain waits for this save too
            hold = SlotHold()
            try:
                self._slots.acquire(key, hold=hold)
                return self.stage_and_submit(
                    checkpoint, target, key, storage_options, hold, started, time.perf_counter() - started
                )
            except BaseException:
                try:
                    self._slots.release_hold(hold)  # unless its operation took it over (then empty)
                finally:  # again if a signal handler's exception cut it short at its start (it acts once)
                    self._slots.release_hold(hold)
                raise

    def _save_agreed(self, agree: Any, checkpoint: Any, path: PathLike, storage_options: Any) -> SaveHandle:
        """``save_checkpoint`` for a collective IO (``agree_to_save``): the ranks agree at the
        call, after everything that may refuse the save and before staging, whether they all
        make it; a save refused on one rank is refused on every rank (see
        :meth:`asyncckpt.DistributedCheckpointIO.agree_to_save`)."""
        lifecycle.drain_collective_saves_before_groups_are_destroyed()
        started = time.perf_counter()
        hold = SlotHold()
        agreement = Agreement()
        try:
            key, target, checkpoint, refusal, background = self.before_agreement(checkpoint, path, storage_options)
            if refusal is None:
                try:
                    self._slots.acquire(key, hold=hold)
                except Exception as err:  # noqa: BLE001 - refused on every rank below, then raised here
                    refusal, background = err, self.reports_background_failure(err)
            waited = time.perf_counter() - started
            self.start_agreement(agree, agreement, path, refusal, background)
            agreement.decided.wait()
            return self.after_agreement(checkpoint, target, key, storage_options, hold, started, waited, agreement)
        except BaseException as err:
            try:
                self.abandon_agreed_save(agreement, path, err, hold)
            finally:  # again if a signal handler's exception cut it short at its start (it acts once)
                self.abandon_agreed_save(agreement, path, err, hold)
            raise

    def abandon_agreed_save(self, agreement: Agreement, path: PathLike, error: BaseException, hold: SlotHold) -> None:
        """The clean-up of a collective save that failed or was interrupted: its abort if every
        rank agreed to it and it was not queued (:meth:`stand_in_for`), and its slot given back
        unless its operation took it over. Acts once however often it is called."""
        try:
            self.stand_in_for(agreement, "abort", path, error)
        finally:
            self._slots.release_hold(hold)

    def start_agreement(
        self, agree: Any, agreement: Agreement, path: PathLike, refusal: Optional[BaseException], background: bool,
        kind: str = "save",
    ) -> None:
        """Start the ranks' agreement on a call of a collective IO (its ``agree_to_save``) on a
        thread of its own (``agreement.thread``); as it ends it sets ``agreement.error`` and
        then ``agreement.decided``.

        Off the caller's thread, a signal handler's exception (Ctrl-C while a slow rank is
        awaited) cannot land between the ranks' exchange and this rank's record of the outcome;
        the caller's clean-up waits for the outcome (:meth:`stand_in_for`)."""

        def decide() -> None:
            try:
                agreement.error = agree(path, refusal, background, self.settle, kind=kind, agreement=agreement)
            except BaseException as err:  # noqa: BLE001 - raised on the caller's thread
                agreement.error = err
            finally:
                agreement.decided.set()

        agreement.thread = new_thread(decide, name="asyncckpt-agreement")
        start(agreement.thread)

    def stand_in_for(self, agreement: Agreement, kind: str, path: PathLike, error: BaseException) -> None:
        """Queue the operation this rank owes a collective call every rank agreed to and that
        did not reach this rank's writer (a failure or an interrupt after the agreement): the
        abort of the save (it fails the save on every rank) or the agreed remove. Without it the
        other ranks' writers would wait in that call's collective. Acts once per agreement;
        waits for the agreement to decide first (an interrupt may come while it runs)."""
        agreement.wait_decided()
        if not agreement.owes_stand_in:
            return
        op = Operation(kind, *key_and_target(path), staged=error if kind == "abort" else None)
        op.agreement = agreement
        try:
            self._submit(op)
        except Exception:  # noqa: BLE001 - the failure that brought us here is the one to raise
            log.exception("asyncckpt: could not take part in the collective %s of %r", kind, shown(os.fspath(path)))

    def before_agreement(
        self, checkpoint: Any, path: PathLike, storage_options: Any
    ) -> "tuple[Any, Any, Any, Optional[Exception], bool]":
        """What a collective save checks on this rank before the ranks agree: (key, target,
        stageable checkpoint, this rank's refusal or None, whether it reports a background failure)."""
        key: Any = None
        target: Any = None
        try:
            hooks = WrappedIO(self.wrapped_io())
            key, target = hooks.check_save(path, storage_options)
            self._finish_lazy()
            pending = self._errors.take()
            if pending is not None:
                return key, target, checkpoint, pending, True
            if storage_options is not None:
                hooks.remember_storage_options(path, storage_options)
            checkpoint = hooks.stageable_form(checkpoint)
        except Exception as err:  # noqa: BLE001 - refused on every rank by the agreement, then raised here
            return key, target, checkpoint, err, self.reports_background_failure(err)
        return key, target, checkpoint, None, False

    @staticmethod
    def reports_background_failure(err: BaseException) -> bool:
        """Whether ``err``, refusing a collective save, is a background failure being reported."""
        return isinstance(err, (CheckpointSaveError, CheckpointRemoveError, WriterDiedError, TensorModifiedError))

    def after_agreement(
        self, checkpoint: Any, target: Any, key: Any, storage_options: Any,
        hold: SlotHold, started: float, waited: float, agreement: Agreement,
    ) -> SaveHandle:
        """Raise the decided agreement's refusal, or stage and queue the save every rank agreed
        to (into the slot ``hold`` holds: given back on a refusal), carrying it. If that fails,
        the caller queues the save's abort instead (:meth:`stand_in_for`): the other ranks'
        writers will run its collective, and this rank's takes part without data."""
        if agreement.error is not None:
            self._slots.release_hold(hold)
            raise agreement.error
        assert hold.slot is not None
        with self._in_progress(key):  # from here a SIGTERM drain waits for this save too
            return self.stage_and_submit(checkpoint, target, key, storage_options, hold, started, waited, agreement)

    def _remove_agreed(self, agree: Any, path: PathLike) -> None:
        """``remove_checkpoint`` for a collective IO: the ranks agree at the call, as for a save,
        so that a removal refused on one rank (a bad path, an earlier failure being reported)
        is refused on every rank instead of leaving the others' writers in its collective."""
        key: Any = None
        target: Any = None
        refusal: Optional[BaseException] = None
        background = False
        agreement = Agreement()
        try:
            try:
                key, target = key_and_target(path)
                refusal = self._errors.take()
                background = refusal is not None
            except Exception as err:  # noqa: BLE001 - refused on every rank below, then raised here
                refusal = err
            self.start_agreement(agree, agreement, path, refusal, background, kind="remove")
            agreement.decided.wait()
            if agreement.error is not None:
                raise agreement.error
            op = Operation("remove", key, target)
            op.agreement = agreement
            self._submit(op)
        except BaseException as err:
            try:
                self.stand_in_for(agreement, "remove", path, err)
            finally:  # again if a signal handler's exception cut it short at its start (it acts once)
                self.stand_in_for(agreement, "remove", path, err)
            raise

    def settle(self) -> Optional[BaseException]:
        """Wait for every queued operation; return (and clear) the failures so far, if any
        (the agreement of a collective IO calls it)."""
        try:
            self._table.wait(self._table.pending(), None)
        except Exception as err:  # noqa: BLE001 - returned with the others
            self._errors.put_first(err)
        return self._errors.take()

    def stage_and_submit(
        self,
        checkpoint: Any,
        path: PathLike,
        key: str,
        storage_options: Any,
        hold: SlotHold,
        blocking_since: float,
        waited: float,
        agreement: Optional[Agreement] = None,
    ) -> SaveHandle:
        """Stage into the slot ``hold`` holds (taken by the caller from :attr:`slot_pool`) and
        queue the save; the slot is freed on failure, unless the save's operation took it over.
        The last step of a save, shared by both faces. Callers take the slot into a hold, and
        give the hold back if anything fails before this runs: an exception a signal handler
        raises as the slot is taken then finds it in the hold (never lost)."""
        slot = hold.slot
        assert slot is not None
        try:
            hooks = WrappedIO(self.wrapped_io())
            with self._holding(key):  # a signal handler's save on this thread must not wait for this slot
                slot.last_key = key
                self._stager.torch_save_rules = hooks.writes_with_torch_save
                # Staging allocates many containers (see collection_paused); the pause ends before
                # the hand-over, which may wait on a busy writer process.
                with collection_paused():
                    if self._stager.defers_copies:
                        with torch.inference_mode(False):  # staging memory is never made of inference tensors
                            staged = self._stager.stage(checkpoint, slot, key, hooks.version_owner)
                        self._slots.note_copy_started()  # a save waiting for a slot finishes this copy
                    else:
                        staged = self._stager.stage(checkpoint, slot, key)
                op = Operation("save", key, path, storage_options=storage_options, staged=staged, slot=slot)
                op.settings = torch_settings()  # this thread's: torch keeps them per thread
                op.agreement = agreement
                op.wait_seconds = waited
                op.blocking_seconds = time.perf_counter() - blocking_since
                handle = SaveHandle(key, staged.tensor_bytes)
                self._submit(op, handle, hold)
                return handle
        except BaseException:
            if hold.slot is not None:  # not taken over by the save's operation
                # Each step twice: again if a signal handler's exception cut it short at its
                # start (each acts once). No copy may still write into the slot once it is free.
                try:
                    try:
                        self._finish_lazy()
                    finally:
                        self._finish_lazy()
                finally:
                    try:
                        self._slots.release_hold(hold)
                    finally:
                        self._slots.release_hold(hold)
            raise

    @contextlib.contextmanager
    def _holding(self, key: str) -> Iterator[None]:
        """Marks this thread as inside a save or hand-over of this engine (see :meth:`_save_now`)."""
        was_holding = getattr(self._local, "holding", False)
        self._local.holding = True
        try:
            with self._in_progress(key):
                yield
        finally:
            self._local.holding = was_holding

    @contextlib.contextmanager
    def _in_progress(self, key: str) -> Iterator[None]:
        """Lists a save or remove in ``_handovers`` from its admission until its operation is
        counted (or has failed), so that the exit drain waits for it; a SIGTERM handled on this
        thread meanwhile is handed on when it ends (see :mod:`asyncckpt._engine.lifecycle`)."""
        if getattr(self._local, "in_progress", False):
            yield  # the outer call lists it
            return
        listed: List[int] = []  # its token, once listed
        ended = threading.Event()
        try:
            # Listed inside the ``try``, the token kept where ``finally`` finds it before any
            # call returns: an exception a signal handler raises at any point leaves it listed
            # and unlisted again, or never listed (listed and forgotten, the exit drain would
            # wait for it for ever).
            self._list_handover(key, ended, listed)
            yield
        finally:
            if listed:
                self._local.in_progress = False
                with self._cv:
                    self._handovers.pop(listed[0], None)
                ended.set()
                lifecycle.after_handover()

    def _list_handover(self, key: str, ended: threading.Event, listed: List[int]) -> None:
        with self._cv:
            self._handover_tokens += 1
            token = self._handover_tokens
            self._handovers[token] = (key, threading.get_ident(), ended)
            listed.append(token)
        self._local.in_progress = True

    def _is_collective(self) -> bool:
        """Whether the wrapped IO's saves run collectives (a sharded IO's, on its process group)."""
        io = self._checkpoint_io
        return io is not None and WrappedIO(io).is_collective

    def _locked_here(self) -> bool:
        """Whether the calling thread is inside a call holding this engine's lock."""
        return self._cond.held_here()

    def _hands_over_on(self, thread_id: int) -> List[str]:
        """The paths of the saves or removes that thread ``thread_id`` is handing over."""
        with self._cv:
            return [key for key, tid, _ in self._handovers.values() if tid == thread_id]

    def _save_now(self, checkpoint: Any, key: str, target: PathLike, storage_options: Any) -> SaveHandle:
        """A save made once the interpreter has begun to exit (its exit drain ran, or is
        running: nothing would wait for a queued save any more), or on a thread that is inside
        another save of this engine (holding a slot)
        or inside a hand-over to the writer: a signal handler's (a framework plugin may save from
        its cluster's requeue handler). The latter can wait neither
        for the slot nor for a send that the interrupted call holds, so, like a synchronous
        save, it is written here and now through the wrapped IO, after the operations already
        queued on its path (they never wait for this thread) and before the interrupted one."""
        if WrappedIO(self.wrapped_io()).is_sharded:
            raise AsyncCheckpointError(
                f"cannot save {key!r}: this thread is inside another save of this engine (a save "
                "from a signal handler?), and a sharded save is collective, so it cannot be written "
                "here on this rank alone; save from the training loop instead"
            )
        self.raise_pending_errors()
        self._table.wait_path(key)
        started = time.perf_counter()
        if storage_options is None:
            self.wrapped_io().save_checkpoint(checkpoint, target)
        else:
            self.wrapped_io().save_checkpoint(checkpoint, target, storage_options=storage_options)
        took = time.perf_counter() - started
        # Written at the call: nothing staged, the whole time was the caller's and the write's.
        return SaveHandle.completed(key, SaveStats(shown(key), took, 0.0, 0.0, took, 0))

    def save_here(self, checkpoint: Dict[str, Any], path: PathLike, storage_options: Optional[Any] = None) -> None:
        """Write ``checkpoint`` to ``path`` on the calling thread, through the wrapped IO, once
        every operation queued before is done; its errors are raised here, as the IO raised them.

        For a framework plugin called where there is no training to overlap with. An IO known
        to write with ``torch.save`` (the file is then the point in time), or a collective one,
        gets ``checkpoint`` itself. Any other IO gets a point-in-time copy in staging memory, as
        a queued save would: one that keeps what it is given, to write it later, then keeps the
        checkpoint as it was at the call, and a later save never writes into what it kept.
        """
        self.flush()
        io = self.wrapped_io()
        hooks = WrappedIO(io)
        if (
            hooks.writes_with_torch_save
            or not isinstance(path, (str, os.PathLike))  # an IO's own kind of target (a buffer?): as given
            or hooks.is_collective
            or getattr(self._local, "holding", False)  # a signal handler's save inside a save: no slot
        ):
            io.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        key, target = key_and_target(path)
        hold = SlotHold()
        with self._holding(key):
            op: Optional[Operation] = None
            written = False
            try:
                slot = self._slots.acquire(key, when_full="wait", hold=hold)  # a synchronous save never refuses
                slot.last_key = key
                self._eager_stager.torch_save_rules = False
                with collection_paused():
                    staged = self._eager_stager.stage(hooks.stageable_form(checkpoint), slot, key)
                op = Operation("save", key, target, storage_options=storage_options, staged=staged, slot=slot)
                perform_save(io, op)
                written = True
            finally:
                if op is not None and op.kept_staged:
                    if written:
                        self._say_kept(op)
                    slot.release_memory()
                try:
                    self._slots.release_hold(hold)
                finally:  # again if a signal handler's exception cut it short at its start (it acts once)
                    self._slots.release_hold(hold)

    def wait_staged(self) -> None:
        """Wait until the last save's tensors are copied (``staging="lazy"``), and check them.

        After it returns, the checkpoint's tensors may be modified in any way. An optimizer
        step and every call into the engine wait for the copy on their own; call this before
        modifying checkpoint tensors in place anywhere else. With ``staging="eager"`` the copy
        is done when ``save_checkpoint`` returns, and this returns at once.
        """
        self._finish_lazy(host_sync=True)

    def _finish_lazy(self, host_sync: bool = False) -> None:
        """A guard point: finish and verify this engine's lazy copy (see :mod:`asyncckpt.lazy`)."""
        self._stager.finish(host_sync)  # eager staging: nothing to finish

    def load_checkpoint(
        self,
        path: PathLike,
        map_location: Optional[Any] = None,
        weights_only: Optional[bool] = None,
        verify: bool = False,
        **wrapped_options: Any,
    ) -> Dict[str, Any]:
        """Load ``path`` once every queued operation on it has taken effect.

        ``verify=True`` (needs a wrapped IO that supports it, as ``TorchCheckpointIO`` does)
        checks the whole file first and raises :class:`asyncckpt.IntegrityError` if it is damaged.
        Other keyword arguments go to the wrapped IO's ``load_checkpoint`` (for example
        ``state=`` of :class:`asyncckpt.DistributedCheckpointIO`).
        """
        # the working folder at the call, even if another thread changes it while this waits
        target = absolute_target(path) if isinstance(path, (str, os.PathLike)) else path
        self.wait_for_path(target)  # the target's keys: one reading of the working folder for both
        self.raise_pending_errors()
        kwargs = load_options(map_location, weights_only, verify)
        return self.wrapped_io().load_checkpoint(target, **kwargs, **wrapped_options)

    def remove_checkpoint(self, path: PathLike) -> None:
        """Queue the removal of ``path``, after every earlier operation on it.

        The removal depends on every save queued before it, on any path: if one of them fails,
        ``path`` is kept (the run keeps its last good checkpoint) and the failure, raised once,
        says so (:class:`asyncckpt.RemoveSkippedError`). A failure already raised to the caller
        before this call does not hold the removal back.
        """
        hooks = WrappedIO(self.wrapped_io())
        if hooks.remove_is_collective:
            self._remove_agreed(hooks.agree_to_save, path)
            return
        key, target = key_and_target(path)
        self.raise_pending_errors()
        if lifecycle.exiting():  # the writer is drained (or stopped): removed here, as a synchronous IO would
            with self._in_progress(key):
                self._table.wait(self._table.pending(), None)  # it depends on every save queued before it
                self.raise_pending_errors()
                self.wrapped_io().remove_checkpoint(target)
            return
        self._submit(Operation("remove", key, target))

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait until every operation submitted before this call is done, then raise failures."""
        self._table.wait(self._table.pending(), timeout)
        self.raise_pending_errors()

    def teardown(self) -> None:
        """Flush, stop the writer, free staging memory and tear down the wrapped IO.

        Idempotent; the object works again afterwards (a later save starts a new writer).
        Errors are raised after everything else has been done, never hidden.
        """
        first_error: Optional[BaseException] = None
        with self._reserve_lock:
            reservation = self._reservation
        if reservation is not None:
            reservation.stop()  # it gives its slots back after the page step it is in
        try:
            self._table.wait(self._table.pending(), None)
        except BaseException as err:  # noqa: BLE001 - raised below, after cleanup
            first_error = err
        with self._submit_lock:  # a concurrent save waits here, then starts a new writer
            writer = self._writer
            if writer is not None:
                # Other threads may have handed this writer lazy saves since the wait above; it
                # writes each only once a guard point has verified its copy, and no other guard
                # point may come: this is one for every save the writer holds.
                self._finish_lazy()
                writer.stop()
                # Let go of only once stopped: interrupted before, it stays the engine's (a
                # stopping one is replaced by the next save, a running one stopped by the next
                # teardown or exit), never left running unowned.
                self._writer = None
        if reservation is not None:
            concurrent.futures.wait([reservation])  # its slots are back, to be freed here
        self._slots.release_memory()
        self._stager.copier.close()
        if self.checkpoint_io is not None:
            try:
                self.checkpoint_io.teardown()
            except BaseException as err:  # noqa: BLE001
                first_error = first_error or err
        if first_error is not None:
            raise first_error
        self.raise_pending_errors()

    @property
    def stats(self) -> List[SaveStats]:
        """Measurements of the most recent completed saves (oldest first)."""
        return self._stats.all()

    @property
    def pending(self) -> int:
        """Operations submitted and not yet done."""
        return len(self._table)

    @property
    def free_slots(self) -> int:
        """How many staging slots are free now (of ``max_pending``)."""
        return self._slots.free_count

    def staging_buffers(self) -> List[StagingBuffer]:
        """A read-out of the free staging slots' host memory, in slot order (takes the lock)."""
        return self._slots.buffers()

    @property
    def staging_bytes(self) -> int:
        """Staging memory held now by all ``max_pending`` slots (free, busy, or being reserved)."""
        return self._slots.held_bytes()

    @property
    def pending_errors(self) -> int:
        """How many background failures wait to be raised by the next call (a peek: raises nothing)."""
        with self._cond:
            return self._errors.pending

    @property
    def slot_pool(self) -> SlotPool:
        """The staging slots and the admission rule (both faces admit saves through it)."""
        return self._slots

    @property
    def op_table(self) -> OpTable:
        """The pending operations, and the waits on them (both faces wait through it)."""
        return self._table

    def wait_idle(self, timeout: Optional[float] = None) -> None:
        """Wait until every operation submitted before this call is done; raises nothing but
        :class:`FlushTimeoutError` (failures stay pending for the next call)."""
        self._table.wait(self._table.pending(), timeout)

    @property
    def writer(self) -> Optional[Writer]:
        """The running writer (thread or process), or None before the first operation and after teardown."""
        return self._holder.writer

    def queued_kind(self, path: PathLike) -> Optional[str]:
        """``"save"`` or ``"remove"``: the last operation queued on ``path`` and not yet done;
        None when nothing is pending there. Answers at once, without waiting for the writer."""
        op = self._table.last_on(path_key_of(path))
        return op.kind if op is not None else None

    def wait_for_path(self, path: PathLike, timeout: Optional[float] = None) -> None:
        """Block until every operation queued on ``path`` has taken effect (errors are not raised),
        and on the file a symlink on the way resolves to now (what a read of ``path`` reads)."""
        keys = read_keys_of(path)
        deadline = None if timeout is None else time.monotonic() + timeout
        for key in keys:
            self._table.wait_path(key, None if deadline is None else max(0.0, deadline - time.monotonic()))

    # -- submission and completion --------------------------------------------------------

    def _submit(self, op: Operation, handle: Optional[SaveHandle] = None, hold: Optional[SlotHold] = None) -> None:
        """Hand ``op`` to the writer; it counts as pending only once fully handed over.

        Anything that fails before that (an unpicklable message, an interrupted send) raises
        here and leaves nothing counted; the caller gives the slot back.
        """
        op.add_done_callback(lambda op: self._on_done(op, handle))  # then the handle, if any
        op.hold = hold  # the writer empties it as it takes the operation (Operation.take_over)
        try:
            with self._holding(op.path):  # nor for this hand-over (a process writer's send lock)
                with self._submit_lock:
                    for _ in range(2):
                        writer = self._live_writer()
                        with self._cv:
                            op.seq = self._table.next_seq()
                            if op.kind == "remove":
                                op.after = self._saves_not_known_good()
                        try:
                            writer.submit(op)
                        except WriterGoneError:
                            continue  # it died since we looked: start another and hand it over there
                        break
                    else:
                        raise WriterDiedError(f"could not hand the {op.kind} of {op.path!r} to a writer", op.path)
        finally:
            # Counted once handed over, whatever is raised meanwhile (a signal handler's
            # exception as the hand-over returns): flush and the exit drain wait for it.
            if op.handed_over:
                with self._cv:
                    try:
                        self._table.count(op)  # unless a fast writer finished it already
                    finally:  # again if a signal handler's exception cut it short at its start (it acts once)
                        self._table.count(op)

    def _saves_not_known_good(self) -> List[Operation]:
        """(``_cv`` and the submit lock held) The saves a remove submitted now depends on: those
        still pending, and those that failed without the failure having been raised yet (a failure
        raised to the caller is the caller's to act on). Every save submitted earlier is one or
        the other, or known good: the submit lock orders hand-overs, and a save completes only
        after it was counted or with ``_on_done`` having run."""
        return self._table.pending_saves() + self._errors.failed_saves()

    @property
    def _writer(self) -> Optional[Writer]:
        return self._holder.writer

    @_writer.setter
    def _writer(self, writer: Optional[Writer]) -> None:
        self._holder.writer = writer

    def _live_writer(self) -> Writer:
        """The running writer, starting one when there is none or the last one died (whose
        pipes and threads are released first: its operations have been failed already)."""
        writer = self._writer
        if writer is None or not writer.alive:
            if writer is not None:
                writer.stop(5)
            self._writer = writer = self._new_writer()
        return writer

    def _new_writer(self) -> Writer:
        if self.writer_kind == "process":
            # multiprocessing's exit handler must drain and stop it, whatever the order of exit hooks
            lifecycle.stop_writers_before_multiprocessing_exit()
            writer: Writer = ProcessWriter(self.wrapped_io(), nice=self.writer_nice)
        else:
            writer = ThreadWriter(self.wrapped_io(), nice=self.writer_nice)
        writer.start()
        return writer

    def _on_done(self, op: Operation, handle: Optional[SaveHandle] = None) -> None:
        """Runs once per operation, on the thread that completes it: free the slot, record
        stats or the error, forget the operation, wake slot waiters; then complete ``handle``
        (with the same error object the next call raises)."""
        error = op.error
        stats: Optional[SaveStats] = None
        wrapped_error: Optional[BaseException] = None
        if error is not None:
            wrapped_error = self._background_error(op, error)
            if op.interrupted_by is None:
                log.error("asyncckpt: %s", wrapped_error, exc_info=wrapped_error.__cause__ or wrapped_error)
            else:  # its call raised that exception already: said, not raised again
                log.warning("asyncckpt: %s", wrapped_error)
        if op.kind == "save" and op.kept_staged and error is None:
            self._say_kept(op)
        with self._cv:
            if op.kind == "save":
                if op.kept_staged:  # that memory is the IO's now: the slot's next save gets new memory
                    op.slot.release_memory()
                self._slots.release_locked(op.slot)
                if error is None:
                    stats = SaveStats(
                            path=shown(op.path),
                            blocking_seconds=op.blocking_seconds,
                            wait_seconds=op.wait_seconds,
                            staging_seconds=op.staged.staging_seconds,
                            write_seconds=op.write_seconds,
                            tensor_bytes=op.staged.tensor_bytes,
                            allocated_bytes=op.staged.allocated_bytes,
                        )
                    self._stats.add(stats)
            if error is not None and op.interrupted_by is None:
                self._errors.put(wrapped_error, op if op.kind == "save" else None)
            self._table.forget(op)
            op.staged = op.slot = None
            op.after = ()
            self._cv.notify_all()
        if handle is not None:
            handle.settle(stats, wrapped_error)

    def _say_kept(self, op: Operation) -> None:
        """Say once per engine that the wrapped IO keeps what it was given (see :meth:`_on_done`)."""
        if self._said_kept:
            return
        self._said_kept = True
        log.warning(
            "asyncckpt: %s.save_checkpoint kept tensors of the checkpoint %r after it returned; they "
            "live in staging memory, so that memory is now the IO's and the next save into it gets "
            "new memory (allocated in its call: slower). An IO that keeps the data should copy it "
            "(tensor.clone()). Said once.",
            type(self.wrapped_io()).__name__,
            shown(op.path),
        )

    @staticmethod
    def _background_error(op: Operation, error: BaseException) -> AsyncCheckpointError:
        """The error raised for ``op``: names its path, chains ``error``; neither shows the
        credentials of the path's URL or of the save's storage_options (``error`` is replaced
        by a redacted stand-in if its chain quotes them)."""
        if isinstance(error, (WriterDiedError, TensorModifiedError, RemoveSkippedError)):
            return error
        options = op.storage_options if isinstance(op.storage_options, Mapping) else None
        secrets = secret_values(options, op.path)
        cause = redact(f"{type(error).__name__}: {error}", secrets)
        if op.kind == "save":
            err: AsyncCheckpointError = CheckpointSaveError(
                f"saving checkpoint {op.path!r} failed in the background: {cause}", op.path
            )
        else:
            err = CheckpointRemoveError(f"removing checkpoint {op.path!r} failed in the background: {cause}", op.path)
        err.__cause__ = safe_cause(error, secrets)
        return err

    def raise_pending_errors(self) -> None:
        """Raise the first background failure not yet raised (later ones noted on it), and clear it."""
        self._errors.raise_first()

    # -- waiting --------------------------------------------------------------------------

    def _exit_time_left(self, reason: str) -> float:
        """Seconds left to write pending saves before ``reason``: ``exit_timeout`` per SIGTERM,
        and one ``exit_timeout`` for all of interpreter exit (its hooks drain more than once)."""
        if reason != "interpreter exit":
            return self.exit_timeout
        now = time.monotonic()
        if self._exit_deadline is None:
            self._exit_deadline = now + self.exit_timeout
        return max(0.0, self._exit_deadline - now)

    def _stop_writer_before_exit(self) -> None:
        """Stop the writer within what is left of the exit time (``multiprocessing`` joins a
        writer process at exit without a timeout; a stopped one is joined at once)."""
        writer = self._writer
        if writer is not None:
            writer.stop(wait_limit(max(1.0, self._exit_time_left("interpreter exit"))))

    def _drain_before_exit(self, reason: str, deadline: Optional[float] = None) -> None:
        """Write what is pending, within the exit time (and by ``deadline``, a monotonic time),
        and log it: the operations counted, and those other threads are handing over (they
        are counted once handed over, and are waited for too). A hand-over on this thread
        cannot finish while this runs (the SIGTERM handler waits for it to end first; see
        :mod:`asyncckpt._engine.lifecycle`), so one still in progress here is logged as not written."""
        budget = self._exit_time_left(reason)
        if deadline is not None:
            budget = min(budget, max(0.0, deadline - time.monotonic()))
        started = time.monotonic()
        end = started + budget
        me = threading.get_ident()
        with self._cv:
            others = [ended for _, tid, ended in self._handovers.values() if tid != me]
            counted = self._table.keys()
            keys = set(counted) | {key for key, _, _ in self._handovers.values()}
            paths = sorted(shown(key) for key in keys)
            pending = len(counted) + len(self._handovers)
        if pending == 0:
            return
        log.warning(
            "asyncckpt: %s with %d checkpoint operation(s) pending (%s); writing them first (%s)",
            reason,
            pending,
            ", ".join(paths),
            "no time limit" if wait_limit(budget) is None else f"up to {budget:.0f}s",
        )
        # Events, not ``_cv``: this may run in a signal handler on a thread that holds ``_cv``.
        for ended in others:
            ended.wait(wait_limit(max(0.0, end - time.monotonic())))
        ops = self._table.pending()
        try:
            self._table.wait(ops, max(0.0, end - time.monotonic()))
        except AsyncCheckpointError as err:
            err_text = str(err)
        else:
            err_text = ""
        with self._cv:
            keys = {op.path for op in ops if not op.done()} | {key for key, _, _ in self._handovers.values()}
            not_written = sorted(shown(key) for key in keys)
            errors = self._errors.errors()
        if not_written:
            log.error(
                "asyncckpt: pending checkpoints not all written before %s; not written: %s%s",
                reason,
                ", ".join(not_written),
                f" ({err_text})" if err_text else "",
            )
            return
        log.warning(
            "asyncckpt: pending checkpoint operations finished in %.2fs before %s%s",
            time.monotonic() - started,
            reason,
            f"; {len(errors)} failed (logged above)" if errors else "",
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.checkpoint_io!r}, max_pending={self.max_pending}, "
            f"when_full={self.when_full!r}, writer={self.writer_kind!r}, staging={self.staging!r})"
        )
