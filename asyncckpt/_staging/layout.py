"""The layout of a save in its slot: which storages there are, where each goes, and how it is copied.

:func:`prepare` reads every staged tensor once (the caller's thread pays for it per tensor),
refuses what ``torch.save`` would refuse, and, when the layout differs from the slot's last one,
plans the storages into the slot's arena (:func:`plan`). :func:`copy_pairs` is what a copy into
the slot pairs up, fixed by the layout.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import NotSerializableError
from .arena import HostArena, adoptable, build_views, byte_view, headroom, plan_groups, storages_in
from .locations import is_device_location, locations_of
from .protocol import Layout, StagingSlot
from .skeleton import key_paths

__all__ = ["PACKED_MAX_NUMEL", "copy_pairs", "packing_classes", "plan", "prepare", "reserve_bytes"]


def prepare(
    slot: StagingSlot,
    tensors: List[torch.Tensor],
    skeleton: bytes,
    path: str,
    *,
    torch_save_rules: bool,
    reserving: bool = False,
    stop: Optional[Callable[[], bool]] = None,
) -> Tuple[List[torch.UntypedStorage], int]:
    """Lay ``tensors`` out in ``slot`` (reusing its buffers when the layout repeats).

    Returns the distinct source storages, in the slot's group order, and their total bytes.
    ``skeleton`` and ``path`` name the tensors in an error; ``torch_save_rules`` (the wrapped IO
    writes with torch.save) raises torch.save's refusals at the call. ``reserving``: a
    reservation lays the slot out ahead of its first save (see :func:`plan`).
    """
    slot.allocated_bytes = 0
    storages: List[torch.UntypedStorage] = []
    storage_sizes: List[Tuple[str, int]] = []
    storage_keys: Dict[Any, int] = {}
    per_tensor = []
    # One pass of cheap attribute reads: it runs per tensor on the caller's thread (20,000
    # tensors for a transformer's optimizer state). Staged tensors are on the CPU or a CUDA
    # device (XLA ones were moved to the CPU), so ``is_cuda`` names the device.
    for t in tensors:
        is_tensor = isinstance(t, torch.Tensor)
        if is_tensor:
            st = t.untyped_storage()
        elif isinstance(t, torch.TypedStorage):
            st = t._untyped_storage  # torch's own field: the storage a TypedStorage wraps
        else:
            st = t
        # Storages are told apart as torch.save tells them apart: by the storage itself,
        # not its address (two storages may start at one address: from_numpy twice);
        # ``_cdata`` is torch's own handle of the storage, the identity torch.save keys on.
        key = st._cdata
        group = storage_keys.get(key)
        if group is None:
            group = storage_keys[key] = len(storages)
            storages.append(st)
            # the location torch.save records (``"cuda:1"``): the file loads it back there
            if is_tensor:
                device = f"cuda:{t.get_device()}" if t.is_cuda else "cpu"
            else:
                device = "cpu" if st.device.type == "cpu" else str(st.device)
            storage_sizes.append((device, st.nbytes()))
        if is_tensor:
            # tuple(t.shape), not the torch.Size: a writer process gets these specs pickled,
            # and a Size pickles through a Python __reduce__, 7x slower for 20,000 of them.
            per_tensor.append((group, t.dtype, tuple(t.shape), t.stride(), t.storage_offset(), t.requires_grad))
        else:
            per_tensor.append((group, t.dtype if isinstance(t, torch.TypedStorage) else None))
    layout: Layout = (tuple(storage_sizes), tuple(per_tensor))
    if slot.layout != layout:
        if torch_save_rules:
            _refuse_dtype_conflict(layout, skeleton, path)
        plan(slot, layout, _whole_copy_flags(layout, tensors), reserving=reserving, stop=stop)
    return storages, sum(nbytes for _, nbytes in layout[0])


def plan(
    slot: StagingSlot,
    layout: Layout,
    whole_copy: Sequence[bool],
    *,
    reserving: bool = False,
    stop: Optional[Callable[[], bool]] = None,
) -> None:
    """Lay the storages out in the slot's arena (reused when it fits) and build views.

    ``reserving``: a new arena gets :func:`~asyncckpt._staging.arena.headroom` and every page
    touched now (``stop`` may cut that short), off the save call that would otherwise pay both.
    """
    storage_sizes, per_tensor = layout
    groups, total = plan_groups([nbytes for _, nbytes in storage_sizes], packing_classes(layout, whole_copy))
    kind = slot.arena_kind
    if kind == "plain" and any(is_device_location(device) for device, _ in storage_sizes):
        kind = "pinned"
    arena = slot.arena
    slot.release_memory()
    # Keep the arena when it is exactly the size needed, or a reserved one that fits with at
    # most ``headroom`` to spare: staging memory then stays within max_pending times the
    # checkpoint's tensor bytes (plus alignment, plus a reservation's headroom) whatever the
    # sizes saved before.
    fits = arena is not None and arena.kind == kind and (
        arena.nbytes == total or (arena.reserved and adoptable(arena.nbytes, total))
    )
    if not fits:
        arena = None  # drop the old block before allocating the new one
        arena = _new_arena(total + headroom(total) if reserving else total, kind, reserving, stop)
        if not reserving:
            slot.allocated_bytes = arena.nbytes
    assert arena is not None
    slot.arena = arena
    slot.groups = groups
    host_storages = storages_in(arena.tensor, groups, arena)
    slot.storages = host_storages
    slot.views = build_views(host_storages, per_tensor)
    slot.locations = locations_of(host_storages, [device for device, _ in storage_sizes])
    slot.group_locations = tuple(device for device, _ in storage_sizes) if slot.locations else None
    slot.byte_views = [byte_view(st) for st in host_storages]
    members: List[List[int]] = [[] for _ in groups]
    for i, spec in enumerate(per_tensor):
        members[spec[0]].append(i)
    slot.layout = layout
    slot.whole_copy = list(whole_copy)
    slot.members = members


def reserve_bytes(slot: StagingSlot, nbytes: int, kind: str, stop: Optional[Callable[[], bool]] = None) -> None:
    """Give ``slot`` an arena for a checkpoint of about ``nbytes`` tensor bytes, plus
    :func:`~asyncckpt._staging.arena.headroom`, every page touched, and no layout (its first
    save plans into it). An arena the slot holds already is kept if it fits that need."""
    arena = slot.arena
    if arena is not None and arena.kind == kind and adoptable(arena.nbytes, nbytes):
        return
    slot.release_memory()
    arena = None  # drop the old block before allocating the new one
    slot.arena = _new_arena(nbytes + headroom(nbytes), kind, True, stop)


def _new_arena(nbytes: int, kind: str, reserving: bool, stop: Optional[Callable[[], bool]]) -> HostArena:
    arena = HostArena(nbytes, kind)
    if reserving:
        arena.reserved = True
        arena.fault_in(stop)
    return arena


#: Dtypes whose tensor-to-tensor copy is a copy of the bytes, which ``torch.save`` writes. Others
#: are copied as raw bytes: a bool copy turns every nonzero byte into 1 (a byte view as
#: ``torch.bool`` holds others), a quantized dtype's is a quantizing copy (see
#: :data:`~asyncckpt._staging.arena.QUANTIZED_DTYPES`), and torch has no copy at all for some
#: (``float4_e2m1fn_x2`` in torch 2.9).
_COPIED_AS_TENSORS = frozenset({
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
})


#: A storage viewed whole by one tensor of fewer elements than this (below torch's parallel
#: grain, ``at::internal::GRAIN_SIZE``) is packed beside the others of its class: a warm save
#: copies a checkpoint of many small tensors with one ``torch.cat`` per class, a memcpy per
#: tensor, instead of a copy of its own per tensor (about 0.8 us each, the cost that dominated).
PACKED_MAX_NUMEL = 32768


def packing_classes(layout: Layout, whole_copy: Sequence[bool]) -> List[Optional[Tuple[Any, ...]]]:
    """Per storage group, its packing class, or None: the groups copied whole from one tensor of
    at most :data:`PACKED_MAX_NUMEL` elements, by ``(dtype, dimensions, size past the first
    dimension)`` (what ``torch.cat`` along the first dimension, or ``torch.stack`` of 0-d
    tensors, needs alike)."""
    storage_sizes, per_tensor = layout
    only: List[Optional[tuple]] = [None] * len(storage_sizes)
    for spec in per_tensor:
        if len(spec) == 6 and whole_copy[spec[0]]:
            only[spec[0]] = spec
    classes: List[Optional[Tuple[Any, ...]]] = []
    for spec in only:
        if spec is None:
            classes.append(None)
            continue
        size = spec[2]
        numel = 1
        for n in size:
            numel *= n
        classes.append((spec[1], len(size), tuple(size[1:])) if 0 < numel < PACKED_MAX_NUMEL else None)
    return classes


def _whole_copy_flags(layout: Layout, tensors: Sequence[torch.Tensor]) -> List[bool]:
    """Per storage: viewed by exactly one contiguous tensor that spans it (copied tensor to
    tensor); anything else (views, shared storage, gaps, a dtype not in
    :data:`_COPIED_AS_TENSORS`) is copied as raw bytes."""
    storage_sizes, per_tensor = layout
    users: List[List[int]] = [[] for _ in storage_sizes]
    for i, spec in enumerate(per_tensor):
        users[spec[0]].append(i)
    flags = []
    for group, (_, nbytes) in enumerate(storage_sizes):
        only = tensors[users[group][0]] if len(users[group]) == 1 else None
        if not isinstance(only, torch.Tensor):
            only = None
        flags.append(
            only is not None
            and only.is_contiguous()
            and only.storage_offset() == 0
            and only.numel() * only.element_size() == nbytes
            and only.dtype in _COPIED_AS_TENSORS
        )
    return flags


def _refuse_dtype_conflict(layout: Layout, skeleton: bytes, path: str) -> None:
    """torch.save's rule, checked once per new layout: every item viewing a storage that holds
    bytes reads it as one dtype (a bare ``UntypedStorage`` as uint8). A conflict is raised at
    the call, naming both items by their key paths in the checkpoint."""
    storage_sizes, per_tensor = layout
    first: Dict[int, Tuple[int, Any]] = {}
    for i, spec in enumerate(per_tensor):
        group = spec[0]
        if not storage_sizes[group][1]:
            continue
        dtype = spec[1] if spec[1] is not None else torch.uint8
        seen = first.setdefault(group, (i, dtype))
        if seen[1] == dtype:
            continue
        names = key_paths(skeleton, len(per_tensor), (seen[0], i))
        a, b = (names.get(j, f"staged item {j}") for j in (seen[0], i))
        raise NotSerializableError(
            f"cannot save checkpoint {path!r}: {a} ({seen[1]}) and {b} ({dtype}) view the same "
            "memory as different dtypes, which torch.save refuses ('Cannot save multiple tensors "
            "or storages that view the same data as different types'); save a .clone() of one "
            "of them instead",
            path,
        )


def copy_pairs(slot: StagingSlot) -> Tuple[List[Tuple[int, int]], List[torch.Tensor], bool]:
    """What a copy into ``slot`` pairs up, fixed by its layout: per storage group with bytes,
    ``(group, i)`` with ``i`` the tensor copied whole into ``slot.views[i]``, or -1 for the
    storage copied as raw bytes into ``slot.byte_views[group]``; the targets; whether any
    source is on a CUDA device."""
    storage_sizes = slot.layout[0] if slot.layout else ()
    sources: List[Tuple[int, int]] = []
    targets: List[torch.Tensor] = []
    for group, (_, nbytes) in enumerate(storage_sizes):
        if slot.whole_copy[group]:
            i = slot.members[group][0]
            sources.append((group, i))
            targets.append(slot.views[i])
        elif nbytes:
            sources.append((group, -1))
            targets.append(slot.byte_views[group])
    return sources, targets, any(is_device_location(device) for device, _ in storage_sizes)
