"""Compatibility path; the code lives in :mod:`asyncckpt._engine` (the engine in
``_engine.engine``, its options in ``_engine.options``)."""

from ._engine.engine import AsyncCheckpointIO
from ._engine.options import WHEN_FULL_CHOICES, WRITER_CHOICES

__all__ = ["AsyncCheckpointIO", "WHEN_FULL_CHOICES", "WRITER_CHOICES"]
