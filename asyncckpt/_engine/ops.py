"""What the engine knows of its operations: the pending ones, the last one per path, the
failures not yet raised, and the measurements of completed saves.

:class:`OpTable` counts an operation from its hand-over to its completion, and is what
``flush``, ``load_checkpoint``, ``wait_for_path`` and the exit drain wait on (blocking or
awaiting, one rule for both faces). :class:`ErrorInbox` holds background failures until the next
call into the engine raises them, once. :class:`StatsLog` keeps the last measurements.
:class:`SaveHandle` is what a save returns: a Future of that one save.
All three share the engine's condition.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional

from .._writers.base import Operation
from ..errors import FlushTimeoutError, RemoveSkippedError
from ..redaction import shown
from ..stats import SaveStats
from .condition import EngineCondition

STATS_KEPT = 1000


def wait_limit(seconds: Optional[float]) -> Optional[float]:
    """``seconds`` as a timeout for a thread's wait: None (no limit) beyond what one can wait
    (``exit_timeout=float("inf")``), where the wait would raise ``OverflowError``."""
    if seconds is not None and seconds >= threading.TIMEOUT_MAX:
        return None
    return seconds


class OpTable:
    """Operations handed to the writer and not yet complete (by sequence number), and per path
    key the last of them. ``finish_lazy`` is the engine's guard point, run before any wait: the
    writer waits for a lazy copy to be verified at one."""

    def __init__(self, cond: EngineCondition, finish_lazy: Optional[Callable[[], None]] = None) -> None:
        self._cond = cond
        self._finish_lazy = finish_lazy or (lambda: None)
        self._ops: Dict[int, Operation] = {}
        self._last: Dict[str, Operation] = {}
        self._seq = 0

    # -- bookkeeping (lock held) ----------------------------------------------------------

    def next_seq(self) -> int:
        """(lock held) The next sequence number."""
        self._seq += 1
        return self._seq

    def count(self, op: Operation) -> None:
        """(lock held) Count ``op`` as pending, unless a fast writer finished it already.

        Listed before the look at whether it is done: an exception a signal handler raises as
        that look returns leaves it listed (a done operation listed is waited for at once), not
        unlisted while it runs (flush would not wait for it). Counted after the hand-over lock
        is left, it may come after a later operation on the same path from another thread: that
        one stays the last. Counting it again changes nothing.
        """
        self._ops[op.seq] = op
        last = self._last.get(op.path)
        if last is None or last.seq <= op.seq:
            self._last[op.path] = op
        if op.done():
            self.forget(op)

    def forget(self, op: Operation) -> None:
        """(lock held) ``op`` completed."""
        self._ops.pop(op.seq, None)
        if self._last.get(op.path) is op:
            del self._last[op.path]

    def pending_saves(self) -> List[Operation]:
        """(lock held) The saves still pending, in submission order."""
        return [op for op in self._ops.values() if op.kind == "save"]

    def all_forgotten(self, ops: Iterable[Operation]) -> bool:
        """(lock held) Whether each of ``ops`` has completed and been forgotten."""
        return all(op.seq not in self._ops for op in ops)

    def keys(self) -> List[str]:
        """(lock held) The path keys of the pending operations."""
        return [op.path for op in self._ops.values()]

    # -- read-outs (lock taken) -----------------------------------------------------------

    def pending(self) -> List[Operation]:
        """The operations handed over and not yet complete, in submission order."""
        with self._cond:
            return list(self._ops.values())

    def __len__(self) -> int:
        with self._cond:
            return len(self._ops)

    def last_on(self, key: str) -> Optional[Operation]:
        """The last pending operation on ``key``, or None."""
        with self._cond:
            return self._last.get(key)

    # -- waiting --------------------------------------------------------------------------

    def guard_point(self) -> None:
        """Finish and verify the engine's lazy copy, if any (see :mod:`asyncckpt.lazy`): the
        writer waits for a lazy copy to be verified at a guard point before it writes."""
        self._finish_lazy()

    def wait(self, ops: Iterable[Operation], timeout: Optional[float]) -> None:
        """Wait for each of ``ops`` to complete; :class:`FlushTimeoutError` after ``timeout`` s.

        No polling: each operation is completed by its writer, or failed by the writer's death
        (the process writer's reply reader sees the pipe close; the thread writer's loop fails
        what it took on its way out).
        """
        self._finish_lazy()
        ops = list(ops)
        timeout = wait_limit(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        for i, op in enumerate(ops):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not op.wait(left):
                still = sum(1 for later in ops[i:] if not later.done())
                raise FlushTimeoutError(
                    f"flush timed out after {timeout}s with {still} operation(s) pending", None
                )

    def wait_path(self, key: str, timeout: Optional[float] = None) -> None:
        """Wait until every operation queued on ``key`` has taken effect."""
        op = self.last_on(key)
        if op is not None:
            self.wait([op], timeout)

    async def await_done(self, ops: List[Operation]) -> None:
        """Await ``ops`` (each one handed over, so the table forgets it when it completes)."""
        self._finish_lazy()
        await self._cond.await_until(lambda: self.all_forgotten(ops))

    async def await_path(self, key: str) -> None:
        op = self.last_on(key)
        if op is not None:
            await self.await_done([op])


class ErrorInbox:
    """Background failures not yet raised, and the failed saves among them (a remove submitted
    meanwhile depends on them: see ``writer.failed_save_before``)."""

    def __init__(self, cond: EngineCondition) -> None:
        self._cond = cond
        self._errors: List[BaseException] = []
        self._failed_saves: List[Operation] = []

    @property
    def pending(self) -> int:
        """How many failures wait to be raised (a peek)."""
        return len(self._errors)

    def put(self, error: BaseException, failed_save: Optional[Operation] = None) -> None:
        """(lock held) File ``error``; ``failed_save`` is its save, if it was one."""
        self._errors.append(error)
        if failed_save is not None:
            self._failed_saves.append(failed_save)

    def put_first(self, error: BaseException) -> None:
        """File ``error`` ahead of the others (lock taken)."""
        with self._cond:
            self._errors.insert(0, error)

    def failed_saves(self) -> List[Operation]:
        """(lock held) The failed saves not yet raised."""
        return list(self._failed_saves)

    def errors(self) -> List[BaseException]:
        """The failures filed, not cleared (lock taken)."""
        with self._cond:
            return list(self._errors)

    def take(self) -> Optional[BaseException]:
        """The first failure not yet raised (the later ones noted on it), cleared."""
        with self._cond:
            if not self._errors:
                return None
            errors, self._errors = self._errors, []
            self._failed_saves = []
        first = errors[0]
        for later in errors[1:]:
            first.add_note(str(later) if isinstance(later, RemoveSkippedError) else f"also failed: {later}")
        return first

    def raise_first(self) -> None:
        """Raise :meth:`take`'s failure, if any."""
        error = self.take()
        if error is not None:
            raise error


class StatsLog:
    """Measurements of the last :data:`STATS_KEPT` completed saves."""

    def __init__(self, cond: EngineCondition) -> None:
        self._cond = cond
        self._stats: Deque[SaveStats] = collections.deque(maxlen=STATS_KEPT)

    def add(self, stats: SaveStats) -> None:
        """(lock held) Record one save's measurements."""
        self._stats.append(stats)

    def all(self) -> List[SaveStats]:
        with self._cond:
            return list(self._stats)


class SaveHandle(concurrent.futures.Future):
    """What ``save_checkpoint`` and ``asave_checkpoint`` return: a ``concurrent.futures.Future``
    of one save (DCP's ``async_save`` returns a Future too).

    ``path`` is the path as it may be shown (credentials redacted), ``bytes`` the tensor bytes
    staged, ``timings`` the save's :class:`~asyncckpt.SaveStats` once it is written (None until
    then). ``result(timeout)`` returns those stats or raises the save's failure;
    ``exception(timeout)``, ``done()`` and ``add_done_callback()`` are ``Future``'s;
    :meth:`wait` waits without raising. A save cannot be cancelled once queued: ``cancel()``
    returns False.

    The failure is the same object the engine raises once from its next call: looking at it here
    does not consume it (the engine's error contract stays as it is). A synchronous save (one
    made during interpreter exit, or inside another save) returns a handle already completed.
    The handle keeps only the path, sizes and timings, never the staged buffers.
    """

    def __init__(self, path: Any, nbytes: int = 0) -> None:
        super().__init__()
        self.path: Any = shown(path)
        self.bytes = int(nbytes)
        self.timings: Optional[SaveStats] = None

    def cancel(self) -> bool:
        return False

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the save is written or has failed; False when ``timeout`` s passed first."""
        done, _ = concurrent.futures.wait([self], timeout=wait_limit(timeout))
        return self in done

    def settle(self, stats: Optional[SaveStats], error: Optional[BaseException]) -> None:
        """Complete the handle: with the save's stats, or its (already wrapped) failure."""
        if error is not None:
            self.set_exception(error)
            return
        self.timings = stats
        self.set_result(stats)

    @classmethod
    def completed(cls, path: Any, stats: Optional[SaveStats]) -> "SaveHandle":
        """A handle for a save already written at the call."""
        handle = cls(path, stats.tensor_bytes if stats is not None else 0)
        handle.settle(stats, None)
        return handle

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self.exception() is not None else "written")
        return f"SaveHandle({self.path!r}, {state})"
