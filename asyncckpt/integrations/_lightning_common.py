"""One implementation of the Lightning plugin, built for either package family.

``lightning.pytorch`` and ``pytorch_lightning`` are the same code under two names, and a Trainer
accepts only its own family's ``CheckpointIO`` (an ``isinstance`` check). :func:`build` takes a
family's top-level package name, imports it, and returns the classes made from that family's
bases. :mod:`asyncckpt.lightning` and :mod:`asyncckpt.pytorch_lightning` are thin shells over it;
Lightning is imported only when one of them is.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
import types
import warnings
from typing import Any, Callable, Dict, List, Optional

from ..async_io import AsyncCheckpointIO as _CoreAsyncCheckpointIO
from ..errors import AsyncCheckpointError
from ..stats import SaveStats
from ..storage import local_path_of
from . import _lightning_sharded

log = logging.getLogger("asyncckpt")

_FAMILIES: Dict[str, types.SimpleNamespace] = {}
_NOT_GIVEN: Any = type("NotGiven", (), {"__repr__": lambda self: "<not given>"})()


class UnsupportedStrategyError(AsyncCheckpointError, ValueError):
    """The strategy writes checkpoints itself and never calls the ``CheckpointIO`` it was given.

    Raised instead of letting saves silently fall back to the strategy's own synchronous path.
    """


def find_async_io(io: Any) -> Optional[_CoreAsyncCheckpointIO]:
    """The asyncckpt engine in a chain of wrapping IOs (``io``, ``io.checkpoint_io``, ...), or None."""
    seen = set()
    while io is not None and id(io) not in seen:
        if isinstance(io, _CoreAsyncCheckpointIO):
            return io
        seen.add(id(io))
        io = getattr(io, "_checkpoint_io", None)
    return None


def _bypass_reason(strategy: Any, strategies: Any) -> Optional[str]:
    """Why ``strategy`` will never hand checkpoints to its ``checkpoint_io``; None when it will.

    Read from the installed Lightning source: DeepSpeed always saves through its own engine.
    The sharded modes of FSDP and ModelParallel bypass the CheckpointIO too, but the callback
    connects them to the engine (:mod:`._lightning_sharded`).
    """
    name = type(strategy).__name__
    deepspeed = getattr(strategies, "DeepSpeedStrategy", None)
    if deepspeed is not None and isinstance(strategy, deepspeed):
        return (
            f"{name} saves checkpoints through deepspeed's own engine.save_checkpoint and never calls the "
            "CheckpointIO it is given, so asyncckpt would not be used; remove the asyncckpt plugin, or use "
            "a strategy that saves through its CheckpointIO (DDP, FSDP with state_dict_type='full')"
        )
    return None


def build(family: str) -> types.SimpleNamespace:
    """The plugin classes for one Lightning family (``"lightning.pytorch"`` or ``"pytorch_lightning"``)."""
    if family in _FAMILIES:
        return _FAMILIES[family]
    pl = importlib.import_module(family)
    wrapping_cls = importlib.import_module(f"{family}.plugins.io.wrapper")._WrappingCheckpointIO
    strategies = importlib.import_module(f"{family}.strategies")
    model_checkpoint_cls = importlib.import_module(f"{family}.callbacks").ModelCheckpoint

    def check_strategy(strategy: Any) -> None:
        """Raise :class:`UnsupportedStrategyError` when ``strategy`` ignores its ``checkpoint_io``."""
        reason = _bypass_reason(strategy, strategies)
        if reason is not None:
            raise UnsupportedStrategyError(f"asyncckpt: {reason}")

    io_cls = _make_io_class(wrapping_cls, family, _in_stage_finder(pl.Trainer))
    callback_cls = _make_callback_class(pl.Callback, model_checkpoint_cls, check_strategy, family)
    ns = types.SimpleNamespace(
        AsyncCheckpointIO=io_cls,
        AsyncCheckpointCallback=callback_cls,
        check_strategy=check_strategy,
        find_async_io=find_async_io,
        UnsupportedStrategyError=UnsupportedStrategyError,
    )
    _FAMILIES[family] = ns
    return ns


def _in_stage_finder(trainer_cls: type) -> Callable[[], bool]:
    """A function that says whether the calling thread is inside a running stage of a Trainer.

    Lightning runs every stage (fit, validate, test, predict) in ``Trainer._run_stage``, on the
    thread that called ``fit``/``validate``/...; the strategy's teardown, ``on_fit_end``, the
    ``ddp_spawn``/``ddp_fork`` launchers' result hand-over and any call after ``fit`` returns run
    outside it. Lightning gives a ``CheckpointIO`` no hook for the start of a stage, so the
    plugin looks for that method's frame on the calling thread's stack (a few microseconds,
    once per operation). Should a Lightning version rename the method, every operation is
    treated as outside a stage: saves become synchronous, never unsafe.
    """
    code = getattr(getattr(trainer_cls, "_run_stage", None), "__code__", None)
    if code is None:
        log.warning(
            "asyncckpt: this Lightning version has no Trainer._run_stage; checkpoints are written synchronously"
        )

    def in_stage() -> bool:
        if code is None:
            return False
        frame: Optional[types.FrameType] = sys._getframe(1)
        while frame is not None:
            if frame.f_code is code:
                return True
            frame = frame.f_back
        return False

    return in_stage


def _make_io_class(wrapping_cls: type, family: str, in_stage: Callable[[], bool]) -> type:
    class AsyncCheckpointIO(_CoreAsyncCheckpointIO, wrapping_cls):  # type: ignore[misc, valid-type]
        """asyncckpt's engine as a Lightning ``CheckpointIO`` plugin.

        Pass it as ``Trainer(plugins=[AsyncCheckpointIO()])`` or ``Strategy(checkpoint_io=...)``.
        With no ``checkpoint_io`` the strategy fills in its default (``TorchCheckpointIO``, or
        ``XLACheckpointIO`` on XLA), also when this object sits inside, or holds, another wrapping
        IO.

        Saves and removes made while a Trainer stage runs (``ModelCheckpoint``, or
        ``trainer.save_checkpoint`` from a hook) are queued and written in the background; the
        strategy's ``teardown()`` at the end of the stage writes them all and stops the writer.
        Anywhere else (after ``fit`` returns, in ``on_fit_end``, in the ``ddp_spawn``/``ddp_fork``
        launchers, from another thread, without a Trainer) there is no training to overlap with:
        the call does its IO before it returns, through the wrapped IO, exactly as Lightning's
        default plugin would (errors included), and starts no thread.

        Args: as :class:`asyncckpt.AsyncCheckpointIO`.
        """

        # Lightning's semantics, not the core's: the strategy's ``checkpoint_io`` getter assigns a
        # fresh default on every access, and only the first one (or the one a base-less inner
        # wrapper still needs) may stick. The core setter would replace the base each time.
        checkpoint_io = wrapping_cls.checkpoint_io
        base_io_comes_later = True

        def __init__(self, checkpoint_io: Optional[Any] = None, **options: Any) -> None:
            """``options`` are those of :class:`asyncckpt.AsyncCheckpointIO` (``max_pending``,
            ``when_full``, ``writer``, ``writer_nice``, ``staging_threads``, ``exit_timeout``,
            ``handle_sigterm``, ``staging``); one list, kept by the core, so the two cannot drift apart.

            ``handle_sigterm`` defaults to False here: during a stage Lightning's own SIGTERM
            handler stops training at the end of the batch and raises ``SIGTERMException``, and
            the teardown that follows writes every queued save. asyncckpt's handler, chained
            behind Lightning's, would end the process before that graceful stop."""
            options.setdefault("handle_sigterm", False)
            wrapping_cls.__init__(self, checkpoint_io)  # sets _base_checkpoint_io_configured
            _CoreAsyncCheckpointIO.__init__(self, checkpoint_io, **options)
            self._saves_requested = 0

        @property
        def saves_requested(self) -> int:
            """How many times ``save_checkpoint`` was called (lets the callback spot a bypassing strategy)."""
            return self._saves_requested

        def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
            """In a running stage: stage, queue and return; elsewhere: write before returning.

            In a stage the local folder is created now, as a synchronous save would:
            ``ModelCheckpoint(save_last="link")`` puts its ``last.ckpt`` symlink into that folder
            right after this call returns, before the writer has run.
            """
            self._saves_requested += 1
            if not in_stage():
                self._now().save_checkpoint(checkpoint, path, storage_options=storage_options)
                return
            local = local_path_of(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
            if local:
                os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)

        def remove_checkpoint(self, path: Any) -> None:
            """In a running stage: queue the removal behind earlier operations; elsewhere: remove now."""
            _lightning_sharded.warn_if_bypassed(self)
            if not in_stage():
                self._now().remove_checkpoint(path)
                return
            super().remove_checkpoint(path)

        def load_checkpoint(
            self, path: Any, map_location: Any = _NOT_GIVEN, weights_only: Any = _NOT_GIVEN, verify: bool = False
        ) -> Dict[str, Any]:
            """Load ``path`` once its queued operations are done.

            The arguments reach the wrapped IO exactly as given (``weights_only=None`` included);
            those not given are left to its defaults.
            """
            self.wait_for(path)
            self.raise_pending_errors()
            kwargs: Dict[str, Any] = {}
            if map_location is not _NOT_GIVEN:
                kwargs["map_location"] = map_location
            if weights_only is not _NOT_GIVEN:
                kwargs["weights_only"] = weights_only
            if verify:
                kwargs["verify"] = True
            return self.wrapped_io().load_checkpoint(path, **kwargs)

        def _now(self) -> Any:
            """The wrapped IO, for an operation done on the caller's thread: once every queued
            operation is done (order), and any background failure raised (it comes first)."""
            self.flush()
            return self.wrapped_io()

        def will_exist(self, path: Any) -> Optional[bool]:
            """Whether ``path`` exists once its queued operations are done; None when none are queued.

            Answers without waiting, so a check never stalls the training step behind a write.
            """
            kind = self.queued_kind(path)
            return None if kind is None else kind == "save"

        def wait_for(self, path: Any) -> None:
            """Block until every queued operation on ``path`` has taken effect (then ``exists`` is true)."""
            self.wait_for_path(path)

        def teardown(self) -> None:
            """Flush, stop the writer, tear down the wrapped IO.

            When Lightning tears down because training raised, a checkpoint failure must not
            replace the training exception (a user's ``except`` would miss it): it is logged and
            added as a note to the exception in flight, which Lightning then re-raises.
            """
            in_flight = sys.exc_info()[1]
            _lightning_sharded.warn_if_bypassed(self)
            try:
                super().teardown()
            except Exception as err:
                if in_flight is None or in_flight is err:
                    raise
                log.error("asyncckpt: while tearing down after %r: %s", in_flight, err, exc_info=err)
                _add_note(in_flight, f"asyncckpt: during teardown: {type(err).__name__}: {err}")

        # ddp_spawn pickles the Trainer, and with it this plugin, into each worker process.
        def __getstate__(self) -> Dict[str, Any]:
            if self.pending:
                raise RuntimeError(
                    f"cannot pickle {type(self).__name__} with {self.pending} checkpoint operation(s) pending; "
                    "call flush() first"
                )
            return {
                "checkpoint_io": self._checkpoint_io,
                "base_configured": self._base_checkpoint_io_configured,
                "options": self.options(),
            }

        def __setstate__(self, state: Dict[str, Any]) -> None:
            type(self).__init__(self, state["checkpoint_io"], **state["options"])
            self._base_checkpoint_io_configured = state["base_configured"]

    _publish(AsyncCheckpointIO, family)
    return AsyncCheckpointIO


def _publish(cls: type, family: str) -> None:
    """Name the class after its public module, so pickle (ddp_spawn) and reprs find it there."""
    cls.__module__ = "asyncckpt.lightning" if family == "lightning.pytorch" else "asyncckpt.pytorch_lightning"
    cls.__qualname__ = cls.__name__


def _add_note(err: BaseException, note: str) -> None:
    add_note = getattr(err, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(note)


def _make_callback_class(callback_base: type, model_checkpoint_cls: type, check_strategy: Any, family: str) -> type:
    class AsyncCheckpointCallback(callback_base):  # type: ignore[misc, valid-type]
        """Companion callback for the asyncckpt plugin; optional, recommended.

        - ``setup``: raises :class:`UnsupportedStrategyError` for a strategy that never calls its
          CheckpointIO (DeepSpeed), flushes, so a strategy that reads checkpoint files directly
          sees every earlier save, and connects a sharded strategy (ModelParallel, FSDP with
          ``state_dict_type="sharded"``) to the plugin: it needs this callback to save in the
          background (see ``docs/distributed.md``).
        - Keeps each ``ModelCheckpoint``'s file names as a synchronous run makes them: its
          ``file_exists`` answers from the queue for a path with queued operations (version
          counter ``-v1`` names), and before ``ModelCheckpoint`` runs in a hook, a queued save of
          the ``save_last="link"`` path is waited for (so the link is not replaced by that file).
        - Warns once if a checkpoint was dumped but never reached the plugin (a strategy that
          saves on its own).
        - ``on_exception``: writes pending saves before Lightning tears down; a save failure is
          logged and noted on the training exception rather than replacing it.
        - ``teardown``: tears the engine down (covers a wrapping IO around ours that does not
          forward teardown),
          holds every rank at a barrier until rank 0's writes are on disk, and logs
          :attr:`asyncckpt.AsyncCheckpointIO.stats` to the trainer's loggers as ``asyncckpt/blocking_s``,
          ``asyncckpt/write_s``, ``asyncckpt/wait_s``, ``asyncckpt/tensor_mb``, at the step Lightning
          logs its own metrics at.

        Args:
            log_stats: send per-save measurements to the trainer's loggers.
        """

        def __init__(self, log_stats: bool = True) -> None:
            super().__init__()
            self.log_stats = log_stats
            self._io: Optional[_CoreAsyncCheckpointIO] = None
            self._last_logged: Optional[SaveStats] = None
            self._expected_saves: Optional[int] = None
            self._warned_bypass = False

        @property
        def async_io(self) -> Optional[_CoreAsyncCheckpointIO]:
            """The asyncckpt engine found in the strategy at ``setup``."""
            return self._io

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            check_strategy(trainer.strategy)
            self._io = find_async_io(trainer.strategy.checkpoint_io)
            if self._io is None:
                warnings.warn(
                    "AsyncCheckpointCallback: the strategy's checkpoint_io holds no asyncckpt AsyncCheckpointIO; "
                    "pass Trainer(plugins=[AsyncCheckpointIO()]) for asynchronous saves",
                    UserWarning,
                    stacklevel=2,
                )
                return
            self._io.flush()
            _lightning_sharded.connect(trainer.strategy, self._io)
            stats = self._io.stats
            self._last_logged = stats[-1] if stats else None
            self._expected_saves = None
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, model_checkpoint_cls):
                    _QueueAwareFileExists.install(cb)

        def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
            counter = getattr(self._io, "saves_requested", None)
            if counter is not None and trainer.is_global_zero and self._expected_saves is None:
                # The strategy's save_checkpoint runs right after this dump; by our next hook the
                # plugin must have seen it, unless the strategy wrote the file itself.
                self._expected_saves = counter + 1

        def _check_bypass(self, trainer: Any) -> None:
            if self._expected_saves is None or self._io is None:
                return
            seen = self._io.saves_requested  # type: ignore[attr-defined]
            expected, self._expected_saves = self._expected_saves, None
            if seen < expected and not self._warned_bypass:
                self._warned_bypass = True
                warnings.warn(
                    f"asyncckpt: {type(trainer.strategy).__name__} saved a checkpoint without calling its "
                    "checkpoint_io, so the asyncckpt plugin was bypassed and the save ran synchronously in "
                    "the training step",
                    UserWarning,
                    stacklevel=2,
                )

        def _before_model_checkpoint(self, trainer: Any) -> None:
            """Runs in each hook ``ModelCheckpoint`` saves in, before it (Lightning runs checkpoint
            callbacks last). ``save_last="link"`` replaces ``last.ckpt`` with a symlink using ``os``
            calls; a save of that same path still queued would later rename a file over the link.
            Waits only then: while ``last.ckpt`` is still a file being written."""
            if self._io is None or not trainer.is_global_zero or not hasattr(self._io, "will_exist"):
                return
            for cb in trainer.checkpoint_callbacks:
                last = getattr(cb, "last_model_path", "") if getattr(cb, "save_last", None) == "link" else ""
                if last and self._io.will_exist(last) is not None:
                    self._io.wait_for(last)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self._check_bypass(trainer)
            self._before_model_checkpoint(trainer)
            self._log_new_stats(trainer)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self._before_model_checkpoint(trainer)

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            self._before_model_checkpoint(trainer)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._check_bypass(trainer)
            self._before_model_checkpoint(trainer)

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            if self._io is None:
                return
            try:
                self._io.flush()
            except Exception as err:
                log.error("asyncckpt: while handling %r: %s", exception, err, exc_info=err)
                _add_note(exception, f"asyncckpt: pending checkpoint failed: {type(err).__name__}: {err}")

        def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if self._io is None:
                return
            try:
                self._check_bypass(trainer)
                # Normally the strategy's teardown already did this (then it is a no-op); a wrapping
                # IO around ours that does not forward teardown() (Lightning's base does not)
                # would leave the queue unwritten and the writer running after the stage.
                self._io.teardown()
                self._log_new_stats(trainer, save=True)
            finally:
                # Only rank 0 writes. After a synchronous save Lightning holds every rank at a barrier
                # until the file is written; here every rank waits once, for rank 0's last writes,
                # so on no rank does fit/validate/test return before the files are on disk.
                trainer.strategy.barrier("asyncckpt.teardown")

        def _log_new_stats(self, trainer: Any, save: bool = False) -> None:
            if not self.log_stats or self._io is None or not trainer.loggers or not trainer.is_global_zero:
                return
            stats = self._io.stats
            start = 0
            if self._last_logged is not None:
                for i in range(len(stats) - 1, -1, -1):
                    if stats[i] is self._last_logged:
                        start = i + 1
                        break
            fresh: List[SaveStats] = stats[start:]
            if not fresh:
                return
            self._last_logged = fresh[-1]
            step = _logging_step(trainer)
            for record in fresh:
                metrics = {
                    "asyncckpt/blocking_s": record.blocking_seconds,
                    "asyncckpt/wait_s": record.wait_seconds,
                    "asyncckpt/write_s": record.write_seconds,
                    "asyncckpt/tensor_mb": record.tensor_megabytes,
                }
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=step)
            if save:
                for logger in trainer.loggers:
                    logger.save()

    _publish(AsyncCheckpointCallback, family)
    return AsyncCheckpointCallback


def _logging_step(trainer: Any) -> int:
    """The step Lightning logs its own metrics at now (``self.log`` in ``training_step``, epoch
    and validation metrics): the count of batches that stepped, not ``global_step``, which is one
    ahead in ``on_train_batch_end``. Loggers that refuse a step going backwards (W&B) would drop
    metrics logged at ``global_step``."""
    step = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "_batches_that_stepped", None)
    return step if isinstance(step, int) else trainer.global_step


class _QueueAwareFileExists:
    """``ModelCheckpoint.file_exists`` for one instance, answering from asyncckpt's queue.

    ``ModelCheckpoint`` names a new file ``-v1`` when the name already exists. With a save of that
    name still queued, the disk says "missing" where a synchronous run would say "exists" (and the
    other way round for a queued remove); for such a path the answer comes from the queue, without
    waiting. Every other path goes to the instance's own ``file_exists`` (its class's, or one a
    user set on the instance), so subclasses and doubles keep their behaviour.

    It holds no engine (found through the ``trainer`` argument at each call) and no closure, so a
    ``ModelCheckpoint``, and a Trainer holding it, still pickle (``torch.save(trainer)``, ``ddp_spawn``).
    """

    def __init__(self, mc: Any, prior: Optional[Any]) -> None:
        self._mc = mc
        self._prior = prior  # an instance-level callable the user set; None: the class's method

    @classmethod
    def install(cls, mc: Any) -> None:
        current = mc.__dict__.get("file_exists") if hasattr(mc, "__dict__") else None
        if isinstance(current, cls):
            return
        if current is None and not callable(getattr(type(mc), "file_exists", None)):
            return  # nothing of ModelCheckpoint's to stand in for (a test double)
        mc.file_exists = cls(mc, current)

    def _original(self) -> Any:
        if self._prior is not None:
            return self._prior
        attr = inspect.getattr_static(type(self._mc), "file_exists")
        return attr.__get__(self._mc, type(self._mc)) if hasattr(attr, "__get__") else attr

    def __call__(self, filepath: Any, trainer: Any) -> bool:
        io = find_async_io(trainer.strategy.checkpoint_io)
        queued = io.will_exist(filepath) if io is not None and hasattr(io, "will_exist") else None
        if trainer.world_size > 1:
            # One collective on every rank, then the same branch everywhere: only rank 0 has a queue.
            queued = trainer.strategy.broadcast(queued if trainer.is_global_zero else None, src=0)
        if queued is None:
            return self._original()(filepath, trainer)
        return bool(queued)
