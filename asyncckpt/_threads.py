"""Threads that leave the process's signals to the main thread.

A signal sent to the process (``kill PID``, SLURM's SIGTERM, Ctrl-C's SIGINT) is delivered by the
kernel to any one thread that does not block it. CPython runs Python signal handlers only on the
main thread: when the kernel picks one of our threads, the handler is merely flagged, and a main
thread blocked in one long C call (``time.sleep``, a ``select``, a collective) is not woken, so
the handler (our SIGTERM drain, a user's own) runs late or never. Every thread asyncckpt starts
therefore starts with the asynchronous signals blocked, and the kernel delivers them to a thread
that can act on them. Signals raised by a fault in the thread itself (SIGSEGV, SIGBUS, SIGFPE,
SIGILL, SIGTRAP, SIGSYS, SIGABRT) and SIGPIPE stay unblocked: blocking those hides the fault.

A blocked mask is inherited by whatever a thread starts: a subprocess (across ``exec``) or a
forked child. So user code that runs on one of our threads (the wrapped IO's save, on the thread
writer) runs with the process's signals allowed (:func:`signals_as_the_process`), and a child
forked from one of our threads gets them back (an at-fork hook): a child process must answer
SIGTERM as usual.
"""

from __future__ import annotations

import _thread
import contextlib
import os
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
def _mask(how: int, when: bool = True) -> Iterator[None]:
    """``pthread_sigmask(how, KEPT_FOR_MAIN)`` on this thread while the body runs, then the mask
    as it was (nothing where masks do not exist, or ``when`` is false)."""
    if not CAN_BLOCK or not when:
        yield
        return
    old = signal.pthread_sigmask(how, KEPT_FOR_MAIN)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def signals_kept_for_main() -> "contextlib.AbstractContextManager[None]":
    """Block the asynchronous signals on this thread while the body runs.

    Threads inherit the mask of the thread that starts them, so a thread started inside this
    block runs with them blocked from its first instruction. A signal that arrives meanwhile
    stays pending and is delivered when the block ends (or to another thread at once).
    """
    return _mask(getattr(signal, "SIG_BLOCK", 0))


_ours = threading.local()  # ``blocked`` is True on the threads started here


def _mark() -> None:
    _ours.blocked = True


def _marked(target: Callable[..., object]) -> Callable[..., object]:
    def run(*args: Any) -> object:
        _mark()
        return target(*args)

    return run


def signals_as_the_process() -> "contextlib.AbstractContextManager[None]":
    """On one of our threads, allow the asynchronous signals while the body runs user code, so
    that what it starts (a subprocess, a process pool) does not inherit our block."""
    return _mask(getattr(signal, "SIG_UNBLOCK", 0), when=getattr(_ours, "blocked", False))


def _after_fork_in_child() -> None:
    # The forking thread is the child's only thread: its main thread, which must take signals.
    if CAN_BLOCK and getattr(_ours, "blocked", False):
        _ours.blocked = False
        signal.pthread_sigmask(signal.SIG_UNBLOCK, KEPT_FOR_MAIN)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def new_thread(target: Callable[[], object], name: str, daemon: bool = True) -> threading.Thread:
    """A ``threading.Thread``, not started yet, that leaves the process's signals to the main
    thread once started with :func:`start` (for a caller that must hold it before it runs)."""
    return threading.Thread(target=_marked(target), name=name, daemon=daemon)


def start(thread: threading.Thread) -> None:
    """Start ``thread`` (from :func:`new_thread`) with the asynchronous signals blocked."""
    with signals_kept_for_main():
        thread.start()


def start_thread(target: Callable[[], object], name: str, daemon: bool = True) -> threading.Thread:
    """Start a ``threading.Thread`` that leaves the process's signals to the main thread."""
    thread = new_thread(target, name, daemon)
    start(thread)
    return thread


def start_raw_thread(target: Callable[[], object]) -> None:
    """Start a bare ``_thread`` thread (no ``threading`` bookkeeping; returns without waiting for
    it to run) that leaves the process's signals to the main thread."""
    with signals_kept_for_main():
        _thread.start_new_thread(_marked(target), ())


def start_timer(interval: float, function: Callable[..., object], args: tuple = ()) -> threading.Timer:
    """Start a daemon ``threading.Timer`` that leaves the process's signals to the main thread."""
    timer = threading.Timer(interval, _marked(function), args)
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
        super().__init__(max_workers, thread_name_prefix=thread_name_prefix, initializer=_mark)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> "Future[Any]":
        with signals_kept_for_main():
            return super().submit(fn, *args, **kwargs)
