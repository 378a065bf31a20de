"""The engine's one lock and condition, and the two ways to wait on it: blocking (the sync
face) and awaiting without blocking the event loop (the async face).

Every piece of engine state (free slots, pending operations, errors, stats) is guarded by this
one condition; completions notify it. Waiting is written here once, so the slot pool and the
operation table (:mod:`.slots`, :mod:`.ops`) wait the same way for both faces.
"""

from __future__ import annotations

import _thread
import threading
from typing import Callable, Optional

#: Longest an abandoned waiter thread lingers after its task was cancelled.
WAIT_SLICE = 0.25


class EngineCondition(_thread.RLock):  # type: ignore[misc]
    """The engine's lock (a re-entrant one) and its condition, in one object: use it with ``with``.

    It is the lock itself, a subclass of the C ``RLock``, so that ``with cond:`` takes and
    gives back the lock in C. A ``threading.Condition``'s ``__enter__`` is Python: an
    exception a signal handler raises inside it (a Ctrl-C), once the lock is taken and before
    the ``with`` block has begun, leaves the lock held for ever, and every later call into the
    engine, and the writer, then wait for it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cv = threading.Condition(self)

    def held_here(self) -> bool:
        """Whether the calling thread holds the lock: a SIGTERM handler that interrupted this
        thread inside it must not wait for writes whose completion needs it."""
        return self._is_owned()  # the stdlib RLock's own ownership test

    def wait(self, timeout: Optional[float] = None) -> bool:
        """(held) Release, sleep until notified or ``timeout``, re-acquire."""
        return self.cv.wait(timeout)

    def notify_all(self) -> None:
        """(held) Wake every waiter."""
        self.cv.notify_all()

    async def await_until(self, ready: Callable[[], bool]) -> None:
        """Await ``ready()`` (called with the lock held) without blocking the loop.

        A worker thread sleeps on the condition, which the writer notifies on every completion.
        Cancelled, the task leaves at once; the thread sees ``abandoned`` at its next wake-up
        (at most :data:`WAIT_SLICE` later) and ends. Each wait has its own capacity limiter, so
        parked waiters never starve anyio's default thread pool (which file I/O uses).
        """
        import anyio
        from anyio import lowlevel

        with self:
            done = ready()
        if done:
            await lowlevel.checkpoint()  # still a checkpoint, as an async call should be
            return
        abandoned = threading.Event()

        def wait() -> None:
            with self:
                while not ready() and not abandoned.is_set():
                    self.cv.wait(WAIT_SLICE)

        try:
            await anyio.to_thread.run_sync(wait, abandon_on_cancel=True, limiter=anyio.CapacityLimiter(1))
        finally:
            # Not woken here: taking the lock without blocking the loop needs a bare acquire, and
            # an exception a signal handler raised as it returned left the engine's lock held for
            # ever (seen: every later call waited). The thread ends at its next slice.
            abandoned.set()
