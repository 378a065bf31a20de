"""An adversarial review of the engine: two threads drive one engine with random programs of
save, remove, load, flush and teardown, while the writer is killed at random moments, and the
folder is checked against a model of it.

Each thread owns its paths, so its model is its own: per path, the values queued since it was
last known. Without a writer death the file holds exactly the last one. A death fails the
operations in flight; each may or may not have committed (the rename is atomic), so then the file
holds one of them. Always: every file is a complete checkpoint of one save (never mixed), a call
raises nothing but an asyncckpt error (or FileNotFoundError for a load of an absent file), no call
hangs, and afterwards nothing is pending, every slot is free exactly once, and no temp file of a
live writer remains.

Writer deaths: the process writer is killed for real (SIGKILL of its pid, at any moment). A
thread cannot be killed from outside, so for the thread writer the fault is injected: the
wrapped IO raises ``SystemExit`` inside its save (the writer thread dies mid-save, as it would
from an uncaught signal or interpreter error). Writer processes take seconds to start, so the
process runs have a budget of writer restarts (kills and teardowns); past it, those steps are
flushes.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Dict, List

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncckpt import AsyncCheckpointError, AsyncCheckpointIO, TorchCheckpointIO
from asyncckpt.errors import FlushTimeoutError
from asyncckpt.storage import cleanup_temp_files
from conftest import temp_files

RESTART_BUDGET = {"thread": 10**9, "process": 20}
# No single call may take this long, even on a loaded machine (a writer process starts in about
# 1 s idle, 25 s at load average 11): longer is reported as a hang, with the program.
HANG_SECONDS = 120


class DyingIO(TorchCheckpointIO):
    """Fault injection for the thread writer: once armed, the next save raises ``SystemExit``
    in the writer thread, before it writes anything."""

    def __init__(self) -> None:
        super().__init__(durable=False)
        self.armed = threading.Event()

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if self.armed.is_set():
            self.armed.clear()
            raise SystemExit("writer thread killed (injected)")
        super().save_checkpoint(checkpoint, path, storage_options)


def _content(value: int) -> dict:
    return {"v": value, "w": torch.full((16,), float(value))}


def _value_of(obj: dict) -> int:
    assert torch.equal(obj["w"], torch.full((16,), float(obj["v"]))), "a mixed checkpoint"
    return obj["v"]


class Harness:
    """One engine per writer kind for every example, as a long run would use it."""

    def __init__(self, writer: str) -> None:
        self.writer = writer
        self.io_impl = DyingIO() if writer == "thread" else TorchCheckpointIO(durable=False)
        self.io = AsyncCheckpointIO(self.io_impl, writer=writer, max_pending=2, staging_threads=1)
        self.restarts = 0
        self._lock = threading.Lock()
        self._kill_lock = threading.Lock()
        self.runs = 0
        self.deaths = 0

    def take_restart(self) -> bool:
        with self._lock:
            if self.restarts >= RESTART_BUDGET[self.writer]:
                return False
            self.restarts += 1
            return True

    def kill(self) -> None:
        if self.writer == "thread":
            self.io_impl.armed.set()
            self.deaths += 1
            return
        # One kill at a time: two threads killing at once would signal a pid the other has
        # already reaped (ProcessLookupError, a harness race, not an engine failure).
        with self._kill_lock:
            writer = self.io.writer
            if writer is not None and writer.pid is not None and writer.alive:
                try:
                    os.kill(writer.pid, signal.SIGKILL)
                except ProcessLookupError:
                    return  # it died (and was reaped) on its own since we looked
                # Reap it before going on: a writer killed in one example but not yet seen dead
                # would fail a save of the next example, whose model knows of no kill.
                writer.wait_exited(30)
                self.deaths += 1


_HARNESSES: Dict[str, Harness] = {}


@pytest.fixture(scope="module", autouse=True)
def _teardown_engines():
    yield
    for harness in _HARNESSES.values():
        try:
            harness.io.teardown()
        except AsyncCheckpointError:
            pass
    _HARNESSES.clear()


OPS = st.one_of(
    st.tuples(st.just("save"), st.integers(0, 1)),
    st.tuples(st.just("remove"), st.integers(0, 1)),
    st.tuples(st.just("load"), st.integers(0, 1)),
    st.tuples(st.just("flush"), st.just(0)),
    st.tuples(st.just("teardown"), st.just(0)),
    st.tuples(st.just("kill"), st.just(0)),
)
PROGRAMS = st.tuples(st.lists(OPS, max_size=8), st.lists(OPS, max_size=8))


class Player:
    """One thread's program and its model of its own two paths."""

    def __init__(self, harness: Harness, folder: str, name: str, base: int, shared: dict) -> None:
        self.h = harness
        self.paths = [os.path.join(folder, f"{name}{i}.ckpt") for i in range(2)]
        self.history: List[List[object]] = [[None], [None]]  # None: no file
        self.next_value = base
        self.shared = shared
        self.failures: List[BaseException] = []

    def possible(self, i: int) -> set:
        if self.shared["killed"]:
            return set(self.history[i])
        return {self.history[i][-1]}

    def run(self, program, barrier: threading.Barrier) -> None:
        try:
            barrier.wait(30)
            for kind, i in program:
                self.step(kind, i)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.failures.append(err)

    def step(self, kind: str, i: int) -> None:
        io, path = self.h.io, self.paths[i]
        if kind in ("kill", "teardown") and not self.h.take_restart():
            kind = "flush"
        if kind == "save":
            self.next_value += 1
            value = self.next_value
            ckpt = _content(value)
            try:
                io.save_checkpoint(ckpt, path)
            except AsyncCheckpointError:
                return  # a pending failure was raised at the call: nothing was queued
            ckpt["w"].add_(1000)  # point in time
            self.history[i].append(value)
        elif kind == "remove":
            try:
                io.remove_checkpoint(path)
            except AsyncCheckpointError:
                return
            self.history[i].append(None)
        elif kind == "load":
            try:
                value: object = _value_of(io.load_checkpoint(path, weights_only=True))
            except FileNotFoundError:
                value = None
            except AsyncCheckpointError:
                return
            assert value in self.possible(i), (path, value, self.history[i])
            self.history[i] = [value]  # known now: nothing else of this thread's is queued on it
        elif kind == "flush":
            try:
                io.flush(timeout=HANG_SECONDS)
            except FlushTimeoutError:
                raise
            except AsyncCheckpointError:
                pass
        elif kind == "teardown":
            try:
                io.teardown()
            except AsyncCheckpointError:
                pass
        elif kind == "kill":
            self.shared["killed"] = True
            self.h.kill()


def check_example(harness: Harness, programs) -> None:
    harness.runs += 1
    folder = tempfile.mkdtemp(prefix="asyncckpt-adversarial-")
    shared = {"killed": False}
    players = [Player(harness, folder, "a", 1000, shared), Player(harness, folder, "b", 2000, shared)]
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=p.run, args=(prog, barrier)) for p, prog in zip(players, programs, strict=True)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(3 * HANG_SECONDS)
        assert not any(t.is_alive() for t in threads), f"a call hung: programs={programs}"
        for p in players:
            if p.failures:
                raise p.failures[0]
        if harness.writer == "thread":
            harness.io_impl.armed.clear()
        io = harness.io
        try:
            io.flush(timeout=HANG_SECONDS)
        except FlushTimeoutError:
            raise AssertionError(f"a flush hung: {io.pending} operations pending, programs={programs}") from None
        except AsyncCheckpointError:
            pass
        io.flush(timeout=HANG_SECONDS)  # every failure was raised once; now clean
        assert io.pending == 0
        slots = io.staging_buffers()  # taken under the engine's lock
        assert len(slots) == io.max_pending and len({s.slot for s in slots}) == len(slots)
        for p in players:
            for i, path in enumerate(p.paths):
                value = _value_of(torch.load(path, weights_only=True)) if os.path.exists(path) else None
                assert value in p.possible(i), (path, value, p.history[i], programs)
        if shared["killed"]:
            cleanup_temp_files(folder)  # a killed writer's temp file (its pid is gone)
        assert temp_files(folder) == []
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
# The whole run, not one call, is what the suite's default 300 s limit measured: a copy of this
# test with 800 examples took 70 s idle and 262-318 s at load 6, and failed on that limit alone
# (which is how earlier full-suite runs failed). A hang is caught per call, above.
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("writer", ["thread", "process"])
def test_two_threads_and_writer_deaths_against_a_model_of_the_folder(writer):
    harness = _HARNESSES.setdefault(writer, Harness(writer))
    started = time.monotonic()

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(PROGRAMS)
    def run(programs) -> None:
        check_example(harness, programs)

    run()
    print(f"\nadversarial, writer={writer}: {harness.runs} runs, {harness.deaths} writer kills, "
          f"{harness.restarts} restarts ({time.monotonic() - started:.0f}s)")
    assert harness.runs >= 200
