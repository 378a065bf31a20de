"""What every stager shares: the staged checkpoint, the slot it lives in, and the collector pause.

:class:`Stager` is the one interface of the two stagers (``asyncckpt._staging.eager`` and
``asyncckpt._staging.lazy``), so the engine holds one stager and never asks which. A
:class:`StagingSlot` is host memory for one in-flight checkpoint, reused while the layout
repeats; a :class:`StagedCheckpoint` is what a stager hands the writer: the pickled skeleton,
host tensors viewing the slot's arena, and a wait for copies still landing.
:func:`collection_paused` keeps the cyclic garbage collector out of the save call.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple

import torch

from .arena import HostArena, reference_counts
from .copier import CopyPlan, ParallelCopier
from .skeleton import restore

__all__ = [
    "Layout",
    "StagedCheckpoint",
    "Stager",
    "StagingSlot",
    "VersionOwner",
    "collection_paused",
    "reset_after_fork",
]

# Per distinct storage: (device type, bytes); per tensor: (storage index, dtype, size, stride,
# offset, requires_grad); per bare storage: (storage index, dtype or None). Two saves with
# equal layouts reuse the same buffers and views.
Layout = Tuple[Tuple[Tuple[str, int], ...], Tuple[tuple, ...]]

#: For a staged tensor, another tensor whose version counter moves when it is modified (a
#: DTensor for its local tensor), or None; a wrapped IO may offer one (``version_owner``).
VersionOwner = Callable[[torch.Tensor], Optional[torch.Tensor]]


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
    # A Ctrl-C can land between any two bytecodes: the pause is counted and the collector
    # disabled with no call in between, inside the try, so whatever the handler interrupts, the
    # finally undoes exactly what was done (seen failing: an interrupt after gc.disable() and
    # before the try left the collector off for the rest of the process).
    counted = False
    try:
        with _gc_lock:
            _gc_pauses += 1
            counted = True
            if _gc_pauses == 1:
                _gc_was_enabled = gc.isenabled()
                gc.disable()
        yield
    finally:
        if counted:
            with _gc_lock:
                _gc_pauses -= 1
                if _gc_pauses == 0:
                    if _gc_was_enabled:
                        gc.enable()
                    _gc_was_enabled = False


def reset_after_fork() -> None:
    """A process forked by another thread during a save call has no such call: its collector
    runs as it did before the pause."""
    global _gc_lock, _gc_pauses, _gc_was_enabled
    _gc_lock = threading.RLock()
    if _gc_pauses:
        _gc_pauses = 0
        if _gc_was_enabled:
            gc.enable()
        _gc_was_enabled = False




@dataclass
class StagedCheckpoint:
    """A checkpoint frozen in host memory: what the writer needs, and nothing live."""

    skeleton: bytes
    tensors: List[torch.Tensor]
    tensor_bytes: int
    arena: Optional[HostArena] = None
    storages: List[torch.UntypedStorage] = field(default_factory=list)  # one per group, viewing the arena
    groups: Tuple[Tuple[int, int], ...] = ()
    specs: Tuple[tuple, ...] = ()
    staging_seconds: float = 0.0
    wait_for_copies: Optional[Callable[[], None]] = None
    # Host storage handle -> the device location torch.save records for it (empty: all CPU),
    # and the same per storage group for the writer process (None: all CPU).
    locations: Dict[int, str] = field(default_factory=dict)
    group_locations: Optional[Tuple[str, ...]] = None
    allocated_bytes: int = 0  # staging memory allocated by this save's call (0: reused)

    @classmethod
    def from_slot(
        cls, skeleton: bytes, slot: "StagingSlot", tensor_bytes: int, started: float,
        wait_for_copies: Optional[Callable[[], None]] = None, original_locations: bool = False,
    ) -> "StagedCheckpoint":
        """What a stager hands the writer once ``slot`` holds (or is receiving) the tensors.

        ``original_locations``: the wrapped IO writes with ``torch.save``, which records each
        storage's device, so the writer declares the staged storages' original devices. Other
        IOs (DCP's, which moves tensors to the CPU itself and records "cpu") get host tensors.
        """
        return cls(
            skeleton=skeleton,
            tensors=list(slot.views),
            tensor_bytes=tensor_bytes,
            arena=slot.arena,
            storages=slot.storages,
            groups=slot.groups,
            specs=slot.layout[1] if slot.layout else (),
            staging_seconds=time.perf_counter() - started,
            wait_for_copies=wait_for_copies,
            locations=slot.locations if original_locations else {},
            group_locations=slot.group_locations if original_locations else None,
            allocated_bytes=slot.allocated_bytes,
        )

    def materialize(self) -> Any:
        """Rebuild the checkpoint object with host tensors, ready for ``torch.save``."""
        self.wait()
        return restore(self.skeleton, self.tensors)

    def references(self) -> List[int]:
        """The references to the staged tensors and their storages now (see
        :func:`~asyncckpt._staging.arena.reference_counts`); call it after :meth:`wait`."""
        return reference_counts(self.tensors, self.storages)

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
    layout: Optional[Layout] = None
    arena: Optional[HostArena] = None
    groups: Tuple[Tuple[int, int], ...] = ()
    byte_views: List[torch.Tensor] = field(default_factory=list)
    storages: List[torch.UntypedStorage] = field(default_factory=list)  # per group: its window of the arena
    views: List[torch.Tensor] = field(default_factory=list)
    whole_copy: List[bool] = field(default_factory=list)
    members: List[List[int]] = field(default_factory=list)
    # Per layout, reused with it: what ``EagerStager.copy_into_slot`` copies, and the copier's split of it.
    copy_pairs: Optional[Tuple[List[Tuple[int, int]], List[torch.Tensor], bool]] = None
    copy_plan: Optional[CopyPlan] = None
    locations: Dict[int, str] = field(default_factory=dict)  # see StagedCheckpoint.locations
    group_locations: Optional[Tuple[str, ...]] = None
    # What the last save's structure was, to check the next one against (asyncckpt._staging.warm),
    # and how many saves in a row differed from it.
    warm: Optional[Any] = None
    warm_misses: int = 0
    allocated_bytes: int = 0  # arena bytes the last save's layout allocated in its call (0: reused)

    @property
    def nbytes(self) -> int:
        return self.arena.nbytes if self.arena is not None else 0

    def release_memory(self) -> None:
        self.layout = None
        self.arena = None
        self.groups = ()
        self.byte_views = []
        self.storages = []
        self.views = []
        self.whole_copy = []
        self.members = []
        self.copy_pairs = None
        self.copy_plan = None
        self.locations = {}
        self.group_locations = None
        self.warm = None


class Stager(Protocol):
    """What the engine asks of a stager, eager or lazy.

    ``copier`` copies host to host (the engine sets ``copier.threads`` and closes it);
    ``torch_save_rules`` is set by the engine when the wrapped IO writes with ``torch.save``,
    whose refusals are then raised at the call; ``defers_copies`` says that :meth:`stage` may
    return before the bytes are in the slot, and that the engine must then call :meth:`finish`
    at every guard point (a save waiting for a slot waits for such a copy too).
    """

    copier: ParallelCopier
    torch_save_rules: bool
    defers_copies: bool

    def stage(
        self, checkpoint: Any, slot: StagingSlot, key: str, version_owner: Optional[VersionOwner] = None
    ) -> StagedCheckpoint:
        """Snapshot ``checkpoint`` into ``slot``; ``key`` names it in errors."""
        ...

    def finish(self, host_sync: bool = False) -> None:
        """Finish and verify every copy :meth:`stage` left running (eager: nothing to do)."""
        ...

    def unfinished(self) -> List[Any]:
        """The deferred copies not yet finished by a guard point, oldest first (eager: none).

        Each has ``path``, ``finished`` and ``cuda_event`` (the side stream's event, or None).
        """
        ...
