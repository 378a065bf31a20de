"""Staging: snapshot a checkpoint into host memory owned by a reusable slot.

:func:`asyncckpt._pickling.split` pickles the non-tensor skeleton and sets the tensors aside;
the :class:`Stager` then copies them, one raw memcpy per distinct storage, into an arena
(:mod:`asyncckpt._arena`) that belongs to a :class:`StagingSlot` and is reused by later saves
with the same layout, sharing the copy across threads (:mod:`asyncckpt._copier`). Copying whole
storages (not views) keeps views, shared storage and non-contiguous strides exactly as
``torch.save`` would write them, and is bitwise for every dtype.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ._arena import HostArena, build_views, byte_view, plan_groups, storages_in
from ._copier import CopyPlan, ParallelCopier, default_staging_threads
from ._pickling import move_xla_to_cpu, restore, split
from .errors import NotSerializableError

__all__ = [
    "HostArena",
    "ParallelCopier",
    "StagedCheckpoint",
    "Stager",
    "StagingSlot",
    "build_views",
    "default_staging_threads",
    "restore",
    "storages_in",
]

# Per distinct storage: (device type, bytes); per tensor: (storage index, dtype, size, stride,
# offset, requires_grad); per bare storage: (storage index, dtype or None). Two saves with
# equal layouts reuse the same buffers and views.
_Layout = Tuple[Tuple[Tuple[str, int], ...], Tuple[tuple, ...]]


_gc_lock = threading.RLock()  # re-entered by a save from a signal handler on this thread
_gc_pauses = 0
_gc_was_enabled = False


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic garbage collection while a save call stages.

    Staging a checkpoint of many tensors allocates tens of thousands of short-lived containers;
    they make the collector run a hundred times in one call, and with a training process's
    hundreds of thousands of tracked objects a full collection in the call costs 0.4-0.5 s
    (measured on the 20,000-tensor workload). Paused, the temporaries die by reference count
    before any collection promotes them. Nested and concurrent calls share one pause; the
    collector is re-enabled only if it was enabled when the first began.
    """
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


def _collection_in_forked_child() -> None:
    """A process forked by another thread during a save call has no such call: its collector
    runs as it did before the pause."""
    global _gc_lock, _gc_pauses
    _gc_lock = threading.RLock()
    if _gc_pauses:
        _gc_pauses = 0
        if _gc_was_enabled:
            gc.enable()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_collection_in_forked_child)


@dataclass
class StagedCheckpoint:
    """A checkpoint frozen in host memory: what the writer needs, and nothing live."""

    skeleton: bytes
    tensors: List[torch.Tensor]
    tensor_bytes: int
    arena: Optional[HostArena] = None
    groups: Tuple[Tuple[int, int], ...] = ()
    specs: Tuple[tuple, ...] = ()
    staging_seconds: float = 0.0
    wait_for_copies: Optional[Callable[[], None]] = None

    @classmethod
    def from_slot(
        cls, skeleton: bytes, slot: "StagingSlot", tensor_bytes: int, started: float,
        wait_for_copies: Optional[Callable[[], None]] = None,
    ) -> "StagedCheckpoint":
        """What a stager hands the writer once ``slot`` holds (or is receiving) the tensors."""
        return cls(
            skeleton=skeleton,
            tensors=list(slot.views),
            tensor_bytes=tensor_bytes,
            arena=slot.arena,
            groups=slot.groups,
            specs=slot.layout[1] if slot.layout else (),
            staging_seconds=time.perf_counter() - started,
            wait_for_copies=wait_for_copies,
        )

    def materialize(self) -> Any:
        """Rebuild the checkpoint object with host tensors, ready for ``torch.save``."""
        self.wait()
        return restore(self.skeleton, self.tensors)

    def wait(self) -> None:
        """Wait for asynchronous device-to-host copies (CUDA) to land in the host buffers."""
        if self.wait_for_copies is not None:
            self.wait_for_copies()
            self.wait_for_copies = None


@dataclass
class StagingSlot:
    """Host memory for one in-flight checkpoint, kept and reused while the layout repeats."""

    index: int
    arena_kind: str = "plain"
    last_key: Optional[str] = None  # the path this slot staged last (slots are chosen by it)
    layout: Optional[_Layout] = None
    arena: Optional[HostArena] = None
    groups: Tuple[Tuple[int, int], ...] = ()
    byte_views: List[torch.Tensor] = field(default_factory=list)
    views: List[torch.Tensor] = field(default_factory=list)
    whole_copy: List[bool] = field(default_factory=list)
    members: List[List[int]] = field(default_factory=list)
    # Per layout, reused with it: what ``Stager._copy`` copies, and the copier's split of it.
    copy_pairs: Optional[Tuple[List[Tuple[int, int]], List[torch.Tensor], bool]] = None
    copy_plan: Optional[CopyPlan] = None

    @property
    def nbytes(self) -> int:
        return self.arena.nbytes if self.arena is not None else 0

    def release_memory(self) -> None:
        self.layout = None
        self.arena = None
        self.groups = ()
        self.byte_views = []
        self.views = []
        self.whole_copy = []
        self.members = []
        self.copy_pairs = None
        self.copy_plan = None


def _whole_copy_flags(layout: _Layout, tensors: Sequence[torch.Tensor]) -> List[bool]:
    """Per storage: viewed by exactly one contiguous tensor that spans it (copied tensor to
    tensor); anything else (views, shared storage, gaps) is copied as raw bytes."""
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
        )
    return flags


def _refuse_dtype_conflict(layout: _Layout, skeleton: bytes, path: str) -> None:
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
        from .lazy import key_paths  # only on this failure

        names = key_paths(skeleton, len(per_tensor), (seen[0], i))
        a, b = (names.get(j, f"staged item {j}") for j in (seen[0], i))
        raise NotSerializableError(
            f"cannot save checkpoint {path!r}: {a} ({seen[1]}) and {b} ({dtype}) view the same "
            "memory as different dtypes, which torch.save refuses ('Cannot save multiple tensors "
            "or storages that view the same data as different types'); save a .clone() of one "
            "of them instead",
            path,
        )


def _copy_pairs(slot: StagingSlot) -> Tuple[List[Tuple[int, int]], List[torch.Tensor], bool]:
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
    return sources, targets, any(device == "cuda" for device, _ in storage_sizes)


class Stager:
    """Turns a live checkpoint into a :class:`StagedCheckpoint` inside a slot's buffers."""

    def __init__(self, threads: int = 1) -> None:
        self._cuda_stream: Any = None
        self.copier = ParallelCopier(threads)
        # Set by the engine when the wrapped IO writes with torch.save, whose refusals are then
        # raised at the call (DCP, for one, saves each tensor on its own and has no such rule).
        self.torch_save_rules = False

    def stage(self, checkpoint: Any, slot: StagingSlot, path: str) -> StagedCheckpoint:
        started = time.perf_counter()
        skeleton, tensors = split(checkpoint, path)
        move_xla_to_cpu(tensors)
        # Staging memory and its views are made outside inference mode, so that a first save
        # under torch.inference_mode() (validation, an eval loop) leaves ordinary tensors for
        # the saves after it; reading inference tensors there is allowed.
        with torch.inference_mode(False):
            storages, tensor_bytes = self.prepare(slot, tensors, skeleton, path)
            with torch.no_grad():
                waiter = self._copy(slot, tensors, storages)
        return StagedCheckpoint.from_slot(skeleton, slot, tensor_bytes, started, waiter)

    def prepare(
        self, slot: StagingSlot, tensors: List[torch.Tensor], skeleton: bytes, path: str
    ) -> Tuple[List[torch.UntypedStorage], int]:
        """Lay ``tensors`` out in ``slot`` (reusing its buffers when the layout repeats).

        Returns the distinct source storages, in the slot's group order, and their total bytes.
        ``skeleton`` and ``path`` name the tensors in an error (see ``torch_save_rules``).
        """
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
                st = t._untyped_storage
            else:
                st = t
            # Storages are told apart as torch.save tells them apart: by the storage itself,
            # not its address (two storages may start at one address: from_numpy twice).
            key = st._cdata
            group = storage_keys.get(key)
            if group is None:
                group = storage_keys[key] = len(storages)
                storages.append(st)
                device = ("cuda" if t.is_cuda else "cpu") if is_tensor else st.device.type
                storage_sizes.append((device, st.nbytes()))
            if is_tensor:
                # tuple(t.shape), not the torch.Size: a writer process gets these specs pickled,
                # and a Size pickles through a Python __reduce__, 7x slower for 20,000 of them.
                per_tensor.append((group, t.dtype, tuple(t.shape), t.stride(), t.storage_offset(), t.requires_grad))
            else:
                per_tensor.append((group, t.dtype if isinstance(t, torch.TypedStorage) else None))
        layout: _Layout = (tuple(storage_sizes), tuple(per_tensor))
        if slot.layout != layout:
            if self.torch_save_rules:
                _refuse_dtype_conflict(layout, skeleton, path)
            self._plan(slot, layout, _whole_copy_flags(layout, tensors))
        return storages, sum(nbytes for _, nbytes in layout[0])

    @staticmethod
    def _plan(slot: StagingSlot, layout: _Layout, whole_copy: Sequence[bool]) -> None:
        """Lay the storages out in the slot's arena (reused when big enough) and build views."""
        storage_sizes, per_tensor = layout
        groups, total = plan_groups([nbytes for _, nbytes in storage_sizes])
        kind = slot.arena_kind
        if kind == "plain" and any(device == "cuda" for device, _ in storage_sizes):
            kind = "pinned"
        arena = slot.arena
        slot.release_memory()
        # Keep the arena only when it is exactly the size needed: staging memory then stays
        # within max_pending times the checkpoint's tensor bytes (plus alignment) whatever the
        # sizes saved before.
        if arena is None or arena.kind != kind or arena.nbytes != total:
            arena = None  # drop the old block before allocating the new one
            arena = HostArena(total, kind)
        slot.arena = arena
        slot.groups = groups
        host_storages = storages_in(arena.tensor, groups, arena)
        slot.views = build_views(host_storages, per_tensor)
        slot.byte_views = [byte_view(st) for st in host_storages]
        members: List[List[int]] = [[] for _ in groups]
        for i, spec in enumerate(per_tensor):
            members[spec[0]].append(i)
        slot.layout = layout
        slot.whole_copy = list(whole_copy)
        slot.members = members

    def _copy(
        self, slot: StagingSlot, tensors: List[torch.Tensor], storages: List[torch.UntypedStorage]
    ) -> Optional[Callable[[], None]]:
        if slot.copy_pairs is None:
            slot.copy_pairs = _copy_pairs(slot)
        sources, dst, on_cuda = slot.copy_pairs
        src = [tensors[i] if i >= 0 else byte_view(storages[group]) for group, i in sources]
        if not on_cuda:
            slot.copy_plan = self.copier.copy(dst, src, slot.copy_plan)
            return None
        return self._copy_from_cuda(dst, src, wait_here=slot.arena_kind == "shared")

    def _copy_from_cuda(
        self, dst: List[torch.Tensor], src: List[torch.Tensor], wait_here: bool = False
    ) -> Optional[Callable[[], None]]:
        """Device-to-pinned-host copies on a side stream, ordered against the training stream.

        The side stream first waits for the current stream, so pending kernels that produce the
        values finish before the copy reads them. The current stream then waits for the copy's
        event, so the next optimizer step (queued on it) cannot overwrite a source still being
        read. The caller's thread never blocks on the copy; the writer waits for the event
        before it serializes the pinned buffers.
        """
        if self._cuda_stream is None:
            self._cuda_stream = torch.cuda.Stream()
        stream = self._cuda_stream
        current = torch.cuda.current_stream()
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for d, s in zip(dst, src, strict=True):
                d.copy_(s, non_blocking=s.device.type == "cuda")
                if s.device.type == "cuda":
                    s.record_stream(stream)
            event = torch.cuda.Event()
            event.record(stream)
        current.wait_event(event)
        if wait_here:
            # The writer process cannot wait on this process's CUDA event; finish the copy now.
            event.synchronize()
            return None
        return event.synchronize
