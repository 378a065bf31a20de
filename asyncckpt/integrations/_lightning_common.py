"""One implementation of the Lightning plugin, built for either package family.

``lightning.pytorch`` and ``pytorch_lightning`` are the same code under two names, and a Trainer
accepts only its own family's ``CheckpointIO`` (an ``isinstance`` check). :func:`build` takes a
family's top-level package name, imports it, and returns the classes made from that family's
bases. :mod:`asyncckpt.lightning` and :mod:`asyncckpt.pytorch_lightning` are thin shells over it;
Lightning is imported only when one of them is.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import types
import warnings
from typing import Any, Dict, List, Optional

from ..async_io import AsyncCheckpointIO as _CoreAsyncCheckpointIO
from ..errors import AsyncCheckpointError
from ..stats import SaveStats
from ..storage import local_path_of

log = logging.getLogger("asyncckpt")

_FAMILIES: Dict[str, types.SimpleNamespace] = {}


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

    Read from the installed Lightning source: DeepSpeed always saves through its engine; FSDP
    with ``state_dict_type="sharded"`` and ModelParallel with ``save_distributed_checkpoint=True``
    write with ``torch.distributed.checkpoint``. Their full-state modes do use the CheckpointIO.
    """
    name = type(strategy).__name__
    deepspeed = getattr(strategies, "DeepSpeedStrategy", None)
    if deepspeed is not None and isinstance(strategy, deepspeed):
        return (
            f"{name} saves checkpoints through deepspeed's own engine.save_checkpoint and never calls the "
            "CheckpointIO it is given, so asyncckpt would not be used; remove the asyncckpt plugin, or use "
            "a strategy that saves through its CheckpointIO (DDP, FSDP with state_dict_type='full')"
        )
    fsdp = getattr(strategies, "FSDPStrategy", None)
    if fsdp is not None and isinstance(strategy, fsdp) and getattr(strategy, "_state_dict_type", "full") != "full":
        return (
            f"{name}(state_dict_type={strategy._state_dict_type!r}) writes sharded checkpoints with "
            "torch.distributed.checkpoint and never calls the CheckpointIO; pass state_dict_type='full' to "
            "save through asyncckpt, or remove the asyncckpt plugin"
        )
    model_parallel = getattr(strategies, "ModelParallelStrategy", None)
    if (
        model_parallel is not None
        and isinstance(strategy, model_parallel)
        and getattr(strategy, "_save_distributed_checkpoint", True)
    ):
        return (
            f"{name}(save_distributed_checkpoint=True) writes sharded checkpoints with "
            "torch.distributed.checkpoint and never calls the CheckpointIO; pass "
            "save_distributed_checkpoint=False to save through asyncckpt, or remove the asyncckpt plugin"
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

    io_cls = _make_io_class(wrapping_cls, family)
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


def _make_io_class(wrapping_cls: type, family: str) -> type:
    class AsyncCheckpointIO(_CoreAsyncCheckpointIO, wrapping_cls):  # type: ignore[misc, valid-type]
        """asyncckpt's engine as a Lightning ``CheckpointIO`` plugin.

        Pass it as ``Trainer(plugins=[AsyncCheckpointIO()])`` or ``Strategy(checkpoint_io=...)``.
        With no ``checkpoint_io`` the strategy fills in its default (``TorchCheckpointIO``, or
        ``XLACheckpointIO`` on XLA), also when this object sits inside, or holds, another wrapping
        IO. The strategy's ``teardown()`` (end of fit/validate/test, and after an exception)
        calls :meth:`teardown`, which writes every pending checkpoint before returning.

        Args: as :class:`asyncckpt.AsyncCheckpointIO`.
        """

        # Lightning's semantics, not the core's: the strategy's ``checkpoint_io`` getter assigns a
        # fresh default on every access, and only the first one (or the one a base-less inner
        # wrapper still needs) may stick. The core setter would replace the base each time.
        checkpoint_io = wrapping_cls.checkpoint_io
        _base_io_comes_later = True

        def __init__(self, checkpoint_io: Optional[Any] = None, **options: Any) -> None:
            """``options`` are those of :class:`asyncckpt.AsyncCheckpointIO` (``max_pending``,
            ``when_full``, ``writer``, ``writer_nice``, ``staging_threads``, ``exit_timeout``,
            ``handle_sigterm``); one list, kept by the core, so the two cannot drift apart."""
            wrapping_cls.__init__(self, checkpoint_io)  # sets _base_checkpoint_io_configured
            _CoreAsyncCheckpointIO.__init__(self, checkpoint_io, **options)
            self._saves_requested = 0

        @property
        def saves_requested(self) -> int:
            """How many times ``save_checkpoint`` was called (lets the callback spot a bypassing strategy)."""
            return self._saves_requested

        def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
            """Stage and queue the save; create the local folder now, as a synchronous save would.

            ``ModelCheckpoint(save_last="link")`` puts its ``last.ckpt`` symlink into that folder
            right after this call returns, before the writer has run.
            """
            self._saves_requested += 1
            local = local_path_of(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
            if local:
                os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)

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
          CheckpointIO (DeepSpeed, sharded FSDP/ModelParallel), and flushes, so a strategy that
          reads checkpoint files directly sees every earlier save.
        - Makes each ``ModelCheckpoint``'s existence checks (version counter ``-v1`` names) and
          ``save_last="link"`` wait for queued operations on that one path, so file names match a
          synchronous run.
        - Warns once if a checkpoint was dumped but never reached the plugin (a strategy that
          saves on its own).
        - ``on_exception``: writes pending saves before Lightning tears down; a save failure is
          logged and noted on the training exception rather than replacing it.
        - ``teardown``: flushes (covers a wrapping IO around ours that does not forward teardown)
          and logs :attr:`asyncckpt.AsyncCheckpointIO.stats` to the trainer's loggers as
          ``asyncckpt/blocking_s``, ``asyncckpt/write_s``, ``asyncckpt/wait_s``, ``asyncckpt/tensor_mb``.

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
            stats = self._io.stats
            self._last_logged = stats[-1] if stats else None
            self._expected_saves = None
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, model_checkpoint_cls):
                    _order_model_checkpoint(cb, self._io)

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

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self._check_bypass(trainer)
            self._log_new_stats(trainer)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._check_bypass(trainer)

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
            self._check_bypass(trainer)
            self._io.flush()
            self._log_new_stats(trainer, save=True)

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
            for record in fresh:
                metrics = {
                    "asyncckpt/blocking_s": record.blocking_seconds,
                    "asyncckpt/wait_s": record.wait_seconds,
                    "asyncckpt/write_s": record.write_seconds,
                    "asyncckpt/tensor_mb": record.tensor_megabytes,
                }
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)
            if save:
                for logger in trainer.loggers:
                    logger.save()

    _publish(AsyncCheckpointCallback, family)
    return AsyncCheckpointCallback


def _order_model_checkpoint(mc: Any, io: Any) -> None:
    """Make ``mc``'s on-disk checks see the queue, so its file names match a synchronous run.

    ``ModelCheckpoint`` names a new file ``-v1`` when the name already exists. With a save of that
    name still queued, the disk says "missing" where a synchronous run would say "exists" (and the
    other way round for a queued remove); the check now answers from the queue, without waiting.
    ``save_last="link"`` deletes and re-creates ``last.ckpt`` with ``os`` calls: with a save of
    ``last.ckpt`` still queued, its rename would later replace the new link, so the link waits for
    operations queued on that one path (rare: only when ``last.ckpt`` turns from a file into a link).
    """
    if getattr(mc, "_asyncckpt_io", None) is io or not hasattr(io, "will_exist"):
        return
    cls = type(mc)
    file_exists = cls.file_exists
    link = cls._link_checkpoint

    def ordered_file_exists(filepath: Any, trainer: Any) -> bool:
        queued = io.will_exist(filepath) if trainer.is_global_zero else None
        if queued is None:
            return file_exists(mc, filepath, trainer)
        return trainer.strategy.reduce_boolean_decision(queued, all=False)

    def ordered_link(trainer: Any, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero:
            io.wait_for(linkpath)
        link(trainer, filepath, linkpath)

    mc.file_exists = ordered_file_exists
    mc._link_checkpoint = ordered_link
    mc._asyncckpt_io = io
