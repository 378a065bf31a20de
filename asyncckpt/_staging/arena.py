"""Staging memory: one block of host memory per slot (an arena), and the tensors viewing it.

``torch.save`` writes each storage as its own record, so the staged tensors of one source
storage get a storage of their own, a window of the arena, and the file holds one record per
source storage, exactly as it would for the live tensors.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import mmap
import operator
import os
import sys
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

ALIGN = 64

#: Pages first touched per step of :meth:`HostArena.fault_in`, between looks at its ``stop``.
FAULT_IN_STEP = 64 * 1024 * 1024


def headroom(nbytes: int) -> int:
    """Room a reservation of ``nbytes`` adds: 1/64 of it plus 1 MiB.

    A reservation is made before the exact checkpoint exists (a byte count; or, in a framework,
    the model and optimizer state without the few small tensors its checkpoint adds): the room
    covers 64-byte alignment of up to 16,384 storages plus small additions, so that the first
    save fits into it.
    """
    return nbytes // 64 + (1 << 20)


def adoptable(arena_nbytes: int, needed: int) -> bool:
    """Whether a save needing ``needed`` bytes keeps a reserved arena of ``arena_nbytes``: big
    enough, and at most twice :func:`headroom` bigger. A reservation of ``n`` bytes then serves
    a checkpoint from about ``n - headroom(n)`` to ``n + headroom(n)``, and a slot never holds
    more than ``needed * 33/32 + 2 MiB``: the memory bound stays one checkpoint a slot."""
    return needed <= arena_nbytes <= needed + 2 * headroom(needed)


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
        #: Made by a reservation and not yet planned by a save: a save may adopt it when it is
        #: big enough, within :func:`adoptable` (an arena a save made is kept at its exact size).
        self.reserved = False
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
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=True)
        else:
            # on the CPU whatever torch.set_default_device says (a staging copy on the GPU, or
            # on "meta", would hold nothing the writer can write)
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, device="cpu")

    def fault_in(self, stop: Optional[Callable[[], bool]] = None) -> bool:
        """Touch every page now, so that the first copy into the arena finds them mapped.

        Fresh memory is mapped page by page on first write (a memfd's costs more), inside the
        save call that first copies into it. Written with ``memset`` through ctypes, which
        releases the GIL and starts no torch thread pool. Pinned memory is resident already.
        Returns False if ``stop()`` said to stop between two steps of :data:`FAULT_IN_STEP`.
        """
        if self.kind == "pinned" or not self.nbytes:
            return True
        address = self.tensor.data_ptr()
        for start in range(0, self.nbytes, FAULT_IN_STEP):
            if stop is not None and stop():
                return False
            ctypes.memset(address + start, 0, min(FAULT_IN_STEP, self.nbytes - start))
        return True

    def close_fd(self) -> None:
        """The writer process has its own mapping; the descriptor is no longer needed here."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        if getattr(self, "fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)


def plan_groups(
    sizes: Sequence[int], classes: Optional[Sequence[Optional[Hashable]]] = None
) -> Tuple[Tuple[Tuple[int, int], ...], int]:
    """``(offset, nbytes)`` per storage, and the arena size they need.

    Each storage starts at a multiple of :data:`ALIGN`, except the storages of one packing class
    (``classes[i]``, not None; see :func:`asyncckpt._staging.layout.packing_classes`): those lie
    back to back, in order, in one run that starts at such a multiple, so that one copy fills
    the run. A class holds one dtype, so each of its storages starts at a multiple of its
    element size.
    """
    offsets = [0] * len(sizes)
    runs: Dict[Hashable, List[int]] = {}
    total = 0
    for i, nbytes in enumerate(sizes):
        key = classes[i] if classes is not None else None
        if key is None:
            offsets[i] = total
            total += (nbytes + ALIGN - 1) // ALIGN * ALIGN
        else:
            runs.setdefault(key, []).append(i)
    for members in runs.values():
        for i in members:
            offsets[i] = total
            total += sizes[i]
        total = (total + ALIGN - 1) // ALIGN * ALIGN
    return tuple(zip(offsets, sizes, strict=True)), total


def storages_in(base: torch.Tensor, groups: Sequence[Tuple[int, int]], owner: Any) -> List[torch.UntypedStorage]:
    """One distinct storage per ``(offset, nbytes)`` range of ``base``, without copying.

    Each storage keeps ``owner`` (the object that owns ``base``'s memory: the arena, or the
    writer process's mapping) alive, so a staged tensor that escapes (kept by a wrapped IO, or by
    a failed save's traceback) never reads freed memory.
    """
    address = base.data_ptr()
    storages = []
    for offset, nbytes in groups:
        if nbytes == 0:
            storages.append(torch.UntypedStorage(0))
            continue
        window = (ctypes.c_char * nbytes).from_address(address + offset)
        window.owner = owner  # torch.frombuffer keeps ``window`` alive, and it keeps ``owner``
        storages.append(torch.frombuffer(window, dtype=torch.uint8).untyped_storage())
    return storages


#: Dtypes that torch treats as quantized values: ``torch.empty(0, dtype=torch.qint8)`` is a
#: quantized tensor without a quantizer, which ``torch.save`` refuses, and a copy into such a
#: tensor is a quantizing copy. A dense tensor of one of these dtypes (a byte view as
#: ``torch.qint8``, which ``torch.save`` writes) is staged as bytes and rebuilt as such a view
#: (the integer dtype of the same size, then ``.view(dtype)``).
QUANTIZED_DTYPES = {
    getattr(torch, name): getattr(torch, plain)
    for name, plain in (
        ("qint8", "int8"),
        ("quint8", "uint8"),
        ("qint32", "int32"),
        ("quint4x2", "uint8"),
        ("quint2x4", "uint8"),
    )
    if hasattr(torch, name)
}


def build_views(storages: Sequence[torch.UntypedStorage], specs: Sequence[tuple]) -> List[Any]:
    """The staged items: each tensor spec ``(group, dtype, size, stride, offset, requires_grad)`` as
    a view, each storage spec ``(group, dtype or None)`` as a typed (or untyped) storage."""
    views: List[Any] = []
    for spec in specs:
        if len(spec) == 2:
            group, dtype = spec
            storage: Any = storages[group]
            if dtype is not None:
                storage = torch.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
            views.append(storage)
            continue
        group, dtype, size, stride, offset, requires_grad = spec
        plain = QUANTIZED_DTYPES.get(dtype)
        if plain is None:
            view = torch.empty(0, dtype=dtype, device=storages[group].device)
            view.set_(storages[group], offset, size, stride)
        else:
            view = (
                torch.empty(0, dtype=plain, device=storages[group].device)
                .set_(storages[group], offset, size, stride)
                .view(dtype)
            )
        if requires_grad:
            view.requires_grad_(True)
        views.append(view)
    return views


#: torch's count of the references to a storage (tensors and storage objects viewing it); a
#: private function of torch's, registered in CPU-only builds only since pytorch#131881 (None:
#: the staged tensors' Python references alone are counted).
_storage_use_count: Optional[Callable[[int], int]] = getattr(torch._C, "_storage_Use_Count", None)
_handle = operator.attrgetter("_cdata")


def _is_tensor(item: Any) -> bool:
    return isinstance(item, torch.Tensor)


def reference_counts(items: Sequence[Any], storages: Sequence[torch.UntypedStorage]) -> List[int]:
    """The references to each staged item and each staging storage now.

    Taken before and after a wrapped IO's ``save_checkpoint``, once the checkpoint it was given
    is dropped: a count that grew (:func:`grew`) means the IO kept something that views the
    staging memory (the checkpoint, a tensor of it, a ``detach()``, a slice or ``.numpy()`` of
    one), which the next save into the slot would overwrite. The Python references to storage
    objects are not counted: ``torch.save`` of torch 2.9 leaks one to each storage it writes
    (measured: +1 per save), which would read as kept at every save.
    """
    counts = list(map(sys.getrefcount, filter(_is_tensor, items)))
    if _storage_use_count is not None:
        counts.extend(map(_storage_use_count, map(_handle, storages)))
    return counts


def grew(before: Sequence[int], after: Sequence[int]) -> bool:
    """Whether any count of :func:`reference_counts` is higher ``after`` than ``before``."""
    return any(map(operator.lt, before, after))


#: Set once a whole-heap collection failed to clear a grown count: the wrapped IO really keeps
#: what it was given, and a whole-heap collection after each of its saves (0.4-0.5 s holding the
#: GIL in a large training process) would find the same; only the young generations then.
_whole_heap_found_nothing = False


def still_referenced(before: Sequence[int], counts: Callable[[], Sequence[int]]) -> bool:
    """Whether the counts ``counts()`` gives are still higher than ``before`` once the objects
    only reference cycles hold are gone.

    A checkpoint whose objects form a cycle (a list holding itself, an object pointing back at
    its owner) is rebuilt with that cycle, and its tensors stay referenced until the cyclic
    collector runs: that is not the wrapped IO keeping them. The young generations are collected
    first (the rebuilt objects are new); the whole heap only if that was not enough, and only
    until once it was not enough either. Nothing is collected unless the counts grew.
    """
    global _whole_heap_found_nothing
    if not grew(before, counts()):
        return False
    gc.collect(1)
    if not grew(before, counts()):
        return False
    if _whole_heap_found_nothing:
        return True
    gc.collect()
    if not grew(before, counts()):
        return False
    _whole_heap_found_nothing = True
    return True


def byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over the whole of ``storage``."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
