"""Staging memory made ready before the first save: allocated and every page touched.

A slot's first save allocates its arena and, copying into it, takes a page fault per page of
fresh memory: 639 ms against 109-117 ms for a warm save of 256 MB on the 2-core machine. A
reservation does both ahead of time, on a background thread: from a state (the exact layout
the save will have, views and copy plan included, so the save finds its slot ready) or from a
byte count (an arena with :func:`~asyncckpt._staging.arena.headroom`, which the first save
adopts when it fits; see :func:`~asyncckpt._staging.arena.adoptable`).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch

from . import layout
from .arena import byte_view
from .copier import ParallelCopier
from .protocol import StagingSlot
from .skeleton import split

__all__ = ["fill_slot", "fill_slot_bytes", "tensors_of"]

Source = Tuple[bytes, List[Any]]


def tensors_of(checkpoint: Any, key: str) -> Source:
    """The pickled skeleton and the tensors of ``checkpoint``, as a save splits them."""
    skeleton, tensors = split(checkpoint, key)
    for t in tensors:
        device = t.device.type if isinstance(t, torch.Tensor) else "cpu"
        if device not in ("cpu", "cuda"):
            raise ValueError(
                f"cannot reserve staging memory from a state with {device} tensors (their host "
                "copy is made at the save); reserve a byte count instead"
            )
    return skeleton, tensors


def fill_slot(
    slot: StagingSlot,
    source: Source,
    key: str,
    *,
    torch_save_rules: bool,
    copier: ParallelCopier,
    stop: Optional[Callable[[], bool]] = None,
) -> None:
    """Lay ``source`` out in ``slot`` as its save will (arena, views, copy pairs and plan)."""
    skeleton, tensors = source
    with torch.inference_mode(False):  # staging memory is never made of inference tensors
        storages, _ = layout.prepare(
            slot, tensors, skeleton, key, torch_save_rules=torch_save_rules, reserving=True, stop=stop
        )
        if slot.copy_pairs is None:
            slot.copy_pairs = layout.copy_pairs(slot)
        sources, dst, on_cuda = slot.copy_pairs
        if not on_cuda and slot.copy_plan is None:
            src = [tensors[i] if i >= 0 else byte_view(storages[group]) for group, i in sources]
            slot.copy_plan = copier.plan(dst, src)


def fill_slot_bytes(slot: StagingSlot, nbytes: int, pinned: bool, stop: Optional[Callable[[], bool]] = None) -> None:
    """Give ``slot`` a touched arena for a checkpoint of about ``nbytes`` tensor bytes."""
    kind = "pinned" if pinned and slot.arena_kind == "plain" else slot.arena_kind
    layout.reserve_bytes(slot, nbytes, kind, stop)
