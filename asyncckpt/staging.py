"""Staging: snapshot a checkpoint into host memory owned by a reusable slot.

One pass of a pickler over the checkpoint does two things at once: every plain tensor, wherever
it sits (dicts, lists, namedtuples, dataclasses, a module's ``_parameters``), is set aside by
``persistent_id``; everything else is serialized into a small "skeleton". The skeleton is the
point-in-time copy of all non-tensor state, and pickling it on the caller's thread surfaces an
unpicklable object where the user can act on it.

The tensors are then copied, one raw memcpy per distinct storage, into host buffers that belong
to a :class:`StagingSlot` and are reused by later saves with the same layout. Copying whole
storages (not views) keeps views, shared storage and non-contiguous strides exactly as
``torch.save`` would write them, and is bitwise for every dtype.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import itertools
import mmap
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ._pickling import describe_unpicklable
from .errors import NotSerializableError


def _is_stageable(obj: Any) -> bool:
    """Plain dense CPU, CUDA or XLA tensors go through the staging buffers; others are pickled by value.

    Runs once per tensor on the caller's thread, so it uses the cheapest attribute checks.
    """
    return (
        type(obj) is torch.Tensor
        and (obj.is_cpu or obj.is_cuda or obj.is_xla)
        and obj.layout is torch.strided
        and not obj.is_quantized
        and not obj.is_conj()
        and not obj.is_neg()
        and not obj.__dict__
    )


class _TensorCollector(pickle.Pickler):
    """Pickles the non-tensor skeleton and collects stageable tensors as persistent ids."""

    def __init__(self, buffer: io.BytesIO) -> None:
        super().__init__(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: List[torch.Tensor] = []
        self._index: Dict[int, int] = {}

    def persistent_id(self, obj: Any) -> Optional[int]:
        if type(obj) is not torch.Tensor or not _is_stageable(obj):
            return None
        index = self._index.get(id(obj))
        if index is None:
            index = len(self.tensors)
            self._index[id(obj)] = index
            self.tensors.append(obj)  # keeps the object alive, so its id stays unique
        return index


class _TensorRestorer(pickle.Unpickler):
    def __init__(self, data: bytes, tensors: Sequence[torch.Tensor]) -> None:
        super().__init__(io.BytesIO(data))
        self._tensors = tensors

    def persistent_load(self, pid: Any) -> torch.Tensor:
        return self._tensors[pid]


# Per distinct storage: (device type, bytes); per tensor: (storage index, dtype, size, stride,
# offset, requires_grad). Two saves with equal layouts reuse the same buffers and views.
_Layout = Tuple[Tuple[Tuple[str, int], ...], Tuple[Tuple[int, torch.dtype, tuple, tuple, int, bool], ...]]

_ALIGN = 64


class HostArena:
    """One block of host memory holding every storage of a staged checkpoint.

    ``kind`` is ``"plain"`` (ordinary memory), ``"pinned"`` (page-locked, for CUDA copies) or
    ``"shared"`` (an anonymous memfd, mapped by the writer process too, so tensors are written
    from there without being pickled through a pipe).
    """

    _ids = itertools.count(1)

    def __init__(self, nbytes: int, kind: str) -> None:
        self.id = next(HostArena._ids)
        self.nbytes = nbytes
        self.kind = kind
        self.fd: Optional[int] = None
        if kind == "shared":
            self.fd = os.memfd_create(f"asyncckpt-arena-{self.id}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(self.fd, max(nbytes, 1))
            except OSError as err:
                os.close(self.fd)
                self.fd = None
                raise type(err)(
                    err.errno,
                    f"cannot allocate {nbytes} bytes of shared staging memory for writer='process' "
                    f"({err.strerror}); it is a memfd, so the file size limit (RLIMIT_FSIZE, "
                    "'ulimit -f') applies to it: raise the limit or use writer='thread'",
                ) from err
            self._mmap = mmap.mmap(self.fd, max(nbytes, 1))
            self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)[:nbytes]
        elif kind == "pinned":
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        else:
            self.tensor = torch.empty(nbytes, dtype=torch.uint8)

    def close_fd(self) -> None:
        """The writer process has its own mapping; the descriptor is no longer needed here."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        if getattr(self, "fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)


def storages_in(base: torch.Tensor, groups: Sequence[Tuple[int, int]]) -> List[torch.UntypedStorage]:
    """One distinct storage per ``(offset, nbytes)`` range of ``base``, without copying.

    ``torch.save`` writes each storage as its own record, so the file holds one record per
    source storage, exactly as it would for the live tensors; an arena-wide storage would be
    written whole instead.
    """
    address = base.data_ptr()
    storages = []
    for offset, nbytes in groups:
        if nbytes == 0:
            storages.append(torch.UntypedStorage(0))
            continue
        window = (ctypes.c_char * nbytes).from_address(address + offset)
        storages.append(torch.frombuffer(window, dtype=torch.uint8).untyped_storage())
    return storages


def build_views(storages: Sequence[torch.UntypedStorage], specs: Sequence[tuple]) -> List[torch.Tensor]:
    """The staged tensors: each spec ``(group, dtype, size, stride, offset, requires_grad)`` as a view."""
    views = []
    for group, dtype, size, stride, offset, requires_grad in specs:
        view = torch.empty(0, dtype=dtype).set_(storages[group], offset, size, stride)
        if requires_grad:
            view.requires_grad_(True)
        views.append(view)
    return views


def _byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def restore(skeleton: bytes, tensors: Sequence[torch.Tensor]) -> Any:
    """Rebuild the checkpoint object from its skeleton and staged tensors."""
    return _TensorRestorer(skeleton, tensors).load()


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
    layout: Optional[_Layout] = None
    arena: Optional[HostArena] = None
    groups: Tuple[Tuple[int, int], ...] = ()
    byte_views: List[torch.Tensor] = field(default_factory=list)
    views: List[torch.Tensor] = field(default_factory=list)
    whole_copy: List[bool] = field(default_factory=list)
    members: List[List[int]] = field(default_factory=list)

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


_PARALLEL_MIN_BYTES = 8 * 1024 * 1024


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _memmovable(d: torch.Tensor, s: torch.Tensor) -> bool:
    return d.is_cpu and s.is_cpu and d.is_contiguous() and s.is_contiguous() and d.dtype == s.dtype


def _memmove_pairs(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    """Raw byte copies; ctypes releases the GIL for the call, and no torch thread pool is used."""
    for d, s in zip(dst, src, strict=True):
        nbytes = d.numel() * d.element_size()
        if nbytes:
            ctypes.memmove(d.data_ptr(), s.data_ptr(), nbytes)


class ParallelCopier:
    """Host-to-host copies split across ``threads`` threads (the caller's included).

    The training thread waits for staging anyway, so its idle cores can share the memcpy:
    on the 2-core reference machine two threads copy 256 MB in about half the time of one.
    ``torch`` copies release the GIL, so plain threads run them in parallel. Copies are split
    by bytes; a tensor larger than a thread's share is cut into byte ranges.
    """

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self._pool: Optional[ThreadPoolExecutor] = None

    def copy(self, dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
        total = sum(d.numel() * d.element_size() for d in dst)
        if self.threads == 1 or total < _PARALLEL_MIN_BYTES:
            torch._foreach_copy_(dst, src)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="asyncckpt-stage")
        # Only contiguous CPU pairs are shared out, and the helper threads copy them with a
        # plain memmove: a torch copy on a new thread would start an OpenMP team of its own,
        # which measurably slowed a 2-intra-op-thread training loop for seconds afterwards.
        plain = [(d, s) for d, s in zip(dst, src, strict=True) if _memmovable(d, s)]
        rest = [(d, s) for d, s in zip(dst, src, strict=True) if not _memmovable(d, s)]
        plain_bytes = sum(d.numel() * d.element_size() for d, _ in plain)
        chunks = self._split([d for d, _ in plain], [s for _, s in plain], plain_bytes)
        futures = [self._pool.submit(_memmove_pairs, d, s) for d, s in chunks[1:] if d]
        try:
            main_dst = chunks[0][0] + [d for d, _ in rest]
            main_src = chunks[0][1] + [s for _, s in rest]
            if main_dst:
                torch._foreach_copy_(main_dst, main_src)
        finally:
            for future in futures:
                future.result()

    def _split(
        self, dst: List[torch.Tensor], src: List[torch.Tensor], total: int
    ) -> List[Tuple[List[torch.Tensor], List[torch.Tensor]]]:
        """``threads`` chunks of about equal bytes; all pairs are contiguous (see ``copy``)."""
        share = -(-total // self.threads)
        chunks: List[Tuple[List[torch.Tensor], List[torch.Tensor]]] = [([], []) for _ in range(self.threads)]
        index, room = 0, share
        for d, s in zip(dst, src, strict=True):
            nbytes = d.numel() * d.element_size()
            if nbytes <= room or index == self.threads - 1:
                chunks[index][0].append(d)
                chunks[index][1].append(s)
                room -= nbytes
            else:  # cut a large tensor at the chunk boundary, as raw bytes
                d_bytes, s_bytes = _flat_bytes(d), _flat_bytes(s)
                start = 0
                while start < nbytes:
                    end = nbytes if index == self.threads - 1 else min(nbytes, start + max(room, 0))
                    if end > start:
                        chunks[index][0].append(d_bytes[start:end])
                        chunks[index][1].append(s_bytes[start:end])
                        room -= end - start
                        start = end
                    if start < nbytes:
                        index, room = index + 1, share
                continue
            if room <= 0 and index < self.threads - 1:
                index, room = index + 1, share
        return chunks

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


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
        flags.append(
            only is not None
            and only.is_contiguous()
            and only.storage_offset() == 0
            and only.numel() * only.element_size() == nbytes
        )
    return flags


def default_staging_threads() -> int:
    """Cores the training thread leaves idle while it waits for staging, up to 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class Stager:
    """Turns a live checkpoint into a :class:`StagedCheckpoint` inside a slot's buffers."""

    def __init__(self, threads: int = 1) -> None:
        self._cuda_stream: Any = None
        self.copier = ParallelCopier(threads)

    def stage(self, checkpoint: Any, slot: StagingSlot, path: str) -> StagedCheckpoint:
        started = time.perf_counter()
        skeleton, tensors = self._split(checkpoint, path)
        xla = [i for i, t in enumerate(tensors) if t.device.type == "xla"]
        if xla:
            from .xla import transfer_to_cpu

            for i, cpu_tensor in zip(xla, transfer_to_cpu([tensors[i] for i in xla]), strict=True):
                tensors[i] = cpu_tensor
        tensor_bytes, waiter = self._copy_into(slot, tensors)
        return StagedCheckpoint(
            skeleton=skeleton,
            tensors=list(slot.views),
            tensor_bytes=tensor_bytes,
            arena=slot.arena,
            groups=slot.groups,
            specs=slot.layout[1] if slot.layout else (),
            staging_seconds=time.perf_counter() - started,
            wait_for_copies=waiter,
        )

    @staticmethod
    def _split(checkpoint: Any, path: str) -> Tuple[bytes, List[torch.Tensor]]:
        buffer = io.BytesIO()
        collector = _TensorCollector(buffer)
        try:
            collector.dump(checkpoint)
        except Exception as err:
            raise NotSerializableError(describe_unpicklable(checkpoint, path, err), path) from err
        return buffer.getvalue(), collector.tensors

    def _copy_into(self, slot: StagingSlot, tensors: List[torch.Tensor]) -> Tuple[int, Optional[Callable[[], None]]]:
        storages: List[torch.UntypedStorage] = []
        storage_keys: Dict[Any, int] = {}
        per_tensor = []
        for t in tensors:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            key = (t.device, ptr) if ptr else ("unallocated", id(t))
            group = storage_keys.get(key)
            if group is None:
                group = storage_keys[key] = len(storages)
                storages.append(st)
            per_tensor.append(
                (group, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.requires_grad)
            )
        layout: _Layout = (tuple((st.device.type, st.nbytes()) for st in storages), tuple(per_tensor))
        if slot.layout != layout:
            self._plan(slot, layout, _whole_copy_flags(layout, tensors))
        with torch.no_grad():
            waiter = self._copy(slot, tensors, storages)
        return sum(nbytes for _, nbytes in layout[0]), waiter

    @staticmethod
    def _plan(slot: StagingSlot, layout: _Layout, whole_copy: Sequence[bool]) -> None:
        """Lay the storages out in the slot's arena (reused when big enough) and build views."""
        storage_sizes, per_tensor = layout
        groups = []
        total = 0
        for _, nbytes in storage_sizes:
            groups.append((total, nbytes))
            total += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        kind = slot.arena_kind
        if kind == "plain" and any(device == "cuda" for device, _ in storage_sizes):
            kind = "pinned"
        arena = slot.arena
        slot.release_memory()
        # Keep the arena when it fits and is not more than twice the need, so staging memory
        # stays within max_pending times the checkpoint's tensor bytes (plus alignment).
        if arena is None or arena.kind != kind or not (total <= arena.nbytes <= 2 * total):
            arena = None  # drop the old block before allocating the new one
            arena = HostArena(total, kind)
        slot.arena = arena
        slot.groups = tuple(groups)
        host_storages = storages_in(arena.tensor, groups)
        slot.views = build_views(host_storages, per_tensor)
        slot.byte_views = [_byte_view(st) for st in host_storages]
        members: List[List[int]] = [[] for _ in groups]
        for i, spec in enumerate(per_tensor):
            members[spec[0]].append(i)
        slot.layout = layout
        slot.whole_copy = list(whole_copy)
        slot.members = members

    def _copy(
        self, slot: StagingSlot, tensors: List[torch.Tensor], storages: List[torch.UntypedStorage]
    ) -> Optional[Callable[[], None]]:
        members = slot.members
        dst: List[torch.Tensor] = []
        src: List[torch.Tensor] = []
        on_cuda = False
        for group, st in enumerate(storages):
            if st.device.type == "cuda":
                on_cuda = True
            if slot.whole_copy[group]:
                i = members[group][0]
                dst.append(slot.views[i])
                src.append(tensors[i])
            elif st.nbytes():
                dst.append(slot.byte_views[group])
                src.append(_byte_view(st))
        if not on_cuda:
            if dst:
                self.copier.copy(dst, src)
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
