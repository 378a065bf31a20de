"""Eager staging: every tensor is copied into the slot before ``save_checkpoint`` returns.

:func:`asyncckpt._staging.skeleton.split` pickles the non-tensor skeleton and sets the tensors
aside; the :class:`EagerStager` then copies them, one raw memcpy per distinct storage, into an
arena (:mod:`asyncckpt._staging.arena`) that belongs to a :class:`StagingSlot` and is reused by
later saves with the same layout, sharing the copy across threads
(:mod:`asyncckpt._staging.copier`). Copying whole storages (not views) keeps views, shared
storage and non-contiguous strides exactly as ``torch.save`` would write them, and is bitwise
for every dtype.
"""

from __future__ import annotations

import time
from typing import Any, Callable, List, Optional, Tuple

import torch

from . import layout, warm
from .arena import byte_view
from .copier import ParallelCopier
from .devices import SideStreamCopy, move_xla_to_cpu
from .protocol import StagedCheckpoint, StagingSlot, VersionOwner
from .skeleton import split

__all__ = ["EagerStager"]


class EagerStager:
    """Turns a live checkpoint into a :class:`StagedCheckpoint` inside a slot's buffers."""

    defers_copies = False  # every byte is in the slot when stage() returns (or on the side stream)

    def __init__(self, threads: int = 1) -> None:
        self.side_stream = SideStreamCopy()  # its own stream, apart from a lazy stager's
        self.copier = ParallelCopier(threads)
        # Set by the engine when the wrapped IO writes with torch.save, whose refusals are then
        # raised at the call (DCP, for one, saves each tensor on its own and has no such rule).
        self.torch_save_rules = False

    def stage(
        self, checkpoint: Any, slot: StagingSlot, path: str, version_owner: Optional[VersionOwner] = None
    ) -> StagedCheckpoint:
        """Copy every tensor of ``checkpoint`` into ``slot`` now (``version_owner``: unused, as
        nothing is left to verify)."""
        started = time.perf_counter()
        skeleton, tensors, storages, tensor_bytes, copied = self.split_and_prepare(checkpoint, slot, path, copy=True)
        waiter = None
        if not copied:
            with torch.inference_mode(False), torch.no_grad():
                waiter = self.copy_into_slot(slot, tensors, storages)
        return StagedCheckpoint.from_slot(skeleton, slot, tensor_bytes, started, waiter, self.torch_save_rules)

    def split_and_prepare(self, checkpoint: Any, slot: StagingSlot, path: str, copy: bool = False) -> warm.Reused:
        """The skeleton, the tensors, their storages (in the slot's group order) and their
        bytes, with ``slot`` laid out for them: from what the slot's last save learned when the
        structure is unchanged (:mod:`asyncckpt._staging.warm`, which with ``copy`` also copies
        CPU tensors into the slot: see ``copied``), else by the full pass."""
        with torch.inference_mode(False):
            reused = warm.reuse(slot, checkpoint, self.copier if copy else None)
        if reused is not None:
            return reused
        skeleton, tensors = split(checkpoint, path)
        moved = move_xla_to_cpu(tensors)
        # Staging memory and its views are made outside inference mode, so that a first save
        # under torch.inference_mode() (validation, an eval loop) leaves ordinary tensors for
        # the saves after it; reading inference tensors there is allowed.
        with torch.inference_mode(False):
            before = slot.layout
            storages, tensor_bytes = self.prepare(slot, tensors, skeleton, path)
        if not moved and slot.layout is before:  # the layout repeated: worth remembering
            warm.record(slot, tensors, tensor_bytes)
        return warm.Reused(skeleton, tensors, storages, tensor_bytes, False)

    def prepare(
        self, slot: StagingSlot, tensors: List[torch.Tensor], skeleton: bytes, path: str
    ) -> Tuple[List[torch.UntypedStorage], int]:
        """Lay ``tensors`` out in ``slot`` under this stager's ``torch_save_rules``; see
        :func:`asyncckpt._staging.layout.prepare`."""
        return layout.prepare(slot, tensors, skeleton, path, torch_save_rules=self.torch_save_rules)

    def finish(self, host_sync: bool = False) -> None:
        """Nothing to finish: eager copies are complete, or ordered on the training stream."""

    def unfinished(self) -> List[Any]:
        """No deferred copies."""
        return []

    def copy_into_slot(
        self, slot: StagingSlot, tensors: List[torch.Tensor], storages: List[torch.UntypedStorage]
    ) -> Optional[Callable[[], None]]:
        """Copy every storage of a prepared save into ``slot`` (:func:`layout.prepare` laid it
        out); returns the writer's wait for copies still landing (CUDA), or None."""
        if slot.copy_pairs is None:
            slot.copy_pairs = layout.copy_pairs(slot)
        sources, dst, on_cuda = slot.copy_pairs
        src = [tensors[i] if i >= 0 else byte_view(storages[group]) for group, i in sources]
        if not on_cuda:
            slot.copy_plan = self.copier.copy(dst, src, slot.copy_plan)
            return None
        return self._copy_from_cuda(dst, src, wait_here=slot.arena_kind == "shared")

    def _copy_from_cuda(
        self, dst: List[torch.Tensor], src: List[torch.Tensor], wait_here: bool = False
    ) -> Optional[Callable[[], None]]:
        """Device-to-pinned-host copies on this stager's side stream, which the training stream
        waits for (see :class:`SideStreamCopy`); returns the writer's wait, or None once done."""
        event = self.side_stream.start(dst, src, training_stream_waits=True)
        if wait_here:
            # The writer process cannot wait on this process's CUDA event; finish the copy now.
            event.synchronize()
            return None
        return event.synchronize
