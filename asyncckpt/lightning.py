"""asyncckpt for ``lightning.pytorch`` (the ``lightning`` package).

Usage::

    from lightning.pytorch import Trainer
    from asyncckpt.lightning import AsyncCheckpointCallback, AsyncCheckpointIO

    trainer = Trainer(plugins=[AsyncCheckpointIO()], callbacks=[AsyncCheckpointCallback()])

For the ``pytorch_lightning`` package use :mod:`asyncckpt.pytorch_lightning`: a Trainer accepts
only the ``CheckpointIO`` of its own package family. See ``docs/lightning.md``.
"""

from __future__ import annotations

from .integrations._lightning_common import UnsupportedStrategyError, build

_family = build("lightning.pytorch")

AsyncCheckpointIO = _family.AsyncCheckpointIO
AsyncCheckpointCallback = _family.AsyncCheckpointCallback
check_strategy = _family.check_strategy
find_async_io = _family.find_async_io

__all__ = [
    "AsyncCheckpointCallback",
    "AsyncCheckpointIO",
    "UnsupportedStrategyError",
    "check_strategy",
    "find_async_io",
]
