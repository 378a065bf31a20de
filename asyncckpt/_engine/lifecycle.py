"""The engines' lifecycle, in one registry: interpreter exit, SIGTERM, and fork.

Each engine registers an exit view (its public face to this module: ``drain_before_exit``,
``stop_writer_before_exit``, ``hands_over_on``, ``locked_here``, ``exit_timeout``,
``adopt_after_fork``); this module holds the views weakly and drives them.

Interpreter exit: a ``threading`` exit hook (the one ``concurrent.futures`` uses) runs before
daemon threads are stopped, and drains every live engine's queue within its ``exit_timeout``.
Where a writer process runs, ``multiprocessing``'s own exit handler would then terminate it
(SIGTERM, which the writer ignores) and join it without a timeout; so a finalizer of
``multiprocessing``'s, which that handler runs first whatever the order of ``atexit`` hooks,
drains once more (saves made by ``atexit`` handlers) and stops the writers, within the same
``exit_timeout``.

SIGTERM (preemption): the default action kills the process without running any Python, so the
first engine created on the main thread installs a handler that drains the queues, then hands
the signal on: to the previous Python handler if there was one, otherwise it restores the
default action and re-sends SIGTERM, so the exit status is the one the process would have had.
A signal handler runs on the main thread, between the instructions of whatever that thread was
doing; when that is a save of an engine (staging, or handing the save to a busy writer process),
the drain could not wait for it, and the save was lost. The handler then returns at once, and the
signal is handled as soon as that save is handed over (or, at ``exit_timeout``, with that save
logged as not written).

Fork: one ``os.register_at_fork`` hook. In a forked child a SIGTERM the parent was keeping is
forgotten, then every engine starts afresh as the child's own (``adopt_after_fork``), so the
child's exit drains only the child's own saves.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing.util
import os
import signal
import threading
import time
import weakref
from typing import Any, Optional, Protocol, Tuple

from .._staging import lazy as staging_lazy
from .._staging import protocol as staging_protocol
from .._threads import start_timer
from .._writers import process as writer_process

log = logging.getLogger("asyncckpt")


class ExitView(Protocol):
    """What this module needs of an engine (the engine owns the object; it lives as long as
    the engine does)."""

    exit_timeout: float

    @property
    def collective(self) -> bool:
        """Whether the engine's saves run collectives on a process group (sharded saves)."""

    def drain_before_exit(self, reason: str, deadline: Optional[float] = None) -> None:
        """Write what is pending, within the exit time (and by ``deadline``), and log it."""

    def stop_writer_before_exit(self) -> None:
        """Stop the writer within what is left of the exit time."""

    def hands_over_on(self, thread_id: int) -> list:
        """The paths of the saves or removes that thread ``thread_id`` is handing over."""

    def locked_here(self) -> bool:
        """Whether the calling thread is inside a call holding the engine's lock."""

    def adopt_after_fork(self) -> None:
        """In a forked child: start afresh as the child's own engine."""


_engines: "weakref.WeakSet[ExitView]" = weakref.WeakSet()
_lock = threading.Lock()
_previous_sigterm: Any = None
_installed = False


def register(view: ExitView) -> None:
    """Drive ``view`` at exit, on SIGTERM and at a fork (held weakly: the engine keeps it alive)."""
    with _lock:
        _engines.add(view)


def drain_all(reason: str, deadline: Optional[float] = None, collective_only: bool = False) -> None:
    for engine in list(_engines):
        if collective_only and not engine.collective:
            continue
        try:
            engine.drain_before_exit(reason, deadline)
        except Exception:  # noqa: BLE001 - keep draining the other engines
            log.exception("asyncckpt: could not write pending checkpoints before %s", reason)


# Set once the interpreter has begun to exit (before the first drain). From then on a save or
# remove takes effect at the call, as with a synchronous IO: an ``atexit`` handler that runs
# after every drain (registered before asyncckpt was imported), or a thread still running, would
# otherwise queue it on a writer that nobody waits for any more (a thread writer is a daemon; a
# writer process would be started anew during exit and left behind).
_exiting = False


def exiting() -> bool:
    """True once the interpreter has begun to exit: saves and removes are then synchronous."""
    return _exiting


def _at_exit() -> None:
    global _exiting
    _exiting = True
    drain_all("interpreter exit")


threading._register_atexit(_at_exit)  # type: ignore[attr-defined]
# A forked child keeps this registry: its copies of the engines start afresh at the fork (see
# ``_after_fork_in_child``), so its exit drains only the child's own saves.

_multiprocessing_hook_pid: Optional[int] = None

_DRAINS_FIRST = "_asyncckpt_drains_collective_saves_first"


def drain_collective_saves_before_groups_are_destroyed() -> None:
    """Make ``torch.distributed.destroy_process_group`` write pending sharded saves first
    (installed once, by the first sharded save).

    A training script's usual last lines are a save and ``dist.destroy_process_group()``. The
    sharded save is then still being written in the background, and its collectives run on a
    process group that ``destroy_process_group()`` destroys too: it failed, and the last
    checkpoint was lost. No hook of torch's runs before a group is destroyed, so the function is
    wrapped: it drains every engine whose saves are collective (within ``exit_timeout``, and
    logged), then destroys as asked. Code that imported the function by name before the first
    sharded save keeps the original (``dist.destroy_process_group()`` finds the wrapper).
    """
    import torch.distributed as dist

    if not dist.is_available():
        return
    from torch.distributed import distributed_c10d

    with _lock:
        original = distributed_c10d.destroy_process_group
        if getattr(original, _DRAINS_FIRST, False):
            return

        @functools.wraps(original)
        def destroy_process_group(*args: Any, **kwargs: Any) -> Any:
            drain_all("torch.distributed.destroy_process_group()", collective_only=True)
            return original(*args, **kwargs)

        setattr(destroy_process_group, _DRAINS_FIRST, True)
        distributed_c10d.destroy_process_group = destroy_process_group
        if getattr(dist, "destroy_process_group", None) is original:
            dist.destroy_process_group = destroy_process_group


def _before_multiprocessing_joins_its_children() -> None:
    global _exiting
    _exiting = True
    for engine in list(_engines):
        try:
            engine.drain_before_exit("interpreter exit")
            engine.stop_writer_before_exit()
        except Exception:  # noqa: BLE001 - keep stopping the other engines' writers
            log.exception("asyncckpt: could not stop a writer before interpreter exit")


def stop_writers_before_multiprocessing_exit() -> None:
    """Make ``multiprocessing``'s exit handler drain and stop this process's writers before it
    joins its children (once per process; called when a writer process starts).

    Its finalizers with an ``exitpriority`` run at the start of that handler, whenever the
    handler itself runs among the ``atexit`` hooks. A child started by ``multiprocessing``
    begins with no finalizers, hence once per process id.
    """
    global _multiprocessing_hook_pid
    with _lock:
        if _multiprocessing_hook_pid == os.getpid():
            return
        multiprocessing.util.Finalize(None, _before_multiprocessing_joins_its_children, exitpriority=100)
        _multiprocessing_hook_pid = os.getpid()


def install_sigterm_handler() -> bool:
    """Install the draining SIGTERM handler once; only possible from the main thread."""
    global _installed, _previous_sigterm
    with _lock:
        if _installed:
            return True
        if threading.current_thread() is not threading.main_thread():
            log.debug("asyncckpt: not on the main thread; SIGTERM handler not installed")
            return False
        _previous_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
        _installed = True
        return True


def uninstall_sigterm_handler() -> None:
    """Put back the handler that was there before asyncckpt installed its own."""
    global _installed
    with _lock:
        if _installed and signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, _previous_sigterm if _previous_sigterm is not None else signal.SIG_DFL)
        _installed = False


# A SIGTERM waiting for the main thread to finish handing a save over:
# (deadline, the frame it interrupted, the timer that re-sends it at the deadline).
_deferred: Optional[Tuple[float, Any, Optional[threading.Timer]]] = None


def _saves_in_progress_here() -> Tuple[list, float]:
    """The paths this thread is staging or handing over, and the longest ``exit_timeout`` of
    the engines concerned."""
    me = threading.get_ident()
    paths: list = []
    timeout = 0.0
    for engine in list(_engines):
        mine = engine.hands_over_on(me)
        if mine:
            paths += mine
            timeout = max(timeout, engine.exit_timeout)
    return paths, timeout


# Until when a SIGTERM that landed inside an engine's lock is tried again (see _on_sigterm).
_retry_until: Optional[float] = None


def _on_sigterm(signum: int, frame: Optional[Any]) -> None:
    global _deferred, _retry_until
    engines = list(_engines)
    if any(engine.locked_here() for engine in engines):
        # The signal interrupted this thread inside an engine call holding the engine's lock
        # (``io.pending``...), which every write needs to complete: a drain here would wait for
        # them in vain. The call ends within moments; the signal comes again then.
        now = time.monotonic()
        if _retry_until is None:
            _retry_until = now + max((engine.exit_timeout for engine in engines), default=0.0)
        if now < _retry_until:
            start_timer(0.01, signal.pthread_kill, (threading.get_ident(), signum))
            return
    _retry_until = None
    paths, timeout = _saves_in_progress_here()
    if paths:
        if _deferred is None:
            deadline = time.monotonic() + timeout
            # At the deadline the signal comes again, and is handled whatever this thread does
            # (with no time limit, ``exit_timeout=float("inf")``, there is no deadline).
            timer = (
                start_timer(timeout, signal.pthread_kill, (threading.get_ident(), signum))
                if timeout < threading.TIMEOUT_MAX
                else None
            )
            _deferred = (deadline, frame, timer)
            log.warning(
                "asyncckpt: SIGTERM during the save of %s; handling it once that save is handed to the writer",
                ", ".join(paths),
            )
            return
        if time.monotonic() < _deferred[0]:
            return  # already waiting for this save
        deadline = _deferred[0]
        if _deferred[2] is not None:
            _deferred[2].cancel()
        _deferred = None
        _handle_sigterm(signum, frame, deadline)  # the drain logs the save in progress as not written
        return
    _handle_sigterm(signum, frame, None)


def _forget_the_parents_signal() -> None:
    """In a forked child: a SIGTERM the parent was keeping for the end of a hand-over is the
    parent's (its timer did not survive the fork either); the child must not act on it."""
    global _deferred, _retry_until
    _deferred = None
    _retry_until = None


def _after_fork_in_child() -> None:
    """The one fork hook, in a fixed order: the collector's pause and the lazy copies in
    progress are the parent's (their threads did not survive the fork), then the parent's held
    signal is forgotten, every engine adopts, and the parent's writer processes are disowned."""
    staging_protocol.reset_after_fork()
    staging_lazy.reset_after_fork()
    _forget_the_parents_signal()
    for engine in list(_engines):
        engine.adopt_after_fork()
    writer_process.reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def after_handover() -> None:
    """Called when a thread has finished staging and handing over a save or remove: a SIGTERM
    that arrived meanwhile on this thread is handled now."""
    global _deferred
    deferred = _deferred
    if deferred is None or threading.current_thread() is not threading.main_thread():
        return
    if _saves_in_progress_here()[0]:
        return  # still inside a save of another engine
    _deferred = None
    deadline, frame, timer = deferred
    if timer is not None:
        timer.cancel()
    _handle_sigterm(signal.SIGTERM, frame, deadline)


def _handle_sigterm(signum: int, frame: Optional[Any], deadline: Optional[float]) -> None:
    drain_all("SIGTERM", deadline)
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
