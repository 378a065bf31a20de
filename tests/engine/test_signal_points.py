"""A Ctrl-C at any instant of a save leaves the engine whole: no staging slot lost or freed twice,
no lock held, and the next save writes its own values.

CPython runs a Python signal handler only at certain points of the main thread: when a call
returns, at a function's start or its resumption after a ``yield``, and at a loop's backward
jump, and not while the thread blocks the signal. A real signal cannot be aimed at each of those
points in turn, so this is fault injection: a trace function raises ``KeyboardInterrupt`` (what
Ctrl-C's handler raises) at one such point of a call in asyncckpt's own code, for every point.
Found this way (each seen
failing first): a ``threading.Condition``'s Python ``__enter__`` left the engine's lock held when
interrupted after taking it (every later call, and the writer, then waited for ever); a slot
taken off the free list and not yet returned to the caller was lost (with ``max_pending=1`` the
next save waited for ever); an operation handed to the writer and not yet counted had its slot
freed by the failed call while the writer still read it; a lazy copy listed for the guard points
and not yet started kept the next guard point (an optimizer step, a flush) waiting for ever; the
process writer's entry for an operation interrupted just after it was listed as sent freed its
slot a second time when that writer exited, and one interrupted as its message left gave its
slot back while the writer process could still read it; ``asave_checkpoint`` and ``save_here``
lost a slot taken and not yet held; ``reserve()`` lost the slots it took (every later save then
waited for ever), or left a reservation that never settled (a later ``reserve()`` refused, and
``teardown`` waited for ever); a save interrupted just after it paused the garbage collector
left the collector off for the rest of the process; an interrupted ``teardown`` left its writer
running, owned by nobody (a thread or a process more for each), and the process writer's stop,
interrupted as it took its send lock, kept the lock (the next save waited for ever once the
engine kept that writer until stopped). Once function starts were interrupted too: a save handed
to the writer and interrupted at the start of its counting was never listed as pending (flush
returned before it was written), and ``save_here`` interrupted at the start of its slot's
give-back kept the slot (every later save waited for ever). On the collective paths (a one-rank
gloo group): an ``asave_checkpoint`` interrupted just as it started the ranks' agreement on its
thread raised before the agreement decided, so a call every rank agreed to reached no writer.
"""

from __future__ import annotations

import asyncio
import collections
import dis
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch

import asyncckpt
from asyncckpt.distributed import DistributedCheckpointIO
from conftest import load, temp_files

PACKAGE = os.path.dirname(asyncckpt.__file__)
CALLS = {dis.opmap[n] for n in ("CALL", "CALL_FUNCTION_EX") if n in dis.opmap}
JUMPS = {dis.opmap[n] for n in ("JUMP_BACKWARD", "JUMP_BACKWARD_NO_INTERRUPT") if n in dis.opmap}
RESUME = dis.opmap.get("RESUME")

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "pthread_sigmask") or RESUME is None or not hasattr(dis, "_parse_exception_table"),
    reason="needs POSIX signal masks and CPython 3.11's exception tables",
)


Site = Tuple[Any, int, int]  # (code object, offset of the previous instruction or -1 at its start, offset)


class InterruptAt:
    """A trace function over the main thread's frames of asyncckpt's code, at the points where
    CPython could run a signal handler: after a call returns, at a loop's backward jump, at a
    function's start or its resumption after a ``yield`` (a ``RESUME`` that checks for
    signals), and only while SIGINT is not blocked.

    Made with ``target=None`` it records every point, in order, as ``(site, k)``: the ``k``-th
    time the call reached that site. Made with one of those, it raises ``KeyboardInterrupt``
    there and traces nothing else: only frames of that site's code run under its opcode trace,
    so each interrupted call costs about what the call costs (tracing every opcode of every
    frame made the sweep quadratic in its points).
    """

    def __init__(self, target: Optional[Tuple[Site, int]] = None) -> None:
        self.target = target
        self.points: List[Tuple[Site, int]] = []
        self.where: Optional[str] = None
        self._seen: Dict[Site, int] = collections.Counter()
        self._last: Dict[int, int] = {}
        self._code = target[0][0] if target is not None else None
        self._main = threading.main_thread()
        self._armed = True

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        code = frame.f_code
        if not self._armed:
            return None
        if self._code is not None:
            if code is not self._code:
                return None
        elif not code.co_filename.startswith(PACKAGE):
            return None
        if threading.current_thread() is not self._main:
            return None
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        self._last[id(frame)] = -1  # (a new frame may reuse a finished one's id)
        if event == "call" and _checks_signals_on_resume(code, frame.f_lasti):
            self._reached((code, -1, frame.f_lasti), frame)  # raised here, it leaves the frame at once
        return self._local

    def _local(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            code = frame.f_code
            previous = self._last.get(id(frame), -1)
            offset = frame.f_lasti
            self._last[id(frame)] = offset
            if previous >= 0 and _ends_with_signal_check(code, previous):
                # Raised here, the exception must meet the handler it would meet raised at the
                # end of the previous instruction, where CPython runs signal handlers (a call that
                # ends a ``with`` block is inside it; the next instruction may not be).
                handlers = _handlers(code)
                if handlers[previous] == handlers[offset]:
                    self._reached((code, previous, offset), frame)
        return self._local

    def disarm(self) -> None:
        """Count and raise no more (a suspended coroutine's frame keeps its trace function)."""
        self._armed = False

    def _reached(self, site: Site, frame: Any) -> None:
        if not self._armed or (self.target is not None and site != self.target[0]):
            return
        if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []):
            return  # a handler cannot run here: the signal waits until it is unblocked
        self._seen[site] += 1
        if self.target is None:
            self.points.append((site, self._seen[site]))
        elif self._seen[site] == self.target[1]:
            self.where = f"{os.path.relpath(frame.f_code.co_filename, PACKAGE)}:{frame.f_lineno}"
            raise KeyboardInterrupt


_HANDLERS: Dict[Any, List[Optional[int]]] = {}
_CHECKS: Dict[Any, List[bool]] = {}


def _handlers(code: Any) -> List[Optional[int]]:
    """For each offset of ``code``: where an exception raised there goes (its exception table's
    target), or None (it leaves the frame)."""
    handlers = _HANDLERS.get(code)
    if handlers is None:
        handlers = [None] * len(code.co_code)
        for entry in dis._parse_exception_table(code):  # type: ignore[attr-defined]
            handlers[entry.start:entry.end] = [entry.target] * (entry.end - entry.start)
        _HANDLERS[code] = handlers
    return handlers


def _ends_with_signal_check(code: Any, offset: int) -> bool:
    """Whether CPython may run a signal handler as the instruction at ``offset`` ends: a call
    (as it returns) or a backward jump."""
    checks = _CHECKS.get(code)
    if checks is None:
        raw = code.co_code
        checks = _CHECKS[code] = [raw[i] in CALLS or raw[i] in JUMPS for i in range(len(raw))]
    return checks[offset]


def _checks_signals_on_resume(code: Any, offset: int) -> bool:
    """Whether the ``RESUME`` at ``offset`` (a frame's start or its resumption) checks for
    signals: at a function's start and after a ``yield`` (oparg 0 and 1), not after an ``await``."""
    raw = code.co_code
    return 0 <= offset < len(raw) and raw[offset] == RESUME and raw[offset + 1] < 2


#: Every pass of every site by default. ``ASYNCCKPT_SWEEP_PASSES=3`` (a quicker run while working
#: on the engine) interrupts a site a loop passes many times (over the state's tensors, 30 or more
#: passes) at its first 3 passes and its last only.
PASSES = int(os.environ.get("ASYNCCKPT_SWEEP_PASSES", "0"))


def to_sweep(points: List[Tuple[Site, int]], passes: int = PASSES) -> List[Tuple[int, Tuple[Site, int]]]:
    """The points to interrupt, numbered by their place in the call: every one, or with
    ``passes`` set, every site at its first ``passes`` passes and its last."""
    last = {site: k for site, k in points}
    return [(n, (site, k)) for n, (site, k) in enumerate(points, 1) if not passes or k <= passes or k == last[site]]


def _within(seconds: float, fn: Any, where: str = "") -> List[BaseException]:
    """Run ``fn`` on a thread; fail the test if it has not returned in ``seconds``."""
    errors: List[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - reported by the caller
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the engine hung after an interrupt {where}"
    return errors


def _writers_running() -> set:
    """The writer threads and writer processes of this process that are running."""
    writers = {t for t in threading.enumerate() if t.name == "asyncckpt-writer"}
    return writers | {c for c in multiprocessing.active_children() if c.name == "asyncckpt-writer"}


def _wait_until(ready: Any) -> None:
    while not ready():
        time.sleep(0.005)


CASES = {
    "thread-eager": dict(writer="thread", staging="eager"),
    "thread-lazy": dict(writer="thread", staging="lazy"),
    "process-eager": dict(writer="process", staging="eager"),
    "collective-thread-eager": dict(writer="thread", staging="eager"),
}


class RecordingDCP(DistributedCheckpointIO):
    """A collective IO that records each call the ranks agreed on and each run of one by the
    writer: every agreed call must reach the writer exactly once (the save, or the abort or
    remove standing in for it), or the other ranks' writers would wait in its collective, or
    pair it with another call's."""

    def __init__(self) -> None:
        super().__init__(timeout=30)
        self.agreed: List[int] = []
        self.ran: List[int] = []

    def agree_to_save(self, *args: Any, agreement: Any = None, **options: Any) -> Any:
        error = super().agree_to_save(*args, agreement=agreement, **options)
        if agreement is not None and agreement.number is not None:
            self.agreed.append(agreement.number)
        return error

    def running_agreed(self, number: int) -> Any:
        self.ran.append(number)
        return super().running_agreed(number)


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of one rank in this process (what the collective paths need)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class PlainIO(asyncckpt.TorchCheckpointIO):
    """An IO not known to write with ``torch.save``: ``save_here`` stages a copy for it."""

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)


# what is interrupted: "save" (save_checkpoint), "flush", "asave" (asave_checkpoint on an asyncio
# loop that is not asyncio.run's, where Ctrl-C raises KeyboardInterrupt in the task), "save_here",
# "remove" (remove_checkpoint of a file saved just before), "reserve" (reserve(state, wait=True)),
# "load" (load_checkpoint of a file whose save is still queued), "teardown" (with a save queued;
# the object must work again afterwards)
# ("collective-...": a collective IO, whose calls the ranks agree on, on a one-rank gloo group)
CALLS_CASES = (
    [(case, call) for case in CASES for call in ("save", "flush", "asave", "teardown")]
    + [("collective-thread-eager", "remove")]
    + [("thread-eager", "save_here")]
    + [(case, call) for case in ("thread-eager", "process-eager") for call in ("remove", "reserve", "load")]
)
# Split into parts that run side by side (pytest -n), each taking every PARTS-th point: after
# most points of an interrupted process-writer teardown the next save starts a writer process
# (about 2 s each); the slowest cases, whole, held the suite's end for minutes.
PARTS = {("process-eager", "teardown"): 4, ("thread-eager", "save_here"): 2}
SWEEPS = [
    pytest.param(case, call, part, parts, id=f"{case}-{call}" + (f"-{part}" if parts > 1 else ""))
    for case, call in CALLS_CASES
    for parts in [PARTS.get((case, call), 1)]
    for part in range(parts)
]


# (interrupted between making a coroutine and awaiting it, Python says so as it is collected)
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
@pytest.mark.parametrize("case,interrupted,part,parts", SWEEPS)
def test_an_interrupt_at_any_point_leaves_the_engine_whole(request, tmp_path, case, interrupted, part, parts):
    # exit_timeout: an engine this test breaks must not hold the interpreter's exit for minutes
    wrapped: Any = PlainIO() if interrupted == "save_here" else None
    collective = case.startswith("collective")
    if collective:
        request.getfixturevalue("one_rank_group")
        wrapped = RecordingDCP()
    load_saved = DistributedCheckpointIO().load_checkpoint if collective else load
    others = _writers_running()  # earlier tests' (this process runs several)
    io = asyncckpt.AsyncCheckpointIO(wrapped, max_pending=1, exit_timeout=5, **CASES[case])
    # Large enough for lazy staging to copy lazily (above 64 KiB), in several storages. (Fewer for
    # a collective IO: its loops are the ones swept above, and each of its saves is a DCP save,
    # whose cost grows with the number of tensors.)
    params = [torch.zeros(8) for _ in range(4 if collective else 30)] + [torch.zeros(20_000) for _ in range(2)]
    path = os.path.join(tmp_path, "x.ckpt")

    def the_call(step: int) -> None:
        own_path = os.path.join(tmp_path, f"{step}.ckpt")  # a file it leaves is checked below
        if interrupted == "save":
            io.save_checkpoint({"step": step, "p": params}, own_path)
        elif interrupted == "asave":
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(io.asave_checkpoint({"step": step, "p": params}, own_path))
            finally:
                loop.close()
        elif interrupted == "save_here":
            io.save_here({"step": step, "p": params}, own_path)
        elif interrupted == "remove":
            io.remove_checkpoint(own_path)
        elif interrupted == "reserve":
            io.reserve({"step": step, "p": params}, wait=True)
        elif interrupted == "load":
            loaded = io.load_checkpoint(own_path)
            assert loaded["step"] == step
        elif interrupted == "teardown":
            io.teardown()
        else:
            io.flush()

    try:
        for step in range(3):  # warm: the save takes the path most saves take
            io.save_checkpoint({"step": step, "p": params}, path)
            io.flush()
        counter = InterruptAt()
        if interrupted in ("flush", "teardown"):
            io.save_checkpoint({"step": 3, "p": params}, path)
        if interrupted == "load":
            io.save_checkpoint({"step": 3, "p": params}, os.path.join(tmp_path, "3.ckpt"))
        if interrupted == "remove":
            io.save_checkpoint({"step": 3, "p": params}, os.path.join(tmp_path, "3.ckpt"))
            io.flush()
        sys.settrace(counter)
        try:
            the_call(3)
        finally:
            sys.settrace(None)
        io.flush()
        assert len(counter.points) > 10  # the call was traced
        for p in params:
            p.fill_(-1.0)  # the values of every interrupted call
        missed = 0
        chosen = to_sweep(counter.points)[part::parts]
        for n, point in chosen:
            if interrupted in ("flush", "teardown"):
                io.save_checkpoint({"step": -n, "p": params}, path)
            if interrupted == "load":  # still queued as the load begins
                io.save_checkpoint({"step": -n, "p": params}, os.path.join(tmp_path, f"{-n}.ckpt"))
            if interrupted == "remove":  # the file it removes, or leaves whole
                io.save_checkpoint({"step": -n, "p": params}, os.path.join(tmp_path, f"{-n}.ckpt"))
                io.flush()
            interrupt = InterruptAt(point)
            sys.settrace(interrupt)
            try:
                the_call(-n)
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)
            missed += interrupt.where is None  # a point this call did not reach (a wait that did not loop)
            where = f"interrupted at point {n}, {interrupt.where}"
            # The interrupted save may still be written, or fail: then loudly, at the next call, once.
            errors = _within(30, io.flush, where)
            assert all(isinstance(e, asyncckpt.errors.AsyncCheckpointError) for e in errors), f"{where}: {errors!r}"
            if interrupted == "reserve":  # its job gives the slot back once the memory is ready
                _within(30, lambda: _wait_until(lambda: io._reservation is None or io._reservation.done()), where)
            assert io.slot_pool.free_count == 1, f"{where}: {io.slot_pool.free_count} free slots of 1"
            # (white-box) no save left listed as in progress: the exit drain would wait for it
            assert not io._handovers, f"{where}: a save is still listed as in progress"
            # (white-box) nor this thread marked as inside a save: its saves would be synchronous
            assert not getattr(io._local, "holding", False), f"{where}: this thread is still marked as saving"
            # the collector, paused while a call stages, runs again (else the process leaks cycles)
            assert gc.isenabled(), f"{where}: garbage collection left disabled"
            if collective:  # each agreed call reached the writer once: as itself, or its stand-in
                assert sorted(wrapped.ran) == sorted(set(wrapped.agreed)) == wrapped.agreed, (
                    f"{where}: calls agreed {wrapped.agreed}, run by the writer {wrapped.ran}"
                )
            for p in params:
                p.fill_(float(n))
            def save_now(n: int = n) -> None:
                io.save_checkpoint({"step": n, "p": params}, path)
                io.flush()

            errors = _within(30, save_now, where)
            if errors and isinstance(errors[0], asyncckpt.errors.AsyncCheckpointError):
                # the interrupted save's own failure, raised once by the first call after it
                errors = _within(30, save_now, where)
            assert not errors, f"{where}: the next save raised {errors[0]!r}"
            # no writer of this engine left running beside its own (an interrupted teardown's, say)
            writers = _writers_running() - others
            assert len(writers) <= 1, f"{where}: {len(writers)} writers running"
            for p in params:
                p.fill_(-1.0)
            saved = load_saved(path)
            assert saved["step"] == n and all(torch.all(p == float(n)) for p in saved["p"]), where
            interrupted_file = os.path.join(tmp_path, f"{-n}.ckpt")
            if os.path.exists(interrupted_file):  # written after all: with the values of its call
                saved = load_saved(interrupted_file)
                assert saved["step"] == -n and all(torch.all(p == -1.0) for p in saved["p"]), where
            assert not temp_files(str(tmp_path)), f"{where}: a partial file was left"
        # A wait loop may pass fewer times than in the counting run (its points are then missed);
        # a sweep whose trace no longer finds its sites would miss them all.
        assert missed <= len(chosen) // 2, f"{missed} of {len(chosen)} points not reached again: nothing interrupted"
    finally:
        sys.settrace(None)
        _within(60, io.teardown)


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_an_interrupt_as_a_cancelled_async_wait_ends_leaves_the_engine_lock_free():
    """``await_until`` cancelled while its worker thread waits (an ``asave_checkpoint`` waiting for
    a slot whose task is cancelled): an interrupt at any point of it, the clean-up included,
    leaves the engine's lock free for other threads (held, every call and the writer wait)."""
    from asyncckpt._engine.condition import EngineCondition

    async def cancelled_wait(cond: EngineCondition) -> None:
        task = asyncio.ensure_future(cond.await_until(lambda: False))
        await asyncio.sleep(0.02)  # its thread is waiting on the condition
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    def run(cond: EngineCondition, tracer: InterruptAt) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda loop, context: None)  # a task's KeyboardInterrupt: expected
        sys.settrace(tracer)
        try:
            loop.run_until_complete(cancelled_wait(cond))
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
            tracer.disarm()  # (a suspended coroutine's frame keeps its trace function)
            for _ in range(3):  # let the tasks the interrupt left end (it re-raises in each awaiter)
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                if not pending:
                    break
                try:
                    loop.run_until_complete(asyncio.wait(pending))
                except KeyboardInterrupt:
                    pass
            loop.close()

    counter = InterruptAt()
    run(EngineCondition(), counter)
    assert len(counter.points) > 5  # the call was traced
    for n, point in enumerate(counter.points, 1):
        cond = EngineCondition()
        interrupt = InterruptAt(point)
        run(cond, interrupt)
        free: List[bool] = []

        def take_and_give_back(cond: EngineCondition = cond, free: List[bool] = free) -> None:
            if cond.acquire(timeout=5):
                cond.release()
                free.append(True)

        _within(30, take_and_give_back, f"at point {n}")
        assert free, f"interrupted at point {n}, {interrupt.where}: the engine's lock was left held"
