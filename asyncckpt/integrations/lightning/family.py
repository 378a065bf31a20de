"""One Lightning package family: its imported bases, and the checks that depend on them.

``lightning.pytorch`` and ``pytorch_lightning`` are the same code under two names, and a Trainer
accepts only its own family's ``CheckpointIO`` and ``Callback`` (``isinstance`` checks). A
:class:`Family` imports one of them; :mod:`asyncckpt.lightning` and
:mod:`asyncckpt.pytorch_lightning` each build one and define their classes over its bases, so
Lightning is imported only when one of those modules is.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

from ..._engine.engine import AsyncCheckpointIO as CoreAsyncCheckpointIO
from ...errors import AsyncCheckpointError
from .stage import call_site_finder


class UnsupportedStrategyError(AsyncCheckpointError, ValueError):
    """The strategy writes checkpoints itself and never calls the ``CheckpointIO`` it was given.

    Raised instead of letting saves silently fall back to the strategy's own synchronous path.
    """


def find_async_io(io: Any) -> Optional[CoreAsyncCheckpointIO]:
    """The asyncckpt engine in a chain of wrapping IOs (``io``, ``io.checkpoint_io``, ...), or None."""
    seen = set()
    while io is not None and id(io) not in seen:
        if isinstance(io, CoreAsyncCheckpointIO):
            return io
        seen.add(id(io))
        io = getattr(io, "checkpoint_io", None)
    return None


class Family:
    """The classes of one Lightning package family that the plugin and callback build on.

    Args:
        package: ``"lightning.pytorch"`` or ``"pytorch_lightning"``; imported here.
    """

    def __init__(self, package: str) -> None:
        self.package = package
        pl = importlib.import_module(package)
        self.trainer: type = pl.Trainer
        self.callback_base: type = pl.Callback
        # Lightning's private base of every wrapping CheckpointIO. The strategy's checkpoint_io
        # getter fills in the base IO of an instance of it, so the plugin must be one.
        self.wrapping_io_base: type = importlib.import_module(f"{package}.plugins.io.wrapper")._WrappingCheckpointIO
        self.strategies = importlib.import_module(f"{package}.strategies")
        self.model_checkpoint: type = importlib.import_module(f"{package}.callbacks").ModelCheckpoint
        # The family's Fabric: lightning.fabric beside lightning.pytorch, lightning_fabric beside
        # pytorch_lightning (a dependency of each, so always there).
        fabric = importlib.import_module("lightning.fabric" if package.startswith("lightning.") else "lightning_fabric")
        #: Where the calling thread is: in a stage of this family's Trainer, in its ``Fabric.save``
        #: or ``Fabric.load`` (:data:`.stage.TRAINER_STAGE`, :data:`.stage.FABRIC_SAVE`,
        #: :data:`.stage.FABRIC_LOAD`), or none of them (None).
        self.call_site: Callable[[], Optional[str]] = call_site_finder(self.trainer, fabric.Fabric)

    def bypass_reason(self, strategy: Any) -> Optional[str]:
        """Why ``strategy`` will never hand checkpoints to its ``checkpoint_io``; None when it will.

        Read from the installed Lightning source: DeepSpeed always saves through its own engine.
        The sharded modes of FSDP and ModelParallel bypass the CheckpointIO too, but the callback
        connects them to the engine (:mod:`.sharded`).
        """
        name = type(strategy).__name__
        deepspeed = getattr(self.strategies, "DeepSpeedStrategy", None)
        if deepspeed is not None and isinstance(strategy, deepspeed):
            return (
                f"{name} saves checkpoints through deepspeed's own engine.save_checkpoint and never calls the "
                "CheckpointIO it is given, so asyncckpt would not be used; remove the asyncckpt plugin, or use "
                "a strategy that saves through its CheckpointIO (DDP, FSDP with state_dict_type='full')"
            )
        return None

    def check_strategy(self, strategy: Any) -> None:
        """Raise :class:`UnsupportedStrategyError` when ``strategy`` ignores its ``checkpoint_io``."""
        reason = self.bypass_reason(strategy)
        if reason is not None:
            raise UnsupportedStrategyError(f"asyncckpt: {reason}")
