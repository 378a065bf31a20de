"""What a slot's last save learned about the checkpoint's structure, checked cheaply and reused.

The structure of a state dict rarely changes between saves. For a checkpoint of many small
tensors (20,000 of 1 KB: a transformer's per-layer weights and optimizer state), the call used
to spend 3-4x as long as the copy itself in per-tensor Python: a pickling pass that asked
:func:`~asyncckpt._staging.skeleton.is_stageable` of every tensor, a loop that read each
tensor's storage, dtype, shape, stride and offset into the layout tuple, and a copy per tensor.

Once a slot's layout has repeated, :func:`record` keeps, per staged tensor, what that layout was
built from: its storage's identity (the ``id`` of its Python object, an integer: no reference
that would keep the user's memory alive) and size, dtype, shape, stride, offset and ``requires_grad``. A later save
(:func:`reuse`) pickles the skeleton with the lean pass
(:func:`~asyncckpt._staging.skeleton.split_lean`), reads those same attributes of every tensor
with ``map`` (C loops, no Python frame per tensor) and compares the lists whole; where torch
has the C check its compiler guards tensors with (``TensorGuards``: type, dispatch keys, dtype,
device, ``requires_grad``, shape and stride of every tensor in one call, five times faster than
reading them), that check stands in for most of the reads (:func:`tensor_guards`). Equal lists
mean the layout is the one the slot holds, storage for storage: the same tensors share the same
storages as before, so the slot's views and copy plan stand. Anything else (a key added or
removed, a dtype, shape, stride or offset changed, a tensor replaced by one on another storage,
a storage resized, the conjugate or negative bit, attributes set on a tensor: anything
:func:`split` would pickle by value) falls back to the full path, which rebuilds the layout. The
non-tensor state (epoch, step, ...) is pickled anew at every save either way.

A storage id may be taken by a new storage once the old one is freed; that is harmless: within
one call every storage compared is alive, so equal id lists mean the same partition into
storages, and the sizes are compared too.

The small tensors that each fill a storage of their own lie in the arena in packed runs, one per
dtype and shape past the first dimension (:func:`~asyncckpt._staging.layout.packing_classes`);
each run is filled by one ``torch.cat`` (:func:`~asyncckpt._staging.copier.copy_runs`), a
memcpy per tensor, on the copier's helper thread while the checks run. A copy whose check then
fails only wrote the slot's own memory, and the full path copies everything again.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch

from . import layout as layouts
from .arena import byte_view, storages_in
from .copier import CopyPlan, HelperCopy, PackedRun, ParallelCopier, copy_runs, settle
from .protocol import Layout, StagingSlot
from .skeleton import split_lean, without_attributes

__all__ = ["MAX_MISSES", "Reused", "WarmCache", "record", "reuse", "tensor_guards"]

#: After this many saves in a row whose structure differed from the recorded one, a slot stops
#: recording: a checkpoint whose storages change at every save (fresh clones) would only pay
#: the lean pass on top of the full one.
MAX_MISSES = 3

_storage_of = torch.Tensor.untyped_storage
# A storage's Python object: torch keeps one per storage while the storage lives (and hands it
# out again), so within one call equal ids are one storage, as torch.save's ``_cdata`` keys
# are; reading ``id`` costs half of reading ``_cdata``. Across saves only the partition into
# storages is compared (see above), which holds whatever torch does with the objects between.
_storage_id = id
_storage_bytes = torch.UntypedStorage.nbytes
_dtype = torch.Tensor.dtype.__get__  # a getset descriptor's own getter: faster than attrgetter
_size = torch.Tensor.size
_stride = torch.Tensor.stride
_offset = torch.Tensor.storage_offset
_requires_grad = torch.Tensor.requires_grad.__get__
_is_neg = torch.Tensor.is_neg
_is_conj = torch.Tensor.is_conj


def _works(check_class: Callable[..., Any]) -> bool:
    """Whether ``check_class`` is the check meant: it passes an equal tensor and fails one that
    differs in each thing it must see."""
    def guards_of(t: torch.Tensor) -> Any:
        return check_class(t, dynamic_dims_sizes=[list(t.size())], dynamic_dims_strides=[list(t.stride())])

    base = torch.zeros(2, 3)
    guards = guards_of(base)
    z = torch.zeros(2, 3, dtype=torch.complex64)
    return (
        guards.check(torch.ones(2, 3)) is True
        and guards.check(torch.zeros(3, 2)) is False  # shape
        and guards.check(torch.zeros(3, 2).t()) is False  # stride
        and guards.check(torch.zeros(2, 3, dtype=torch.int32)) is False  # dtype
        and guards.check(torch.zeros(2, 3, requires_grad=True)) is False
        and guards.check(torch.zeros(2, 3, dtype=torch.complex64).conj().imag) is False  # the negative bit
        and guards.check(torch.nn.Parameter(torch.zeros(2, 3), requires_grad=False)) is False  # type
        and guards_of(z).check(z.conj()) is False  # the conjugate bit
    )


def _guards_class() -> Optional[Callable[..., Any]]:
    try:  # private to torch's compiler: present since torch 2.0, with no promise of its shape
        from torch._C._dynamo.guards import TensorGuards

        return TensorGuards if _works(TensorGuards) else None
    except Exception:  # noqa: BLE001 - absent, or another shape: the attribute reads stand
        return None


#: The class of :func:`tensor_guards`; None (no such check in this torch, or a test switching it
#: off) leaves every attribute to be read.
GUARDS_CLASS: Optional[Callable[..., Any]] = _guards_class()


def tensor_guards(
    tensors: Sequence[torch.Tensor], sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]]
) -> Optional[Any]:
    """One C check of ``tensors``' types, dispatch keys (device, layout, the negative and
    conjugate bits), dtypes, devices, ``requires_grad``, shapes and strides, or None.

    It is torch's compiler's own tensor check, built with every size and stride fixed (the
    ``sizes`` and ``strides`` already read of ``tensors``); it keeps no reference to the
    tensors. :func:`_works` tried it once on tensors made for the purpose.
    """
    if GUARDS_CLASS is None or not tensors:
        return None
    try:
        guards = GUARDS_CLASS(
            *tensors,
            dynamic_dims_sizes=list(map(list, sizes)),
            dynamic_dims_strides=list(map(list, strides)),
        )
        return guards if guards.check(*tensors) is True else None
    except Exception:  # noqa: BLE001 - the attribute reads work for any tensor
        return None


@dataclass
class WarmCache:
    """Per staged tensor, the attributes the slot's layout was built from (no tensor references
    of the user's), and the slot's copy: packed runs, and the rest pair by pair."""

    layout: Layout  # the slot's layout these belong to (compared by identity)
    storage_ids: List[int]
    storage_bytes: List[int]
    dtypes: List[torch.dtype]
    sizes: List[torch.Size]
    strides: List[Tuple[int, ...]]
    offsets: List[int]
    requires_grad: List[bool]
    complex_items: List[int]  # the only tensors that can carry the conjugate bit
    guards: Optional[Any]  # tensor_guards() of the tensors recorded; None: every attribute is read
    first_members: List[int]  # per storage group, its first tensor
    one_group_each: bool  # first_members is 0, 1, 2, ...: each tensor is its group's only member
    tensor_bytes: int
    on_cpu: bool  # every storage is on the CPU: reuse() copies (else the stager's device copy)
    runs: List[PackedRun]  # the packed runs, each copied by one call
    # With the guards, the tensors whose offsets are read: those outside the runs (a tensor in
    # a run fills its storage, so an equal storage size, shape and stride leave it offset 0).
    # None: all of them.
    unpacked: Optional[List[int]]
    unpacked_offsets: List[int]
    rest_sources: List[Tuple[int, int]]  # as layout.copy_pairs: (group, tensor or -1)
    rest_dst: List[torch.Tensor]
    rest_plan: Optional[CopyPlan] = None


class Reused(NamedTuple):
    """What :func:`reuse` hands the stager: as ``split`` + ``layout.prepare`` would, and
    whether the tensors are already in the slot."""

    skeleton: bytes
    tensors: List[torch.Tensor]
    storages: List[torch.UntypedStorage]
    tensor_bytes: int
    copied: bool


def _read(tensors: List[torch.Tensor], storages: List[torch.UntypedStorage]) -> Tuple[List[Any], ...]:
    """The attributes of every tensor, each read by a C loop; raises where a tensor has none
    (nested tensors have no strides)."""
    return (
        list(map(_storage_bytes, storages)),
        list(map(_dtype, tensors)),
        list(map(_size, tensors)),
        list(map(_stride, tensors)),
        list(map(_offset, tensors)),
        list(map(_requires_grad, tensors)),
    )


def _packed_runs(
    slot: StagingSlot, members: List[Tuple[int, torch.Tensor]], key: Tuple[Any, ...], packed: Set[int]
) -> List[PackedRun]:
    """The runs of one packing class: its members' targets back to back in the arena (as
    :func:`~asyncckpt._staging.arena.plan_groups` lays them out), cut where they are not. Adds
    the tensors the runs copy to ``packed``."""
    arena = slot.arena
    assert arena is not None
    runs: List[PackedRun] = []
    start = 0
    while start < len(members):
        end = start + 1
        while end < len(members):
            prev = members[end - 1][1]
            if members[end][1].data_ptr() != prev.data_ptr() + prev.numel() * prev.element_size():
                break
            end += 1
        if end - start >= 2:  # a single tensor is copied with the rest
            runs.append(_run(arena, members[start:end], key))
            packed.update(i for i, _ in members[start:end])
        start = end
    return runs


def _run(arena: Any, members: List[Tuple[int, torch.Tensor]], key: Tuple[Any, ...]) -> PackedRun:
    """One run: its members' targets, back to back, as one tensor of the class's dtype."""
    dtype, dims, trailing = key
    first = members[0][1]
    nbytes = sum(dst.numel() * dst.element_size() for _, dst in members)
    offset = first.data_ptr() - arena.tensor.data_ptr()
    # A storage of its own over the run (it keeps the arena alive), not resizable: a copy of
    # tensors that changed cannot resize the target over its neighbours' memory.
    (storage,) = storages_in(arena.tensor, [(offset, nbytes)], arena)
    if dims == 0:
        shape: Tuple[int, ...] = (len(members),)
    else:
        shape = (sum(dst.shape[0] for _, dst in members), *trailing)
    dst = torch.empty(0, dtype=dtype, device=storage.device).set_(storage, 0, shape)
    take = itemgetter(*[i for i, _ in members])
    return PackedRun(take, dst, dims == 0)


def record(slot: StagingSlot, tensors: List[Any], tensor_bytes: int) -> None:
    """Keep what the full path learned for the next save into ``slot``.

    Only once its layout has repeated (a structure that changes at every save gains nothing
    from it), and only when every staged item is a plain tensor: bare storages, tensors moved
    from XLA (new storages at every save) and the like always take the full path.
    """
    layout = slot.layout
    if layout is None or slot.warm_misses >= MAX_MISSES or len(layout[1]) != len(tensors):
        return
    if set(map(type, tensors)) != {torch.Tensor}:
        return
    try:
        storages = list(map(_storage_of, tensors))
        ids = list(map(_storage_id, storages))
        nbytes, dtypes, sizes, strides, offsets, grads = _read(tensors, storages)
    except Exception:  # noqa: BLE001 - no cache; the full path keeps working
        return
    first: dict = {}
    for i, spec in enumerate(layout[1]):
        first.setdefault(spec[0], i)
    firsts = [first[group] for group in range(len(layout[0]))]
    if slot.copy_pairs is None:
        slot.copy_pairs = layouts.copy_pairs(slot)
    sources, targets, on_cuda = slot.copy_pairs
    classes = layouts.packing_classes(layout, slot.whole_copy) if not on_cuda else [None] * len(layout[0])
    members: Dict[Tuple[Any, ...], List[Tuple[int, torch.Tensor]]] = {}
    for (group, i), dst in zip(sources, targets, strict=True):
        key = classes[group] if i >= 0 else None
        if key is not None:
            members.setdefault(key, []).append((i, dst))
    packed: Set[int] = set()
    runs = [run for key, found in members.items() for run in _packed_runs(slot, found, key, packed)]
    rest_sources: List[Tuple[int, int]] = []
    rest_dst: List[torch.Tensor] = []
    for (group, i), dst in zip(sources, targets, strict=True):
        if i not in packed:  # -1 (a storage copied as bytes) never is
            rest_sources.append((group, i))
            rest_dst.append(dst)
    unpacked = [i for i in range(len(tensors)) if i not in packed]
    slot.warm = WarmCache(
        layout=layout,
        storage_ids=ids,
        storage_bytes=nbytes,
        dtypes=dtypes,
        sizes=sizes,
        strides=strides,
        offsets=offsets,
        requires_grad=grads,
        complex_items=[i for i, dtype in enumerate(dtypes) if dtype.is_complex],
        guards=tensor_guards(tensors, sizes, strides),
        first_members=firsts,
        one_group_each=firsts == list(range(len(tensors))),
        tensor_bytes=tensor_bytes,
        on_cpu=not on_cuda,
        runs=runs,
        unpacked=None if len(unpacked) == len(tensors) else unpacked,
        unpacked_offsets=[offsets[i] for i in unpacked],
        rest_sources=rest_sources,
        rest_dst=rest_dst,
    )


def reuse(slot: StagingSlot, checkpoint: Any, copier: Optional[ParallelCopier] = None) -> Optional[Reused]:
    """``checkpoint`` split and laid out as the full path would, when its structure is the one
    recorded for ``slot``; None otherwise (the cache is then dropped, and the full path runs).

    With a ``copier`` and CPU storages the tensors are copied into the slot too: the packed runs
    on the copier's helper thread while this thread checks the structure (a copy whose check
    then fails is overwritten by the full path's), the rest once it passed.
    """
    cache = slot.warm
    if cache is None:
        return None
    if cache.layout is not slot.layout:  # re-planned since (a save into it failed midway, say)
        slot.warm = None
        return None
    lean = split_lean(checkpoint)
    found = None if lean is None else _check_and_copy(cache, lean[1], copier if cache.on_cpu else None)
    if found is None:
        slot.warm = None
        slot.warm_misses += 1
        return None
    slot.warm_misses = 0
    storages, copied = found
    # Each tensor on a storage of its own (the common case) needs no picking.
    group_storages = storages if cache.one_group_each else list(map(storages.__getitem__, cache.first_members))
    return Reused(lean[0], lean[1], group_storages, cache.tensor_bytes, copied)


def _check_and_copy(
    cache: WarmCache, tensors: List[torch.Tensor], copier: Optional[ParallelCopier]
) -> Optional[Tuple[List[torch.UntypedStorage], bool]]:
    """The tensors' storages and whether they were copied, if every tensor matches the cache
    and is stageable; else None.

    Given equal storage, dtype, shape, stride and offset, :func:`is_stageable` can only differ
    by the negative and conjugate bits (views of the same memory) and by attributes set on the
    tensor: device and layout come with the storage (sparse and MKL-DNN tensors have none, and
    raise), a nested tensor has no strides (raises), and a quantized tensor has a dtype of its own.

    The packed runs start copying at once (with the guards: each tensor is a plain
    ``torch.Tensor``, and a copy of a changed one either fails or writes the slot's own
    memory, which the full path copies again) or once the same storages are seen (without
    them), while the rest is checked.
    """
    if len(tensors) != len(cache.storage_ids):
        return None
    guards = cache.guards
    storages: Optional[List[torch.UntypedStorage]] = None
    if guards is None:
        try:
            storages = _same_storages(cache, tensors)
        except Exception:  # noqa: BLE001 - not a plain strided tensor: the full path decides
            return None
        if storages is None:
            return None
    helpers: List[HelperCopy] = []  # the helper, listed before it may run
    running: Optional[HelperCopy] = None
    same = False
    try:  # from here on the helper's copy is waited for, whatever is raised (a Ctrl-C included)
        running = copier.start(cache.runs, tensors, into=helpers) if copier is not None else None
        if running is not None:
            running.hand_over()
        try:
            if guards is not None:
                same = guards.check(*tensors) is True
                if same and running is not None:
                    running.make_way()  # its next copy may start now, not after these checks
                storages = _same_storages(cache, tensors) if same else None
                if storages is not None and running is not None:
                    running.make_way()
                same = storages is not None and _same_rest(cache, tensors, storages)
            else:
                same = _same(cache, tensors, storages)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - not a plain strided tensor: the full path decides
            same = False
        if running is not None:
            try:
                running.wait()
            except Exception:  # noqa: BLE001 - a changed tensor that cannot be copied: the check fails
                same = False
    except BaseException:
        try:
            settle([h.future for h in helpers])
        finally:  # again if a signal handler's exception cut it short at its start
            settle([h.future for h in helpers])
        raise
    if not same or storages is None:
        return None
    if copier is None:
        return storages, False
    with torch.no_grad():
        if running is None and cache.runs:
            copy_runs(cache.runs, tensors)
        if cache.rest_dst:
            firsts = cache.first_members
            rest_src = [tensors[i] if i >= 0 else byte_view(storages[firsts[g]]) for g, i in cache.rest_sources]
            cache.rest_plan = copier.copy(cache.rest_dst, rest_src, cache.rest_plan)
    return storages, True


def _same_storages(cache: WarmCache, tensors: List[torch.Tensor]) -> Optional[List[torch.UntypedStorage]]:
    """The tensors' storages, if they are the ones recorded, tensor for tensor; else None."""
    storages = list(map(_storage_of, tensors))
    return storages if list(map(_storage_id, storages)) == cache.storage_ids else None


def _same_rest(cache: WarmCache, tensors: List[torch.Tensor], storages: List[torch.UntypedStorage]) -> bool:
    """What the guards do not see: how much storage there is, where in it each tensor starts
    (outside the packed runs), and attributes set on a tensor."""
    if list(map(_storage_bytes, storages)) != cache.storage_bytes:
        return False
    if cache.unpacked is None:
        if list(map(_offset, tensors)) != cache.offsets:
            return False
    elif cache.unpacked and list(map(_offset, map(tensors.__getitem__, cache.unpacked))) != cache.unpacked_offsets:
        return False
    return without_attributes(tensors)


def _same(cache: WarmCache, tensors: List[torch.Tensor], storages: List[torch.UntypedStorage]) -> bool:
    """Every attribute read and compared: where there are no guards."""
    try:
        nbytes, dtypes, sizes, strides, offsets, grads = _read(tensors, storages)
    except Exception:  # noqa: BLE001 - not a plain strided tensor: the full path decides
        return False
    return not (
        nbytes != cache.storage_bytes
        or dtypes != cache.dtypes
        or sizes != cache.sizes
        or strides != cache.strides
        or offsets != cache.offsets
        or grads != cache.requires_grad
        or any(map(_is_neg, tensors))
        or not without_attributes(tensors)
        or any(_is_conj(tensors[i]) for i in cache.complex_items)
    )
