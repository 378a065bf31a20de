"""How a DCP save becomes the folder's checkpoint: fresh shard names, then the ``.metadata`` commit.

A DCP checkpoint folder is committed by its ``.metadata`` file. The storage writer here gives each
save's shard files names no earlier save used, so the committed checkpoint's files are never
overwritten, checks that every rank wrote the same save, and replaces ``.metadata`` atomically;
only then are the replaced checkpoint's shard files deleted. Until that rename the folder still
holds the previous complete checkpoint. :func:`committed_token` reads back which save a folder's
``.metadata`` commits (Lightning's ``meta.pt`` is settled against it).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import uuid
from typing import Any, Callable, List, Optional

from ..._storage.local import AtomicFile
from ...errors import AsyncCheckpointError

METADATA_FILE = ".metadata"
_SHARD_FILE = re.compile(r"^__\d+_.*\.distcp$")

#: Called by the coordinator just before it commits ``.metadata``, with the folder and the save's
#: token; what it returns (if anything) is called right after the commit.
BeforeCommit = Callable[[str, str], Optional[Callable[[], None]]]


class RanksOutOfStepError(AsyncCheckpointError, RuntimeError):
    """The ranks did not make the same save: a ``save_checkpoint`` call that raised at the call on
    another rank (raised on every rank at that call, since the ranks agree before they save), or,
    in the background, two different saves paired in one collective. Nothing was committed."""


# The public classes keep the public module's name (tracebacks, docs, pickles of errors).
RanksOutOfStepError.__module__ = "asyncckpt.distributed"


_TOKEN_IN_NAME = re.compile(r"^__\d+_([0-9a-f]{10})")


def committed_token(folder: str) -> Optional[str]:
    """The token of the save whose ``.metadata`` is committed in ``folder`` (None if unknown)."""
    try:
        with open(os.path.join(folder, METADATA_FILE), "rb") as f:
            metadata = pickle.load(f)
    except Exception:  # noqa: BLE001 - unreadable or another format: the token is unknown
        return None
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        match = _TOKEN_IN_NAME.match(getattr(info, "relative_path", ""))
        if match:
            return match.group(1)
    return None


def make_storage_writer(
    path: str,
    before_commit: Optional[BeforeCommit],
    token: str = "",
    fail_with: Optional[BaseException] = None,
    **options: Any,
) -> Any:
    """DCP's ``FileSystemWriter`` for one save into ``path``, committing the way this package
    promises: shard files under names no earlier save used (``__<rank>_<token><hex8>_``), checked
    to belong to this save (``token``), then ``.metadata`` replaced atomically (temp file
    ``.metadata.<hex8>.tmp``, fsync, rename, folder fsync: an :class:`AtomicFile`) -- the commit -- and only then
    the replaced checkpoint's shard files and stale temp files removed. ``before_commit`` runs on
    the coordinator just before the commit; ``fail_with`` fails the save on every rank (a rank
    that cannot take part). ``options`` go to ``FileSystemWriter``.
    """
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import _StoragePrefix  # DCP's private: the one way to name shard files

    class _CommitOnMetadataWriter(FileSystemWriter):
        """DCP's file writer with fresh shard names per save and an atomic ``.metadata`` commit."""

        def prepare_local_plan(self, plan: Any) -> Any:
            if fail_with is not None:  # this rank cannot take part: fail the save on every rank
                raise fail_with
            # The folder may hold the previous checkpoint: it stays valid until the commit, so
            # the "existing checkpoint" warning of the base class does not apply.
            os.makedirs(self.path, exist_ok=True)
            return plan

        def write_data(self, plan: Any, planner: Any) -> Any:
            # Names no earlier save used (a cached plan would repeat the prefix), so the shard
            # files of the committed checkpoint are never overwritten.
            # The token names the save, so the coordinator can check that every rank wrote the
            # same one before it commits.
            prefix = f"__{self.rank or 0}_{token}{uuid.uuid4().hex[:8]}_"
            return super().write_data(dataclasses.replace(plan, storage_data=_StoragePrefix(prefix)), planner)

        def finish(self, metadata: Any, results: List[List[Any]]) -> None:
            from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION

            folder = os.fspath(self.path)
            metadata.version = CURRENT_DCP_VERSION
            storage = {}
            for rank, per_rank in enumerate(results):
                for wr in per_rank:
                    if not wr.storage_data.relative_path.startswith(f"__{rank}_{token}"):
                        raise RanksOutOfStepError(
                            f"not committing {folder!r}: rank {rank} wrote shards of another save "
                            f"({wr.storage_data.relative_path!r}); the ranks' saves are out of step, as after "
                            "a save_checkpoint call that raised on some ranks only. Every rank must make the "
                            "same saves in the same order"
                        )
                storage.update({wr.index: wr.storage_data for wr in per_rank})
            metadata.storage_data = storage
            metadata.storage_meta = self.storage_meta()
            after_commit = before_commit(folder, token) if before_commit is not None else None
            # the temp name keeps its own pattern: the stale sweep below matches older runs' leftovers
            metadata_file = AtomicFile(
                os.path.join(folder, METADATA_FILE), temp_name=f"{METADATA_FILE}.{uuid.uuid4().hex[:8]}.tmp"
            )
            with metadata_file:
                with metadata_file.open() as f:
                    pickle.dump(metadata, f)
                metadata_file.commit()  # the commit
            if after_commit is not None:
                after_commit()
            keep = {info.relative_path for info in storage.values()}
            for name in os.listdir(folder):
                stale = (_SHARD_FILE.match(name) and name not in keep) or (
                    name.startswith(METADATA_FILE + ".") and name.endswith(".tmp")
                )
                if stale:
                    try:
                        os.unlink(os.path.join(folder, name))
                    except FileNotFoundError:
                        pass

    return _CommitOnMetadataWriter(path, **options)
