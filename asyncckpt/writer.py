"""The queue and the writer: operations run one at a time, in the order they were submitted.

A single worker keeps the order contract trivially true: a remove queued after a save to the
same path runs after that save commits, and a save queued after a remove re-creates the file.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Optional

log = logging.getLogger(__name__)


@dataclass
class Operation:
    """One unit of background work: a save or a remove of ``path``."""

    seq: int
    kind: str
    path: str
    run: Callable[[], Any]
    on_done: Callable[["Operation", Optional[BaseException]], None]
    context: Any = field(default=None, repr=False)
    result: Any = field(default=None, repr=False)


class ThreadWriter:
    """A daemon thread draining a FIFO of operations.

    The thread is a daemon so that an idle writer never keeps the interpreter alive; pending
    work is drained at exit by :mod:`asyncckpt._exit`, before daemon threads are stopped.
    """

    kind = "thread"

    def __init__(self, name: str = "asyncckpt-writer") -> None:
        self._name = name
        self._queue: Deque[Operation] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        with self._cv:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, op: Operation) -> None:
        with self._cv:
            if self._stopping:
                raise RuntimeError("the writer is stopping; it takes no more operations")
            self._queue.append(op)
            self._cv.notify()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Finish what is queued, then end the thread; returns whether it ended in time."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if not self._queue:
                    return
                op = self._queue.popleft()
            error: Optional[BaseException] = None
            try:
                op.result = op.run()
            except BaseException as err:  # noqa: BLE001 - every failure is reported, none kills the loop
                error = err
            try:
                op.on_done(op, error)
            except BaseException:  # noqa: BLE001
                log.exception("asyncckpt: internal error while completing %s of %s", op.kind, op.path)
