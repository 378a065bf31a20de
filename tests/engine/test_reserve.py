"""``AsyncCheckpointIO.reserve``: the first saves' staging memory made ready off the caller's
thread, within the memory bound, and correct when a save or a teardown meets it halfway."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from asyncckpt import AsyncCheckpointError, AsyncCheckpointIO, NotSerializableError
from conftest import load

MB = 1024 * 1024


def state_of(mb: int = 8, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(mb * MB // 4, generator=gen), "b": torch.randn(100, generator=gen), "step": seed}


def headroom(nbytes: int) -> int:
    return nbytes // 64 + MB  # as documented: a slot holds at most need + 2 * this


def reserve_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "asyncckpt-reserve"]


@pytest.mark.parametrize("how", ["state", "bytes"])
def test_first_save_after_a_reservation_allocates_nothing_in_the_call(tmp_path, writer, how):
    io = AsyncCheckpointIO(max_pending=2, writer=writer)
    state = state_of()
    nbytes = state["w"].nbytes + state["b"].nbytes
    reserved = io.reserve(state if how == "state" else nbytes, wait=True).result()
    assert len(reserved) == 2 and all(b.reserved and b.nbytes > 0 for b in reserved)
    for i in range(2):  # the second overlaps the first's write: warm too
        io.save_checkpoint(dict(state, step=i), tmp_path / f"{i}.ckpt")
    io.flush()
    assert [s.allocated_bytes for s in io.stats] == [0, 0]
    after = io.staging_buffers()
    assert {b.arena_id for b in after} == {b.arena_id for b in reserved}
    for i in range(2):
        out = load(tmp_path / f"{i}.ckpt")
        assert out["step"] == i and torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"])
    io.teardown()


def test_without_a_reservation_the_first_save_allocates_in_the_call(tmp_path):
    io = AsyncCheckpointIO(max_pending=1)
    state = state_of()
    io.save_checkpoint(state, tmp_path / "a.ckpt")
    io.save_checkpoint(state, tmp_path / "b.ckpt")
    io.flush()
    first, second = io.stats
    assert first.allocated_bytes >= state["w"].nbytes and second.allocated_bytes == 0
    io.teardown()


def test_lazy_staging_stages_into_reserved_memory(tmp_path):
    io = AsyncCheckpointIO(max_pending=2, staging="lazy")
    state = state_of()
    io.reserve(state, wait=True)
    io.save_checkpoint(state, tmp_path / "a.ckpt")
    io.flush()
    assert io.stats[-1].allocated_bytes == 0
    assert torch.equal(load(tmp_path / "a.ckpt")["w"], state["w"])
    io.teardown()


@pytest.mark.parametrize("when_full", ["wait", "raise"])
def test_a_save_during_a_reservation_waits_for_a_ready_slot_and_is_correct(tmp_path, writer, when_full):
    io = AsyncCheckpointIO(max_pending=2, writer=writer, when_full=when_full)
    state = state_of(mb=32)
    reservation = io.reserve(state)  # not waited for: every free slot is the reservation's now
    state["w"][:10] = 7.0  # in place, as training does; the point in time is the save's call
    handle = io.save_checkpoint(state, tmp_path / "a.ckpt")
    state["w"][:10] = 8.0
    io.flush()
    reservation.result(timeout=60)
    assert handle.result().allocated_bytes == 0  # it took a reserved slot: no second arena beside it
    out = load(tmp_path / "a.ckpt")
    assert torch.equal(out["w"][:10], torch.full((10,), 7.0)) and torch.equal(out["w"][10:], state["w"][10:])
    io.teardown()


def test_staging_memory_stays_within_max_pending_slots_while_reserving_and_saving(tmp_path):
    io = AsyncCheckpointIO(max_pending=2)
    state = state_of(mb=32)
    need = state["w"].nbytes + 64 + state["b"].nbytes
    samples = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(io.staging_bytes)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        io.reserve(need)  # a byte count, then saves of the same size while it runs
        arenas = set()
        for i in range(4):
            handle = io.save_checkpoint(dict(state, step=i), tmp_path / f"{i}.ckpt")
            arenas |= {b.arena_id for b in io.staging_buffers()}
            handle.result()
        io.flush()
        arenas |= {b.arena_id for b in io.staging_buffers()}
    finally:
        done.set()
        sampler.join()
    assert max(samples) <= 2 * (need + 2 * headroom(need))
    assert len(arenas) <= 2  # the saves kept the reserved arenas: none was allocated beside them
    assert all(s.allocated_bytes == 0 for s in io.stats)
    io.teardown()


def test_teardown_during_a_reservation_stops_it_and_frees_its_memory(tmp_path):
    io = AsyncCheckpointIO(max_pending=2)
    reservation = io.reserve(512 * MB)
    finished = threading.Event()
    tearer = threading.Thread(target=lambda: (io.teardown(), finished.set()))
    tearer.start()
    tearer.join(120)
    assert finished.is_set(), "teardown hung on a reservation"
    assert reservation.done() and io.staging_bytes == 0 and io.free_slots == 2
    if reservation.exception() is not None:
        assert "stopped by teardown" in str(reservation.exception())
    for thread in reserve_threads():
        thread.join(10)
    assert not reserve_threads()
    # the engine works again afterwards, reservations included
    io.reserve(state_of(mb=1), wait=True)
    io.save_checkpoint(state_of(mb=1), tmp_path / "a.ckpt")
    io.flush()
    assert io.stats[-1].allocated_bytes == 0
    io.teardown()


def test_a_failed_reservation_is_raised_by_its_handle_and_the_saves_go_on(tmp_path):
    io = AsyncCheckpointIO(max_pending=2)
    with pytest.raises(NotSerializableError):
        io.reserve({"w": torch.ones(4), "f": lambda: 0}, wait=True)
    assert io.free_slots == 2 and io.pending_errors == 0
    io.save_checkpoint({"w": torch.ones(4)}, tmp_path / "a.ckpt")
    io.flush()
    io.teardown()


def test_a_reservation_does_not_let_a_save_skip_torch_saves_refusals(tmp_path):
    base = torch.zeros(16)
    state = {"a": base, "b": base.view(torch.int32)}  # one storage, two dtypes: torch.save refuses
    io = AsyncCheckpointIO(max_pending=1)
    with pytest.raises(NotSerializableError):
        io.reserve(state, wait=True)
    with pytest.raises(NotSerializableError, match="different dtypes"):
        io.save_checkpoint(state, tmp_path / "a.ckpt")
    io.teardown()


@pytest.mark.parametrize(
    "bad, error, words",
    [
        (-1, ValueError, "negative byte count"),
        (True, TypeError, "byte count"),
        ([torch.ones(2)], TypeError, "got list"),
        (torch.nn.Linear(2, 2), TypeError, "state_dict()"),
        (1.5, TypeError, "got float"),
    ],
)
def test_reserve_refuses_what_is_neither_a_state_nor_a_byte_count(bad, error, words):
    io = AsyncCheckpointIO()
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        io.reserve(bad)
    assert io.free_slots == 2
    io.teardown()


def test_reserve_refuses_pinned_memory_it_cannot_give():
    io = AsyncCheckpointIO()
    with pytest.raises(TypeError, match="pinned= is for a byte count"):
        io.reserve({"w": torch.ones(2)}, pinned=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            io.reserve(MB, pinned=True)
    io.teardown()


def test_a_second_reservation_while_one_runs_is_refused():
    io = AsyncCheckpointIO(max_pending=2)
    first = io.reserve(256 * MB)
    if not first.done():
        with pytest.raises(AsyncCheckpointError, match="still running"):
            io.reserve(MB)
    first.result(timeout=120)
    io.reserve(MB, wait=True)  # once it is done, another may replace it
    io.teardown()
