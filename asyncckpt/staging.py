"""Compatibility path; the code lives in asyncckpt._staging (protocol.py, eager.py, arena.py,
copier.py, skeleton.py). ``Stager`` is the eager stager, :class:`EagerStager`."""

from ._staging.arena import HostArena, build_views, storages_in
from ._staging.copier import ParallelCopier, default_staging_threads
from ._staging.eager import EagerStager
from ._staging.eager import EagerStager as Stager
from ._staging.protocol import StagedCheckpoint, StagingSlot, collection_paused
from ._staging.skeleton import restore

__all__ = [
    "EagerStager",
    "HostArena",
    "ParallelCopier",
    "StagedCheckpoint",
    "Stager",
    "StagingSlot",
    "build_views",
    "collection_paused",
    "default_staging_threads",
    "restore",
    "storages_in",
]
