"""The async API (asyncckpt/aio.py) against the contract lines it touches, under asyncio and trio.

Real torch, real files, real event loops. Where a write must stay in flight, the wrapped IO is a
real TorchCheckpointIO held on a threading.Event (fault injection by design, so the tests are
deterministic rather than timed); where a write must fail, it raises an injected OSError.
Assertions are structural (what is in the file, what is queued, how many slots are free, that
the loop kept ticking), never wall-clock thresholds.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Callable, Dict, List

import anyio
import pytest
import torch

from _subproc import run_python
from asyncckpt import (
    AsyncCheckpointIO,
    CheckpointSaveError,
    FlushTimeoutError,
    InvalidPathError,
    QueueFullError,
    TorchCheckpointIO,
)
from asyncckpt.storage import is_temp_file
from conftest import FailingIO

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


class HeldIO(TorchCheckpointIO):
    """A real TorchCheckpointIO whose saves wait for ``gate``: keeps a write in flight on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.path_gates: Dict[str, threading.Event] = {}  # extra gates for single file names

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.started.set()
        assert self.gate.wait(30), "test gate never opened"
        own = self.path_gates.get(os.path.basename(os.fspath(path)))
        assert own is None or own.wait(30), "test gate never opened"
        super().save_checkpoint(checkpoint, path, storage_options)


class ThreadRecordingIO(TorchCheckpointIO):
    """Overrides load_checkpoint, so aload must fall back to running it in a worker thread."""

    def __init__(self) -> None:
        super().__init__()
        self.load_threads: List[str] = []

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> Dict[str, Any]:
        self.load_threads.append(threading.current_thread().name)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


class CancelWhenPickled:
    """Cancels ``scope`` while staging pickles the checkpoint: a cancel landing mid-staging."""

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.scope = scope

    def __reduce__(self) -> Any:
        self.scope.cancel()
        return (int, (7,))


@pytest.fixture
def make_io() -> Any:
    """Builds engines and, whatever the test did, opens their gates and tears them down."""
    made: List[AsyncCheckpointIO] = []

    def make(inner: Any = None, **kwargs: Any) -> AsyncCheckpointIO:
        io = AsyncCheckpointIO(inner, handle_sigterm=False, **kwargs)
        made.append(io)
        return io

    yield make
    for io in made:
        for gate in [getattr(io.checkpoint_io, "gate", None), *getattr(io.checkpoint_io, "path_gates", {}).values()]:
            if gate is not None:
                gate.set()
        try:
            io.teardown()
        except Exception:
            pass


def load(path: Any) -> Any:
    return torch.load(path, weights_only=False)


def temp_files(folder: Any) -> List[str]:
    return [name for name in os.listdir(folder) if is_temp_file(name)]


async def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


class Ticker:
    """A task that sleeps 1 ms in a loop and counts how often it got to run."""

    def __init__(self) -> None:
        self.ticks = 0

    async def run(self) -> None:
        while True:
            await anyio.sleep(0.001)
            self.ticks += 1


# -- point in time --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_change_right_after_asave_returns_is_not_in_the_file(tmp_path, make_io):
    held = HeldIO()
    io = make_io(held)
    weight = torch.arange(1000, dtype=torch.float32)
    held.gate.clear()  # the write waits until after the change below
    await io.asave_checkpoint({"w": weight, "meta": {"step": 1}}, tmp_path / "a.ckpt")
    weight.add_(1000)
    held.gate.set()
    await io.aflush()
    got = load(tmp_path / "a.ckpt")
    assert torch.equal(got["w"], torch.arange(1000, dtype=torch.float32))
    assert got["meta"] == {"step": 1}


@pytest.mark.anyio
async def test_other_tasks_cannot_tear_a_checkpoint_while_it_stages(tmp_path, make_io):
    # Staging runs on the loop thread with no await inside, so a task that rewrites every
    # tensor each turn can never interleave with the copy: the file holds one turn, the one
    # current when asave_checkpoint returned. (Staging in a worker thread would tear it.)
    io = make_io()
    tensors = [torch.zeros(1 << 16) for _ in range(64)]
    turn = 0

    async def mutate() -> None:
        nonlocal turn
        while True:
            turn += 1
            for t in tensors:
                t.fill_(float(turn))
            await anyio.sleep(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(mutate)
        await anyio.sleep(0.01)
        for i in range(3):
            await io.asave_checkpoint({"t": tensors}, tmp_path / f"{i}.ckpt")
            expected = float(turn)  # no await since the return: the mutator has not run
            await io.aflush()
            got = load(tmp_path / f"{i}.ckpt")["t"]
            assert all(torch.all(t == expected) for t in got), f"torn or late checkpoint {i}"
        tg.cancel_scope.cancel()


# -- order ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_aremove_after_asave_leaves_no_file(tmp_path, make_io):
    held = HeldIO()
    io = make_io(held)
    held.gate.clear()
    await io.asave_checkpoint({"x": torch.ones(3)}, tmp_path / "a.ckpt")
    await io.aremove_checkpoint(tmp_path / "a.ckpt")
    held.gate.set()
    await io.aflush()
    assert not (tmp_path / "a.ckpt").exists()


@pytest.mark.anyio
async def test_aload_after_asave_waits_for_the_write_and_returns_new_data(tmp_path, make_io):
    held = HeldIO()
    io = make_io(held)
    path = tmp_path / "a.ckpt"
    await io.asave_checkpoint({"v": torch.tensor([1.0])}, path)
    await io.aflush()
    held.gate.clear()
    await io.asave_checkpoint({"v": torch.tensor([2.0])}, path)
    result: Dict[str, Any] = {}

    async def loader() -> None:
        result["ckpt"] = await io.aload_checkpoint(path)

    async with anyio.create_task_group() as tg:
        tg.start_soon(loader)
        await anyio.sleep(0.2)
        assert "ckpt" not in result, "aload returned while the save to its path was pending"
        held.gate.set()
    assert torch.equal(result["ckpt"]["v"], torch.tensor([2.0]))


@pytest.mark.anyio
async def test_aload_and_acopy_through_a_symlink_wait_for_the_save_queued_by_another_spelling(tmp_path, make_io):
    """``last.ckpt`` links to the file a save queued through a linked folder is writing: aload
    and acopy of it wait for that write (the keys were the paths as text: both read the old file)."""
    held = HeldIO()
    io = make_io(held)
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    (tmp_path / "last.ckpt").symlink_to(real / "x.ckpt")
    torch.save({"v": torch.tensor([1.0])}, real / "x.ckpt")
    held.gate.clear()
    await io.asave_checkpoint({"v": torch.tensor([2.0])}, tmp_path / "link" / "x.ckpt")
    result: Dict[str, Any] = {}

    async def loader() -> None:
        result["ckpt"] = await io.aload_checkpoint(tmp_path / "last.ckpt")

    async def copier() -> None:
        await io.acopy_checkpoint(tmp_path / "last.ckpt", tmp_path / "copy.ckpt")
        result["copied"] = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(loader)
        tg.start_soon(copier)
        await anyio.sleep(0.2)
        assert not result, "aload or acopy returned while the save to the file it reads was pending"
        held.gate.set()
    assert torch.equal(result["ckpt"]["v"], torch.tensor([2.0]))
    assert torch.equal(torch.load(tmp_path / "copy.ckpt")["v"], torch.tensor([2.0]))


@pytest.mark.anyio
async def test_aload_of_a_file_torch_load_cannot_read_gets_the_same_note_as_load(tmp_path, make_io):
    """``aload_checkpoint`` reads the bytes itself; its failure says what is wrong with the file,
    as ``load_checkpoint``'s does (tests/engine/test_inputs.py)."""
    path = tmp_path / "foreign.ckpt"
    path.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(Exception) as caught:
        await make_io().aload_checkpoint(path)
    assert any("not a zip-format torch checkpoint" in note for note in getattr(caught.value, "__notes__", []))


@pytest.mark.anyio
async def test_aload_falls_back_to_the_wrapped_io_in_a_worker_thread(tmp_path, make_io):
    inner = ThreadRecordingIO()
    io = make_io(inner)
    await io.asave_checkpoint({"v": torch.arange(4)}, tmp_path / "a.ckpt")
    got = await io.aload_checkpoint(tmp_path / "a.ckpt", map_location="cpu")
    assert torch.equal(got["v"], torch.arange(4))
    assert inner.load_threads and inner.load_threads[0] != threading.current_thread().name


@pytest.mark.anyio
async def test_aload_missing_file_and_folder_raise_clearly(tmp_path, make_io):
    io = make_io()
    with pytest.raises(FileNotFoundError, match="not found"):
        await io.aload_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(InvalidPathError):
        await io.aload_checkpoint(tmp_path)


# -- loud -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_background_failure_raised_by_next_async_call_once(tmp_path, make_io):
    io = make_io(FailingIO())
    await io.asave_checkpoint({"x": torch.ones(2)}, tmp_path / "fail.ckpt")
    with pytest.raises(CheckpointSaveError) as caught:
        await io.aflush()
    assert "fail.ckpt" in str(caught.value) and caught.value.path.endswith("fail.ckpt")
    assert isinstance(caught.value.__cause__, OSError)
    await io.aflush()  # raised once, not again

    await io.asave_checkpoint({"x": torch.ones(2)}, tmp_path / "fail2.ckpt")
    await wait_for(lambda: io.pending == 0)
    with pytest.raises(CheckpointSaveError, match="fail2.ckpt"):
        await io.asave_checkpoint({"x": torch.ones(2)}, tmp_path / "ok.ckpt")
    assert io.pending == 0  # the raising save queued nothing
    await io.asave_checkpoint({"x": torch.ones(2)}, tmp_path / "ok.ckpt")
    await io.aflush()
    assert (tmp_path / "ok.ckpt").exists()


@pytest.mark.anyio
async def test_when_full_raise_raises_at_once(tmp_path, make_io):
    held = HeldIO()
    io = make_io(held, max_pending=1, when_full="raise")
    held.gate.clear()
    await io.asave_checkpoint({"x": torch.ones(2)}, tmp_path / "a.ckpt")
    with pytest.raises(QueueFullError):
        await io.asave_checkpoint({"x": torch.ones(2)}, tmp_path / "b.ckpt")
    assert io.pending == 1


# -- cancellation ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cancelled_while_waiting_for_a_slot_holds_nothing(tmp_path, make_io):
    held = HeldIO()
    io = make_io(held, max_pending=1)
    held.gate.clear()  # the only slot stays busy
    await io.asave_checkpoint({"x": torch.ones(2)}, tmp_path / "a.ckpt")
    with anyio.move_on_after(0.2) as scope:
        await io.asave_checkpoint({"x": torch.full((2,), 2.0)}, tmp_path / "b.ckpt")
    assert scope.cancelled_caught
    assert io.pending == 1 and io.free_slots == 0  # nothing queued, no slot taken
    held.gate.set()
    await io.aflush()
    assert (tmp_path / "a.ckpt").exists() and not (tmp_path / "b.ckpt").exists()
    assert io.free_slots == 1
    await io.asave_checkpoint({"x": torch.full((2,), 3.0)}, tmp_path / "b.ckpt")  # slot not leaked
    await io.aflush()
    assert torch.equal(load(tmp_path / "b.ckpt")["x"], torch.full((2,), 3.0))


@pytest.mark.anyio
async def test_cancelled_before_asave_raises_and_queues_nothing(tmp_path, make_io):
    io = make_io(max_pending=2)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await io.asave_checkpoint({"x": torch.ones(2)}, tmp_path / "a.ckpt")
        pytest.fail("asave_checkpoint did not raise in a cancelled scope")
    assert io.pending == 0 and io.free_slots == 2
    assert not (tmp_path / "a.ckpt").exists()


@pytest.mark.anyio
async def test_cancel_landing_during_staging_still_queues_the_save(tmp_path, make_io):
    io = make_io()
    returned = False
    with anyio.CancelScope() as scope:
        ckpt = {"x": torch.arange(5), "marker": CancelWhenPickled(scope)}
        await io.asave_checkpoint(ckpt, tmp_path / "a.ckpt")
        returned = True  # it returned normally: the save is queued
        await anyio.sleep(10)  # the cancellation lands here
        pytest.fail("the cancellation was lost")
    assert returned and scope.cancelled_caught
    await io.aflush()
    got = load(tmp_path / "a.ckpt")
    assert torch.equal(got["x"], torch.arange(5)) and got["marker"] == 7
    assert io.free_slots == io.max_pending


@pytest.mark.anyio
async def test_cancelled_aflush_leaves_the_writes_going(tmp_path, make_io):
    held = HeldIO()
    io = make_io(held)
    held.gate.clear()
    await io.asave_checkpoint({"x": torch.ones(2)}, tmp_path / "a.ckpt")
    with anyio.move_on_after(0.1) as scope:
        await io.aflush()
    assert scope.cancelled_caught and io.pending == 1
    with pytest.raises(FlushTimeoutError):
        await io.aflush(timeout=0.1)
    held.gate.set()
    await io.aflush()
    assert torch.equal(load(tmp_path / "a.ckpt")["x"], torch.ones(2))


@pytest.mark.anyio
async def test_cancelled_aload_leaves_the_save_going(tmp_path, make_io):
    held = HeldIO()
    io = make_io(held)
    held.gate.clear()
    await io.asave_checkpoint({"x": torch.ones(2)}, tmp_path / "a.ckpt")
    with anyio.move_on_after(0.1) as scope:
        await io.aload_checkpoint(tmp_path / "a.ckpt")
    assert scope.cancelled_caught and io.pending == 1
    held.gate.set()
    assert torch.equal((await io.aload_checkpoint(tmp_path / "a.ckpt"))["x"], torch.ones(2))


# -- the loop stays free --------------------------------------------------------------------


@pytest.mark.anyio
async def test_loop_keeps_ticking_while_waiting_for_a_slot_and_for_the_write(tmp_path, make_io):
    held = HeldIO()
    io = make_io(held, max_pending=1)
    ticker = Ticker()
    state = {"second_saved": False, "flushed": False}

    async def second_save_then_flush() -> None:
        await io.asave_checkpoint({"x": torch.full((4,), 2.0)}, tmp_path / "b.ckpt")
        state["second_saved"] = True
        await io.aflush()
        state["flushed"] = True

    b_gate = held.path_gates["b.ckpt"] = threading.Event()  # holds the second write
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        held.gate.clear()
        await io.asave_checkpoint({"x": torch.ones(4)}, tmp_path / "a.ckpt")
        tg.start_soon(second_save_then_flush)
        start = ticker.ticks
        await wait_for(lambda: ticker.ticks >= start + 50)  # the loop runs while a save awaits a slot
        assert not state["second_saved"]
        held.gate.set()
        await wait_for(lambda: state["second_saved"])
        start = ticker.ticks  # now aflush awaits the held second write
        await wait_for(lambda: ticker.ticks >= start + 50)
        assert not state["flushed"]
        b_gate.set()
        await wait_for(lambda: state["flushed"])
        tg.cancel_scope.cancel()
    assert torch.equal(load(tmp_path / "b.ckpt")["x"], torch.full((4,), 2.0))


# -- lifecycle and copy ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_with_flushes_on_exit_and_tears_down(tmp_path):
    held = HeldIO()
    held.gate.clear()
    async with anyio.create_task_group() as tg:
        async with AsyncCheckpointIO(held, handle_sigterm=False) as io:
            await io.asave_checkpoint({"x": torch.ones(3)}, tmp_path / "a.ckpt")
            tg.start_soon(anyio.to_thread.run_sync, lambda: (held.started.wait(30), held.gate.set()))
        assert (tmp_path / "a.ckpt").exists() and io.pending == 0
        assert io.writer is None  # torn down
    async with io:  # works again after teardown
        await io.asave_checkpoint({"x": torch.zeros(3)}, tmp_path / "a.ckpt")
    assert torch.equal(load(tmp_path / "a.ckpt")["x"], torch.zeros(3))


@pytest.mark.anyio
async def test_async_with_exit_is_shielded_from_cancellation(tmp_path):
    held = HeldIO()
    held.gate.clear()
    threading.Timer(0.3, held.gate.set).start()
    with anyio.move_on_after(0.05):
        async with AsyncCheckpointIO(held, handle_sigterm=False) as io:
            await io.asave_checkpoint({"x": torch.ones(3)}, tmp_path / "a.ckpt")
            await anyio.sleep(10)
    assert (tmp_path / "a.ckpt").exists() and io.pending == 0


@pytest.mark.anyio
async def test_acopy_waits_for_src_and_copies_atomically(tmp_path, make_io):
    held = HeldIO()
    io = make_io(held)
    src, dst = tmp_path / "last.ckpt", tmp_path / "best" / "best.ckpt"
    held.gate.clear()
    await io.asave_checkpoint({"v": torch.arange(10)}, src)
    async with anyio.create_task_group() as tg:
        tg.start_soon(io.acopy_checkpoint, src, dst)
        await anyio.sleep(0.1)
        assert not dst.exists()  # still waiting for the save of src
        held.gate.set()
    assert torch.equal(load(dst)["v"], torch.arange(10))
    await io.asave_checkpoint({"v": torch.arange(3)}, src)
    await io.acopy_checkpoint(src, dst)  # over an existing file
    assert torch.equal(load(dst)["v"], torch.arange(3))
    assert dst.read_bytes() == src.read_bytes()
    with pytest.raises(FileNotFoundError):
        await io.acopy_checkpoint(tmp_path / "missing.ckpt", dst)
    assert temp_files(dst.parent) == [] and temp_files(tmp_path) == []
    assert torch.equal(load(dst)["v"], torch.arange(3))


@pytest.mark.anyio
@pytest.mark.parametrize("scheme", ["file://", "local://"])
async def test_acopy_copies_between_local_urls_resolved_at_the_call(tmp_path, make_io, monkeypatch, scheme):
    """``local://`` names a local file as ``file://`` does (fsspec's LocalFileSystem): acopy
    copies it, resolving a relative one against the working folder at the call."""
    (tmp_path / "at_call").mkdir()
    (tmp_path / "later").mkdir()
    monkeypatch.chdir(tmp_path / "at_call")
    held = HeldIO()
    io = make_io(held)
    held.gate.clear()
    await io.asave_checkpoint({"v": torch.arange(4)}, f"{scheme}last.ckpt")
    async with anyio.create_task_group() as tg:
        tg.start_soon(io.acopy_checkpoint, f"{scheme}last.ckpt", f"{scheme}best/best.ckpt")
        await anyio.sleep(0.1)  # the copy waits for the save of its source
        monkeypatch.chdir(tmp_path / "later")
        held.gate.set()
    dst = tmp_path / "at_call" / "best" / "best.ckpt"
    assert torch.equal(load(dst)["v"], torch.arange(4))
    assert dst.read_bytes() == (tmp_path / "at_call" / "last.ckpt").read_bytes()
    assert not (tmp_path / "later" / "best").exists()


@pytest.mark.anyio
async def test_acopy_over_a_checkpoint_with_a_checksum_record_leaves_it_verifiable(tmp_path, make_io):
    from asyncckpt.__main__ import main
    from asyncckpt.integrity import read_record, sha256_file

    io = make_io(TorchCheckpointIO(checksum=True))
    src, dst = tmp_path / "last.ckpt", tmp_path / "best.ckpt"
    await io.asave_checkpoint({"v": torch.arange(3)}, dst)
    await io.asave_checkpoint({"v": torch.arange(10)}, src)
    await io.acopy_checkpoint(src, dst)
    assert read_record(str(dst)) == [sha256_file(str(dst))]  # the copy's digest only, once committed
    assert torch.equal(io.load_checkpoint(dst, verify=True)["v"], torch.arange(10))
    assert main(["verify", str(dst)]) == 0
    # A copy of a plain file (no record) over a checksummed one records the copied bytes.
    plain = tmp_path / "plain.ckpt"
    torch.save({"v": torch.arange(4)}, plain)
    await io.acopy_checkpoint(plain, dst)
    assert main(["verify", str(dst)]) == 0 and torch.equal(io.load_checkpoint(dst, verify=True)["v"], torch.arange(4))
    # A source with a record passes it on to a destination that had none.
    fresh = tmp_path / "fresh.ckpt"
    await io.acopy_checkpoint(src, fresh)
    assert read_record(str(fresh)) == [sha256_file(str(src))] and main(["verify", str(fresh)]) == 0
    assert temp_files(tmp_path) == []


@pytest.mark.anyio
async def test_two_acopies_to_one_destination_at_once_leave_it_verifiable(tmp_path, make_io):
    """Copies are not ordered by the engine; their record commits and renames must not interleave."""
    from asyncckpt.integrity import verify_file

    io = make_io(TorchCheckpointIO(checksum=True))
    sources = [tmp_path / f"src{i}.ckpt" for i in range(2)]
    for i, src in enumerate(sources):
        await io.asave_checkpoint({"v": torch.full((200_000,), float(i))}, src)
    dst = tmp_path / "best.ckpt"
    await io.asave_checkpoint({"v": torch.arange(3)}, dst)
    for _ in range(5):
        async with anyio.create_task_group() as tg:
            for src in sources:
                tg.start_soon(io.acopy_checkpoint, src, dst)
        assert verify_file(str(dst)).method == "sha256"
        assert dst.read_bytes() in (sources[0].read_bytes(), sources[1].read_bytes())
    assert temp_files(tmp_path) == []


@pytest.mark.anyio
async def test_acopy_of_a_source_that_does_not_match_its_record_copies_nothing(tmp_path, make_io):
    from asyncckpt import IntegrityError

    io = make_io(TorchCheckpointIO(checksum=True))
    src, dst = tmp_path / "last.ckpt", tmp_path / "best.ckpt"
    await io.asave_checkpoint({"v": torch.arange(3)}, dst)
    await io.asave_checkpoint({"v": torch.arange(10)}, src)
    await io.aflush()
    before = dst.read_bytes(), (tmp_path / "best.ckpt.sha256").read_bytes()
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the source rotted on disk after its save
    src.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its checksum record"):
        await io.acopy_checkpoint(src, dst)
    assert (dst.read_bytes(), (tmp_path / "best.ckpt.sha256").read_bytes()) == before
    assert temp_files(tmp_path) == []


# -- asyncio-native (pytest-asyncio): Task.cancel and wait_for ------------------------------


@pytest.mark.asyncio
async def test_asyncio_task_cancel_while_waiting_for_a_slot(tmp_path, make_io):
    held = HeldIO()
    io = make_io(held, max_pending=1)
    held.gate.clear()
    await io.asave_checkpoint({"x": torch.ones(2)}, tmp_path / "a.ckpt")
    task = asyncio.create_task(io.asave_checkpoint({"x": torch.ones(2)}, tmp_path / "b.ckpt"))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert io.pending == 1 and io.free_slots == 0
    held.gate.set()
    await io.aflush()
    assert not (tmp_path / "b.ckpt").exists() and io.free_slots == 1


@pytest.mark.asyncio
async def test_asyncio_wait_for_on_aflush_leaves_writes_going(tmp_path, make_io):
    held = HeldIO()
    io = make_io(held)
    held.gate.clear()
    weight = torch.ones(8)
    await io.asave_checkpoint({"w": weight}, tmp_path / "a.ckpt")
    weight.zero_()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(io.aflush(), 0.1)
    assert io.pending == 1
    held.gate.set()
    got = await io.aload_checkpoint(tmp_path / "a.ckpt")
    assert torch.equal(got["w"], torch.ones(8))


@pytest.mark.asyncio
async def test_asyncio_async_with_round_trip(tmp_path):
    async with AsyncCheckpointIO(handle_sigterm=False) as io:
        await io.asave_checkpoint({"v": torch.arange(6)}, tmp_path / "a.ckpt")
        await io.aremove_checkpoint(tmp_path / "a.ckpt")
        await io.asave_checkpoint({"v": torch.arange(2)}, tmp_path / "a.ckpt")
        assert torch.equal((await io.aload_checkpoint(tmp_path / "a.ckpt"))["v"], torch.arange(2))
    assert torch.equal(load(tmp_path / "a.ckpt")["v"], torch.arange(2))


def test_core_imports_and_saves_without_anyio(tmp_path):
    code = (
        "import sys; sys.modules['anyio'] = None; sys.modules['aiofiles'] = None\n"
        "import torch, asyncckpt\n"
        "io = asyncckpt.AsyncCheckpointIO(handle_sigterm=False)\n"
        f"io.save_checkpoint({{'x': torch.ones(2)}}, {str(tmp_path / 'a.ckpt')!r}); io.teardown()\n"
    )
    run_python(code, timeout=60, check=True)
    assert torch.equal(load(tmp_path / "a.ckpt")["x"], torch.ones(2))


@pytest.mark.anyio
async def test_asave_refuses_two_dtypes_on_one_storage_at_the_call_as_save_does(tmp_path, make_io):
    from asyncckpt import NotSerializableError

    io = make_io()
    ints = torch.arange(8, dtype=torch.int32)
    with pytest.raises(NotSerializableError, match=r"ints \(torch\.int32\) and floats \(torch\.float32\)"):
        await io.asave_checkpoint({"ints": ints, "floats": ints.view(torch.float32)}, tmp_path / "a.ckpt")
    await io.asave_checkpoint({"ints": ints}, tmp_path / "b.ckpt")
    await io.aflush()
    assert not (tmp_path / "a.ckpt").exists() and torch.equal(load(tmp_path / "b.ckpt")["ints"], ints)


# -- reserve ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_areserve_returns_once_the_memory_is_ready_and_the_first_save_allocates_nothing(tmp_path, make_io):
    io = make_io(max_pending=2)
    state = {"w": torch.randn(64, 1024), "b": torch.randn(1024)}
    buffers = await io.areserve(state)
    assert len(buffers) == 2 and all(b.reserved and b.nbytes > 0 for b in buffers)
    handle = await io.asave_checkpoint(dict(state, step=1), tmp_path / "a.ckpt")
    await io.aflush()
    assert handle.result().allocated_bytes == 0
    got = load(tmp_path / "a.ckpt")
    assert got["step"] == 1 and torch.equal(got["w"], state["w"])


@pytest.mark.anyio
async def test_areserve_raises_a_bad_request_at_the_await(make_io):
    io = make_io()
    with pytest.raises(TypeError, match="reserve"):
        await io.areserve("not a state")
    with pytest.raises(ValueError, match="reserve"):
        await io.areserve(-1)


@pytest.mark.anyio
async def test_a_cancelled_areserve_leaves_the_reservation_running_and_the_loop_free(tmp_path, make_io):
    io = make_io(max_pending=1)
    nbytes = 256 << 20  # long enough to be cancelled midway on this machine
    with anyio.move_on_after(0.001) as scope:
        await io.areserve(nbytes)
    assert scope.cancelled_caught
    # The reservation goes on in its thread: the next save waits for its slot, allocates nothing.
    state = {"w": torch.ones(nbytes // 4)}  # the size reserved: its slot adopts the arena
    handle = await io.asave_checkpoint(state, tmp_path / "a.ckpt")
    await io.aflush()
    assert handle.result().allocated_bytes == 0
    assert torch.equal(load(tmp_path / "a.ckpt")["w"], state["w"])
