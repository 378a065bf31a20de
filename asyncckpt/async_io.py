"""``AsyncCheckpointIO``: the engine's public face.

``save_checkpoint`` admits the save (waits for a free staging slot), stages it into host memory on
the caller's thread, queues it, and returns. The writer commits queued operations in order.
Background failures are logged when they happen and raised once by the next call into the
engine.
"""

from __future__ import annotations

import _thread
import collections
import contextlib
import logging
import math
import numbers
import os
import pathlib
import sys
import threading
import time
import weakref
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Mapping, Optional

import torch

from . import _exit
from .aio import AsyncAPIMixin
from .checkpoint_io import CheckpointIO, PathLike, load_options
from .errors import (
    AsyncCheckpointError,
    CheckpointRemoveError,
    CheckpointSaveError,
    FlushTimeoutError,
    InvalidPathError,
    QueueFullError,
    RemoveSkippedError,
    WriterDiedError,
)
from .lazy import LazyStager, TensorModifiedError, check_staging
from .redaction import shown
from .remote import redact, safe_cause, secret_values
from .staging import Stager, StagingSlot, collection_paused, default_staging_threads
from .stats import SaveStats
from .storage import absolute_path, check_target, path_key
from .torch_io import TorchCheckpointIO
from .writer import Operation, ThreadWriter, Writer, WriterGoneError

log = logging.getLogger("asyncckpt")

WHEN_FULL_CHOICES = ("wait", "raise")
WRITER_CHOICES = ("thread", "process")
_STATS_KEPT = 1000


def _choice(name: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise ValueError(f"unknown {name}={value!r}; allowed values: {', '.join(repr(a) for a in allowed)}")
    return value


class _EngineLock(_thread.RLock):  # type: ignore[misc]
    """The engine's lock, able to tell whether the calling thread holds it: a SIGTERM handler
    that interrupted this thread inside it must not wait for writes whose completion needs it."""

    def held_here(self) -> bool:
        return self._is_owned()


def _wait_limit(seconds: Optional[float]) -> Optional[float]:
    """``seconds`` as a timeout for a thread's wait: None (no limit) beyond what one can wait
    (``exit_timeout=float("inf")``), where the wait would raise ``OverflowError``."""
    if seconds is not None and seconds >= threading.TIMEOUT_MAX:
        return None
    return seconds


def _absolute(path: PathLike) -> PathLike:
    """A relative local path or ``file://``/``local://`` URL made absolute now: it means the
    working folder at the call, not the writer's when it writes (see :func:`absolute_path`)."""
    text = os.fspath(path)
    absolute = absolute_path(text)
    if absolute == text:
        return path
    return type(path)(absolute) if isinstance(path, pathlib.PurePath) else absolute


_LIGHTNING_PACKAGES = ("lightning", "lightning_fabric", "pytorch_lightning")


def _check_storage_options(io: Any, path: PathLike, storage_options: Any) -> None:
    """Raise ``TypeError`` where the wrapped IO's own save would refuse ``storage_options``."""
    check = getattr(io, "check_storage_options", None)
    owner = next((c for c in type(io).__mro__ if "save_checkpoint" in vars(c)), None)
    if check is not None and owner is not None and "check_storage_options" in _attrs_up_to(type(io), owner):
        check(path, storage_options)
        return
    if (
        owner is not None
        and owner.__name__ in ("TorchCheckpointIO", "XLACheckpointIO")
        and owner.__module__.split(".")[0] in _LIGHTNING_PACKAGES
    ):
        raise TypeError(
            "`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg"
            f" is not supported for `{type(io).__name__}`. Please implement your custom `CheckpointIO`"
            " to define how you'd like to use `storage_options`."
        )


def _saves_with_torch_save(io: Any) -> bool:
    """Whether ``io``'s ``save_checkpoint`` is one known to write with ``torch.save``: ours or
    Lightning's ``TorchCheckpointIO`` / ``XLACheckpointIO``, not overridden below them."""
    owner = next((c for c in type(io).__mro__ if "save_checkpoint" in vars(c)), None)
    if owner is None or owner.__name__ not in ("TorchCheckpointIO", "XLACheckpointIO"):
        return False
    return owner.__module__.split(".")[0] in (*_LIGHTNING_PACKAGES, "asyncckpt")


def _attrs_up_to(cls: type, owner: type) -> set:
    """Names defined on ``owner`` or on classes below it in ``cls``'s MRO: an IO that overrides
    ``save_checkpoint`` below the class that checks its options may accept other options."""
    names: set = set()
    for c in cls.__mro__:
        names |= set(vars(c))
        if c is owner:
            break
    return names


class _WriterHolder:
    """Holds the engine's current writer, so that the engine's finalizer stops whichever writer
    is current then, without keeping old writers (or the engine) alive."""

    def __init__(self) -> None:
        self.writer: Optional[Writer] = None

    def stop(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.stop(5)


class AsyncCheckpointIO(AsyncAPIMixin, CheckpointIO):
    """Saves checkpoints in the background, through any ``CheckpointIO``.

    Args:
        checkpoint_io: the IO that does the actual writing: ours, a subclass of yours, or
            Lightning's. Defaults to :class:`asyncckpt.TorchCheckpointIO`. It must not keep
            references to the tensors it is given after ``save_checkpoint`` returns: they live
            in reused staging buffers.
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
            ends, then hands the signal on (see :mod:`asyncckpt._exit`).
        staging: ``"eager"`` (``save_checkpoint`` copies every tensor before it returns) or
            ``"lazy"`` (it copies small tensors, starts a background copy of the rest and
            returns; an optimizer step pre-hook and every call into the engine wait for that
            copy, and version counters prove nothing modified it meanwhile, else that save
            fails with :class:`asyncckpt.lazy.TensorModifiedError`). See :mod:`asyncckpt.lazy`.
    """

    #: With no ``checkpoint_io``, ours is used at once; a framework plugin that receives its base
    #: IO later (Lightning's strategy fills it in) sets this, and the writer starts at first use.
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
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an integer >= 1, got {max_pending!r}")
        if (
            isinstance(exit_timeout, bool)
            or not isinstance(exit_timeout, numbers.Real)
            or math.isnan(exit_timeout)
            or exit_timeout < 0
        ):
            raise ValueError(
                f"exit_timeout must be a number of seconds >= 0 (float('inf') for no limit), got {exit_timeout!r}"
            )
        self._checkpoint_io = checkpoint_io
        self.max_pending = max_pending
        self.when_full = _choice("when_full", when_full, WHEN_FULL_CHOICES)
        self.writer_kind = _choice("writer", writer, WRITER_CHOICES)
        if not isinstance(writer_nice, int) or not 0 <= writer_nice <= 19:
            raise ValueError(f"writer_nice must be an integer from 0 to 19, got {writer_nice!r}")
        if writer_nice and self.writer_kind == "thread" and not sys.platform.startswith("linux"):
            raise ValueError(
                f"writer_nice={writer_nice} with writer='thread' needs Linux, where a thread has a "
                f"niceness of its own; on {sys.platform} use writer='process' or writer_nice=0"
            )
        self.writer_nice = writer_nice
        self.exit_timeout = float(exit_timeout)
        self._cv_lock = _EngineLock()  # see _locked_here
        self._cv = threading.Condition(self._cv_lock)
        arena_kind = "shared" if writer == "process" else "plain"
        self._free_slots: List[StagingSlot] = [StagingSlot(i, arena_kind) for i in range(max_pending)]
        self._staging_threads_chosen = staging_threads is not None
        if staging_threads is None:
            staging_threads = default_staging_threads()
        if isinstance(staging_threads, bool) or not isinstance(staging_threads, int) or staging_threads < 1:
            raise ValueError(f"staging_threads must be an integer >= 1, got {staging_threads!r}")
        self.staging_threads = staging_threads
        self._stager = Stager(staging_threads)
        self.staging = check_staging(staging, self.writer_kind)
        self._lazy: Optional[LazyStager] = LazyStager(self._stager) if staging == "lazy" else None
        self._holder = _WriterHolder()
        weakref.finalize(self, self._holder.stop)  # the holder, not the engine, knows the writer
        # Submission is serialized by its own lock, never the condition's: a send to a busy
        # writer process may block, and completions (which take ``_cv``) must go on meanwhile.
        self._submit_lock = threading.RLock()
        self._local = threading.local()  # ``holding``: this thread holds a slot in _stage_and_submit
        self._seq = 0
        self._lazy_started = 0  # lazy copies started (see _acquire_slot); under _cv
        self._ops: Dict[int, Operation] = {}  # handed to the writer, not yet complete; by seq
        self._last_op: Dict[str, Operation] = {}  # per path key: the last pending operation
        self._errors: List[AsyncCheckpointError] = []
        self._failed_saves: List[Operation] = []  # failed, and not yet raised to the caller
        self._stats: Deque[SaveStats] = collections.deque(maxlen=_STATS_KEPT)
        self._exit_deadline: Optional[float] = None  # set when the interpreter starts to exit
        # Saves and removes between admission and being counted in ``_ops`` (staging, hand-over):
        # token -> (path key, thread id, set when it ends). The exit drain waits for them too.
        self._handovers: Dict[int, "tuple[str, int, threading.Event]"] = {}
        self._handover_tokens = 0
        if writer == "process" and (checkpoint_io is not None or not self.base_io_comes_later):
            from .process_writer import check_picklable

            check_picklable(self.wrapped_io())
            self._writer = self._new_writer()  # its interpreter starts while training runs
        _exit.register(self)
        _live_engines.add(self)
        self.handle_sigterm = handle_sigterm
        if handle_sigterm:
            _exit.install_sigterm_handler()

    def _adopt_after_fork(self) -> None:
        """In a child forked from the process that made this engine, start afresh as the
        child's own engine (``ddp_fork`` trains in such children with the parent's plugin).

        The parent's pending saves stay the parent's: its writer did not survive the fork here,
        and the child must neither wait for nor redo them. Its locks may have been copied while
        held. Its staging memory may be shared with the parent's writer process (a memfd), so
        the child stages into new memory of its own.
        """
        self._cv_lock = _EngineLock()  # see _locked_here
        self._cv = threading.Condition(self._cv_lock)
        self._submit_lock = threading.RLock()
        self._local = threading.local()
        self._holder.writer = None  # the parent's: never stopped or used from here
        self._ops = {}
        self._lazy_started = 0
        self._last_op = {}
        self._errors = []
        self._failed_saves = []
        self._stats = collections.deque(maxlen=_STATS_KEPT)
        self._exit_deadline = None
        self._handovers = {}
        arena_kind = "shared" if self.writer_kind == "process" else "plain"
        self._free_slots = [StagingSlot(i, arena_kind) for i in range(self.max_pending)]
        self._stager = Stager(self.staging_threads)
        self._lazy = LazyStager(self._stager) if self.staging == "lazy" else None

    def share_cores_among(self, local_ranks: int) -> None:
        """With the default ``staging_threads``, copy with this rank's share of the machine's
        cores, ``local_ranks`` ranks running on it (for launchers that do not set
        ``LOCAL_WORLD_SIZE``). A count given at construction is kept."""
        if self._staging_threads_chosen:
            return
        self.staging_threads = default_staging_threads(max(1, int(local_ranks)))
        self._stager.copier.threads = self.staging_threads

    def options(self) -> Dict[str, Any]:
        """The keyword options this engine was built with (to build an equal one elsewhere)."""
        return dict(
            max_pending=self.max_pending,
            when_full=self.when_full,
            writer=self.writer_kind,
            writer_nice=self.writer_nice,
            staging_threads=self.staging_threads,
            exit_timeout=self.exit_timeout,
            handle_sigterm=self.handle_sigterm,
            staging=self.staging,
        )

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
            from .process_writer import check_picklable

            check_picklable(io)
        with self._submit_lock:
            writer, self._writer = self._writer, None
            ops = self._pending_ops()
        if writer is not None:
            self._wait_for(ops, None)
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

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], path: PathLike, storage_options: Optional[Any] = None
    ) -> None:
        """Stage ``checkpoint`` into host memory, queue its write, and return.

        The file will hold the checkpoint exactly as it is now; later in-place changes to its
        tensors or containers do not reach it.
        """
        agree = getattr(self.wrapped_io(), "agree_to_save", None)
        if agree is not None and not getattr(self._local, "holding", False):
            self._save_agreed(agree, checkpoint, path, storage_options)
            return
        key, target = self._check_save(path, storage_options)
        if getattr(self._local, "holding", False):
            self._save_now(checkpoint, key, target, storage_options)
            return
        if _exit.exiting():
            with self._in_progress(key):  # a SIGTERM meanwhile is handled once it is written
                self._save_now(checkpoint, key, target, storage_options)
            return
        self._finish_lazy()
        self.raise_pending_errors()
        if storage_options is not None:  # this copy of the IO loads it; a writer process saves it
            remember = getattr(self.wrapped_io(), "remember_storage_options", None)
            if remember is not None:
                remember(path, storage_options)
        started = time.perf_counter()
        checkpoint = self._stageable_form(checkpoint)
        with self._in_progress(key):  # from here a SIGTERM drain waits for this save too
            slot = self._acquire_slot(key)
            self._stage_and_submit(
                checkpoint, target, key, storage_options, slot, started, time.perf_counter() - started
            )

    def _save_agreed(self, agree: Any, checkpoint: Any, path: PathLike, storage_options: Any) -> None:
        """``save_checkpoint`` for a collective IO (``agree_to_save``): the ranks agree at the
        call, after everything that may refuse the save and before staging, whether they all
        make it; a save refused on one rank is refused on every rank (see
        :meth:`asyncckpt.DistributedCheckpointIO.agree_to_save`)."""
        started = time.perf_counter()
        slot: Optional[StagingSlot] = None
        key, target, checkpoint, refusal, background = self._before_agreement(checkpoint, path, storage_options)
        if refusal is None:
            try:
                slot = self._acquire_slot(key)
            except Exception as err:  # noqa: BLE001 - refused on every rank below, then raised here
                refusal, background = err, self._reports_background_failure(err)
        waited = time.perf_counter() - started
        try:
            error = agree(path, refusal, background, self._settle)
        except BaseException:
            if slot is not None:
                self._release_slot(slot)
            raise
        self._after_agreement(error, checkpoint, target, key, storage_options, slot, started, waited)

    def _before_agreement(
        self, checkpoint: Any, path: PathLike, storage_options: Any
    ) -> "tuple[Any, Any, Any, Optional[Exception], bool]":
        """What a collective save checks on this rank before the ranks agree: (key, target,
        stageable checkpoint, this rank's refusal or None, whether it reports a background failure)."""
        key: Any = None
        target: Any = None
        try:
            key, target = self._check_save(path, storage_options)
            self._finish_lazy()
            pending = self._take_pending_errors()
            if pending is not None:
                return key, target, checkpoint, pending, True
            if storage_options is not None:
                remember = getattr(self.wrapped_io(), "remember_storage_options", None)
                if remember is not None:
                    remember(path, storage_options)
            checkpoint = self._stageable_form(checkpoint)
        except Exception as err:  # noqa: BLE001 - refused on every rank by the agreement, then raised here
            return key, target, checkpoint, err, self._reports_background_failure(err)
        return key, target, checkpoint, None, False

    @staticmethod
    def _reports_background_failure(err: BaseException) -> bool:
        return isinstance(err, (CheckpointSaveError, CheckpointRemoveError, WriterDiedError, TensorModifiedError))

    def _after_agreement(
        self, error: Optional[BaseException], checkpoint: Any, target: Any, key: Any, storage_options: Any,
        slot: Optional[StagingSlot], started: float, waited: float,
    ) -> None:
        """Raise the agreement's refusal, or stage and queue the save every rank agreed to."""
        if error is not None:
            if slot is not None:
                self._release_slot(slot)
            raise error
        assert slot is not None
        with self._in_progress(key):  # from here a SIGTERM drain waits for this save too
            try:
                self._stage_and_submit(checkpoint, target, key, storage_options, slot, started, waited)
            except Exception as err:
                # Every rank agreed to this save, and the others' writers will run its collective:
                # this rank's writer takes part without data, failing it on every rank.
                abort = Operation("abort", key, target, staged=err)
                try:
                    self._submit(abort)
                except Exception:  # noqa: BLE001 - the staging failure is the one to raise
                    log.exception("asyncckpt: could not fail the collective save of %r on the other ranks", key)
                raise

    def _remove_agreed(self, agree: Any, path: PathLike) -> None:
        """``remove_checkpoint`` for a collective IO: the ranks agree at the call, as for a save,
        so that a removal refused on one rank (a bad path, an earlier failure being reported)
        is refused on every rank instead of leaving the others' writers in its collective."""
        key: Any = None
        target: Any = None
        refusal: Optional[BaseException] = None
        background = False
        try:
            key = self._path_key(path)
            target = _absolute(path)
            refusal = self._take_pending_errors()
            background = refusal is not None
        except Exception as err:  # noqa: BLE001 - refused on every rank below, then raised here
            refusal = err
        error = agree(path, refusal, background, self._settle, kind="remove")
        if error is not None:
            raise error
        self._submit(Operation("remove", key, target))

    def _settle(self) -> Optional[BaseException]:
        """Wait for every queued operation; return (and clear) the failures so far, if any."""
        try:
            self._wait_for(self._pending_ops(), None)
        except Exception as err:  # noqa: BLE001 - returned with the others
            with self._cv:
                self._errors.insert(0, err)
        return self._take_pending_errors()

    def _stageable_form(self, checkpoint: Any) -> Any:
        """The hook for wrapped IOs whose state is not all plain tensors: an IO with a
        ``prepare_for_staging(checkpoint)`` method returns a form the stager can copy (for
        :class:`asyncckpt.DistributedCheckpointIO`: each DTensor as its local tensor), and its
        ``save_checkpoint`` receives that form back, rebuilt from the staged copy."""
        prepare = getattr(self.wrapped_io(), "prepare_for_staging", None)
        return checkpoint if prepare is None else prepare(checkpoint)

    def _stage_and_submit(
        self,
        checkpoint: Any,
        path: PathLike,
        key: str,
        storage_options: Any,
        slot: StagingSlot,
        blocking_since: float,
        waited: float,
    ) -> None:
        """Stage into ``slot`` (held by the caller) and queue the save; the slot is freed on failure."""
        with self._holding(key):  # a signal handler's save on this thread must not wait for this slot
            slot.last_key = key
            self._stager.torch_save_rules = _saves_with_torch_save(self.wrapped_io())
            try:
                # Staging allocates many containers (see collection_paused); the pause ends before
                # the hand-over, which may wait on a busy writer process.
                with collection_paused():
                    if self._lazy is not None:
                        with torch.inference_mode(False):  # staging memory is never made of inference tensors
                            staged = self._lazy.stage(
                                checkpoint, slot, key, getattr(self.wrapped_io(), "version_owner", None)
                            )
                        with self._cv:  # a save waiting for a slot finishes this copy (_acquire_slot)
                            self._lazy_started += 1
                            self._cv.notify_all()
                    else:
                        staged = self._stager.stage(checkpoint, slot, key)
            except BaseException:
                self._finish_lazy()  # no copy may still write into the slot once it is free
                self._release_slot(slot)
                raise
            op = Operation("save", key, path, storage_options=storage_options, staged=staged, slot=slot)
            op.wait_seconds = waited
            op.blocking_seconds = time.perf_counter() - blocking_since
            try:
                self._submit(op)
            except BaseException:
                self._finish_lazy()
                self._release_slot(slot)
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
        thread meanwhile is handed on when it ends (see :mod:`asyncckpt._exit`)."""
        if getattr(self._local, "in_progress", False):
            yield  # the outer call lists it
            return
        with self._cv:
            self._handover_tokens += 1
            token = self._handover_tokens
            ended = threading.Event()
            self._handovers[token] = (key, threading.get_ident(), ended)
        self._local.in_progress = True
        try:
            yield
        finally:
            self._local.in_progress = False
            with self._cv:
                del self._handovers[token]
            ended.set()
            _exit.after_handover()

    def _locked_here(self) -> bool:
        """Whether the calling thread is inside a call holding this engine's lock."""
        return self._cv_lock.held_here()

    def _hands_over_on(self, thread_id: int) -> List[str]:
        """The paths of the saves or removes that thread ``thread_id`` is handing over."""
        with self._cv:
            return [key for key, tid, _ in self._handovers.values() if tid == thread_id]

    def _save_now(self, checkpoint: Any, key: str, target: PathLike, storage_options: Any) -> None:
        """A save made once the interpreter has begun to exit (its exit drain ran, or is
        running: nothing would wait for a queued save any more), or on a thread that is inside
        another save of this engine (holding a slot)
        or inside a hand-over to the writer: a signal handler's (Lightning saves from its SLURM
        requeue handler). The latter can wait neither
        for the slot nor for a send that the interrupted call holds, so, like a synchronous
        save, it is written here and now through the wrapped IO, after the operations already
        queued on its path (they never wait for this thread) and before the interrupted one."""
        if hasattr(self.wrapped_io(), "prepare_for_staging"):
            raise AsyncCheckpointError(
                f"cannot save {key!r}: this thread is inside another save of this engine (a save "
                "from a signal handler?), and a sharded save is collective, so it cannot be written "
                "here on this rank alone; save from the training loop instead"
            )
        self.raise_pending_errors()
        self._wait_for_path(key)
        if storage_options is None:
            self.wrapped_io().save_checkpoint(checkpoint, target)
        else:
            self.wrapped_io().save_checkpoint(checkpoint, target, storage_options=storage_options)

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
        if self._lazy is not None:
            self._lazy.finish(host_sync)

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
        target = _absolute(path) if isinstance(path, (str, os.PathLike)) else path
        self.wait_for_path(path)
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
        agree = getattr(self.wrapped_io(), "agree_to_save", None)
        if agree is not None and getattr(self.wrapped_io(), "remove_is_collective", False):
            self._remove_agreed(agree, path)
            return
        key = self._path_key(path)
        self.raise_pending_errors()
        if _exit.exiting():  # the writer is drained (or stopped): removed here, as a synchronous IO would
            with self._in_progress(key):
                self._wait_for(self._pending_ops(), None)  # it depends on every save queued before it
                self.raise_pending_errors()
                self.wrapped_io().remove_checkpoint(_absolute(path))
            return
        self._submit(Operation("remove", key, _absolute(path)))

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait until every operation submitted before this call is done, then raise failures."""
        self._wait_for(self._pending_ops(), timeout)
        self.raise_pending_errors()

    def teardown(self) -> None:
        """Flush, stop the writer, free staging memory and tear down the wrapped IO.

        Idempotent; the object works again afterwards (a later save starts a new writer).
        Errors are raised after everything else has been done, never hidden.
        """
        first_error: Optional[BaseException] = None
        try:
            self._wait_for(self._pending_ops(), None)
        except BaseException as err:  # noqa: BLE001 - raised below, after cleanup
            first_error = err
        with self._submit_lock:  # a concurrent save waits here, then starts a new writer
            writer, self._writer = self._writer, None
            if writer is not None:
                # Other threads may have handed this writer lazy saves since the wait above; it
                # writes each only once a guard point has verified its copy, and no other guard
                # point may come: this is one for every save the writer holds.
                self._finish_lazy()
                writer.stop()
        with self._cv:
            for slot in self._free_slots:
                slot.release_memory()
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
        with self._cv:
            return list(self._stats)

    @property
    def pending(self) -> int:
        """Operations submitted and not yet done."""
        with self._cv:
            return len(self._ops)

    @property
    def free_slots(self) -> int:
        """How many staging slots are free now (of ``max_pending``)."""
        with self._cv:
            return len(self._free_slots)

    @property
    def pending_errors(self) -> int:
        """How many background failures wait to be raised by the next call (a peek: raises nothing)."""
        with self._cv:
            return len(self._errors)

    @property
    def writer(self) -> Optional[Writer]:
        """The running writer (thread or process), or None before the first operation and after teardown."""
        return self._holder.writer

    def queued_kind(self, path: PathLike) -> Optional[str]:
        """``"save"`` or ``"remove"``: the last operation queued on ``path`` and not yet done;
        None when nothing is pending there. Answers at once, without waiting for the writer."""
        key = self._path_key(path)
        with self._cv:
            op = self._last_op.get(key)
            return op.kind if op is not None else None

    def wait_for_path(self, path: PathLike, timeout: Optional[float] = None) -> None:
        """Block until every operation queued on ``path`` has taken effect (errors are not raised)."""
        key = self._path_key(path)
        with self._cv:
            op = self._last_op.get(key)
        if op is not None:
            self._wait_for([op], timeout)

    # -- admission and slots --------------------------------------------------------------

    def _acquire_slot(self, key: str) -> StagingSlot:
        with self._cv:
            # Checked and taken under one lock: with "raise" a save never waits, not even for a
            # slot that another thread took between a check and a take.
            if self.when_full == "raise":
                if self._free_slots:
                    return self._take_slot(key)
                raise QueueFullError(
                    f"cannot save {key!r}: all {self.max_pending} staging slots hold checkpoints "
                    "still being written; call flush(), raise max_pending, or use when_full='wait'",
                    key,
                )
        # Every slot is held by an operation that frees it when it completes (a writer's
        # death completes its operations too), so this wait always ends.
        self._wait_for_slot(lambda: bool(self._free_slots) or bool(self._errors))
        self.raise_pending_errors()
        while True:  # another thread may take the slot freed by a failure
            self._wait_for_slot(lambda: bool(self._free_slots))
            with self._cv:
                if self._free_slots:
                    return self._take_slot(key)

    def _wait_for_slot(self, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()`` (called with ``_cv`` held), finishing lazy copies meanwhile.

        With ``staging="lazy"`` the writer frees a slot only once a guard has verified its
        copy, and a copy that another thread started after this save's own guard point has no
        other guard in sight: this thread finishes it, and wakes for each one started while it
        waits (``_lazy_started``), so that a save never waits on a copy nobody will finish.
        """
        while True:
            with self._cv:
                if ready():
                    return
                started = self._lazy_started
            self._finish_lazy()
            with self._cv:
                if ready():
                    return
                if self._lazy_started == started:
                    self._cv.wait()

    def _take_slot(self, key: str) -> StagingSlot:
        """A free slot (``_cv`` held): the one that last staged ``key`` if free, since a path
        usually keeps its layout (two checkpoints saved in turn keep a slot each); else the most
        recently freed."""
        for i in range(len(self._free_slots) - 1, -1, -1):
            if self._free_slots[i].last_key == key:
                return self._free_slots.pop(i)
        return self._free_slots.pop()

    def _release_slot(self, slot: StagingSlot) -> None:
        with self._cv:
            self._free_slots.append(slot)
            self._cv.notify_all()

    # -- submission and completion --------------------------------------------------------

    def _submit(self, op: Operation) -> None:
        """Hand ``op`` to the writer; it counts as pending only once fully handed over.

        Anything that fails before that (an unpicklable message, an interrupted send) raises
        here and leaves nothing counted; the caller gives the slot back.
        """
        op.add_done_callback(self._on_done)
        with self._holding(op.path):  # nor for this hand-over (a process writer's send lock)
            with self._submit_lock:
                for _ in range(2):
                    writer = self._live_writer()
                    with self._cv:
                        self._seq += 1
                        op.seq = self._seq
                        if op.kind == "remove":
                            op.after = self._saves_not_known_good()
                    try:
                        writer.submit(op)
                    except WriterGoneError:
                        continue  # it died since we looked: start another and hand it over there
                    break
                else:
                    raise WriterDiedError(f"could not hand the {op.kind} of {op.path!r} to a writer", op.path)
                with self._cv:
                    if not op.done():  # a fast writer may have finished it already
                        self._ops[op.seq] = op
                        self._last_op[op.path] = op

    def _saves_not_known_good(self) -> List[Operation]:
        """(``_cv`` and the submit lock held) The saves a remove submitted now depends on: those
        still pending, and those that failed without the failure having been raised yet (a failure
        raised to the caller is the caller's to act on). Every save submitted earlier is one or
        the other, or known good: the submit lock orders hand-overs, and a save completes only
        after it was counted or with ``_on_done`` having run."""
        return [op for op in self._ops.values() if op.kind == "save"] + self._failed_saves

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
            from .process_writer import ProcessWriter

            writer: Writer = ProcessWriter(self.wrapped_io(), nice=self.writer_nice)
        else:
            writer = ThreadWriter(self.wrapped_io(), nice=self.writer_nice)
        writer.start()
        return writer

    def _on_done(self, op: Operation) -> None:
        """Runs once per operation, on the thread that completes it: free the slot, record
        stats or the error, forget the operation, wake slot waiters."""
        error = op.error
        if error is not None:
            wrapped_error = self._background_error(op, error)
            log.error("asyncckpt: %s", wrapped_error, exc_info=wrapped_error.__cause__ or wrapped_error)
        with self._cv:
            if op.kind == "save":
                self._free_slots.append(op.slot)
                if error is None:
                    self._stats.append(
                        SaveStats(
                            path=shown(op.path),
                            blocking_seconds=op.blocking_seconds,
                            wait_seconds=op.wait_seconds,
                            staging_seconds=op.staged.staging_seconds,
                            write_seconds=op.write_seconds,
                            tensor_bytes=op.staged.tensor_bytes,
                        )
                    )
            if error is not None:
                self._errors.append(wrapped_error)
                if op.kind == "save":
                    self._failed_saves.append(op)
            self._ops.pop(op.seq, None)
            if self._last_op.get(op.path) is op:
                del self._last_op[op.path]
            op.staged = op.slot = None
            op.after = ()
            self._cv.notify_all()

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
        error = self._take_pending_errors()
        if error is not None:
            raise error

    def _take_pending_errors(self) -> Optional[BaseException]:
        """The first background failure not yet raised (the later ones noted on it), cleared."""
        with self._cv:
            if not self._errors:
                return None
            errors, self._errors = self._errors, []
            self._failed_saves = []
        first = errors[0]
        for later in errors[1:]:
            first.add_note(str(later) if isinstance(later, RemoveSkippedError) else f"also failed: {later}")
        return first

    # -- waiting --------------------------------------------------------------------------

    def _pending_ops(self) -> List[Operation]:
        """The operations handed over and not yet complete, in submission order."""
        with self._cv:
            return list(self._ops.values())

    def _wait_for(self, ops: Iterable[Operation], timeout: Optional[float]) -> None:
        """Wait for each of ``ops`` to complete; :class:`FlushTimeoutError` after ``timeout`` s.

        No polling: each operation is completed by its writer, or failed by the writer's death
        (the process writer's reply reader sees the pipe close; the thread writer's loop fails
        what it took on its way out).
        """
        self._finish_lazy()  # the writer waits for a lazy copy to be verified at a guard point
        ops = list(ops)
        timeout = _wait_limit(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        for i, op in enumerate(ops):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not op.wait(left):
                still = sum(1 for later in ops[i:] if not later.done())
                raise FlushTimeoutError(
                    f"flush timed out after {timeout}s with {still} operation(s) pending", None
                )

    # Names the Lightning plugin used before ``queued_kind``/``wait_for_path`` existed.
    @property
    def _last_seq_by_path(self) -> Dict[str, int]:
        with self._cv:
            return {key: op.seq for key, op in self._last_op.items()}

    def _wait_for_path(self, key: str) -> None:
        with self._cv:
            op = self._last_op.get(key)
        if op is not None:
            self._wait_for([op], None)

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
            writer.stop(_wait_limit(max(1.0, self._exit_time_left("interpreter exit"))))

    def _drain_before_exit(self, reason: str, deadline: Optional[float] = None) -> None:
        """Write what is pending, within the exit time (and by ``deadline``, a monotonic time),
        and log it: the operations counted, and those other threads are handing over (they
        are counted once handed over, and are waited for too). A hand-over on this thread
        cannot finish while this runs (the SIGTERM handler waits for it to end first; see
        :mod:`asyncckpt._exit`), so one still in progress here is logged as not written."""
        budget = self._exit_time_left(reason)
        if deadline is not None:
            budget = min(budget, max(0.0, deadline - time.monotonic()))
        started = time.monotonic()
        end = started + budget
        me = threading.get_ident()
        with self._cv:
            others = [ended for _, tid, ended in self._handovers.values() if tid != me]
            keys = {op.path for op in self._ops.values()} | {key for key, _, _ in self._handovers.values()}
            paths = sorted(shown(key) for key in keys)
            pending = len(self._ops) + len(self._handovers)
        if pending == 0:
            return
        log.warning(
            "asyncckpt: %s with %d checkpoint operation(s) pending (%s); writing them first (%s)",
            reason,
            pending,
            ", ".join(paths),
            "no time limit" if _wait_limit(budget) is None else f"up to {budget:.0f}s",
        )
        # Events, not ``_cv``: this may run in a signal handler on a thread that holds ``_cv``.
        for ended in others:
            ended.wait(_wait_limit(max(0.0, end - time.monotonic())))
        ops = self._pending_ops()
        try:
            self._wait_for(ops, max(0.0, end - time.monotonic()))
        except AsyncCheckpointError as err:
            err_text = str(err)
        else:
            err_text = ""
        with self._cv:
            keys = {op.path for op in ops if not op.done()} | {key for key, _, _ in self._handovers.values()}
            not_written = sorted(shown(key) for key in keys)
            errors = list(self._errors)
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

    # -- paths ----------------------------------------------------------------------------

    @staticmethod
    def _path_key(path: PathLike) -> str:
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidPathError(f"checkpoint path must be a str or os.PathLike, not {type(path).__name__}")
        return path_key(os.fspath(path))

    def _check_save(self, path: PathLike, storage_options: Optional[Any]) -> "tuple[str, Any]":
        """Check a save's arguments at the call; returns the path key and the target to write.

        ``storage_options`` the wrapped IO would refuse raise ``TypeError`` here, as a
        synchronous save would, not later in the background.
        """
        key = self._check_path(path)
        if storage_options is not None:
            _check_storage_options(self.wrapped_io(), path, storage_options)
        return key, _absolute(path)

    def _check_path(self, path: PathLike) -> str:
        key = self._path_key(path)
        check = getattr(self.wrapped_io(), "check_path", None)
        if check is not None:
            check(path)
        else:
            check_target(os.fspath(path))
        return key

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.checkpoint_io!r}, max_pending={self.max_pending}, "
            f"when_full={self.when_full!r}, writer={self.writer_kind!r}, staging={self.staging!r})"
        )


_live_engines: "weakref.WeakSet[AsyncCheckpointIO]" = weakref.WeakSet()


def _adopt_engines_in_forked_child() -> None:
    for engine in list(_live_engines):
        engine._adopt_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_adopt_engines_in_forked_child)
