"""Staging internals that the contract tests reach only indirectly: the parallel copy."""

from __future__ import annotations

import os

import pytest
import torch

from asyncckpt import AsyncCheckpointIO
from asyncckpt._staging.copier import ParallelCopier, split_shares
from asyncckpt._staging.eager import EagerStager
from conftest import load


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_parallel_copy_is_exact_for_any_split(threads):
    gen = torch.Generator().manual_seed(threads)
    sizes = [3, 5_000_000, 17, 0, 2_100_000, 1, 4_000_001, 64]
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.uint8,
              torch.float64, torch.bool, torch.int16, torch.float16]
    src = [torch.randint(0, 255, (n,), generator=gen).to(dt) for n, dt in zip(sizes, dtypes, strict=True)]
    src.append(torch.randn(3000, 1000, generator=gen).t())  # non-contiguous: copied whole, never cut
    dst = [torch.empty_like(s) for s in src]
    copier = ParallelCopier(threads)
    copier.copy(dst, src)
    copier.close()
    for d, s in zip(dst, src, strict=True):
        assert torch.equal(d.reshape(-1).view(torch.uint8) if d.is_contiguous() else d,
                           s.reshape(-1).view(torch.uint8) if d.is_contiguous() else s)


def test_split_balances_bytes_and_covers_everything():
    shares = split_shares([(0, 10_000_000), (1, 2_000_000)], 12_000_000, 3)
    sizes = [sum(end - start for _, start, end in share.cuts) + 2_000_000 * (1 in share.whole) for share in shares]
    assert sum(sizes) == 12_000_000
    assert max(sizes) - min(sizes) <= 1


def test_a_copy_plan_is_reused_for_new_values_and_redone_for_a_new_thread_count():
    gen = torch.Generator().manual_seed(0)
    src = [torch.randn(3_000_000, generator=gen), torch.randn(5, generator=gen), torch.randn(2_000, 300).t()]
    dst = [torch.empty_like(s) for s in src]
    copier = ParallelCopier(2)
    plan = copier.copy(dst, src)
    assert plan.shares and any(share.cuts for share in plan.shares)  # the large tensor was cut
    for s in src:
        s.normal_(generator=gen)  # new values, same layout: the plan holds no data
    assert copier.copy(dst, src, plan) is plan
    assert all(torch.equal(d, s) for d, s in zip(dst, src, strict=True))
    copier.threads = 3
    plan3 = copier.copy(dst, src, plan)
    assert plan3 is not plan and len(plan3.shares) == 3
    copier.threads = 1
    assert not copier.copy(dst, src, plan3).shares
    copier.close()


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_new_layout_of_the_same_bytes_in_the_same_slot_is_staged_by_the_new_layout(tmp_path, writer):
    """The slot keeps its memory when the size repeats; what it copies and what the writer
    process rebuilds must follow the layout, not the memory (both are cached per layout)."""
    io = AsyncCheckpointIO(writer=writer, max_pending=1, staging_threads=2)
    big = torch.randn(3, 4_000_000)  # 48 MB: shared between the copy threads
    layouts = [
        {"a": big, "b": torch.arange(24.0).reshape(4, 6)},
        {"a": big, "b": torch.arange(24.0).reshape(4, 6)},  # repeated: the cached plan and specs
        {"a": big.t().contiguous().t(), "b": torch.arange(24.0).reshape(6, 4)},  # same bytes, new strides and shapes
        {"a": big[:, :2_000_000], "b": torch.arange(24.0).reshape(6, 4)[::2]},  # views: copied as raw bytes
    ]
    for i, checkpoint in enumerate(layouts):
        io.save_checkpoint(checkpoint, tmp_path / f"{i}.ckpt")
        io.flush()
    io.teardown()
    for i, checkpoint in enumerate(layouts):
        out = load(tmp_path / f"{i}.ckpt")
        for key, value in checkpoint.items():
            assert out[key].shape == value.shape and out[key].stride() == value.stride(), (i, key)
            assert torch.equal(out[key], value), (i, key)


@pytest.mark.parametrize("staging_threads", [1, 2])
def test_engine_with_several_staging_threads_keeps_point_in_time(tmp_path, staging_threads):
    io = AsyncCheckpointIO(staging_threads=staging_threads, max_pending=1)
    big = torch.randn(8, 1024, 1024)  # 32 MB: above the parallel threshold
    expected = big.clone()
    io.save_checkpoint({"big": big, "view": big[3]}, tmp_path / "a.ckpt")
    big.add_(1)
    io.teardown()
    out = load(tmp_path / "a.ckpt")
    assert torch.equal(out["big"], expected) and torch.equal(out["view"], expected[3])


def test_staging_threads_must_be_positive():
    with pytest.raises(ValueError, match="staging_threads"):
        AsyncCheckpointIO(staging_threads=0)


def test_default_staging_threads_share_the_machine_among_its_ranks(monkeypatch):
    from asyncckpt._copier import default_staging_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_staging_threads() == 4  # one process: every core, up to 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_staging_threads() == 2  # 8 ranks on 16 cores: 2 each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert default_staging_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert default_staging_threads() == 3  # pinned to 3 cores: that is this rank's share already
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not a number")
    assert default_staging_threads() == 3


def test_share_cores_among_ranks_keeps_a_count_the_user_gave(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    default = AsyncCheckpointIO()
    assert default.staging_threads == 4
    default.share_cores_among(4)  # 4 ranks on 8 cores (as the Lightning integration says)
    assert default.staging_threads == 2 and default.stager.copier.threads == 2
    chosen = AsyncCheckpointIO(staging_threads=3)
    chosen.share_cores_among(4)
    assert chosen.staging_threads == 3 and chosen.stager.copier.threads == 3
    default.teardown()
    chosen.teardown()


def test_a_save_pauses_the_garbage_collector_and_restores_it(tmp_path, monkeypatch):
    """Staging many tensors allocates enough containers to run the collector about a hundred
    times in one call (0.4-0.5 s for one full collection of a training process's objects); the
    call pauses it. Afterwards it is as it was, after failed and concurrent saves too."""
    import gc
    import threading

    from asyncckpt import NotSerializableError

    io = AsyncCheckpointIO()
    seen = []
    real_stage = EagerStager.stage

    def stage(self, *args, **kwargs):
        seen.append(gc.isenabled())
        return real_stage(self, *args, **kwargs)

    monkeypatch.setattr(EagerStager, "stage", stage)
    assert gc.isenabled()
    io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "a.ckpt")
    assert seen == [False] and gc.isenabled()
    with pytest.raises(NotSerializableError):
        io.save_checkpoint({"lock": threading.Lock()}, tmp_path / "b.ckpt")
    assert gc.isenabled()
    def saves(i: int) -> None:
        for k in range(20):
            io.save_checkpoint({"i": torch.full((64,), i)}, tmp_path / f"t{i}-{k}.ckpt")

    threads = [threading.Thread(target=saves, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gc.isenabled()
    gc.disable()  # the user's choice is kept
    try:
        io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "c.ckpt")
        assert not gc.isenabled()
    finally:
        gc.enable()
    io.teardown()


def test_a_process_forked_during_a_save_call_collects_garbage(tmp_path, monkeypatch):
    """Another thread forks (a DataLoader worker, a subprocess) while a save call has the
    collector paused: the child has no save call, so its collector must be on. The call is held
    open by an event in the stager (fault injection: a real call is too short to fork inside)."""
    import gc
    import threading

    io = AsyncCheckpointIO()
    inside, release = threading.Event(), threading.Event()
    real_stage = EagerStager.stage

    def held_stage(self, *args, **kwargs):
        inside.set()
        release.wait(30)
        return real_stage(self, *args, **kwargs)

    monkeypatch.setattr(EagerStager, "stage", held_stage)
    saver = threading.Thread(target=io.save_checkpoint, args=({"w": torch.ones(3)}, tmp_path / "a.ckpt"))
    saver.start()
    assert inside.wait(30) and not gc.isenabled()
    pid = os.fork()
    if pid == 0:
        os._exit(0 if gc.isenabled() else 1)
    _, status = os.waitpid(pid, 0)
    release.set()
    saver.join(30)
    io.teardown()
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child's collector stayed paused"
    assert gc.isenabled()


def test_the_hand_over_to_a_writer_process_pickles_with_the_collector_paused(tmp_path, monkeypatch):
    """Pickling a new layout's specs (20,000 tuples for a transformer's optimizer state) set off
    full collections of the training process's objects: 0.3-0.4 s of the first save's call."""
    import gc
    from multiprocessing import reduction

    from asyncckpt._writers.messages import SaveMsg

    seen = []
    real_dumps = reduction.ForkingPickler.dumps

    def dumps(obj, *args, **kwargs):
        if isinstance(obj, SaveMsg):
            seen.append(gc.isenabled())
        return real_dumps(obj, *args, **kwargs)

    monkeypatch.setattr(reduction.ForkingPickler, "dumps", dumps)
    io = AsyncCheckpointIO(writer="process")
    assert gc.isenabled()
    io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "a.ckpt")
    io.teardown()
    assert seen == [False] and gc.isenabled()
    assert torch.equal(load(tmp_path / "a.ckpt")["w"], torch.ones(3))


def test_a_thread_count_changed_during_a_copy_does_not_break_it():
    """``share_cores_among`` may lower ``threads`` on another thread while a copy starts; the
    helper pool is sized by the copy's own plan (it was sized by ``threads`` - 1, i.e. 0)."""

    class Shrinking(ParallelCopier):
        reads = 0

        @property
        def threads(self):
            type(self).reads += 1
            return 2 if type(self).reads <= 2 else 1

        @threads.setter
        def threads(self, value):
            pass

    copier = Shrinking(2)
    src = [torch.randn(4_000_000)]
    dst = [torch.empty_like(s) for s in src]
    copier.copy(dst, src)
    copier.close()
    assert torch.equal(dst[0], src[0])


def test_an_interrupt_while_the_helpers_copy_waits_for_them_before_the_slot_is_freed(tmp_path, monkeypatch):
    """Ctrl-C (SIGINT to the main thread) while the caller waits for the helper threads' shares
    used to end the wait at once: the slot was freed while a helper still copied into it, so
    the next save (a checkpoint on interrupt) could stage into the same memory."""
    import signal
    import threading
    import time

    from asyncckpt._staging import copier

    helper_done = threading.Event()
    real = copier.memmove_pairs

    def slow_memmove(dst, src):
        time.sleep(0.5)  # fault injection: a slow share, so the interrupt lands during the wait
        real(dst, src)
        helper_done.set()

    monkeypatch.setattr(copier, "memmove_pairs", slow_memmove)
    io = AsyncCheckpointIO(staging_threads=2, max_pending=1)
    big = torch.randn(8, 1024, 1024)
    main = threading.main_thread().ident
    # Python's own SIGINT handler: a shell starting a background job (a CI runner) may have
    # set SIGINT to ignored, and Python then installs none.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.2, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            io.save_checkpoint({"big": big}, tmp_path / "a.ckpt")
            time.sleep(5)  # the interrupt, if the save returned before it
    finally:
        signal.signal(signal.SIGINT, previous)
    assert helper_done.is_set()  # no helper still writes into the freed slot
    io.save_checkpoint({"big": big}, tmp_path / "b.ckpt")
    io.teardown()
    assert torch.equal(load(tmp_path / "b.ckpt")["big"], big)


@pytest.mark.parametrize("staging", ["eager", "lazy"])
def test_both_stagers_answer_the_one_stager_protocol(tmp_path, staging):
    """The engine holds one Stager and never asks which: stage, finish, unfinished, the copier,
    the torch.save rules and whether copies are deferred, answered alike by both."""
    from asyncckpt._staging.lazy import LazyStager
    from asyncckpt._staging.protocol import Stager, StagingSlot

    eager = EagerStager(2)
    stager: Stager = eager if staging == "eager" else LazyStager(eager)
    assert stager.copier is eager.copier and stager.defers_copies is (staging == "lazy")
    stager.torch_save_rules = True
    assert eager.torch_save_rules and stager.torch_save_rules
    big, small = torch.randn(1_000_000), torch.arange(10.0)
    staged = stager.stage({"big": big, "small": small, "n": 3}, StagingSlot(0), "a.ckpt", None)
    assert [job.path for job in stager.unfinished()] == (["a.ckpt"] if staging == "lazy" else [])
    stager.finish()
    assert stager.unfinished() == []
    got = staged.materialize()
    assert torch.equal(got["big"], big) and torch.equal(got["small"], small) and got["n"] == 3
    assert got["big"].data_ptr() != big.data_ptr()  # a copy in the slot, not the live tensor
    stager.copier.close()


@pytest.mark.parametrize("writer, staging", [("thread", "eager"), ("thread", "lazy"), ("process", "eager")])
def test_a_default_device_set_by_the_program_leaves_staging_memory_on_the_cpu(tmp_path, writer, staging):
    """``torch.set_default_device("cuda")`` is common in training scripts; ``torch.save`` does not
    care. Staging made its memory with factories that follow it: on "cuda" the staging copy of a
    checkpoint would take GPU memory, and on "meta" (shown here, on the CPU) the call failed
    ("Attempted to set the storage of a tensor on device meta to a storage on ... cpu"). Staging
    memory and its views are made on the CPU, whatever the default device."""
    state = {"w": torch.arange(10.0, device="cpu"), "b": torch.ones(3, 3, device="cpu"), "step": 1}
    io = AsyncCheckpointIO(writer=writer, staging=staging)
    try:
        torch.set_default_device("meta")
        try:
            for i in range(3):  # the first save, then warm ones
                state["step"] = i
                io.save_checkpoint(state, tmp_path / f"{i}.ckpt")
            io.flush()
        finally:
            torch.set_default_device(None)
    finally:
        io.teardown()
    for i in range(3):
        out = load(tmp_path / f"{i}.ckpt")
        assert out["step"] == i and torch.equal(out["w"], torch.arange(10.0))
        assert torch.equal(out["b"], torch.ones(3, 3))
