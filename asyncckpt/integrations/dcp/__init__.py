"""Sharded checkpoints on ``torch.distributed.checkpoint``; public path :mod:`asyncckpt.distributed`.

``io.py`` holds :class:`DistributedCheckpointIO` (the ranks' agreement, local shards, the save,
the abort); ``commit.py`` the storage writer that commits a save through ``.metadata``.
"""

from __future__ import annotations

from .commit import METADATA_FILE, BeforeCommit, RanksOutOfStepError, committed_token
from .io import DistributedCheckpointIO, LocalShard, ShardedSaveError, local_folder, remove_folder

__all__ = [
    "METADATA_FILE",
    "BeforeCommit",
    "DistributedCheckpointIO",
    "LocalShard",
    "RanksOutOfStepError",
    "ShardedSaveError",
    "committed_token",
    "local_folder",
    "remove_folder",
]
