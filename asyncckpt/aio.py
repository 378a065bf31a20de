"""Compatibility path; the code lives in :mod:`asyncckpt._engine.aio` (``AsyncFace``, mixed
into :class:`asyncckpt.AsyncCheckpointIO`)."""

from ._engine.aio import AsyncFace

AsyncAPIMixin = AsyncFace  # the name it had here

__all__ = ["AsyncAPIMixin", "AsyncFace"]
