"""One group of tests per contract line in DESIGN.md (1 to 7); each fails when its line breaks."""

from __future__ import annotations

import collections
import logging
import os
import threading

import pytest
import torch

from _subproc import run_python
from asyncckpt import (
    AsyncCheckpointIO,
    CheckpointSaveError,
    InvalidPathError,
    QueueFullError,
    TorchCheckpointIO,
)
from asyncckpt.lazy import TensorModifiedError
from conftest import FailingIO, FileEvent, GatedIO, load, temp_files

#: The writer and staging pairs that exist (lazy staging needs the thread writer).
WRITER_STAGING = [("thread", "eager"), ("thread", "lazy"), ("process", "eager")]


# -- 1. Point in time ------------------------------------------------------------------------


def test_tensor_changed_in_place_after_return_is_not_in_the_file(tmp_path, gated_io, writer):
    io = AsyncCheckpointIO(gated_io, writer=writer)
    weight = torch.arange(1000, dtype=torch.float32)
    gated_io.gate.clear()  # hold the write, so the change lands while the save is in flight
    io.save_checkpoint({"w": weight}, tmp_path / "a.ckpt")
    weight.add_(1000)
    gated_io.gate.set()
    io.flush()
    assert torch.equal(load(tmp_path / "a.ckpt")["w"], torch.arange(1000, dtype=torch.float32))
    io.teardown()


def test_optimizer_step_after_return_is_not_in_the_file(tmp_path, gated_io, writer):
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_avg = opt.state_dict()["state"][0]["exp_avg"].clone()
    io = AsyncCheckpointIO(gated_io, writer=writer)
    gated_io.gate.clear()
    io.save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "a.ckpt")
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    gated_io.gate.set()
    io.teardown()
    out = load(tmp_path / "a.ckpt")
    for k, v in expected.items():
        assert torch.equal(out["model"][k], v)
    assert torch.equal(out["opt"]["state"][0]["exp_avg"], expected_avg)


def test_nested_containers_changed_after_return_are_not_in_the_file(tmp_path, gated_io, writer):
    io = AsyncCheckpointIO(gated_io, writer=writer)
    history = [1, 2, {"lr": 0.1}]
    ckpt = {"history": history, "meta": {"epoch": 3}, "od": collections.OrderedDict(a=1)}
    gated_io.gate.clear()
    io.save_checkpoint(ckpt, tmp_path / "a.ckpt")
    history.append(3)
    history[2]["lr"] = 99.0
    ckpt["meta"]["epoch"] = 4
    ckpt["od"]["b"] = 2
    ckpt["new_key"] = True
    gated_io.gate.set()
    io.teardown()
    out = load(tmp_path / "a.ckpt")
    assert out == {"history": [1, 2, {"lr": 0.1}], "meta": {"epoch": 3}, "od": collections.OrderedDict(a=1)}
    assert type(out["od"]) is collections.OrderedDict


@pytest.mark.parametrize("max_pending", [1, 2])
def test_reused_staging_buffers_never_leak_one_save_into_another(tmp_path, max_pending, writer):
    io = AsyncCheckpointIO(max_pending=max_pending, writer=writer)
    weight = torch.zeros(256, 256)
    for step in range(6):
        weight.fill_(float(step))
        io.save_checkpoint({"w": weight, "step": step}, tmp_path / f"step{step}.ckpt")
    io.flush()
    for step in range(6):
        out = load(tmp_path / f"step{step}.ckpt")
        assert out["step"] == step
        assert torch.equal(out["w"], torch.full((256, 256), float(step)))
    io.teardown()


def test_staging_buffers_are_reused_from_save_to_save(tmp_path, writer):
    io = AsyncCheckpointIO(max_pending=1, writer=writer)
    weight = torch.randn(128, 128)
    io.save_checkpoint({"w": weight}, tmp_path / "a.ckpt")
    io.flush()
    (before,) = io.staging_buffers()
    io.save_checkpoint({"w": weight + 1}, tmp_path / "b.ckpt")
    io.flush()
    (after,) = io.staging_buffers()
    assert after.arena_id == before.arena_id is not None and after.data_ptrs == before.data_ptrs
    io.teardown()


class KeepingIO(TorchCheckpointIO):
    """Keeps what each save hands it and writes it all at teardown, as an IO that batches its
    writes would: it breaks the documented rule that an IO must not keep the staged tensors."""

    def __init__(self, keeps: str) -> None:
        super().__init__()
        self.keeps = keeps
        self.kept: list = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if self.keeps == "detached tensors":  # new tensor objects on the staged memory
            checkpoint = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in checkpoint.items()}
        self.kept.append((path, checkpoint))

    def teardown(self):
        for path, checkpoint in self.kept:
            super().save_checkpoint(checkpoint, path)
        self.kept = []
        super().teardown()


@pytest.mark.parametrize("keeps", ["the checkpoint", "detached tensors"])
@pytest.mark.parametrize("writer,staging", WRITER_STAGING)
def test_an_io_that_keeps_what_it_was_given_keeps_each_save_as_it_was(tmp_path, writer, staging, keeps, caplog):
    # NeMo RL #3312: a reused staging buffer made every kept checkpoint repeat the latest one.
    io = AsyncCheckpointIO(KeepingIO(keeps), max_pending=1, writer=writer, staging=staging)
    weight = torch.zeros(64, 64)
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        for step in range(4):
            weight.fill_(float(step))
            io.save_checkpoint({"w": weight, "step": step}, tmp_path / f"step{step}.ckpt")
        io.flush()
        assert io.staging_bytes <= weight.nbytes + 64  # the kept memory is the IO's, not staging's
        io.teardown()
    for step in range(4):
        out = load(tmp_path / f"step{step}.ckpt")
        assert out["step"] == step and torch.equal(out["w"], torch.full((64, 64), float(step))), step
    said = [r.getMessage() for r in caplog.records if "kept" in r.getMessage()]
    assert len(said) == 1 and "KeepingIO" in said[0], said


# -- 2. Order --------------------------------------------------------------------------------


def test_remove_right_after_save_leaves_no_file(tmp_path, gated_io, writer):
    io = AsyncCheckpointIO(gated_io, writer=writer)
    gated_io.gate.clear()
    io.save_checkpoint({"x": torch.ones(3)}, tmp_path / "a.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")
    assert gated_io.started.wait(120)  # a loaded machine may take long to start the writer process
    gated_io.gate.set()
    io.flush()
    assert not (tmp_path / "a.ckpt").exists()
    assert gated_io.log == [f"save-start {tmp_path / 'a.ckpt'}", f"save-done {tmp_path / 'a.ckpt'}",
                            f"remove {tmp_path / 'a.ckpt'}"]
    io.teardown()


def test_save_after_remove_recreates_the_file(tmp_path, writer):
    io = AsyncCheckpointIO(writer=writer)
    io.save_checkpoint({"v": 1}, tmp_path / "a.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")
    io.save_checkpoint({"v": 2}, tmp_path / "a.ckpt")
    io.flush()
    assert load(tmp_path / "a.ckpt") == {"v": 2}
    io.teardown()


# A remove depends on every save queued before it: one of them failing keeps the file the remove
# would have deleted (keep-last-N rotation, ModelCheckpoint(save_top_k=1)), so a run is never left
# with no checkpoint. The failure is ENOSPC from GatedIO (fault injection: a full disk cannot be
# produced here) or, with lazy staging, a real in-place change caught by the version counters.


@pytest.mark.parametrize("writer,staging", WRITER_STAGING)
def test_a_remove_queued_after_a_save_that_fails_keeps_the_file_it_would_replace(tmp_path, gated_io, writer, staging):
    io = AsyncCheckpointIO(gated_io, writer=writer, staging=staging)
    old = {"step": 1, "w": torch.full((32_768,), 1.0)}  # 128 KiB: copied lazily with staging="lazy"
    io.save_checkpoint(old, tmp_path / "a.ckpt")
    io.flush()
    gated_io.gate.clear()  # the new save fails only after the remove is queued behind it
    io.save_checkpoint({"step": 2, "w": torch.full((32_768,), 2.0)}, tmp_path / "fail-b.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")
    gated_io.gate.set()
    with pytest.raises(CheckpointSaveError, match="fail-b.ckpt") as info:
        io.flush()
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == 28
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "a.ckpt" in notes and "kept" in notes and "fail-b.ckpt" in notes, notes
    assert torch.equal(load(tmp_path / "a.ckpt")["w"], old["w"])
    assert f"remove {tmp_path / 'a.ckpt'}" not in gated_io.log
    io.flush()  # raised once
    # Once the failure has been raised, the caller decides: a remove queued now is carried out.
    io.save_checkpoint({"step": 3}, tmp_path / "c.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")
    io.flush()
    assert sorted(os.listdir(tmp_path)) == ["c.ckpt", "gate"]
    io.teardown()


@pytest.mark.parametrize("writer,staging", WRITER_STAGING)
def test_a_remove_queued_before_a_save_that_fails_is_carried_out(tmp_path, gated_io, writer, staging):
    io = AsyncCheckpointIO(gated_io, writer=writer, staging=staging)
    io.save_checkpoint({"step": 1}, tmp_path / "a.ckpt")
    io.save_checkpoint({"step": 2}, tmp_path / "b.ckpt")
    io.flush()
    gated_io.gate.clear()
    io.save_checkpoint({"step": 3}, tmp_path / "fail-c.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")  # depends on fail-c: kept
    gated_io.gate.set()
    with pytest.raises(CheckpointSaveError):
        io.flush()
    io.remove_checkpoint(tmp_path / "b.ckpt")  # after the failure was raised: removed
    io.save_checkpoint({"step": 4}, tmp_path / "fail-d.ckpt")  # fails after the remove, not before it
    with pytest.raises(CheckpointSaveError, match="fail-d.ckpt") as info:
        io.flush()
    assert not getattr(info.value, "__notes__", None)
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt", "gate"]
    io.teardown()


def test_a_remove_after_a_lazy_save_that_fails_its_version_check_keeps_the_file(tmp_path):
    io = AsyncCheckpointIO(staging="lazy")
    weight = torch.full((32_768,), 1.0)  # 128 KiB: copied lazily
    io.save_checkpoint({"w": weight}, tmp_path / "a.ckpt")
    io.flush()
    io.save_checkpoint({"w": weight}, tmp_path / "b.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")
    weight.add_(1)  # in place while the copy may still run: b.ckpt fails at the next guard
    with pytest.raises(TensorModifiedError) as info:
        io.flush()
    assert "a.ckpt" in "\n".join(getattr(info.value, "__notes__", []))
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]
    assert torch.equal(load(tmp_path / "a.ckpt")["w"], torch.full((32_768,), 1.0))
    io.teardown()


def test_load_right_after_save_waits_for_the_write(tmp_path, gated_io, writer):
    io = AsyncCheckpointIO(gated_io, writer=writer)
    io.save_checkpoint({"v": torch.zeros(4)}, tmp_path / "a.ckpt")
    io.flush()
    gated_io.gate.clear()
    io.save_checkpoint({"v": torch.ones(4)}, tmp_path / "a.ckpt")
    assert gated_io.started.wait(10)
    # The old file is still there; the load must wait for the queued save, not read it.
    threading.Timer(0.2, gated_io.gate.set).start()
    out = io.load_checkpoint(tmp_path / "a.ckpt", weights_only=True)
    assert torch.equal(out["v"], torch.ones(4))
    io.teardown()


def test_saves_to_one_path_take_effect_in_call_order(tmp_path, writer):
    io = AsyncCheckpointIO(max_pending=3, writer=writer)
    for step in range(10):
        io.save_checkpoint({"step": step, "t": torch.full((100,), step)}, tmp_path / "last.ckpt")
    io.flush()
    assert load(tmp_path / "last.ckpt")["step"] == 9
    io.teardown()


def test_saves_from_several_threads_all_land(tmp_path, writer):
    io = AsyncCheckpointIO(max_pending=2, writer=writer)
    errors = []

    def worker(n):
        try:
            for i in range(5):
                io.save_checkpoint({"n": n, "i": i, "t": torch.full((1000,), n * 10 + i)}, tmp_path / f"{n}-{i}.ckpt")
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    io.flush()
    assert not errors
    for n in range(4):
        for i in range(5):
            out = load(tmp_path / f"{n}-{i}.ckpt")
            assert (out["n"], out["i"]) == (n, i)
            assert torch.equal(out["t"], torch.full((1000,), n * 10 + i))
    io.teardown()


# -- 3. Bounded ------------------------------------------------------------------------------


class RecordsWhetherSecondSaveReturned(GatedIO):
    """Notes, when the first file is committed, whether the second save had already returned."""

    def __init__(self, folder):
        super().__init__(folder)
        self.second_returned = FileEvent(os.path.join(folder, "second-returned"))
        self.seen = FileEvent(os.path.join(folder, "second-returned-before-first-write"))

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        super().save_checkpoint(checkpoint, path, storage_options)
        if os.fspath(path).endswith("a.ckpt") and self.second_returned.is_set():
            self.seen.set()


def test_one_save_more_than_max_pending_waits_for_a_write(tmp_path, writer):
    (tmp_path / "gate").mkdir()
    gated = RecordsWhetherSecondSaveReturned(str(tmp_path / "gate"))
    io = AsyncCheckpointIO(gated, max_pending=1, writer=writer)
    gated.gate.clear()
    io.save_checkpoint({"x": torch.ones(10)}, tmp_path / "a.ckpt")

    def second():
        io.save_checkpoint({"x": torch.zeros(10)}, tmp_path / "b.ckpt")
        gated.second_returned.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert gated.started.wait(30)
    assert not gated.second_returned.is_set()
    gated.gate.set()
    assert gated.second_returned.wait(30)
    thread.join()
    io.flush()
    assert not gated.seen.is_set(), "the second save returned before the first was written"
    assert (tmp_path / "b.ckpt").exists()
    io.teardown()


def test_when_full_raise_refuses_without_staging(tmp_path, gated_io, writer):
    io = AsyncCheckpointIO(gated_io, max_pending=1, when_full="raise", writer=writer)
    gated_io.gate.clear()
    io.save_checkpoint({"x": 1}, tmp_path / "a.ckpt")
    with pytest.raises(QueueFullError, match="max_pending|staging slots"):
        io.save_checkpoint({"x": 2}, tmp_path / "b.ckpt")
    gated_io.gate.set()
    io.flush()
    io.save_checkpoint({"x": 3}, tmp_path / "b.ckpt")
    io.teardown()
    assert load(tmp_path / "b.ckpt") == {"x": 3}


@pytest.mark.parametrize("staging", ["eager", "lazy"])
@pytest.mark.parametrize("max_pending", [1, 2])
def test_when_full_raise_never_waits_when_threads_race_for_the_last_slot(tmp_path, gated_io, writer, staging,
                                                                          max_pending):
    """Several threads save at once while every write is held: max_pending of them get a slot, the
    others raise QueueFullError at once; none waits for a slot another thread took meanwhile."""
    if writer == "process" and staging == "lazy":
        pytest.skip("staging='lazy' needs writer='thread'")
    import sys

    io = AsyncCheckpointIO(gated_io, max_pending=max_pending, when_full="raise", writer=writer, staging=staging)
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads switch inside admission
    try:
        for round_ in range(15):
            gated_io.gate.clear()
            saved: list = []
            refused: list = []
            barrier = threading.Barrier(6)

            def save(i: int, barrier=barrier, round_=round_, saved=saved, refused=refused) -> None:
                barrier.wait()
                try:
                    io.save_checkpoint({"w": torch.full((50_000,), float(i))}, tmp_path / f"{round_}-{i}.ckpt")
                    saved.append(i)
                except QueueFullError:
                    refused.append(i)

            threads = [threading.Thread(target=save, args=(i,), daemon=True) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            waiting = sum(t.is_alive() for t in threads)
            gated_io.gate.set()  # lets a waiting save go on, so that the threads end
            for t in threads:
                t.join(30)
            io.flush()
            assert waiting == 0, f"round {round_}: {waiting} save(s) waited for a slot with when_full='raise'"
            assert len(saved) == max_pending and len(refused) == 6 - max_pending, (saved, refused)
    finally:
        sys.setswitchinterval(before)
        gated_io.gate.set()
        io.teardown()


def test_staging_memory_is_at_most_max_pending_checkpoints(tmp_path, writer):
    io = AsyncCheckpointIO(max_pending=2, writer=writer)
    ckpt = {"a": torch.randn(1000, 100), "b": torch.randn(500), "tied": None}
    ckpt["tied"] = ckpt["a"][10:20]
    ckpt_bytes = ckpt["a"].untyped_storage().nbytes() + ckpt["b"].untyped_storage().nbytes()
    for i in range(8):
        io.save_checkpoint(ckpt, tmp_path / f"{i}.ckpt")
    io.flush()
    assert io.free_slots == 2
    alignment = 64 * 2  # each storage starts on a 64-byte boundary in the slot's arena
    assert sum(buffer.nbytes for buffer in io.staging_buffers()) <= 2 * (ckpt_bytes + alignment)
    assert all(s.tensor_bytes == ckpt_bytes for s in io.stats)
    io.teardown()


# -- 4. Durable and atomic -------------------------------------------------------------------


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    sync = TorchCheckpointIO()
    target = tmp_path / "a.ckpt"
    sync.save_checkpoint({"v": 1}, target)

    class ExplodesWhilePickled:
        def __reduce__(self):
            raise RuntimeError("boom while writing")

    with pytest.raises(RuntimeError, match="boom"):
        sync.save_checkpoint({"big": torch.ones(10000), "bad": ExplodesWhilePickled()}, target)
    assert load(target) == {"v": 1}
    assert temp_files(str(tmp_path)) == []


def test_no_temp_files_survive_a_clean_run(tmp_path, writer):
    io = AsyncCheckpointIO(writer=writer)
    for i in range(5):
        io.save_checkpoint({"i": torch.full((100,), i)}, tmp_path / "sub" / f"{i}.ckpt")
        io.save_checkpoint({"i": torch.full((100,), i)}, tmp_path / "sub" / "last.ckpt")
    io.teardown()
    assert temp_files(str(tmp_path)) == []
    assert sorted(os.listdir(tmp_path / "sub")) == sorted([f"{i}.ckpt" for i in range(5)] + ["last.ckpt"])


def test_stale_temp_files_of_dead_processes_are_cleaned(tmp_path):
    from asyncckpt import cleanup_temp_files
    from asyncckpt.storage import temp_path_for

    dead = run_python("import os; print(os.getpid())")
    from asyncckpt.storage import HOST_ID

    stale = tmp_path / f".a.ckpt.asyncckpt-tmp-{HOST_ID}-{int(dead.stdout)}-0123abcd"
    stale.write_bytes(b"partial")
    live = temp_path_for(str(tmp_path / "b.ckpt"))
    open(live, "wb").close()
    assert cleanup_temp_files(str(tmp_path)) == [str(stale)]
    assert os.path.exists(live)


# -- 5. Loud ---------------------------------------------------------------------------------


def test_background_failure_is_logged_then_raised_once_by_the_next_call(tmp_path, caplog, writer):
    io = AsyncCheckpointIO(FailingIO(), writer=writer)
    with caplog.at_level(logging.ERROR, logger="asyncckpt"):
        io.save_checkpoint({"x": torch.ones(3)}, tmp_path / "fail.ckpt")
        with pytest.raises(CheckpointSaveError) as info:
            io.flush()
    assert str(tmp_path / "fail.ckpt") in str(info.value)
    assert info.value.path == str(tmp_path / "fail.ckpt")
    assert isinstance(info.value.__cause__, OSError)
    assert any("fail.ckpt" in r.getMessage() for r in caplog.records)
    io.flush()  # raised once: the next call is clean
    io.save_checkpoint({"x": 1}, tmp_path / "ok.ckpt")
    io.teardown()
    assert load(tmp_path / "ok.ckpt") == {"x": 1}


@pytest.mark.parametrize("next_call", ["save", "flush", "teardown", "load", "remove"])
def test_every_entry_point_raises_a_pending_failure(tmp_path, next_call, writer):
    io = AsyncCheckpointIO(FailingIO(), writer=writer)
    io.save_checkpoint({"x": 1}, tmp_path / "fail.ckpt")
    io.wait_idle(30)
    calls = {
        "save": lambda: io.save_checkpoint({"x": 2}, tmp_path / "ok.ckpt"),
        "flush": io.flush,
        "teardown": io.teardown,
        "load": lambda: io.load_checkpoint(tmp_path / "fail.ckpt"),
        "remove": lambda: io.remove_checkpoint(tmp_path / "other.ckpt"),
    }
    with pytest.raises(CheckpointSaveError, match="fail.ckpt"):
        calls[next_call]()
    io.teardown()


def test_parent_turned_into_a_file_while_queued_is_raised_naming_the_path(tmp_path, gated_io, writer):
    io = AsyncCheckpointIO(gated_io, writer=writer)
    gated_io.gate.clear()
    io.save_checkpoint({"x": 1}, tmp_path / "later" / "a.ckpt")
    (tmp_path / "later").write_text("now a file")
    gated_io.gate.set()
    with pytest.raises(CheckpointSaveError, match="later"):
        io.flush()
    io.teardown()


def test_parent_is_a_file_is_refused_at_the_call(tmp_path, writer):
    (tmp_path / "afile").write_text("x")
    io = AsyncCheckpointIO(writer=writer)
    with pytest.raises(InvalidPathError, match="afile"):
        io.save_checkpoint({"x": 1}, tmp_path / "afile" / "a.ckpt")
    io.teardown()


def test_teardown_raises_a_failure_after_finishing_everything_else(tmp_path, writer):
    gated = GatedIO()
    io = AsyncCheckpointIO(gated, writer=writer)
    gated.gate.clear()  # both saves are queued before the first one fails
    io.save_checkpoint({"x": 1}, tmp_path / "fail.ckpt")
    io.save_checkpoint({"x": 2}, tmp_path / "ok.ckpt")
    gated.gate.set()
    with pytest.raises(CheckpointSaveError):
        io.teardown()
    assert load(tmp_path / "ok.ckpt") == {"x": 2}
    io.teardown()


# -- 6. Lifecycle ----------------------------------------------------------------------------


def test_flush_returns_only_when_everything_before_it_is_done(tmp_path, gated_io, writer):
    io = AsyncCheckpointIO(gated_io, max_pending=3, writer=writer)
    gated_io.gate.clear()
    for i in range(3):
        io.save_checkpoint({"i": i}, tmp_path / f"{i}.ckpt")
    flushed = threading.Event()
    thread = threading.Thread(target=lambda: (io.flush(), flushed.set()))
    thread.start()
    assert gated_io.started.wait(10)
    assert not flushed.is_set()
    gated_io.gate.set()
    thread.join(30)
    assert flushed.is_set()
    assert all((tmp_path / f"{i}.ckpt").exists() for i in range(3))
    io.teardown()


class CountingIO(TorchCheckpointIO):
    teardowns = 0

    def teardown(self):
        CountingIO.teardowns += 1


def test_teardown_is_idempotent_and_the_object_works_again(tmp_path, writer):
    io = AsyncCheckpointIO(CountingIO(), writer=writer)
    io.save_checkpoint({"v": 1}, tmp_path / "a.ckpt")
    CountingIO.teardowns = 0
    io.teardown()
    io.teardown()
    assert CountingIO.teardowns == 2  # this process's copy; the writer process tears its own down
    assert io.writer is None
    io.save_checkpoint({"v": 2}, tmp_path / "b.ckpt")
    io.flush()
    assert load(tmp_path / "b.ckpt") == {"v": 2}
    io.teardown()
    assert load(tmp_path / "a.ckpt") == {"v": 1}


def test_stats_record_each_completed_save(tmp_path, writer):
    io = AsyncCheckpointIO(writer=writer)
    io.save_checkpoint({"w": torch.ones(1000)}, tmp_path / "a.ckpt")
    io.flush()
    (record,) = io.stats
    assert record.path == str(tmp_path / "a.ckpt")
    assert record.tensor_bytes == 4000
    assert record.blocking_seconds >= record.staging_seconds > 0
    assert record.write_seconds > 0
    io.teardown()


# -- 7. Format -------------------------------------------------------------------------------


def _roundtrip_cases():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "bf16": torch.randn(7, 5).to(torch.bfloat16),
        "f16": torch.randn(3).half(),
        "int64": torch.tensor([-(2**62), 0, 2**62 + 3], dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "uint8": torch.arange(256, dtype=torch.uint8),
        "complex": torch.randn(4, dtype=torch.complex64),
        "zero_size": torch.empty(0, 5),
        "scalar": torch.tensor(3.5),
        "noncontig": base.t(),
        "strided": base[:, ::2],
        "base": base,
        "view_of_base": base[1],
        "nan_inf": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]),
    }


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_files_open_with_plain_torch_load_and_round_trip_bitwise(tmp_path, writer):
    ckpt = _roundtrip_cases()
    ckpt["same_again"] = ckpt["bf16"]
    io = AsyncCheckpointIO(writer=writer)
    io.save_checkpoint(ckpt, tmp_path / "a.ckpt")
    io.teardown()
    out = torch.load(tmp_path / "a.ckpt", weights_only=True)
    for key, value in ckpt.items():
        got = out[key]
        assert (got.dtype, got.shape, got.stride()) == (value.dtype, value.shape, value.stride()), key
        assert torch.equal(_raw_bytes(got), _raw_bytes(value)), key
    # sharing is kept exactly as torch.save keeps it
    assert out["same_again"] is out["bf16"]
    assert out["view_of_base"].untyped_storage().data_ptr() == out["base"].untyped_storage().data_ptr()
    assert out["noncontig"].untyped_storage().data_ptr() == out["base"].untyped_storage().data_ptr()
    assert out["strided"].untyped_storage().data_ptr() == out["base"].untyped_storage().data_ptr()
    assert out["nan_inf"][3].item() == 0.0 and torch.signbit(out["nan_inf"][3])


def test_file_is_byte_for_byte_what_torch_save_writes_for_the_same_data(tmp_path, writer):
    ckpt = _roundtrip_cases()
    io = AsyncCheckpointIO(writer=writer)
    io.save_checkpoint(ckpt, tmp_path / "ours.ckpt")
    io.teardown()
    torch.save(ckpt, tmp_path / "plain.ckpt")
    ours = torch.load(tmp_path / "ours.ckpt", weights_only=True)
    plain = torch.load(tmp_path / "plain.ckpt", weights_only=True)
    assert ours.keys() == plain.keys()
    for key in plain:
        assert ours[key].untyped_storage().nbytes() == plain[key].untyped_storage().nbytes()
        assert bytes(ours[key].untyped_storage()) == bytes(plain[key].untyped_storage())


def test_parameters_and_module_objects_round_trip(tmp_path, writer):
    model = torch.nn.Linear(3, 2)
    io = AsyncCheckpointIO(writer=writer)
    io.save_checkpoint({"p": model.weight, "module": model, "frozen": torch.nn.Parameter(torch.ones(2), False)},
                       tmp_path / "a.ckpt")
    io.teardown()
    out = load(tmp_path / "a.ckpt")
    assert isinstance(out["p"], torch.nn.Parameter) and out["p"].requires_grad
    assert not out["frozen"].requires_grad
    assert isinstance(out["module"], torch.nn.Linear)
    assert torch.equal(out["module"].weight, model.weight)


def test_file_loads_in_a_process_without_asyncckpt(tmp_path, writer):
    io = AsyncCheckpointIO(writer=writer)
    io.save_checkpoint({"w": torch.arange(5), "meta": {"epoch": 2}}, tmp_path / "a.ckpt")
    io.teardown()
    code = (
        "import sys; sys.modules['asyncckpt'] = None\n"
        "import torch\n"
        f"out = torch.load({str(tmp_path / 'a.ckpt')!r}, weights_only=True)\n"
        "assert out['meta'] == {'epoch': 2} and out['w'].tolist() == [0, 1, 2, 3, 4]\n"
        "print('ok')\n"
    )
    result = run_python(code, cwd="/")
    assert result.stdout.strip() == "ok", result.stderr
