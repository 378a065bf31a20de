"""The engine's one lock and condition, and the two ways to wait on it: blocking (the sync
face) and awaiting without blocking the event loop (the async face).

Every piece of engine state (free slots, pending operations, errors, stats) is guarded by this
one condition; completions notify it. Waiting is written here once, so the slot pool and the
operation table (:mod:`.slots`, :mod:`.ops`) wait the same way for both faces.
"""

from __future__ import annotations

import _thread
import threading
from typing import Any, Callable, Optional

#: Longest an abandoned waiter thread lingers after its task was cancelled.
WAIT_SLICE = 0.25


class EngineLock(_thread.RLock):  # type: ignore[misc]
    """The engine's lock, able to tell whether the calling thread holds it: a SIGTERM handler
    that interrupted this thread inside it must not wait for writes whose completion needs it."""

    def held_here(self) -> bool:
        return self._is_owned()  # the stdlib RLock's own ownership test


class EngineCondition:
    """A ``threading.Condition`` over an :class:`EngineLock` (use it with ``with``)."""

    def __init__(self) -> None:
        self.lock = EngineLock()
        self.cv = threading.Condition(self.lock)

    def __enter__(self) -> "EngineCondition":
        self.cv.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cv.__exit__(*exc)

    def held_here(self) -> bool:
        """Whether the calling thread holds the lock."""
        return self.lock.held_here()

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

        with self.cv:
            done = ready()
        if done:
            await lowlevel.checkpoint()  # still a checkpoint, as an async call should be
            return
        abandoned = threading.Event()

        def wait() -> None:
            with self.cv:
                while not ready() and not abandoned.is_set():
                    self.cv.wait(WAIT_SLICE)

        try:
            await anyio.to_thread.run_sync(wait, abandon_on_cancel=True, limiter=anyio.CapacityLimiter(1))
        finally:
            abandoned.set()
            if self.cv.acquire(blocking=False):  # wake it now if that costs the loop nothing
                try:
                    self.cv.notify_all()
                finally:
                    self.cv.release()
