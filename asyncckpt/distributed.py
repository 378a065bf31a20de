"""Sharded checkpoints across processes, on ``torch.distributed.checkpoint`` (DCP).

:class:`DistributedCheckpointIO` is a collective ``CheckpointIO``: every rank calls
``save_checkpoint(state, path)`` with its own state dict (DTensor shards, replicated tensors,
plain objects), and ``path`` becomes a DCP checkpoint folder: DCP's planner, its ``.metadata``
and its ``.distcp`` files, readable by ``dcp.load`` at any world size. Wrapped in
:class:`asyncckpt.AsyncCheckpointIO` it saves in the background: each rank stages only its own
local shards, and the writer thread runs DCP's save.

What it adds to a plain ``dcp.save``:

- **Its own process group.** The save's collectives (plan exchange, gathering the write results,
  the ``.metadata`` commit) run on a gloo group created for this IO, never on the training group,
  so a background save cannot interleave with the training step's collectives. Every rank's
  writer runs operations in call order, so the collectives match rank to rank.
- **Commit = ``.metadata``.** Each save writes its shard files under names no earlier save used,
  then the coordinator replaces ``.metadata`` atomically (temp file, fsync, ``os.replace``,
  folder fsync), and only then deletes the files of the checkpoint it replaced. Until that
  rename the folder still holds the previous complete checkpoint; a new folder without
  ``.metadata`` is no checkpoint at all. (DCP's own writer deletes ``.metadata`` before it
  renames the new one into place, and rewrites shard files in place.)
- **A failure on one rank is raised on all**: DCP gathers every rank's write result to the
  coordinator and broadcasts a failure to every rank; no ``.metadata`` is written then.
- **Plan caching**: DCP's ``enable_plan_caching``, keyed per IO, so saves of an unchanged layout
  skip the plan exchange's payload.

The process writer (``writer="process"``) cannot take part: the save runs collectives, and only
the ranks' own processes are members of the job's process groups. Such an engine is refused at
construction (see ``__reduce__``).

This module is the public path; the code lives in :mod:`asyncckpt.integrations.dcp` (``io.py``:
the IO, the agreement and the abort; ``commit.py``: the storage writer and the ``.metadata``
commit).
"""

from __future__ import annotations

from .integrations.dcp.commit import METADATA_FILE, BeforeCommit, RanksOutOfStepError, committed_token
from .integrations.dcp.io import DistributedCheckpointIO, LocalShard, ShardedSaveError

__all__ = [
    "METADATA_FILE",
    "BeforeCommit",
    "DistributedCheckpointIO",
    "LocalShard",
    "RanksOutOfStepError",
    "ShardedSaveError",
    "committed_token",
]
