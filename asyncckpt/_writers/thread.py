"""The thread writer: a daemon thread that performs operations in FIFO order, in this process."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Deque, Optional

from .._threads import signals_as_the_process, start_thread
from ..errors import WriterDiedError
from .base import (
    Operation,
    WriterGoneError,
    failed_save_before,
    lower_this_threads_priority,
    perform,
    perform_save,
    skipped_removal,
)

log = logging.getLogger("asyncckpt.writer")  # the logger's name from before the move: users may configure it


class ThreadWriter:
    """A daemon thread draining a FIFO of operations.

    The thread is a daemon so that an idle writer never keeps the interpreter alive; pending
    work is drained at exit by :mod:`asyncckpt._exit`, before daemon threads are stopped.
    An ``Exception`` from the wrapped IO fails that operation only; anything else that ends
    the thread (a ``SystemExit`` or ``KeyboardInterrupt`` raised in it) completes every
    operation it took with :class:`WriterDiedError`, so no waiter is left hanging.
    """

    kind = "thread"
    arena_kind = "plain"

    def __init__(self, checkpoint_io: Any, name: str = "asyncckpt-writer", nice: int = 0) -> None:
        self._io = checkpoint_io
        self._name = name
        self._nice = nice
        self._queue: Deque[Operation] = collections.deque()
        # ``with self._lock``, not ``with self._cv``: a Condition's ``__enter__`` is Python, and
        # an exception a signal handler raises inside it, once the lock is taken, leaves it held.
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._stopping = False
        self._dead = False
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = start_thread(self._loop, name=self._name)

    @property
    def alive(self) -> bool:
        return not self._dead and not self._stopping and self._thread is not None and self._thread.is_alive()

    pid = None
    sentinel = None

    def wait_exited(self, timeout: Optional[float] = None) -> bool:
        """Wait until the writer thread has ended; whether it has."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def submit(self, op: Operation) -> None:
        with self._lock:
            if self._dead or self._stopping or self._thread is None:
                raise WriterGoneError("the writer thread is not running; it takes no more operations")
            # The wake-up first (the writer runs only once this lock is left), then the queueing
            # as the take-over's last step: an exception a signal handler raises at any point
            # leaves the operation queued and its writer woken, or neither.
            self._cv.notify()
            op.take_over(self._queue.append, op)

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Finish what is queued, then end the thread; returns whether it ended in time."""
        with self._lock:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _loop(self) -> None:
        op: Optional[Operation] = None
        cause: Optional[BaseException] = None
        try:
            if self._nice:
                try:
                    lower_this_threads_priority(self._nice)
                except OSError as err:  # e.g. a sandbox that forbids setpriority: write anyway
                    log.warning("asyncckpt: the writer thread keeps its priority (writer_nice not applied: %s)", err)
            while True:
                with self._lock:
                    while not self._queue and not self._stopping:
                        self._cv.wait()
                    if not self._queue:
                        return
                    op = self._queue.popleft()
                error: Optional[BaseException] = None
                try:
                    if op.kind == "remove":
                        failed = failed_save_before(op.after)
                        if failed is not None:
                            raise skipped_removal(op, failed)
                    # the wrapped IO is user code: what it starts must answer signals as usual
                    if op.kind == "save":
                        perform_save(self._io, op, signals_as_the_process)
                    else:
                        with signals_as_the_process():
                            perform(self._io, op)
                except Exception as err:  # noqa: BLE001 - reported through the operation
                    error = err
                op.complete(error)
                op = None
        except BaseException as err:  # noqa: BLE001 - the thread ends; the cause goes with each failure
            cause = err
        finally:
            with self._lock:
                self._dead = True
                lost = ([op] if op is not None else []) + list(self._queue)
                self._queue.clear()
            for item in lost:
                died = WriterDiedError(
                    f"the asyncckpt writer thread stopped ({type(cause).__name__ if cause else 'ended'}) "
                    f"before finishing the {item.kind} of {item.path!r}; the engine starts a new "
                    "writer for the next operation",
                    item.path,
                )
                died.__cause__ = cause
                item.complete(died)
