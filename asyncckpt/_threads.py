"""Threads that leave the process's signals to the main thread.

A signal sent to the process (``kill PID``, SLURM's SIGTERM, Ctrl-C's SIGINT) is delivered by the
kernel to any one thread that does not block it. CPython runs Python signal handlers only on the
main thread: when the kernel picks one of our threads, the handler is merely flagged, and a main
thread blocked in one long C call (``time.sleep``, a ``select``, a collective) is not woken, so
the handler (our SIGTERM drain, a user's own) runs late or never. Every thread asyncckpt starts
therefore starts with the asynchronous signals blocked, and the kernel delivers them to a thread
that can act on them. Signals raised by a fault in the thread itself (SIGSEGV, SIGBUS, SIGFPE,
SIGILL, SIGTRAP, SIGSYS, SIGABRT) and SIGPIPE stay unblocked: blocking those hides the fault.
"""

from __future__ import annotations

import _thread
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

# Raised by the thread that caused them; blocking them would turn a crash report into a hang.
_SYNCHRONOUS = {
    getattr(signal, name)
    for name in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGTRAP", "SIGSYS", "SIGABRT", "SIGPIPE")
    if hasattr(signal, name)
}

CAN_BLOCK = hasattr(signal, "pthread_sigmask")

#: Blocked on our threads (SIGKILL and SIGSTOP cannot be blocked; the kernel ignores them here).
KEPT_FOR_MAIN: frozenset = frozenset(signal.valid_signals() - _SYNCHRONOUS) if CAN_BLOCK else frozenset()


@contextmanager
def signals_kept_for_main() -> Iterator[None]:
    """Block the asynchronous signals on this thread while the body runs.

    Threads inherit the mask of the thread that starts them, so a thread started inside this
    block runs with them blocked from its first instruction. A signal that arrives meanwhile
    stays pending and is delivered when the block ends (or to another thread at once).
    """
    if not CAN_BLOCK:
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, KEPT_FOR_MAIN)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_thread(target: Callable[[], object], name: str, daemon: bool = True) -> threading.Thread:
    """Start a ``threading.Thread`` that leaves the process's signals to the main thread."""
    thread = threading.Thread(target=target, name=name, daemon=daemon)
    with signals_kept_for_main():
        thread.start()
    return thread


def start_raw_thread(target: Callable[[], object]) -> None:
    """Start a bare ``_thread`` thread (no ``threading`` bookkeeping; returns without waiting for
    it to run) that leaves the process's signals to the main thread."""
    with signals_kept_for_main():
        _thread.start_new_thread(target, ())


def start_timer(interval: float, function: Callable[..., object], args: tuple = ()) -> threading.Timer:
    """Start a daemon ``threading.Timer`` that leaves the process's signals to the main thread."""
    timer = threading.Timer(interval, function, args)
    timer.daemon = True
    with signals_kept_for_main():
        timer.start()
    return timer


class ThreadPool(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` whose workers leave the process's signals to the main thread.

    Workers are started by ``submit`` on the submitting thread, so each submit runs with the
    signals blocked (two system calls, about a microsecond).
    """

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        super().__init__(max_workers, thread_name_prefix=thread_name_prefix)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> "Future[Any]":
        with signals_kept_for_main():
            return super().submit(fn, *args, **kwargs)
