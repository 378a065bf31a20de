"""The queue and the writer: operations run one at a time, in the order they were submitted.

A single worker keeps the order contract trivially true: a remove queued after a save to the
same path runs after that save commits, and a save queued after a remove re-creates the file.
The writer owns the wrapped ``CheckpointIO``; :class:`ThreadWriter` runs it on a thread,
:class:`asyncckpt.process_writer.ProcessWriter` in a separate process.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Optional

from .errors import WriterDiedError

log = logging.getLogger(__name__)


@dataclass
class Operation:
    """One unit of background work: a save or a remove of ``path``.

    ``path`` is the normalized key used for ordering; ``target`` is the path exactly as the
    caller gave it, handed to the wrapped IO.
    """

    seq: int
    kind: str
    path: str
    target: Any
    on_done: Callable[["Operation", Optional[BaseException]], None]
    storage_options: Any = None
    staged: Any = field(default=None, repr=False)
    slot: Any = field(default=None, repr=False)
    wait_seconds: float = 0.0
    blocking_seconds: float = 0.0
    write_seconds: float = 0.0


def perform(checkpoint_io: Any, op: Operation, checkpoint: Any = None) -> None:
    """Run ``op`` against ``checkpoint_io``; for a save, ``checkpoint`` is the rebuilt object."""
    if op.kind == "save":
        started = time.perf_counter()
        checkpoint_io.save_checkpoint(checkpoint, op.target, storage_options=op.storage_options)
        op.write_seconds = time.perf_counter() - started
    elif op.kind == "remove":
        checkpoint_io.remove_checkpoint(op.target)
    else:
        raise ValueError(f"unknown operation kind {op.kind!r}")


class ThreadWriter:
    """A daemon thread draining a FIFO of operations.

    The thread is a daemon so that an idle writer never keeps the interpreter alive; pending
    work is drained at exit by :mod:`asyncckpt._exit`, before daemon threads are stopped.
    """

    kind = "thread"
    arena_kind = "plain"

    def __init__(self, checkpoint_io: Any, name: str = "asyncckpt-writer") -> None:
        self._io = checkpoint_io
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

    def reap(self) -> None:
        """Fail every operation still queued on a thread that is no longer running."""
        if self.alive:
            return
        with self._cv:
            lost, self._queue = list(self._queue), collections.deque()
        for op in lost:
            message = f"the asyncckpt writer thread stopped before the {op.kind} of {op.path!r}"
            op.on_done(op, WriterDiedError(message, op.path))

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
                perform(self._io, op, op.staged.materialize() if op.kind == "save" else None)
            except BaseException as err:  # noqa: BLE001 - every failure is reported, none kills the loop
                error = err
            try:
                op.on_done(op, error)
            except BaseException:  # noqa: BLE001
                log.exception("asyncckpt: internal error while completing %s of %s", op.kind, op.path)
