"""asyncckpt for ``lightning.pytorch`` (the ``lightning`` package).

Usage::

    from lightning.pytorch import Trainer
    from asyncckpt.lightning import AsyncCheckpointCallback, AsyncCheckpointIO

    trainer = Trainer(plugins=[AsyncCheckpointIO()], callbacks=[AsyncCheckpointCallback()])

For the ``pytorch_lightning`` package use :mod:`asyncckpt.pytorch_lightning`: a Trainer accepts
only the ``CheckpointIO`` of its own package family. See ``docs/lightning.md``.
"""

from __future__ import annotations

from typing import Any

from .integrations.lightning.callback import CallbackMixin
from .integrations.lightning.family import Family, UnsupportedStrategyError, find_async_io
from .integrations.lightning.plugin import PluginMixin

_family = Family("lightning.pytorch")  # imports lightning.pytorch


class AsyncCheckpointIO(PluginMixin, _family.wrapping_io_base):  # type: ignore[misc]  # base read from the family
    __doc__ = PluginMixin.__doc__
    lightning_family = _family
    # Lightning's semantics, not the core's: the strategy's ``checkpoint_io`` getter assigns a
    # fresh default on every access, and only the first one (or the one a base-less inner
    # wrapper still needs) may stick. The core setter would replace the base each time.
    checkpoint_io = _family.wrapping_io_base.checkpoint_io


class AsyncCheckpointCallback(CallbackMixin, _family.callback_base):  # type: ignore[misc]  # base read from the family
    __doc__ = CallbackMixin.__doc__
    lightning_family = _family


def check_strategy(strategy: Any) -> None:
    """Raise :class:`UnsupportedStrategyError` when ``strategy`` ignores its ``checkpoint_io``."""
    _family.check_strategy(strategy)


__all__ = [
    "AsyncCheckpointCallback",
    "AsyncCheckpointIO",
    "UnsupportedStrategyError",
    "check_strategy",
    "find_async_io",
]
