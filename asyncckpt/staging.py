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

import io
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ._pickling import describe_unpicklable
from .errors import NotSerializableError

_STAGED_DEVICE_TYPES = ("cpu", "cuda", "xla")


def _is_stageable(obj: Any) -> bool:
    """Plain dense tensors go through the staging buffers; anything else is pickled by value."""
    return (
        type(obj) is torch.Tensor
        and obj.layout is torch.strided
        and obj.device.type in _STAGED_DEVICE_TYPES
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
        if not isinstance(obj, torch.Tensor) or not _is_stageable(obj):
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


@dataclass
class StagedCheckpoint:
    """A checkpoint frozen in host memory: what the writer needs, and nothing live."""

    skeleton: bytes
    tensors: List[torch.Tensor]
    tensor_bytes: int
    staging_seconds: float = 0.0
    wait_for_copies: Optional[Callable[[], None]] = None

    def materialize(self) -> Any:
        """Rebuild the checkpoint object with host tensors, ready for ``torch.save``."""
        if self.wait_for_copies is not None:
            self.wait_for_copies()
            self.wait_for_copies = None
        return _TensorRestorer(self.skeleton, self.tensors).load()


# (device type, storage bytes) per distinct storage, then per tensor:
# (storage index, dtype, size, stride, offset, requires_grad)
_Layout = Tuple[Tuple[Tuple[str, int], ...], Tuple[Tuple[int, torch.dtype, tuple, tuple, int, bool], ...]]


@dataclass
class StagingSlot:
    """Host buffers for one in-flight checkpoint, kept and reused while the layout repeats."""

    index: int
    layout: Optional[_Layout] = None
    buffers: List[torch.UntypedStorage] = field(default_factory=list)
    byte_views: List[torch.Tensor] = field(default_factory=list)
    views: List[torch.Tensor] = field(default_factory=list)
    whole_copy: List[bool] = field(default_factory=list)
    members: List[List[int]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.buffers)

    def release_memory(self) -> None:
        self.layout = None
        self.buffers = []
        self.byte_views = []
        self.views = []
        self.whole_copy = []
        self.members = []


def _byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _new_host_buffer(nbytes: int, pinned: bool) -> torch.UntypedStorage:
    if pinned:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).untyped_storage()
    return torch.UntypedStorage(nbytes)


class Stager:
    """Turns a live checkpoint into a :class:`StagedCheckpoint` inside a slot's buffers."""

    def __init__(self) -> None:
        self._cuda_stream: Any = None

    def stage(self, checkpoint: Any, slot: StagingSlot, path: str) -> StagedCheckpoint:
        started = time.perf_counter()
        skeleton, tensors = self._split(checkpoint, path)
        xla = [i for i, t in enumerate(tensors) if t.device.type == "xla"]
        if xla:
            tensors = list(tensors)
            from .xla import transfer_to_cpu

            for i, cpu_tensor in zip(xla, transfer_to_cpu([tensors[i] for i in xla])):
                tensors[i] = cpu_tensor
        staged, tensor_bytes, waiter = self._copy_into(slot, tensors)
        return StagedCheckpoint(
            skeleton=skeleton,
            tensors=staged,
            tensor_bytes=tensor_bytes,
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

    def _copy_into(
        self, slot: StagingSlot, tensors: List[torch.Tensor]
    ) -> Tuple[List[torch.Tensor], int, Optional[Callable[[], None]]]:
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
            self._plan(slot, layout, tensors)
        with torch.no_grad():
            waiter = self._copy(slot, tensors, storages)
        tensor_bytes = sum(nbytes for _, nbytes in layout[0])
        return list(slot.views), tensor_bytes, waiter

    @staticmethod
    def _plan(slot: StagingSlot, layout: _Layout, tensors: List[torch.Tensor]) -> None:
        """Allocate (or reuse by size) host buffers and build the views the writer will save."""
        spare: Dict[Tuple[int, bool], List[torch.UntypedStorage]] = {}
        for buf in slot.buffers:
            spare.setdefault((buf.nbytes(), buf.is_pinned()), []).append(buf)
        slot.release_memory()
        groups, per_tensor = layout
        buffers = []
        for device_type, nbytes in groups:
            pinned = device_type == "cuda"
            pool = spare.get((nbytes, pinned))
            buffers.append(pool.pop() if pool else _new_host_buffer(nbytes, pinned))
        spare.clear()
        members: List[List[int]] = [[] for _ in groups]
        views = []
        for i, (group, dtype, size, stride, offset, requires_grad) in enumerate(per_tensor):
            view = torch.empty(0, dtype=dtype).set_(buffers[group], offset, size, stride)
            if requires_grad:
                view.requires_grad_(True)
            views.append(view)
            members[group].append(i)
        # A storage viewed by exactly one contiguous tensor that spans it is copied tensor to
        # tensor; anything else (views, shared storage, gaps) is copied as raw bytes.
        whole_copy = []
        for group, (_, nbytes) in enumerate(groups):
            only = members[group][0] if len(members[group]) == 1 else None
            whole_copy.append(
                only is not None
                and tensors[only].is_contiguous()
                and tensors[only].storage_offset() == 0
                and tensors[only].numel() * tensors[only].element_size() == nbytes
            )
        slot.layout = layout
        slot.buffers = buffers
        slot.byte_views = [_byte_view(b) for b in buffers]
        slot.views = views
        slot.whole_copy = whole_copy
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
                torch._foreach_copy_(dst, src)
            return None
        return self._copy_from_cuda(dst, src)

    def _copy_from_cuda(self, dst: List[torch.Tensor], src: List[torch.Tensor]) -> Callable[[], None]:
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
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=s.device.type == "cuda")
                if s.device.type == "cuda":
                    s.record_stream(stream)
            event = torch.cuda.Event()
            event.record(stream)
        current.wait_event(event)
        return event.synchronize
