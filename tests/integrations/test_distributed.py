"""Sharded background saves across real processes: gloo process groups on 127.0.0.1, FSDP2.

Each test starts 2 or 3 ranks of ``_dist_child.py`` as subprocesses, with timeouts so a hang
fails the test instead of the run. Checks that need the whole picture run here, after the
ranks exit: the folders on disk, and a load of the whole checkpoint in this single process
(another world size).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from typing import Dict, List, Optional

import pytest
import torch

import _subproc
import asyncckpt
from _subproc import CHILDREN, finish_all, run_python
from asyncckpt.distributed import METADATA_FILE, DistributedCheckpointIO
from conftest import made_once, same

CHILD = os.path.join(CHILDREN, "_dist_child.py")
TIMEOUT = 180


def start_ranks(scenario: str, world: int, out: str, arg: Optional[str] = None) -> List[subprocess.Popen]:
    os.makedirs(out, exist_ok=True)
    return _subproc.start_ranks(CHILD, world, scenario, out, *([arg] if arg else []))


def finish(procs: List[subprocess.Popen], timeout: float = TIMEOUT) -> List[str]:
    return finish_all(procs, timeout)


def run_ranks(scenario: str, world: int, out: str, arg: Optional[str] = None) -> List[Dict]:
    procs = start_ranks(scenario, world, out, arg)
    outputs = finish(procs)
    for rank, (p, text) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{text[-4000:]}"
    return [json.load(open(os.path.join(out, f"result-{r}.json"))) for r in range(world)]


def wait_for_files(paths: List[str], procs: List[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail("ranks never reached the save:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
        time.sleep(0.05)


def load_whole(path: str) -> Dict:
    return DistributedCheckpointIO().load_checkpoint(path)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """The 2-rank run the tests below read, made once per pytest run (see conftest.made_once)."""
    return made_once(tmp_path_factory, "two_ranks", lambda out: run_ranks("save", 2, out))


@pytest.mark.slow
def test_two_ranks_point_in_time_order_and_same_world_size_load(two_rank_run):
    out, results = two_rank_run
    for r in results:
        # loaded back at 2 ranks into a differently initialized model: values at the call,
        # not after the optimizer step / add_ that followed each save
        assert r["load_one_equal"] and r["load_two_equal"] and r["load_three_equal"], r
        assert r["gone_exists"] is False  # on every rank, right after its flush
        assert r["plan_cached"], r  # DCP's plan cache, under this IO's own key
    # each rank wrote its own shard file; nothing else but the commit
    files = results[0]["files_two"]
    assert METADATA_FILE in files
    assert len([f for f in files if f.endswith(".distcp")]) == 2, files
    assert not [f for f in files if f.endswith(".tmp")], files


@pytest.mark.slow
def test_two_rank_checkpoint_loads_whole_in_one_process(two_rank_run):
    out, _ = two_rank_run
    for name in ("one", "two", "three"):
        expected = torch.load(os.path.join(out, f"expected-{name}.pt"))
        assert same(load_whole(os.path.join(out, "ck", name)), expected), name


@pytest.mark.slow
def test_staging_holds_only_local_shards_within_the_memory_bound(two_rank_run):
    _, results = two_rank_run
    for r in results:
        # no full tensor was staged: each save staged about this rank's half of the state
        assert all(0.9 * r["local_bytes"] <= b <= r["local_bytes"] for b in r["tensor_bytes"][:3]), r
        assert r["local_bytes"] < r["full_bytes"] * 3, r  # model + 2 Adam moments, sharded
        alignment = 64 * 64
        assert r["staging_bytes"] <= r["max_pending"] * r["local_bytes"] + alignment, r


@pytest.mark.slow
def test_three_ranks_reshard_a_two_rank_checkpoint_and_save_their_own(two_rank_run, tmp_path):
    out2, _ = two_rank_run
    out3 = str(tmp_path / "three")
    results = run_ranks("save", 3, out3, os.path.join(out2, "ck", "two"))
    for r in results:
        assert r["foreign_load_equal"], r  # 2 -> 3 ranks
        assert r["load_one_equal"] and r["load_two_equal"] and r["load_three_equal"], r
    check_failure_results(results)
    files = os.listdir(os.path.join(out3, "ck", "two"))
    assert len([f for f in files if f.endswith(".distcp")]) == 3, files
    expected = torch.load(os.path.join(out3, "expected-two.pt"))
    assert same(load_whole(os.path.join(out3, "ck", "two")), expected)  # 3 -> 1 rank


@pytest.mark.slow
def test_a_rank_whose_write_fails_fails_the_save_on_every_rank_once(two_rank_run):
    _, results = two_rank_run  # the 3-rank run below checks the same
    check_failure_results(results)


def check_failure_results(results: List[Dict]) -> None:
    for r in results:
        assert len(r["errors"]) == 1, r  # raised on every rank, once
        assert "failed in the background" in r["errors"][0], r
        assert r["metadata_still_first"], r  # nothing committed; the previous checkpoint stands
        assert r["after_recovery_equal"], r
        assert r["stray"] == [], r


@pytest.mark.slow
def test_a_save_call_that_raises_on_one_rank_raises_on_every_rank_and_never_commits_a_mixed_folder(tmp_path):
    """Three ways one rank's call fails while the other's would queue: a full queue
    (``when_full="raise"``), an argument the IO refuses, and a background failure that one rank
    learns of before its next call and the other after it. Each must raise at that call on every
    rank (the ranks agree at the call), commit no folder mixing two steps' shards, and leave the
    ranks in step: the next save commits on both."""
    out = str(tmp_path)
    results = run_ranks("out_of_step", 2, out)
    for case, own_error in (("full", "QueueFullError"), ("bad", "TypeError"), ("late", None)):
        raised = [r[f"{case}_errors"][0] for r in results]
        assert all(raised), (case, raised)  # the failing call raised on every rank
        if own_error is not None:
            assert raised[1].startswith(own_error), (case, raised)
            assert raised[0].startswith("RanksOutOfStepError") and "rank 1" in raised[0], (case, raised)
        else:  # the background failure itself, on both ranks, at the same call
            assert all(e.startswith("CheckpointSaveError") for e in raised), (case, raised)
        for r in results:
            assert r[f"{case}_errors"][1:] == [None, None], (case, r)  # in step again: saved, flushed
            assert r[f"{case}_after_equal"], (case, r)  # and the whole folder is that one save


@pytest.mark.slow
def test_a_remove_or_asyncio_save_refused_or_called_differently_on_one_rank_raises_on_every_rank(tmp_path):
    """A sharded remove is collective too: one refused at the call on one rank (a bad path, an
    earlier failure that only that rank has not raised yet), a remove on one rank while the other
    saves, saves into different folders at one call, and a save from asyncio refused on one rank.
    Each must raise at that call on every rank (before, the other rank's writer waited in the
    remove's collective until the timeout, which broke the save group for every later save, and
    asyncio saves had no agreement at all), keep the committed checkpoint, write nothing into
    another folder, and leave the ranks in step: the next save commits on both. And an asyncio
    save cancelled on one rank while it waits for a slot is refused on every rank, and so is a save
    refused on one rank by an IO on a process group the caller passed in (it had no agreement)."""
    results = run_ranks("collective_calls", 2, str(tmp_path))
    own = {
        "remove_refused": "InvalidPathError",
        "asave_refused": "TypeError",
        "remove_after_failure": "CheckpointSaveError",
        "given_group": "TypeError",
    }
    for case in ("remove_refused", "remove_vs_save", "two_folders", "asave_refused", "remove_after_failure",
                 "given_group"):
        raised = [r[f"{case}_errors"][0] for r in results]
        assert all(raised), (case, raised)  # the call raised on every rank
        if case in own:
            assert raised[1].startswith(own[case]), (case, raised)
            assert raised[0].startswith("RanksOutOfStepError") and "rank 1" in raised[0], (case, raised)
        else:
            assert all(e.startswith("RanksOutOfStepError") for e in raised), (case, raised)
        for r in results:
            assert r[f"{case}_errors"][1:] == [None, None, None], (case, r)  # in step again
            assert r[f"{case}_committed"] == [40, 41], (case, r)  # the old checkpoint kept, the next one saved
            if case != "remove_after_failure":
                assert r[f"{case}_files"] == ["a", "next"], (case, r)  # nothing queued anywhere
    assert results[0]["fail_flush"].startswith("CheckpointSaveError"), results[0]
    # A call interrupted on rank 0 after the ranks agreed (a real SIGINT as it staged or while it
    # waited for rank 1 at the agreement, or at the agreement's return): rank 0's writer takes
    # part in that call's collective (failing the save on both, or making the remove), so no rank
    # waits for the 20 s collective timeout; and the next save of the same folder commits that
    # save's shards on both ranks, not rank 0's next shards beside rank 1's interrupted ones.
    for case in ("interrupt_staging", "interrupt_agreed", "interrupt_remove", "interrupt_waiting"):
        # (call, flush, next save, flush): rank 1 learns at its flush that the save failed; rank 0
        # was told by its interrupt
        errors = [r[f"{case}_errors"] for r in results]
        assert errors[0] == ["KeyboardInterrupt", None, None, None], (case, errors)
        assert errors[1][0] is None and errors[1][2:] == [None, None], (case, errors)
        if case == "interrupt_remove":
            assert errors[1][1] is None, errors
            assert all(r["interrupt_remove_gone"] for r in results)  # the agreed remove, made on every rank
        else:
            assert errors[1][1].startswith("CheckpointSaveError") and "KeyboardInterrupt" in errors[1][1], errors
        assert all(r[f"{case}_seconds"] < 15 for r in results), (case, [r[f"{case}_seconds"] for r in results])
        assert all(r[f"{case}_is_b"] for r in results), case
    # ... and if rank 0's stand-in never went out: its next save is refused with rank 1's, loudly,
    # and the folder keeps its committed checkpoint (the next save used to reuse the interrupted
    # call's number, pass the coordinator's check and commit a folder of two steps' shards)
    errors = [r["no_stand_in_errors"] for r in results]
    assert errors[0][:2] == ["KeyboardInterrupt", None] and errors[1][:2] == [None, None], errors
    assert all(e[2] and e[2].startswith("CheckpointSaveError") for e in errors), errors
    assert all(r["no_stand_in_is_60"] for r in results)
    # an asyncio save cancelled on rank 1 while waiting for a slot: refused on both, the next saves
    cancelled = [r["cancelled_errors"] for r in results]
    assert cancelled[1][0].startswith("TimeoutError"), cancelled
    assert cancelled[0][0].startswith("RanksOutOfStepError") and "rank 1: CancelledError" in cancelled[0][0], cancelled
    for r in results:
        assert r["cancelled_errors"][1:] == [None, None], r
        assert r["cancelled_a_is_c"], r  # the folder is one save, not rank 0's b beside rank 1's c


@pytest.mark.slow
def test_a_rank_dead_before_a_call_fails_that_call_on_the_others_with_an_asyncckpt_error(tmp_path):
    """The agreement at the call cannot be made when a rank is gone: save_checkpoint,
    remove_checkpoint and asave_checkpoint each raise RanksOutOfStepError naming the folder and
    the cause (before, gloo's RuntimeError came out of the call as it was), queue nothing, and
    the committed checkpoint stays."""
    out = str(tmp_path)
    procs = start_ranks("dead_rank_at_call", 2, out)
    outputs = finish(procs)
    assert procs[0].returncode == 0, outputs[0][-4000:]
    r = json.load(open(os.path.join(out, "result-0.json")))
    ck = os.path.join(out, "ck")
    for error in r["errors"]:
        assert error is not None and error.startswith("RanksOutOfStepError"), r
        assert ck in error and "could not agree" in error, r
    assert r["pending"] == 0 and r["metadata_still_first"], r


@pytest.mark.slow
def test_lazy_staging_of_shards_and_a_save_one_rank_cannot_write(tmp_path):
    results = run_ranks("lazy", 2, str(tmp_path))
    for r in results:
        # point in time under lazy staging: the optimizer step after the call waited for the copy
        assert r["load_one_equal"] and r["load_three_equal"], r
        # rank 0 modified its shards outside the guards: "two" fails on both ranks, loudly, and
        # is not committed; rank 0 names the tensor, rank 1 learns of rank 0's failure
        assert r["two_error"] is not None and not r["two_committed"], r
    # named by its key: an in-place op on a DTensor leaves its local tensor's version counter alone
    assert "TensorModifiedError" in results[0]["two_error"] and "model.0.weight" in results[0]["two_error"], results
    assert "rank 0: TensorModifiedError" in results[1]["two_error"], results[1]
    for r in results:
        # saves out of step across ranks: every pairing refused, nothing committed, no hang
        assert r["out_of_step_committed"] == [], r
        assert any("out of step" in e for e in r["out_of_step_errors"]), r


@pytest.mark.slow
def test_sharded_tensor_state_of_fsdp1_saves_its_local_shards_at_the_call(tmp_path):
    """FSDP1's sharded state dict (Lightning's ``FSDPStrategy(state_dict_type="sharded")``, which
    needs a GPU here) holds ShardedTensors: each rank stages its own shard, at the call."""
    out = str(tmp_path)
    results = run_ranks("sharded_tensor", 2, out)
    for staging in ("eager", "lazy"):
        for r in results:
            if staging == "eager":
                assert r["eager_error"] is None and r["eager_committed"], r
            elif r["lazy_error"] is not None:  # modified while it copied: loud, named, nothing committed
                assert "TensorModifiedError" in r["lazy_error"] or "rank" in r["lazy_error"], r
                assert not r["lazy_committed"], r
        if any(r[f"{staging}_error"] for r in results):
            continue
        whole = load_whole(os.path.join(out, "ck", staging))
        expected = torch.cat([torch.load(os.path.join(out, f"expected-{staging}-{rank}.pt")) for rank in (0, 1)])
        assert torch.equal(whole["model"]["w"], expected), staging
        assert torch.equal(whole["model"]["b"], torch.full((3,), 7.0)) and whole["step"] == 5


@pytest.mark.slow
def test_sigkill_of_one_rank_during_a_background_save_keeps_the_previous_checkpoint(tmp_path):
    out = str(tmp_path)
    procs = start_ranks("sigkill", 2, out)
    # rank 1 is inside its (slowed) shard write; rank 0 has written its shards, not committed
    wait_for_files([os.path.join(out, "in-save-1"), os.path.join(out, "returned-0")], procs)
    procs[1].send_signal(signal.SIGKILL)
    outputs = finish(procs)
    assert procs[0].returncode == 0, outputs[0][-4000:]
    r = json.load(open(os.path.join(out, "result-0.json")))
    assert r["error"] and "CheckpointSaveError" in r["error"], r
    assert r["saves_reported"] == 1, r  # only the committed save counts as saved
    assert r["metadata_still_first"], r
    expected = torch.load(os.path.join(out, "expected-one.pt"))
    assert same(load_whole(os.path.join(out, "ck")), expected)


@pytest.mark.slow
def test_sigterm_on_every_rank_writes_the_pending_save_first(tmp_path):
    out = str(tmp_path)
    procs = start_ranks("sigterm", 2, out)
    wait_for_files([os.path.join(out, f"returned-{r}") for r in range(2)], procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outputs = finish(procs)
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == -signal.SIGTERM, text[-4000:]
        assert "writing them first" in text, text[-4000:]
    expected = torch.load(os.path.join(out, "expected-two.pt"))
    assert same(load_whole(os.path.join(out, "ck")), expected)


@pytest.mark.slow
def test_a_save_then_destroy_process_group_at_the_end_of_a_script_writes_the_save_first(tmp_path):
    # The sharded save's collectives run on a group destroy_process_group() destroys too: the
    # last checkpoint was lost ("Group ... is not registered"), its stray shards left behind.
    out = str(tmp_path)
    procs = start_ranks("destroyed_group", 2, out)
    outputs = finish(procs)
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text[-4000:]
        assert "destroy_process_group() with 1 checkpoint operation(s) pending" in text, text[-4000:]
        assert "not registered" not in text and "failed" not in text, text[-4000:]
    expected = torch.load(os.path.join(out, "expected-two.pt"))
    assert same(load_whole(os.path.join(out, "ck")), expected)
    assert len([n for n in os.listdir(os.path.join(out, "ck")) if n.endswith(".distcp")]) == 2  # one save's shards


@pytest.mark.slow
def test_a_sharded_save_whose_group_was_destroyed_fails_on_every_rank_and_keeps_the_last_checkpoint(tmp_path):
    # destroy_process_group as imported before the first sharded save (no drain): the queued
    # save found no process group and ran as a single process on each rank; one rank's .metadata
    # of its own shards replaced the committed checkpoint, and the folder no longer loaded.
    out = str(tmp_path)
    procs = start_ranks("destroyed_group", 2, out, "by_name")
    outputs = finish(procs)
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text[-4000:]
        assert "2 failed" in text and "process group was destroyed" in text, text[-4000:]
    expected = torch.load(os.path.join(out, "expected-one.pt"))
    assert same(load_whole(os.path.join(out, "ck")), expected)


def test_metadata_records_no_pinned_memory_for_pinned_staging_buffers(tmp_path, monkeypatch):
    """Where CUDA is present the engine stages into pinned buffers, and DCP records each written
    tensor's ``is_pinned()`` in ``.metadata``; FSDP1's optimizer loader (Lightning's FSDPStrategy
    resume) then allocates pinned CUDA tensors from it and fails (seen on a GPU run). A CPU build
    cannot pin memory, so this fault injection makes DCP see every staged tensor as pinned; the GPU
    half is test_cuda::test_cuda_sharded_save_metadata_loads_into_fsdp1_style_allocations."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorProperties

    real = TensorProperties.create_from_tensor

    def as_if_pinned(tensor):
        return dataclasses.replace(real(tensor), pin_memory=True)

    monkeypatch.setattr(TensorProperties, "create_from_tensor", staticmethod(as_if_pinned))
    io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO())
    io.save_checkpoint({"w": torch.arange(6.0), "opt": {"step": torch.tensor(3.0)}}, tmp_path / "ck")
    io.teardown()
    metadata = FileSystemReader(str(tmp_path / "ck")).read_metadata()
    pinned = [
        key
        for key, md in metadata.state_dict_metadata.items()
        if getattr(md, "properties", None) is not None and md.properties.pin_memory
    ]
    assert pinned == [], pinned
    assert torch.equal(load_whole(tmp_path / "ck")["w"], torch.arange(6.0))


def test_the_process_writer_is_refused_at_construction_with_the_reason():
    with pytest.raises(TypeError, match="only the ranks' own processes"):
        asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(), writer="process")


def test_a_folder_without_metadata_is_not_a_checkpoint(tmp_path):
    (tmp_path / "__0_abc_0.distcp").write_bytes(b"partial")
    with pytest.raises(asyncckpt.CheckpointLoadError, match="no .metadata"):
        DistributedCheckpointIO().load_checkpoint(tmp_path)


def test_single_process_save_is_a_plain_dcp_checkpoint(tmp_path):
    import torch.distributed.checkpoint as dcp

    io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO())
    state = {"w": torch.arange(6.0), "meta": {"epoch": 3}}
    io.save_checkpoint(state, tmp_path / "ck")
    state["w"].add_(1)
    io.flush()
    target = {"w": torch.zeros(6), "meta": {"epoch": 0}}
    dcp.load(target, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    assert torch.equal(target["w"], torch.arange(6.0)) and target["meta"] == {"epoch": 3}
    io.teardown()


REINIT_SCRIPT = """
import os, sys, torch, torch.distributed as dist, asyncckpt
from asyncckpt.distributed import DistributedCheckpointIO
folder = sys.argv[1]
io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO())
for run in range(3):  # a sweep of runs in one process, one IO
    dist.init_process_group("gloo", init_method=f"file://{folder}/store{run}", rank=0, world_size=1)
    io.save_checkpoint({"w": torch.full((4,), float(run))}, os.path.join(folder, f"ck{run}"))
    if run == 1:
        io.flush()  # else destroy_process_group() writes it first
    dist.destroy_process_group()
    assert torch.equal(io.load_checkpoint(os.path.join(folder, f"ck{run}"))["w"], torch.full((4,), float(run)))
io.teardown()
print("ok")
"""


def test_one_io_saves_across_process_groups_destroyed_and_made_again(tmp_path):
    # Its own groups died with the first destroy_process_group(); the next run's saves failed.
    proc = run_python(REINIT_SCRIPT, str(tmp_path), timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_import_asyncckpt_does_not_import_dcp_until_used():
    code = (
        "import sys, asyncckpt\n"
        "assert 'torch.distributed.checkpoint' not in sys.modules\n"
        "asyncckpt.DistributedCheckpointIO\n"
        "assert 'torch.distributed.checkpoint' in sys.modules\n"
        "print('ok')\n"
    )
    out = run_python(code, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def _lightning_checkpoint(step: int) -> Dict:
    return {
        "state_dict": {"w": torch.full((64,), float(step))},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.full((64,), step / 10)}}, "param_groups": []}],
        "global_step": step,
    }


@pytest.mark.parametrize("crash", ["after_commit", "before_commit"])
def test_lightning_meta_changes_with_the_committed_shards_across_a_crash(tmp_path, monkeypatch, crash):
    """meta.pt (loops, global_step) must always match the committed shards. The crash is
    injected (a failing rename stands in for the process dying between two renames, a moment
    no real kill can hit reliably)."""
    from asyncckpt.integrations._lightning_sharded import META_FILE, LightningShardedIO

    folder = str(tmp_path / "last.ckpt")
    LightningShardedIO().save_checkpoint(_lightning_checkpoint(1), folder)
    real_replace = os.replace

    def crashing_replace(src, dst):
        target = META_FILE if crash == "after_commit" else METADATA_FILE
        if os.path.basename(os.fspath(dst)) == target:
            raise OSError("injected crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(Exception, match="injected crash"):
        LightningShardedIO().save_checkpoint(_lightning_checkpoint(2), folder)
    monkeypatch.setattr(os, "replace", real_replace)
    loaded = LightningShardedIO().load_checkpoint(folder)
    step = 2 if crash == "after_commit" else 1  # committed or not, meta and shards agree
    assert loaded["global_step"] == step
    assert torch.equal(loaded["state_dict"]["w"], torch.full((64,), float(step)))
    assert [n for n in os.listdir(folder) if n.endswith(".pending")] == []


def test_lightning_sharded_reader_reads_both_strategies_folders(tmp_path):
    """ModelParallelStrategy keeps the model under ``state_dict``, FSDPStrategy under ``model``;
    the reader takes either (it raised KeyError: 'state_dict' on an FSDPStrategy folder, seen on
    a GPU run), and names what it found in a DCP folder of neither."""
    from asyncckpt.integrations._lightning_sharded import LightningShardedIO

    for key in ("state_dict", "model"):
        LightningShardedIO(key).save_checkpoint(_lightning_checkpoint(3), tmp_path / key)
        whole = LightningShardedIO().load_checkpoint(tmp_path / key)
        assert same(whole["state_dict"], _lightning_checkpoint(3)["state_dict"]) and whole["global_step"] == 3
    DistributedCheckpointIO().save_checkpoint({"weights": torch.ones(2)}, tmp_path / "plain")
    (tmp_path / "plain" / "meta.pt").write_bytes((tmp_path / "model" / "meta.pt").read_bytes())
    with pytest.raises(asyncckpt.CheckpointLoadError, match="'state_dict' or 'model'.*weights"):
        LightningShardedIO().load_checkpoint(tmp_path / "plain")
