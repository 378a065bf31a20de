"""The Lightning ``CheckpointIO`` plugin's behaviour, shared by both package families.

:class:`PluginMixin` is the core engine plus what Lightning needs of it: queue only inside a
running Trainer stage (:mod:`.stage`), pass load arguments through as given, keep a checkpoint
failure from replacing the training exception at teardown, and pickle for ``ddp_spawn``. The
public classes :class:`asyncckpt.lightning.AsyncCheckpointIO` and
:class:`asyncckpt.pytorch_lightning.AsyncCheckpointIO` add their family's Lightning base.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Optional

from ..._engine.engine import AsyncCheckpointIO as CoreAsyncCheckpointIO
from ..._engine.ops import SaveHandle
from ..._storage.paths import local_path_of, resolved_entry
from .sharded import warn_if_bypassed
from .stage import FABRIC_LOAD, FABRIC_SAVE, TRAINER_STAGE, calling_strategy

if TYPE_CHECKING:
    from .family import Family

log = logging.getLogger("asyncckpt")


class _NotGiven:
    def __repr__(self) -> str:
        return "<not given>"


_NOT_GIVEN: Any = _NotGiven()

#: Where a save or remove is queued: there is training to overlap with (see :mod:`.stage`).
_QUEUED_FROM = (TRAINER_STAGE, FABRIC_SAVE)


def add_note(err: BaseException, note: str) -> None:
    """Add ``note`` to ``err`` where Python supports notes (3.11+)."""
    add = getattr(err, "add_note", None)
    if add is not None:
        add(note)


class PluginMixin(CoreAsyncCheckpointIO):
    """asyncckpt's engine as a Lightning ``CheckpointIO`` plugin.

    Pass it as ``Trainer(plugins=[AsyncCheckpointIO()])`` or ``Strategy(checkpoint_io=...)``.
    With no ``checkpoint_io`` the strategy fills in its default (``TorchCheckpointIO``, or
    ``XLACheckpointIO`` on XLA), also when this object sits inside, or holds, another wrapping
    IO.

    Saves and removes made while a Trainer stage runs (``ModelCheckpoint``, or
    ``trainer.save_checkpoint`` from a hook) are queued and written in the background; the
    strategy's ``teardown()`` at the end of the stage writes them all and stops the writer.
    In a Fabric loop (``Fabric(plugins=[AsyncCheckpointIO()])``) every ``fabric.save`` is
    queued; Fabric never tears its strategy down, so ``fabric.load`` waits for the path's
    saves, ``flush()`` waits for all, and the queue is written at interpreter exit or on SIGTERM
    (Fabric has no SIGTERM handler of its own: unless ``handle_sigterm=False`` was given, the
    first ``fabric.save`` installs asyncckpt's). Anywhere else (after ``fit`` returns, in
    ``on_fit_end``, in the ``ddp_spawn``/``ddp_fork`` launchers, from another thread, a direct
    call without a Trainer or Fabric) there is no training to overlap with:
    the call does its IO before it returns, through the wrapped IO, exactly as Lightning's
    default plugin would (errors included), and starts no thread; an IO that does not write
    with ``torch.save`` is handed a point-in-time copy (see ``save_here``), as Lightning's own
    ``AsyncCheckpointIO`` hands it a clone.

    Args: as :class:`asyncckpt.AsyncCheckpointIO`.
    """

    #: The package family whose Lightning base the concrete class adds (set by that class).
    lightning_family: ClassVar["Family"]
    base_io_comes_later = True

    def __init__(self, checkpoint_io: Optional[Any] = None, **options: Any) -> None:
        """``options`` are those of :class:`asyncckpt.AsyncCheckpointIO` (``max_pending``,
        ``when_full``, ``writer``, ``writer_nice``, ``staging_threads``, ``exit_timeout``,
        ``handle_sigterm``, ``staging``); one list, kept by the core, so the two cannot drift apart.

        ``handle_sigterm`` defaults to False here: during a stage Lightning's own SIGTERM
        handler stops training at the end of the batch and raises ``SIGTERMException``, and
        the teardown that follows writes every queued save. asyncckpt's handler, chained
        behind Lightning's, would end the process before that graceful stop. Fabric has no
        such handler: unless given, it is installed at the first ``fabric.save``."""
        self._sigterm_chosen = "handle_sigterm" in options
        options.setdefault("handle_sigterm", False)
        self.lightning_family.wrapping_io_base.__init__(self, checkpoint_io)  # sets Lightning's base flag
        CoreAsyncCheckpointIO.__init__(self, checkpoint_io, **options)
        self._saves_requested = 0

    @property
    def saves_requested(self) -> int:
        """How many times ``save_checkpoint`` was called (lets the callback spot a bypassing strategy)."""
        return self._saves_requested

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None
    ) -> SaveHandle:
        """In a running stage or ``fabric.save``: stage, queue and return; elsewhere: write
        before returning.

        In a stage the local folder is created now, as a synchronous save would:
        ``ModelCheckpoint(save_last="link")`` puts its ``last.ckpt`` symlink into that folder
        right after this call returns, before the writer has run.
        """
        self._saves_requested += 1
        site = self.lightning_family.call_site()
        if site not in _QUEUED_FROM:
            self.save_here(checkpoint, path, storage_options=storage_options)
            return SaveHandle.completed(path, None)  # written before returning, as Lightning's own IO does
        if site == FABRIC_SAVE and not self.handle_sigterm and not self._sigterm_chosen:
            self.start_handling_sigterm()  # nothing else would write the queue before a SIGTERM ends the loop
        local = local_path_of(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
        if local:
            os.makedirs(os.path.dirname(resolved_entry(local)), exist_ok=True)
        return super().save_checkpoint(checkpoint, path, storage_options=storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        """In a running stage: queue the removal behind earlier operations; elsewhere: remove now."""
        warn_if_bypassed(self)
        if self.lightning_family.call_site() not in _QUEUED_FROM:
            self._now().remove_checkpoint(path)
            return
        super().remove_checkpoint(path)

    def load_checkpoint(
        self, path: Any, map_location: Any = _NOT_GIVEN, weights_only: Any = _NOT_GIVEN, verify: bool = False
    ) -> Dict[str, Any]:
        """Load ``path`` once its queued operations are done.

        From ``fabric.load``, which every rank calls, once they are done on every rank: the
        strategy's barrier follows this rank's wait (under DDP only rank 0 saves, and
        ``fabric.save``'s own barrier comes before the write, not after it).

        The arguments reach the wrapped IO exactly as given (``weights_only=None`` included);
        those not given are left to its defaults.
        """
        self.wait_for(path)
        if self.lightning_family.call_site() == FABRIC_LOAD:
            strategy = calling_strategy(skip=1, depth=4)
            if strategy is not None and getattr(strategy, "world_size", 1) > 1:
                # Before raising a failed save: every rank reaches the barrier, none hangs in it.
                strategy.barrier("asyncckpt: the saves of a path are written before fabric.load reads it")
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

    def replace_base_io(self, io: Any) -> None:
        """Swap the wrapped IO as the core does, and mark it as configured for Lightning, so
        the strategy's ``checkpoint_io`` getter does not fill in a default over it."""
        super().replace_base_io(io)
        self._base_checkpoint_io_configured = True  # Lightning's _WrappingCheckpointIO flag

    def teardown(self) -> None:
        """Flush, stop the writer, tear down the wrapped IO.

        When Lightning tears down because training raised, a checkpoint failure must not
        replace the training exception (a user's ``except`` would miss it): it is logged and
        added as a note to the exception in flight, which Lightning then re-raises.
        """
        in_flight = sys.exc_info()[1]
        warn_if_bypassed(self)
        try:
            super().teardown()
        except Exception as err:
            if in_flight is None or in_flight is err:
                raise
            log.error("asyncckpt: while tearing down after %r: %s", in_flight, err, exc_info=err)
            add_note(in_flight, f"asyncckpt: during teardown: {type(err).__name__}: {err}")

    # ddp_spawn pickles the Trainer, and with it this plugin, into each worker process.
    # The state's keys are what pickles made by every release hold: keep them.
    def __getstate__(self) -> Dict[str, Any]:
        if self.pending:
            raise RuntimeError(
                f"cannot pickle {type(self).__name__} with {self.pending} checkpoint operation(s) pending; "
                "call flush() first"
            )
        return {
            "checkpoint_io": self.checkpoint_io,
            "base_configured": self._base_checkpoint_io_configured,  # Lightning's _WrappingCheckpointIO flag
            "options": self.options(),
            # Whether handle_sigterm was the user's choice (options() always holds it): in a
            # spawned Fabric worker the first fabric.save still installs the handler if not.
            "sigterm_chosen": self._sigterm_chosen,
        }

    def __setstate__(self, state: Dict[str, Any]) -> None:
        type(self).__init__(self, state["checkpoint_io"], **state["options"])  # handle_sigterm as it was
        self._base_checkpoint_io_configured = state["base_configured"]  # Lightning's flag, as pickled
        self._sigterm_chosen = state.get("sigterm_chosen", True)  # older pickles: as given
