"""The Lightning callback's behaviour, shared by both package families, and ``ModelCheckpoint``'s
queue-aware ``file_exists``.

:class:`CallbackMixin` holds everything :class:`asyncckpt.lightning.AsyncCheckpointCallback` and
:class:`asyncckpt.pytorch_lightning.AsyncCheckpointCallback` do; they add their family's
``Callback`` base. The attribute names it sets are in pickles users made (``torch.save(trainer)``,
``ddp_spawn``): keep them.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional

from ..._engine.engine import AsyncCheckpointIO as CoreAsyncCheckpointIO
from ...stats import SaveStats
from .family import find_async_io
from .plugin import add_note
from .sharded import connect

if TYPE_CHECKING:
    from .family import Family

log = logging.getLogger("asyncckpt")


class CallbackMixin:
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
    - ``reserve``: once the first optimizer step has made the optimizer's state (Adam's moments
      exist only from then), asks the plugin to allocate and touch the staging memory of the
      first saves on a background thread (:meth:`asyncckpt.AsyncCheckpointIO.reserve`), so that
      the first checkpoint costs the training step what a later one does. On the saving rank,
      for strategies that save one full checkpoint (not the sharded ones).
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
        reserve: reserve the first saves' staging memory after the first optimizer step.
    """

    #: The package family whose ``Callback`` base the concrete class adds (set by that class).
    lightning_family: ClassVar["Family"]

    def __init__(self, log_stats: bool = True, reserve: bool = True) -> None:
        super().__init__()
        self.log_stats = log_stats
        self.reserve = reserve
        self._reserved = False  # asked for this stage (or not wanted); a bool: the callback pickles
        self._io: Optional[CoreAsyncCheckpointIO] = None
        self._last_logged: Optional[SaveStats] = None
        self._expected_saves: Optional[int] = None
        self._warned_bypass = False

    @property
    def async_io(self) -> Optional[CoreAsyncCheckpointIO]:
        """The asyncckpt engine found in the strategy at ``setup``."""
        return self._io

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.lightning_family.check_strategy(trainer.strategy)
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
        sharded = connect(trainer.strategy, self._io)
        # every rank saves its own shards there, restructured at the save: nothing to reserve from
        self._reserved = sharded
        stats = self._io.stats
        self._last_logged = stats[-1] if stats else None
        self._expected_saves = None
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, self.lightning_family.model_checkpoint):
                QueueAwareFileExists.install(cb)

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

    def _reserve_staging(self, trainer: Any, pl_module: Any) -> None:
        """After the first optimizer step, reserve staging memory for what a checkpoint holds
        most of: the model's state and the optimizers' (the rest of Lightning's checkpoint is
        small, within the reservation's headroom). Building the two state dicts is the only
        work done here, on the training thread; the allocation runs on a thread of its own and
        runs before ``ModelCheckpoint``'s hook (Lightning runs checkpoint callbacks last)."""
        if not getattr(self, "reserve", False) or self._io is None or getattr(self, "_reserved", True):
            return
        if trainer.global_step < 1 or not trainer.is_global_zero:
            return
        state = {
            "state_dict": pl_module.state_dict(),
            "optimizer_states": [opt.state_dict() for opt in trainer.optimizers],
        }
        self._reserved = True
        try:
            self._io.reserve(state)
        except Exception as err:  # noqa: BLE001 - an optimization: the first save allocates instead
            log.warning("asyncckpt: could not reserve staging memory (the first save allocates it): %s", err)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._reserve_staging(trainer, pl_module)
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
            add_note(exception, f"asyncckpt: pending checkpoint failed: {type(err).__name__}: {err}")

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
        step = logging_step(trainer)
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


def logging_step(trainer: Any) -> int:
    """The step Lightning logs its own metrics at now (``self.log`` in ``training_step``, epoch
    and validation metrics): the count of batches that stepped, not ``global_step``, which is one
    ahead in ``on_train_batch_end``. Loggers that refuse a step going backwards (W&B) would drop
    metrics logged at ``global_step``."""
    # Lightning's private counter; global_step when a version lacks it.
    step = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "_batches_that_stepped", None)
    return step if isinstance(step, int) else trainer.global_step


class QueueAwareFileExists:
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


# A ModelCheckpoint after setup holds one of these, so it is in users' pickles
# (torch.save(trainer), ddp_spawn) under this module and name: keep both, for old and new pickles.
QueueAwareFileExists.__module__ = "asyncckpt.integrations._lightning_common"
QueueAwareFileExists.__qualname__ = "_QueueAwareFileExists"
