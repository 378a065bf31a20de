"""asyncckpt: checkpoint saving off the training step.

Public API: :class:`AsyncCheckpointIO` (the engine), :class:`CheckpointIO` (the interface),
:class:`TorchCheckpointIO` (durable ``torch.save``), :class:`SaveHandle` (what a save returns),
:class:`Reservation` (what ``reserve()`` returns),
the error types, and
:func:`cleanup_temp_files`. Lightning and torch_xla integrations live in their own modules and
are imported only when used.
"""

from ._engine.engine import AsyncCheckpointIO
from ._engine.ops import SaveHandle
from ._engine.reserve import Reservation
from ._storage.local import cleanup_temp_files
from ._storage.retry import RetryPolicy
from ._storage.torch_io import TorchCheckpointIO
from .checkpoint_io import CheckpointIO
from .errors import (
    AsyncCheckpointError,
    CheckpointLoadError,
    CheckpointRemoveError,
    CheckpointSaveError,
    FlushTimeoutError,
    IntegrityError,
    InvalidPathError,
    NotSerializableError,
    QueueFullError,
    RemoteStorageError,
    RemoveSkippedError,
    WriterDiedError,
)
from .stats import SaveStats


def __getattr__(name: str):
    # XLACheckpointIO lives in asyncckpt.xla, which imports torch_xla only when it is used.
    if name == "XLACheckpointIO":
        from .xla import XLACheckpointIO

        return XLACheckpointIO
    if name == "DistributedCheckpointIO":  # imports torch.distributed pieces only when used
        from .distributed import DistributedCheckpointIO

        return DistributedCheckpointIO
    raise AttributeError(f"module 'asyncckpt' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "AsyncCheckpointIO",
    "AsyncCheckpointError",
    "CheckpointIO",
    "CheckpointLoadError",
    "CheckpointRemoveError",
    "CheckpointSaveError",
    "DistributedCheckpointIO",
    "FlushTimeoutError",
    "IntegrityError",
    "InvalidPathError",
    "NotSerializableError",
    "QueueFullError",
    "RemoteStorageError",
    "RemoveSkippedError",
    "Reservation",
    "RetryPolicy",
    "SaveHandle",
    "SaveStats",
    "TorchCheckpointIO",
    "WriterDiedError",
    "XLACheckpointIO",
    "cleanup_temp_files",
]
