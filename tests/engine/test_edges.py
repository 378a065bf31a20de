"""Edges of the contract (issue 10), one regression test per way the engine used to break.

Each test here failed on the engine before its fix. Subprocess tests run the same asyncckpt
that this process imported.
"""

from __future__ import annotations

import gc
import multiprocessing.connection
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
import torch

import asyncckpt
from _subproc import run_python
from asyncckpt import AsyncCheckpointError, AsyncCheckpointIO, CheckpointIO, TorchCheckpointIO
from conftest import load


def run_child(code: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``code`` with ``python -c`` from a folder holding no asyncckpt (``-c`` puts the
    working folder first on ``sys.path``)."""
    return run_python(code, timeout=timeout, cwd=tempfile.gettempdir())


class OptionsIO(TorchCheckpointIO):
    """A wrapped IO that takes storage_options for any path (as a remote-storage IO would)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        super().save_checkpoint(checkpoint, path)


# -- 1: a save whose message cannot be sent to the writer process ------------------------


def test_unsendable_save_raises_at_the_call_and_leaves_nothing_counted(tmp_path):
    io = AsyncCheckpointIO(OptionsIO(), writer="process", max_pending=2)
    io.save_checkpoint({"w": torch.ones(4)}, tmp_path / "warm.ckpt")
    io.flush()
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"w": torch.ones(4)}, tmp_path / "a.ckpt", storage_options={"lock": threading.Lock()})
    assert io.pending == 0 and io.free_slots == 2
    io.flush(timeout=10)
    io.save_checkpoint({"w": torch.full((4,), 2.0)}, tmp_path / "a.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "a.ckpt")["w"], torch.full((4,), 2.0))
    # the writer dies: no slot is freed twice (two saves would then share buffers)
    os.kill(io.writer.pid, 9)
    io.writer.wait_exited(10)
    for step in range(4):
        io.save_checkpoint({"w": torch.full((4,), float(step))}, tmp_path / f"s{step}.ckpt")
    try:
        io.flush(timeout=30)
    except AsyncCheckpointError:
        pass
    assert len({s.slot for s in io.staging_buffers()}) == io.free_slots == 2
    io.teardown()
    for step in range(4):
        assert torch.equal(load(tmp_path / f"s{step}.ckpt")["w"], torch.full((4,), float(step)))


# -- 2: staged tensors keep their memory alive ---------------------------------------------


def test_tensors_kept_by_the_wrapped_io_stay_valid_after_teardown():
    """A wrapped IO that keeps what it was given (and a failed save's traceback) must never read
    freed memory: the staged views keep their arena alive. Run in a child, since the old failure
    was a segfault."""
    result = run_child(
        """
        import gc, torch
        from asyncckpt import AsyncCheckpointIO, TorchCheckpointIO, AsyncCheckpointError

        class KeepingIO(TorchCheckpointIO):
            kept = []
            def save_checkpoint(self, checkpoint, path, storage_options=None):
                KeepingIO.kept.append(checkpoint)
                if "fail" in str(path):
                    raise OSError(28, "no space (injected)")
                super().save_checkpoint(checkpoint, path, storage_options)

        import tempfile, os
        folder = tempfile.mkdtemp()
        io = AsyncCheckpointIO(KeepingIO(), max_pending=1)
        io.save_checkpoint({"w": torch.full((4 << 20,), 3.0)}, os.path.join(folder, "a.ckpt"))
        # another layout: the slot's arena is replaced, and the first one is freed by the engine
        io.save_checkpoint({"w": torch.full(((4 << 20) + 1,), 5.0)}, os.path.join(folder, "fail.ckpt"))
        try:
            io.teardown()
        except AsyncCheckpointError as err:
            error = err
        gc.collect()
        junk = [torch.full((4 << 20,), 9.0) for _ in range(8)]  # reuse whatever was freed
        print(bool((KeepingIO.kept[0]["w"] == 3.0).all()), bool((KeepingIO.kept[1]["w"] == 5.0).all()))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "True"]


def test_an_io_that_keeps_tensors_costs_one_whole_heap_collection_not_one_per_save():
    """Before deciding the wrapped IO kept a save's tensors, the writer collects reference cycles
    (a checkpoint may hold one); a whole-heap collection costs 0.4-0.5 s holding the GIL in a
    large training process, so once it found nothing it is not run after every save again. In
    a child: the choice is remembered per process."""
    result = run_child(
        """
        import gc, os, tempfile, torch
        from asyncckpt import AsyncCheckpointIO, TorchCheckpointIO

        class KeepingIO(TorchCheckpointIO):
            kept = []
            def save_checkpoint(self, checkpoint, path, storage_options=None):
                KeepingIO.kept.append(checkpoint)
                super().save_checkpoint(checkpoint, path, storage_options)

        whole_heap = []
        gc.disable()  # only the writer's own collections are counted
        gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2 and whole_heap.append(1))
        folder = tempfile.mkdtemp()
        io = AsyncCheckpointIO(KeepingIO(), max_pending=1)
        for step in range(4):
            io.save_checkpoint({"w": torch.full((1000,), float(step))}, os.path.join(folder, "a.ckpt"))
            io.flush()
        io.teardown()
        print(len(whole_heap), [float(k["w"][0]) for k in KeepingIO.kept])
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("[", 1)[0].strip() == "1", result.stdout
    assert result.stdout.strip().endswith("[0.0, 1.0, 2.0, 3.0]")


# -- 3: inference mode ----------------------------------------------------------------------


def test_first_save_under_inference_mode_does_not_poison_the_slot(tmp_path, writer):
    io = AsyncCheckpointIO(writer=writer, max_pending=1)
    model = torch.nn.Linear(4, 4)
    with torch.inference_mode():
        io.save_checkpoint({"sd": model.state_dict(), "p": model.weight}, tmp_path / "eval.ckpt")
    io.flush()
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1)
    io.save_checkpoint({"sd": model.state_dict(), "p": model.weight}, tmp_path / "train.ckpt")
    with torch.inference_mode():
        io.save_checkpoint({"sd": model.state_dict(), "p": model.weight}, tmp_path / "eval2.ckpt")
    io.teardown()
    for name in ("train.ckpt", "eval2.ckpt"):
        out = load(tmp_path / name)
        assert torch.equal(out["sd"]["weight"], model.weight.detach())
        assert type(out["p"]) is torch.nn.Parameter and out["p"].requires_grad
    assert torch.equal(load(tmp_path / "eval.ckpt")["sd"]["weight"], before)


# -- 4: relative paths ----------------------------------------------------------------------


def _engine_started_in_one_folder_called_from_another(tmp_path, gated_io, writer, monkeypatch):
    """An engine whose writer started in ``spawned/``, called from ``at_call/`` with its writes
    held (the test moves to ``later/`` before it lets them go)."""
    for name in ("spawned", "at_call", "later"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "spawned")
    io = AsyncCheckpointIO(gated_io, writer=writer)
    io.save_checkpoint({"v": 0}, "warm.ckpt")
    io.flush()
    monkeypatch.chdir(tmp_path / "at_call")
    gated_io.gate.clear()
    return io


def test_relative_path_means_the_working_folder_at_the_call(tmp_path, gated_io, writer, monkeypatch):
    io = _engine_started_in_one_folder_called_from_another(tmp_path, gated_io, writer, monkeypatch)
    io.save_checkpoint({"v": 1}, os.path.join("ckpt", "a.ckpt"))
    io.save_checkpoint({"v": 2}, os.path.join("ckpt", "b.ckpt"))
    io.remove_checkpoint(os.path.join("ckpt", "b.ckpt"))
    monkeypatch.chdir(tmp_path / "later")
    gated_io.gate.set()
    io.flush()
    assert load(tmp_path / "at_call" / "ckpt" / "a.ckpt") == {"v": 1}
    assert not (tmp_path / "at_call" / "ckpt" / "b.ckpt").exists()
    assert not (tmp_path / "later" / "ckpt").exists() and not (tmp_path / "spawned" / "ckpt").exists()
    io.teardown()


class _HeldIO(TorchCheckpointIO):
    """A real TorchCheckpointIO whose saves wait for ``gate`` (in-process, for the thread writer)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        assert self.gate.wait(30), "test gate never opened"
        super().save_checkpoint(checkpoint, path, storage_options)


def _chdir_at_line(n: int, folder: str):
    """A tracer for ``sys.settrace`` that moves the working folder to ``folder`` as the ``n``-th
    line of the engine's or the storage's code runs on this thread (another thread's ``os.chdir``
    landing there), and the count of lines it saw. Staging, which never reads a path, is left
    out: its lines are most of a save's."""
    package = os.path.dirname(asyncckpt.__file__)
    places = tuple(os.path.join(package, part) for part in ("_engine", "_storage", "storage.py"))
    seen = [0]

    def on_line(frame, event, arg):
        if event == "line":
            seen[0] += 1
            if seen[0] == n:
                os.chdir(folder)
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename.startswith(places) else None

    return on_call, seen


def _with_chdir_at_line(n: int, folder: str, call):
    tracer, seen = _chdir_at_line(n, folder)
    sys.settrace(tracer)
    try:
        result = call()
    finally:
        sys.settrace(None)
    return result, seen[0] >= n


def test_a_chdir_at_any_line_of_a_call_leaves_its_key_and_its_file_in_one_folder(tmp_path, monkeypatch):
    """A relative path means the working folder at the call; another thread's ``os.chdir`` may
    land at any line of the call, and either folder is then the call's, but one for all of it:
    the key the call orders under and the file it writes, removes or reads. The key and the
    target were each resolved against the working folder of their own moment, so a chdir
    between the two queued a save (or remove) under one folder's key and wrote the other's
    file, and a load waited on one folder and read the other's file before its save was written."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    held = _HeldIO()
    io = AsyncCheckpointIO(held, writer="thread")
    try:
        for n in range(1, 100_000):  # a save, with the chdir at its n-th line
            monkeypatch.chdir(a)
            held.gate.clear()
            _, moved = _with_chdir_at_line(n, str(b), lambda: io.save_checkpoint({"v": torch.ones(2)}, "x.ckpt"))
            queued = [f for f in (a, b) if io.queued_kind(f / "x.ckpt") == "save"]
            held.gate.set()
            io.flush()
            landed = [f for f in (a, b) if (f / "x.ckpt").exists()]
            assert len(queued) == 1 and landed == queued, f"save, chdir at line {n}: queued {queued}, written {landed}"
            (landed[0] / "x.ckpt").unlink()
            if not moved:
                break
        assert n > 20  # the sweep ran through the call
        for n in range(1, 100_000):  # a remove queued behind a held save, with the chdir at its n-th line
            monkeypatch.chdir(a)
            for f in (a, b):
                torch.save({"v": 0}, f / "x.ckpt")
            held.gate.clear()
            io.save_checkpoint({"v": 1}, tmp_path / "held.ckpt")
            _, moved = _with_chdir_at_line(n, str(b), lambda: io.remove_checkpoint("x.ckpt"))
            queued = [f for f in (a, b) if io.queued_kind(f / "x.ckpt") == "remove"]
            held.gate.set()
            io.flush()
            gone = [f for f in (a, b) if not (f / "x.ckpt").exists()]
            assert len(queued) == 1 and gone == queued, f"remove, chdir at line {n}: queued {queued}, removed {gone}"
            if not moved:
                break
        for n in range(1, 100_000):  # a load of a's file while a save to it is held, with the chdir at its n-th line
            monkeypatch.chdir(a)
            torch.save({"v": 0}, a / "x.ckpt")  # what a load that did not wait for the save would read
            torch.save({"v": 2}, b / "x.ckpt")
            held.gate.clear()
            io.save_checkpoint({"v": 1}, a / "x.ckpt")
            result: list = []
            moved_box: list = []

            def load_it(n=n, result=result, moved_box=moved_box):
                loaded, moved = _with_chdir_at_line(n, str(b), lambda: io.load_checkpoint("x.ckpt"))
                result.append(loaded["v"])
                moved_box.append(moved)

            loader = threading.Thread(target=load_it)
            loader.start()
            loader.join(0.02)  # time to read a's file, if it does not wait for the save
            held.gate.set()
            loader.join(30)
            io.flush()
            assert result and result[0] in (1, 2), f"load, chdir at line {n}: read {result} (0: a's old file)"
            if not moved_box[0]:
                break
    finally:
        held.gate.set()
        io.teardown()


@pytest.mark.skipif(os.name != "posix", reason="'//' is one '/' on Linux and macOS")
def test_a_path_spelled_with_a_leading_double_slash_orders_as_one_path(tmp_path, gated_io, writer):
    """``//tmp/x.ckpt`` and ``file:////tmp/x.ckpt`` are ``/tmp/x.ckpt`` to the kernel, but
    ``os.path.abspath`` keeps POSIX's two leading slashes: a load through one spelling did not
    wait for a save queued through the other."""
    a = tmp_path / "a.ckpt"
    io = AsyncCheckpointIO(gated_io, writer=writer)
    try:
        gated_io.gate.clear()
        io.save_checkpoint({"v": 1}, "/" + str(a))
        assert io.queued_kind(a) == io.queued_kind(f"file:///{a}") == io.queued_kind("/" + str(a)) == "save"
        gated_io.gate.set()
        assert io.load_checkpoint(a) == {"v": 1}  # waits for the save
    finally:
        gated_io.gate.set()
        io.teardown()


@pytest.mark.parametrize("scheme", ["file://", "local://"])
def test_a_home_relative_file_url_is_written_where_fsspec_writes_it(tmp_path, writer, monkeypatch, scheme):
    """``file://~/a.ckpt`` is the home folder's file for fsspec (and Lightning's TorchCheckpointIO,
    which opens paths with fsspec), not a folder named ``~`` under the working folder; saves,
    loads and removes go there, and it orders as one path with the file's absolute path."""
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "cwd")
    expected = tmp_path / "home" / "ckpt" / "a.ckpt"
    TorchCheckpointIO().save_checkpoint({"v": 0}, f"{scheme}~/ckpt/sync.ckpt")
    assert load(tmp_path / "home" / "ckpt" / "sync.ckpt") == {"v": 0}
    io = AsyncCheckpointIO(writer=writer)
    try:
        io.save_checkpoint({"v": 1}, f"{scheme}~/ckpt/a.ckpt")
        assert io.queued_kind(expected) in ("save", None)
        assert io.load_checkpoint(expected) == {"v": 1}
        assert io.load_checkpoint(f"{scheme}~/ckpt/a.ckpt") == {"v": 1}
        io.remove_checkpoint(f"{scheme}~/ckpt/a.ckpt")
        io.flush()
        assert not expected.exists()
    finally:
        io.teardown()
    assert not (tmp_path / "cwd" / "~").exists()


@pytest.mark.parametrize("scheme", ["file://", "local://", "simplecache::file://"])
def test_a_relative_file_url_means_the_working_folder_at_the_call(tmp_path, gated_io, writer, monkeypatch, scheme):
    """Issue 21: fsspec resolves ``file://ckpt/a.ckpt`` (and ``local://``) against the working
    folder, so the engine must resolve it at the call, as it does a relative path."""
    io = _engine_started_in_one_folder_called_from_another(tmp_path, gated_io, writer, monkeypatch)
    io.save_checkpoint({"v": 1}, f"{scheme}ckpt/a.ckpt")
    io.save_checkpoint({"v": 2}, f"{scheme}ckpt/b.ckpt")
    io.remove_checkpoint(f"{scheme}ckpt/b.ckpt")
    a = tmp_path / "at_call" / "ckpt" / "a.ckpt"
    # One file, one path key: the URL, its absolute local path and its absolute file:// URL.
    assert io.queued_kind(a) == io.queued_kind(f"file://{a}") == io.queued_kind(f"{scheme}ckpt/a.ckpt") == "save"
    assert io.queued_kind(tmp_path / "at_call" / "ckpt" / "b.ckpt") == "remove"
    monkeypatch.chdir(tmp_path / "later")
    assert io.queued_kind(f"{scheme}ckpt/a.ckpt") is None  # here it names later/ckpt/a.ckpt
    gated_io.gate.set()
    assert io.load_checkpoint(a) == {"v": 1}  # waits for the save queued through the URL
    io.flush()
    assert not (tmp_path / "at_call" / "ckpt" / "b.ckpt").exists()
    assert not (tmp_path / "later" / "ckpt").exists() and not (tmp_path / "spawned" / "ckpt").exists()
    # Saves, loads and removes after the chdir mean the folder at their own call.
    io.save_checkpoint({"v": 3}, f"{scheme}ckpt/a.ckpt")
    assert io.load_checkpoint(f"{scheme}ckpt/a.ckpt") == {"v": 3}
    monkeypatch.chdir(tmp_path / "at_call")
    assert io.load_checkpoint(f"{scheme}ckpt/a.ckpt") == {"v": 1}
    io.remove_checkpoint(f"{scheme}ckpt/a.ckpt")
    io.flush()
    assert not a.exists() and load(tmp_path / "later" / "ckpt" / "a.ckpt") == {"v": 3}
    io.teardown()


# -- 5: SIGTERM while a save is being handed to a busy writer process ----------------------


def test_sigterm_during_a_blocked_handoff_drains_as_long_as_the_writes_take(tmp_path):
    """The writer is busy (its save waits for a gate), so the next save's 64 MB skeleton fills
    the pipe and ``save_checkpoint`` blocks sending it; SIGTERM lands then. The drain must end
    when the pending write does (the gate opens 2 s in), not after ``exit_timeout``."""
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    code = f"""
        import os, signal, sys, threading, time, logging
        logging.basicConfig(level=logging.WARNING)
        import torch
        from asyncckpt import AsyncCheckpointIO
        from conftest import GatedIO

        if __name__ == "__main__":
            gated = GatedIO({str(gate_dir)!r})
            io = AsyncCheckpointIO(gated, writer="process", exit_timeout=60)
            io.save_checkpoint({{"v": 0}}, {str(tmp_path / "warm.ckpt")!r})
            io.flush()
            gated.gate.clear()
            io.save_checkpoint({{"v": 1}}, {str(tmp_path / "first.ckpt")!r})
            assert gated.started.wait(30)
            started = time.monotonic()
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
            threading.Timer(2.0, gated.gate.set).start()
            sys.stderr.write("handing over\\n")
            sys.stderr.flush()
            io.save_checkpoint({{"blob": b"x" * (64 << 20)}}, {str(tmp_path / "second.ckpt")!r})
            sys.stderr.write("returned\\n")
        """
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    result = run_python(script, timeout=120)
    assert result.returncode == -15, result.stderr[-3000:]
    assert "not all written" not in result.stderr, result.stderr[-3000:]
    assert "finished in" in result.stderr, result.stderr[-3000:]
    assert load(tmp_path / "first.ckpt") == {"v": 1}


# -- 6: the temp-file sweep in a shared folder ---------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_keeps_temp_files_it_cannot_prove_are_this_hosts(tmp_path):
    """Another host writing into a shared folder (NFS, Lustre): its pid means nothing here. We
    cannot run a second host, so the test writes the names another host's writer would: the
    pre-host-id format (pid only) and the current one with another host's id. Neither may be
    swept; a temp file of this host's dead process still is."""
    from asyncckpt.storage import cleanup_temp_files, temp_path_for

    dead = _dead_pid()
    foreign_old = tmp_path / f".a.ckpt.asyncckpt-tmp-{dead}-0123abcd"
    foreign_old.write_bytes(b"partial")
    mine = temp_path_for(str(tmp_path / "b.ckpt"))
    other_host = os.path.basename(mine).replace(f"-{os.getpid()}-", f"-{dead}-")
    ours_dead = tmp_path / other_host
    ours_dead.write_bytes(b"partial")
    host_id = getattr(asyncckpt.storage, "HOST_ID", None)
    foreign_new = None
    if host_id is not None:
        foreign_new = tmp_path / other_host.replace(host_id, "0" * len(host_id))
        foreign_new.write_bytes(b"partial")
    removed = cleanup_temp_files(str(tmp_path))
    assert foreign_old.exists()
    assert host_id is not None, "temp names carry no host identity"
    assert foreign_new.exists()
    assert removed == [str(ours_dead)] and not ours_dead.exists()


# -- 7 and 8: inputs torch.save takes ------------------------------------------------------


def _same_sharing(a: list, b: list) -> None:
    """Tensors/storages at the same positions share memory in ``a`` exactly where they do in ``b``."""

    def ptr(x):
        return x.untyped_storage().data_ptr() if isinstance(x, torch.Tensor) else (
            x._untyped_storage.data_ptr() if isinstance(x, torch.TypedStorage) else x.data_ptr())

    for i in range(len(a)):
        for j in range(len(a)):
            assert (ptr(a[i]) == ptr(a[j])) == (ptr(b[i]) == ptr(b[j])), (i, j)


def _save_both(tmp_path, ckpt, writer):
    torch.save(ckpt, tmp_path / "plain.ckpt")
    io = AsyncCheckpointIO(writer=writer)
    io.save_checkpoint(ckpt, tmp_path / "async.ckpt")
    io.teardown()
    return load(tmp_path / "plain.ckpt"), load(tmp_path / "async.ckpt")


def test_two_storages_at_one_address_are_two_storages(tmp_path, writer):
    buffer = bytearray(64)
    big = torch.frombuffer(buffer, dtype=torch.float32)  # like torch.from_numpy twice on one array
    big.copy_(torch.arange(16.0))
    small = torch.frombuffer(memoryview(buffer)[:16], dtype=torch.float32)
    plain, out = _save_both(tmp_path, {"small": small, "big": big}, writer)
    assert torch.equal(out["small"], small) and torch.equal(out["big"], big)
    _same_sharing([out["small"], out["big"]], [plain["small"], plain["big"]])


def test_nested_tensors_and_storages_round_trip_as_torch_save_gives(tmp_path, writer):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nested = torch.nested.nested_tensor([torch.ones(2), torch.arange(3.0)])
        base = torch.arange(8.0)
        typed = base.storage()  # a TypedStorage sharing memory with ``base``
        with_attr = base[2:]
        with_attr.note = "x"
        bare = torch.UntypedStorage(12)
        bare.fill_(7)
        ckpt = {"nested": nested, "base": base, "typed": typed, "attr": with_attr, "bare": bare}
        plain, out = _save_both(tmp_path, ckpt, writer)
        assert out["nested"].is_nested
        for got, want in zip(out["nested"].unbind(), nested.unbind(), strict=True):
            assert torch.equal(got, want)
        assert torch.equal(out["attr"], with_attr) and out["attr"].note == "x"
        assert list(out["typed"]) == list(typed) and bytes(out["bare"]) == bytes(bare)
        _same_sharing([out["base"], out["typed"], out["attr"], out["bare"]],
                      [plain["base"], plain["typed"], plain["attr"], plain["bare"]])


# -- 9: teardown from another thread while saving ------------------------------------------


@pytest.mark.slow
def test_teardown_concurrent_with_saves_never_crashes_or_mixes(tmp_path):
    io = AsyncCheckpointIO(max_pending=2, staging_threads=3)
    errors: list = []
    stop = threading.Event()
    big = torch.zeros(3 << 20)  # 12 MB: the parallel copy is used

    def saver() -> None:
        step = 0
        while not stop.is_set():
            step += 1
            big.fill_(float(step))
            try:
                io.save_checkpoint({"w": big, "step": step}, tmp_path / f"{step % 3}.ckpt")
            except AsyncCheckpointError:
                pass
            except BaseException as err:  # noqa: BLE001 - what the test looks for
                errors.append(err)
                return

    def tearer() -> None:
        while not stop.is_set():
            try:
                io.teardown()
            except AsyncCheckpointError:
                pass
            except BaseException as err:  # noqa: BLE001
                errors.append(err)
                return

    threads = [threading.Thread(target=saver), threading.Thread(target=tearer)]
    for t in threads:
        t.start()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(60)
    io.teardown()
    assert not errors, errors
    for i in range(3):
        path = tmp_path / f"{i}.ckpt"
        if path.exists():
            out = load(path)
            assert torch.equal(out["w"], torch.full_like(out["w"], float(out["step"])))


# -- 10: old writers leak ------------------------------------------------------------------


def test_torn_down_writers_are_not_kept_alive(tmp_path):
    from asyncckpt.writer import ThreadWriter

    io = AsyncCheckpointIO()
    for i in range(20):
        io.save_checkpoint({"i": i}, tmp_path / "a.ckpt")
        io.teardown()
    gc.collect()
    assert sum(isinstance(o, ThreadWriter) for o in gc.get_objects()) <= 1


def test_dead_writer_processes_leak_no_descriptors(tmp_path):
    io = AsyncCheckpointIO(writer="process")
    io.save_checkpoint({"i": 0}, tmp_path / "a.ckpt")
    io.flush()

    def kill_and_replace() -> None:
        old = io.writer
        os.kill(old.pid, 9)
        old.wait_exited(10)
        io.save_checkpoint({"i": 1}, tmp_path / "a.ckpt")  # nothing was in flight: a new writer takes it
        io.flush(timeout=180)
        assert io.writer is not old

    kill_and_replace()
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(2):  # each death leaked a socket and two pipes
        kill_and_replace()
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before + 1
    io.teardown()


def kill_and_reap_it_ourselves(writer) -> None:
    """SIGKILL the writer process and take its exit status, as a launcher's reaper would."""
    os.kill(writer.pid, 9)
    multiprocessing.connection.wait([writer.sentinel], 30)
    try:
        os.waitpid(writer.pid, 0)
    except ChildProcessError:
        pass  # the reply reader reaped it first


def test_a_save_right_after_the_writer_process_died_goes_to_a_new_writer(tmp_path):
    """Another waiter may take a dead writer's exit status first: the reply reader's join, or a
    launcher's reaper (``os.waitpid(-1)``). multiprocessing then reports the dead process alive
    (its waitpid gets ECHILD), and a save sent to it was failed as lost though nothing was in
    flight. Here the test reaps the writer itself, as such a reaper does."""
    io = AsyncCheckpointIO(writer="process")
    path = tmp_path / "a.ckpt"
    io.save_checkpoint({"i": 0}, path)
    io.flush()
    for i in range(1, 4):
        old = io.writer
        kill_and_reap_it_ourselves(old)
        io.save_checkpoint({"i": i}, path)
        io.flush(timeout=120)
        assert io.writer is not old
        assert load(path) == {"i": i}
    io.teardown()


def test_a_writer_whose_exit_status_was_taken_is_never_signalled_again(tmp_path, monkeypatch):
    """After another waiter reaped the writer, its pid may belong to an unrelated process by the
    time the engine stops the writer; the engine must not send it SIGKILL. (A spy on os.kill:
    pid reuse cannot be produced on demand.)"""
    io = AsyncCheckpointIO(writer="process")
    io.save_checkpoint({"i": 0}, tmp_path / "a.ckpt")
    io.flush()
    writer = io.writer
    kill_and_reap_it_ourselves(writer)
    signalled = []
    real_kill = os.kill
    monkeypatch.setattr(os, "kill", lambda pid, sig: (signalled.append(pid), real_kill(pid, sig))[1])
    writer.stop(5)
    io.teardown()
    assert writer.pid not in signalled


# -- 11: classes the writer process cannot import -------------------------------------------


def test_class_from_a_main_without_a_file_is_refused_at_the_call(tmp_path):
    result = run_child(
        f"""
        import torch
        from asyncckpt import AsyncCheckpointIO

        class Config:
            lr = 0.1

        io = AsyncCheckpointIO(writer="process")
        try:
            io.save_checkpoint({{"cfg": Config()}}, {str(tmp_path / "a.ckpt")!r})
        except TypeError as err:
            print("REFUSED", err)
        io.teardown()
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED" in result.stdout and "__main__" in result.stdout, (result.stdout, result.stderr[-2000:])


def test_class_defined_under_the_main_guard_of_a_script_is_refused_at_the_call(tmp_path):
    """Spawn re-imports a script without running its ``if __name__ == "__main__":`` block, so a
    class defined there cannot be rebuilt by the writer; one at the script's top level can."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(
        f"""
        import torch
        from asyncckpt import AsyncCheckpointIO

        class TopLevel:
            lr = 0.1

        if __name__ == "__main__":
            class Guarded:
                lr = 0.2

            io = AsyncCheckpointIO(writer="process")
            io.save_checkpoint({{"cfg": TopLevel()}}, {str(tmp_path / "top.ckpt")!r})
            try:
                io.save_checkpoint({{"cfg": {{"nested": [Guarded()]}}}}, {str(tmp_path / "guarded.ckpt")!r})
            except TypeError as err:
                print("REFUSED", err)
            io.teardown()
        """
    ))
    result = run_python(script, timeout=180, cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED" in result.stdout and "Guarded" in result.stdout, (result.stdout, result.stderr[-2000:])
    assert "failed in the background" not in result.stderr, result.stderr[-2000:]
    assert (tmp_path / "top.ckpt").exists() and not (tmp_path / "guarded.ckpt").exists()


class _TakesArgs:
    def __init__(self, x):
        self.x = x

    def __reduce__(self):
        return (type(self), (self.x,))


class _Plain:
    pass


def test_the_main_probe_names_every_main_class_of_a_checkpoint(monkeypatch):
    """The probe reads past a class that needs constructor arguments, so a guarded class saved
    after it is still found."""
    import pickle

    from asyncckpt._writers.spawn_check import main_names

    main = sys.modules["__main__"]
    for cls in (_TakesArgs, _Plain):
        monkeypatch.setattr(cls, "__module__", "__main__")
        monkeypatch.setattr(main, cls.__name__, cls, raising=False)
    data = pickle.dumps({"first": _TakesArgs(3), "later": [_Plain()]}, protocol=pickle.HIGHEST_PROTOCOL)
    assert main_names(data) == ["_TakesArgs", "_Plain"]


def _tensors_whose_rebuild_the_probe_once_ran():
    """Tensors a checkpoint may hold before a ``__main__`` class; the skeleton probe used to
    run their rebuild calls, which fail on the ``None`` it has for their staged parts."""
    with_attribute = torch.ones(2)
    with_attribute.note = "kept by torch.save"
    return {
        "sparse": torch.eye(3).to_sparse(),
        "csr": torch.eye(3).to_sparse_csr(),
        "nested": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
        "quantized": torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8),
        "with_attribute": with_attribute,
        "conjugate": torch.ones(2, dtype=torch.cfloat).conj(),
    }


@pytest.mark.parametrize("kind", sorted(_tensors_whose_rebuild_the_probe_once_ran()))
def test_the_main_names_of_a_skeleton_are_found_past_any_tensor_before_them(kind, monkeypatch):
    """Found by attack: the probe that lists a skeleton's ``__main__`` classes unpickled it for
    real, with ``None`` for each staged tensor; a sparse, nested, quantized or attributed tensor
    before the class made a rebuild call fail, the probe stopped there, and the class went
    unseen. The writer process was then never told to import the main module, and the save
    failed in the background (``Can't get attribute 'Config' on <module '__main__'>``)."""
    from asyncckpt._staging.skeleton import split
    from asyncckpt._writers.spawn_check import main_names

    main = sys.modules["__main__"]
    config = type("Config", (), {"__module__": "__main__"})
    monkeypatch.setattr(main, "Config", config, raising=False)
    skeleton, _ = split({"first": _tensors_whose_rebuild_the_probe_once_ran()[kind], "cfg": config()}, "k.ckpt")
    assert main_names(skeleton) == ["Config"]


def test_a_pickle_the_main_probe_cannot_read_to_the_end_is_refused_nothing():
    """The probe's fallback: a pickle cut short (here: it breaks off after a string that names
    ``__main__``) gives the names seen so far and says it is incomplete; the save is not
    refused for what the probe could not read."""
    import pickle

    from asyncckpt._writers.spawn_check import _probe, check_main_references

    cut = pickle.dumps({"note": "__main__", "n": [1, 2, 3]}, protocol=pickle.HIGHEST_PROTOCOL)[:-8]
    assert _probe(cut) == ([], False)
    assert _probe(pickle.dumps({"note": "__main__"}, protocol=pickle.HIGHEST_PROTOCOL)) == ([], True)
    check_main_references(cut, "k.ckpt")  # no refusal, whatever it answers for this __main__


# -- 12: API edges -------------------------------------------------------------------------


def test_async_with_keeps_the_bodys_own_exception(tmp_path):
    import anyio

    from conftest import FailingIO

    async def main() -> None:
        io = AsyncCheckpointIO(FailingIO())
        async with io:
            await io.asave_checkpoint({"x": 1}, tmp_path / "fail.ckpt")
            await anyio.sleep(0.5)
            raise KeyError("the body's own error")

    with pytest.raises(KeyError, match="the body's own error") as info:
        anyio.run(main)
    assert any("fail.ckpt" in note for note in getattr(info.value, "__notes__", []))


def test_storage_options_for_a_local_path_raise_at_the_call(tmp_path):
    io = AsyncCheckpointIO()
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"x": 1}, tmp_path / "a.ckpt", storage_options={"anon": True})
    assert io.pending == 0
    io.flush()
    io.teardown()


@pytest.mark.lightning
def test_storage_options_refused_at_the_call_as_lightnings_torch_io_does(tmp_path):
    lightning_io = pytest.importorskip("lightning.fabric.plugins.io.torch_io")
    io = AsyncCheckpointIO(lightning_io.TorchCheckpointIO())
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"x": 1}, tmp_path / "a.ckpt", storage_options={"anon": True})
    io.flush()
    io.teardown()


# -- settled: defaults and slot reuse --------------------------------------------------------


def test_load_defaults_to_the_cpu_as_lightning_does(tmp_path):
    """A file whose storages are tagged with another device loads onto the CPU unless the caller
    asks otherwise (Lightning's TorchCheckpointIO: ``map_location=lambda storage, loc: storage``).
    The device tag is written by a location tagger registered for the test, as a CUDA run would."""
    from torch import serialization

    def tagger(storage):
        return "fakegpu:0" if storage.device.type == "cpu" else None

    def restore_fake(storage, location):
        if location.startswith("fakegpu"):
            raise RuntimeError("would load onto the device")
        return None

    serialization.register_package(1, tagger, restore_fake)
    try:
        torch.save({"w": torch.ones(3)}, tmp_path / "a.ckpt")
    finally:
        serialization._package_registry[:] = [e for e in serialization._package_registry if e[1] is not tagger]
    serialization.register_package(1, lambda s: None, restore_fake)
    try:
        out = TorchCheckpointIO().load_checkpoint(tmp_path / "a.ckpt")
        assert out["w"].device.type == "cpu"
        io = AsyncCheckpointIO()
        assert io.load_checkpoint(tmp_path / "a.ckpt")["w"].device.type == "cpu"
        io.teardown()
    finally:
        serialization._package_registry[:] = [e for e in serialization._package_registry if e[2] is not restore_fake]


def test_alternating_layouts_reuse_their_slots(tmp_path):
    io = AsyncCheckpointIO(max_pending=2)
    small = {"w": torch.ones(1000)}
    large = {"w": torch.ones(3000), "b": torch.ones(10)}
    arenas = set()
    for i in range(6):
        io.save_checkpoint(small, tmp_path / "small.ckpt")
        io.save_checkpoint(large, tmp_path / "large.ckpt")
        io.flush()
        if i >= 1:
            arenas |= {s.arena_id for s in io.staging_buffers()}
    assert len(arenas) == 2
    io.teardown()


def test_staging_memory_stays_within_max_pending_times_the_checkpoint(tmp_path):
    io = AsyncCheckpointIO(max_pending=1)
    io.save_checkpoint({"w": torch.ones(1 << 20)}, tmp_path / "a.ckpt")
    io.flush()
    io.save_checkpoint({"w": torch.ones(600_000)}, tmp_path / "a.ckpt")  # 60% of the first
    io.flush()
    (buffer,) = io.staging_buffers()
    assert buffer.nbytes <= 600_000 * 4 + 64
    io.teardown()


# -- issue 21: credentials in a URL --------------------------------------------------------


def _chain_texts(err: BaseException) -> str:
    """Everything a traceback of ``err`` shows: messages, notes and the whole cause chain, plus
    its repr and ``path``."""
    import traceback

    return "".join(traceback.format_exception(err)) + repr(err) + str(getattr(err, "path", ""))


def test_a_password_in_a_url_never_appears_in_errors_logs_stats_or_reprs(writer, caplog):
    """ftp to a port where nothing listens: fsspec's FTP filesystem really fails to connect."""
    import logging

    from asyncckpt import RetryPolicy
    from asyncckpt.writer import Operation

    pytest.importorskip("fsspec.implementations.ftp")
    caplog.set_level(logging.DEBUG, logger="asyncckpt")
    url = "ftp://user:pw-Secret-9@127.0.0.1:1/x.ckpt"
    io = AsyncCheckpointIO(TorchCheckpointIO(retry=RetryPolicy(attempts=2, backoff=0.01)), writer=writer)
    texts = []
    for op in ("save", "remove"):
        if op == "save":
            io.save_checkpoint({"w": torch.ones(4)}, url)
        else:
            io.remove_checkpoint(url)
        with pytest.raises(AsyncCheckpointError) as info:
            io.flush()
        assert "ftp://***@127.0.0.1:1/x.ckpt" in str(info.value) and info.value.path == "ftp://***@127.0.0.1:1/x.ckpt"
        texts.append(_chain_texts(info.value))
    with pytest.raises(OSError) as info:  # a load fails at the call, through the same redaction
        io.load_checkpoint(url)
    texts.append(_chain_texts(info.value))
    texts += [repr(io), repr(io.stats), repr(Operation("save", url, url))]
    io.teardown()
    texts += [record.getMessage() for record in caplog.records]
    texts += [_chain_texts(record.exc_info[1]) for record in caplog.records if record.exc_info]
    joined = "\n".join(texts)
    assert "127.0.0.1:1/x.ckpt" in joined and "Connection refused" in joined  # the rest is shown
    assert "pw-Secret-9" not in joined and "user:" not in joined


class _QuotingIO(CheckpointIO):
    """A user's IO whose errors quote the storage_options it was given (a secret among them)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        raise OSError(f"could not write {path} with options {storage_options}")

    def load_checkpoint(self, path, map_location=None):
        raise NotImplementedError

    def remove_checkpoint(self, path):
        pass


def test_a_secret_storage_option_quoted_by_a_failing_save_never_appears_in_its_error_or_logs(writer, caplog):
    """The background error and its log line redact the save's own storage_options too, not
    only the URL's credentials and the environment's."""
    import logging

    caplog.set_level(logging.DEBUG, logger="asyncckpt")
    io = AsyncCheckpointIO(_QuotingIO(), writer=writer)
    io.save_checkpoint({"w": torch.ones(2)}, "memory://bucket/x.ckpt",
                       storage_options={"key": "AKIA-public-id", "secret": "opt-Secret-Value-7"})
    with pytest.raises(AsyncCheckpointError) as info:
        io.flush()
    io.teardown()
    texts = [_chain_texts(info.value)] + [record.getMessage() for record in caplog.records]
    texts += [_chain_texts(record.exc_info[1]) for record in caplog.records if record.exc_info]
    joined = "\n".join(texts)
    assert "memory://bucket/x.ckpt" in joined and "could not write" in joined
    assert "opt-Secret-Value-7" not in joined


def test_an_operation_counted_after_a_later_one_on_the_same_path_does_not_hide_it():
    """(white-box) Two threads saving to one path: the first hand-over is counted only after its
    submit lock is left, so the second thread's later save may be counted first. The later one
    must stay the path's last pending operation, or a load waits for the earlier save only and
    reads the file while the later save is still queued."""
    from asyncckpt._engine.condition import EngineCondition
    from asyncckpt._engine.ops import OpTable
    from asyncckpt._writers.base import Operation

    cond = EngineCondition()
    table = OpTable(cond)
    with cond:
        first = Operation("save", "/a.ckpt", "/a.ckpt", seq=table.next_seq())
        later = Operation("save", "/a.ckpt", "/a.ckpt", seq=table.next_seq())
        table.count(later)
        table.count(first)
        table.count(first)  # counted again (after an interrupt at its start): changes nothing
    assert table.last_on("/a.ckpt") is later
    first.complete()
    with cond:
        table.forget(first)
    assert table.last_on("/a.ckpt") is later
