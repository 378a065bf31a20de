"""``reserve()``: the staging memory of the first saves, allocated and touched ahead of them.

The request is checked on the caller's thread (:func:`check_request`); the work runs on a thread
of its own (:class:`ReservationJob`), slot by slot. The job takes every free slot at once
(:meth:`~asyncckpt._engine.slots.SlotPool.take_for_reservation`) and gives each back as soon as
it is ready, so a save that arrives meanwhile waits for the first ready slot instead of
allocating memory of its own next to the reservation's: each slot holds at most one arena at
any time, and the memory bound (``max_pending`` slots) holds throughout.
"""

from __future__ import annotations

import concurrent.futures
import logging
import operator
import threading
from typing import Any, Callable, List, Mapping, Optional, Tuple, Union

import torch

from .._staging.protocol import StagingSlot
from .._threads import start_thread
from ..errors import AsyncCheckpointError
from .slots import SlotPool, StagingBuffer, buffer_of

log = logging.getLogger("asyncckpt")

Request = Union[Mapping[str, Any], int]


def check_request(value: Any, pinned: Optional[bool], writer_kind: str) -> Tuple[Optional[Mapping[str, Any]], int]:
    """``(state, 0)`` or ``(None, nbytes)``; raises, saying what to pass instead, for anything else."""
    if isinstance(value, Mapping):
        if pinned is not None:
            raise TypeError(
                "reserve(state, pinned=...): pinned= is for a byte count; with a state, its tensors' "
                "devices decide (CUDA tensors are staged into pinned memory)"
            )
        return value, 0
    if isinstance(value, bool):
        raise TypeError(f"reserve() takes a checkpoint (a dict of state) or a byte count, got {value!r}")
    try:
        nbytes = operator.index(value)
    except TypeError:
        hint = " (pass module.state_dict(), not the module)" if isinstance(value, torch.nn.Module) else ""
        raise TypeError(
            f"reserve() takes a checkpoint (a dict of state, as given to save_checkpoint) or a byte "
            f"count (int), got {type(value).__name__}{hint}"
        ) from None
    if nbytes < 0:
        raise ValueError(f"reserve() got a negative byte count ({nbytes}); pass the checkpoint's tensor bytes")
    if pinned:
        if writer_kind == "process":
            raise ValueError(
                "reserve(pinned=True) with writer='process': that writer stages into shared memory, "
                "which is not pinned; leave pinned out"
            )
        if not torch.cuda.is_available():
            raise ValueError(
                "reserve(pinned=True) needs CUDA (pinned memory is for device-to-host copies); leave it out"
            )
    return None, nbytes


class Reservation(concurrent.futures.Future):
    """What :meth:`asyncckpt.AsyncCheckpointIO.reserve` returns: a ``concurrent.futures.Future``
    of the reserved slots' :class:`~asyncckpt._engine.slots.StagingBuffer` read-outs.

    ``result(timeout)`` waits for the memory to be ready, or raises why it could not be made
    (nothing is lost: the first save then allocates in its call, as without a reservation).
    ``slots`` is how many slots it fills. It cannot be cancelled; teardown stops it early.
    """

    def __init__(self) -> None:
        super().__init__()
        self.slots = 0  # set by the job as it takes them, before reserve() returns
        self._stop = threading.Event()
        self._settle_lock = threading.Lock()

    def settle(self, buffers: Optional[List[StagingBuffer]] = None, error: Optional[BaseException] = None) -> None:
        """Set the outcome, unless it is set already (by reserve(), for a job interrupted as
        it started, or by that job)."""
        with self._settle_lock:
            if self.done():
                return
            if error is not None:
                self.set_exception(error)
            else:
                self.set_result(buffers)

    def cancel(self) -> bool:
        return False  # the job owns the slots until it gives them back; teardown stops it

    def stop(self) -> None:
        """Ask the job to stop after the page step it is in (teardown)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"<Reservation of {self.slots} slot(s), {state}>"


class ReservationJob:
    """On a thread of its own: takes every free slot of ``pool``, fills them one by one with
    ``fill(slot, stop)``, gives each back when done (or failed), and settles ``handle``.

    The slots are taken on the job's thread, never held by the caller's: an exception a signal
    handler raises in the caller (Ctrl-C) cannot then lose them, which left every later save
    waiting for ever for slots a lost reservation was counted as holding.
    """

    def __init__(
        self,
        pool: SlotPool,
        fill: Callable[[StagingSlot, Callable[[], bool]], None],
        handle: Reservation,
    ) -> None:
        self._pool = pool
        self._fill = fill
        self._handle = handle
        self._taken = threading.Event()
        self._lock = threading.Lock()
        self._ran = False  # its thread began the job
        self._abandoned = False  # its start was interrupted before that: it never will

    def start(self) -> None:
        """Start the job; return once it holds its slots (a save made after this returns waits
        for the first one ready instead of allocating beside the reservation)."""
        start_thread(self._run, name="asyncckpt-reserve")
        self._taken.wait()

    def abandon(self) -> bool:
        """After :meth:`start` was interrupted: whether the job never ran and never will (the
        caller then settles the handle; else the job gives its slots back and settles it)."""
        with self._lock:
            self._abandoned = not self._ran
            return self._abandoned

    def _run(self) -> None:
        with self._lock:
            if self._abandoned:
                return
            self._ran = True
        handle = self._handle
        try:
            slots = self._pool.take_for_reservation()
            handle.slots = len(slots)
        except BaseException as err:  # noqa: BLE001 - the caller reads it from the handle
            handle.settle(error=err)
            return
        finally:
            self._taken.set()
        stop = handle._stop.is_set
        buffers: List[StagingBuffer] = []
        error: Optional[BaseException] = None
        for slot in slots:
            try:
                if error is None and not stop():
                    self._fill(slot, stop)
                    buffers.append(buffer_of(slot))
            except BaseException as err:  # noqa: BLE001 - settled on the handle below
                error = err
            finally:
                self._pool.give_back_reserved(slot)
        if error is None and stop():
            error = AsyncCheckpointError("the reservation of staging memory was stopped by teardown()")
        if error is not None:
            log.warning("asyncckpt: reserving staging memory failed (the first save allocates instead): %s", error)
            handle.settle(error=error)
        else:
            handle.settle(buffers)
