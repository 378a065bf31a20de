"""Compatibility path; the code lives in :mod:`asyncckpt.integrations.lightning`.

``_QueueAwareFileExists`` must stay loadable under this name: every ``ModelCheckpoint`` pickled
after ``AsyncCheckpointCallback.setup`` (``torch.save(trainer)``, ``ddp_spawn``) references it here.
"""

from __future__ import annotations

from .lightning.callback import QueueAwareFileExists as _QueueAwareFileExists
from .lightning.family import UnsupportedStrategyError, find_async_io

__all__ = ["UnsupportedStrategyError", "_QueueAwareFileExists", "find_async_io"]
