"""The staging slots and THE admission rule, for both faces of the engine.

A save needs a free staging slot (host memory it copies into, freed when its write completes),
so ``max_pending`` bounds staging memory. :class:`SlotPool` owns the free list and decides, in
one order for the sync and the async face: a pending background error is raised first, then a
free slot is taken, then ``when_full="raise"`` raises :class:`QueueFullError`, else the caller
waits (blocking, or awaiting without blocking the loop) and tries again.

With ``staging="lazy"`` the writer frees a slot only once a guard point has verified its copy,
and a copy that another thread started after this save's own guard point has no other guard in
sight: a waiter finishes it, and wakes for each one started while it waits
(:meth:`SlotPool.note_copy_started`), so that a save never waits on a copy nobody will finish.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple, Union

from .._staging.protocol import StagingSlot
from ..errors import QueueFullError
from .condition import EngineCondition


@dataclass(frozen=True)
class StagingBuffer:
    """A read-out of one staging slot's host memory (see :meth:`SlotPool.buffers`)."""

    slot: int  # the slot's index, stable for the engine's life
    arena_id: Optional[int]  # None: no memory held
    kind: Optional[str]  # "plain", "pinned" or "shared"
    nbytes: int
    pinned: bool
    data_ptrs: Tuple[int, ...]  # of the views the last save staged into
    reserved: bool = False  # made by ``reserve()`` (a save may adopt it; see asyncckpt._staging.arena.adoptable)


_ERRORS_PENDING = object()


class SlotHold:
    """The slot one save holds, from the instant it leaves the free list until the save's
    operation takes it over (then ``slot`` is None again).

    Each move is one step no signal handler can split (CPython runs them when a call returns,
    at a function's start and at a loop's jump: a store followed by the call that makes the
    move has no such point between them): a slot goes into the hold just before it leaves the
    free list, out of it just before it joins the free list again, and the writer empties the
    hold just before it queues the operation. An exception a handler raises anywhere in a save
    (a Ctrl-C) finds the slot free, here, or owned by an operation, and
    :meth:`SlotPool.release_hold` gives back the one held here. A slot lost between two of
    these would make every later save wait for it for ever.
    """

    __slots__ = ("slot",)

    def __init__(self, slot: Optional[StagingSlot] = None) -> None:
        self.slot = slot


class SlotPool:
    """The free staging slots; shares the engine's condition.

    ``errors`` is the engine's error inbox (``pending`` read with the lock held, ``raise_first()``
    raises and clears); ``finish_lazy`` finishes the engine's lazy copy (a guard point), or None.
    """

    def __init__(
        self,
        cond: EngineCondition,
        count: int,
        arena_kind: str,
        when_full: str,
        errors: Any,
        finish_lazy: Optional[Callable[[], None]] = None,
    ) -> None:
        self._cond = cond
        self._free: List[StagingSlot] = [StagingSlot(i, arena_kind) for i in range(count)]
        self._count = count
        self._when_full = when_full
        self._errors = errors
        self._finish_lazy = finish_lazy or (lambda: None)
        self._copies_started = 0  # lazy copies started; under the lock
        self._slots = list(self._free)  # every slot, free or not, in index order
        self._reserving = 0  # slots a reservation holds; under the lock

    # -- the rule -------------------------------------------------------------------------

    def poll(
        self, key: str, hint: str, when_full: Optional[str] = None, hold: Optional[SlotHold] = None
    ) -> Union[StagingSlot, object, int]:
        """(lock held) One look at the rule: a slot taken (and put in ``hold``), ``_ERRORS_PENDING``,
        or (to wait) the count of lazy copies started so far. Raises :class:`QueueFullError` in
        ``raise`` mode (``when_full``, or the pool's own)."""
        if self._errors.pending:
            return _ERRORS_PENDING
        if self._free:
            return self._take(key, hold)
        if (when_full or self._when_full) == "raise" and not self._reserving:
            # (a slot a reservation holds is not full of a checkpoint: it comes back soon, ready)
            raise QueueFullError(
                f"cannot save {key!r}: all {self._count} staging slots hold checkpoints "
                f"still being written; {hint}, raise max_pending, or use when_full='wait'",
                key,
            )
        return self._copies_started

    def ready(self, started: int) -> bool:
        """(lock held) Whether to look again: a slot freed, an error arrived, or a lazy copy
        started since ``started``."""
        return bool(self._free) or bool(self._errors.pending) or self._copies_started != started

    def acquire(
        self, key: str, *, hold: SlotHold, hint: str = "call flush()", when_full: Optional[str] = None
    ) -> StagingSlot:
        """Take a free slot, waiting while all are busy (every slot is held by an operation that
        frees it when it completes, and a writer's death completes its operations too);
        ``when_full`` overrides the pool's policy for this call. The slot is in ``hold`` from the
        instant it leaves the free list (a bare slot returned could be lost to an exception a
        signal handler raises as this returns); give it back with :meth:`release_hold`."""
        while True:
            with self._cond:
                got = self.poll(key, hint, when_full, hold)
            if isinstance(got, StagingSlot):
                return got
            if got is _ERRORS_PENDING:
                self._errors.raise_first()
                continue  # another thread raised them first
            self._finish_lazy()
            with self._cond:
                if not self.ready(got):  # type: ignore[arg-type]
                    self._cond.wait()

    async def aacquire(self, key: str, *, hold: SlotHold, hint: str = "await aflush()") -> StagingSlot:
        """As :meth:`acquire`, awaiting without blocking the loop; holds nothing when cancelled."""
        while True:
            with self._cond:
                got = self.poll(key, hint, hold=hold)
            if isinstance(got, StagingSlot):
                return got
            if got is _ERRORS_PENDING:
                self._errors.raise_first()
                continue
            self._finish_lazy()
            await self._cond.await_until(lambda started=got: self.ready(started))  # type: ignore[misc]

    def _take(self, key: str, hold: Optional[SlotHold]) -> StagingSlot:
        """(lock held) The slot that last staged ``key`` if free, since a path usually keeps its
        layout (two checkpoints saved in turn keep a slot each); else the most recently freed."""
        index = len(self._free) - 1
        for i in range(len(self._free) - 1, -1, -1):
            if self._free[i].last_key == key:
                index = i
                break
        slot = self._free[index]
        # Into the hold, then off the free list, with no call between them: a signal handler
        # runs only at a call's return (or a loop's jump), so it finds the slot in one or both.
        if hold is not None:
            hold.slot = slot
        del self._free[index]
        return slot

    # -- reservations ---------------------------------------------------------------------

    def take_for_reservation(self) -> List[StagingSlot]:
        """Take every free slot for a reservation (slots holding a checkpoint being written keep
        their memory). A save arriving meanwhile waits for the first one given back, whatever
        ``when_full``: it then finds its memory ready, and no slot is ever filled twice at once."""
        with self._cond:
            taken = sorted(self._free, key=lambda s: s.index)
            self._free.clear()
            self._reserving += len(taken)
            return taken

    def give_back_reserved(self, slot: StagingSlot) -> None:
        """A reservation is done with ``slot``: free again, and the waiters woken."""
        with self._cond:
            self._reserving -= 1
            self._free.append(slot)
            self._cond.notify_all()

    # -- giving back, and read-outs -------------------------------------------------------

    def release(self, slot: StagingSlot) -> None:
        """Give ``slot`` back and wake the waiters (as :meth:`release_hold` does)."""
        self.release_hold(SlotHold(slot))

    def release_hold(self, hold: SlotHold) -> None:
        """Give back the slot ``hold`` holds, if any (once, however often this is called)."""
        with self._cond:
            slot = hold.slot
            if slot is None:
                return
            try:
                self._cond.notify_all()  # first: the waiters take the lock only once this returns
            except BaseException:
                # A signal handler's exception in the notify or as it returned: the slot goes
                # back all the same (nothing may call this again), and every waiter is woken.
                hold.slot = None
                self._free.append(slot)
                self._cond.notify_all()
                raise
            # Out of the hold and onto the free list with no call between them (the append
            # is the call): a signal handler's exception finds it in one place only.
            hold.slot = None
            self._free.append(slot)

    def release_locked(self, slot: StagingSlot) -> None:
        """(lock held) Give ``slot`` back; the caller notifies."""
        self._free.append(slot)

    def note_copy_started(self) -> None:
        """A lazy copy started: wake the waiters, which finish it (see the module docstring)."""
        with self._cond:
            self._copies_started += 1
            self._cond.notify_all()

    @property
    def free_count(self) -> int:
        with self._cond:
            return len(self._free)

    def free_slots(self) -> List[StagingSlot]:
        """The free slots themselves (lock taken)."""
        with self._cond:
            return list(self._free)

    def buffers(self) -> List[StagingBuffer]:
        """A read-out of the free slots' host memory, in slot order (lock taken)."""
        with self._cond:
            slots = sorted(self._free, key=lambda s: s.index)
            return [buffer_of(s) for s in slots]

    def held_bytes(self) -> int:
        """Staging memory every slot holds now, free, busy or being reserved (lock taken)."""
        with self._cond:
            return sum(slot.nbytes for slot in self._slots)

    def release_memory(self) -> None:
        """Free the host memory of every free slot (teardown)."""
        with self._cond:
            for slot in self._free:
                slot.release_memory()


def buffer_of(slot: StagingSlot) -> StagingBuffer:
    """A read-out of ``slot``'s host memory (the caller holds the slot, or the lock)."""
    arena = slot.arena
    tensor = getattr(arena, "tensor", None)
    return StagingBuffer(
        slot=slot.index,
        arena_id=None if arena is None else arena.id,
        kind=None if arena is None else arena.kind,
        nbytes=slot.nbytes,
        pinned=bool(tensor is not None and tensor.is_pinned()),
        data_ptrs=tuple(v.data_ptr() for v in (slot.views or ())),
        reserved=bool(arena is not None and arena.reserved),
    )
