"""asyncckpt as the ``CheckpointIO`` of a Lightning Fabric loop, for both package families.

Fabric takes our Lightning plugin (``Fabric(plugins=[AsyncCheckpointIO()])``), but it has no
Trainer stage and never tears the strategy down: ``fabric.save`` inside the user's own loop must
still be queued, ``fabric.load`` must see the last save (under DDP on every rank, though only
rank 0 writes), and a script that just ends, or is sent SIGTERM, must still write what is
queued. Writes are held with a ``threading.Event`` in process (``HeldIO``) or slowed with a
sleep in a child (``SlowDiskIO``): fault injection standing in for a slow disk, so the saves
really are pending.
"""

from __future__ import annotations

import importlib
import os
import signal
import textwrap
import time

import pytest
import torch
from _lightning_helpers import FullDiskAtIO, HeldIO, no_writer_thread_left  # noqa: F401 - autouse fixture

from _subproc import finish, run_python, start_python
from asyncckpt.errors import CheckpointSaveError

pytestmark = pytest.mark.lightning


def _fabric_loop(fam, io):
    fabric = importlib.import_module(fam.fabric_package).Fabric(accelerator="cpu", devices=1, plugins=[io])
    torch.manual_seed(0)
    module = torch.nn.Linear(8, 4)
    model, optimizer = fabric.setup(module, torch.optim.Adam(module.parameters(), lr=0.1))

    def step() -> None:
        loss = model(torch.randn(16, 8)).pow(2).mean()
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    return fabric, model, optimizer, step


def test_fabric_save_is_queued_and_load_sees_the_point_in_time(fam, tmp_path):
    held = HeldIO()
    io = fam.ours.AsyncCheckpointIO(held)
    fabric, model, optimizer, step = _fabric_loop(fam, io)
    try:
        step()
        path = tmp_path / "step1.ckpt"
        fabric.save(path, {"model": model, "optimizer": optimizer, "step": 1})
        assert io.pending == 1, "fabric.save wrote synchronously instead of queueing"
        assert not path.exists()
        at_save = {k: v.clone() for k, v in model.state_dict().items()}
        step()  # training goes on while the write is held
        assert not torch.equal(model.state_dict()["weight"], at_save["weight"])
        held.release.set()
        loaded = fabric.load(path)  # waits for its own save
        assert loaded["step"] == 1
        assert all(torch.equal(loaded["model"][k], at_save[k]) for k in at_save)
        assert "state" in loaded["optimizer"] and loaded["optimizer"]["state"]
    finally:
        held.release.set()
        io.teardown()


def test_a_failed_fabric_save_is_raised_by_the_next_call_and_names_its_path(fam, tmp_path):
    disk = FullDiskAtIO("step2.ckpt")  # fault injection: the second save hits a full disk
    io = fam.ours.AsyncCheckpointIO(disk)
    fabric, model, optimizer, step = _fabric_loop(fam, io)
    try:
        step()
        fabric.save(tmp_path / "step1.ckpt", {"model": model, "step": 1})
        step()
        fabric.save(tmp_path / "step2.ckpt", {"model": model, "step": 2})
        assert io.pending >= 1
        disk.release.set()
        deadline = time.monotonic() + 60
        while io.pending and time.monotonic() < deadline:  # the failure has happened, unseen
            time.sleep(0.01)
        with pytest.raises(CheckpointSaveError, match="step2.ckpt"):
            fabric.save(tmp_path / "step3.ckpt", {"model": model, "step": 3})
        assert fabric.load(tmp_path / "step1.ckpt")["step"] == 1
        assert not (tmp_path / "step2.ckpt").exists()
    finally:
        disk.release.set()
        io.teardown()


FABRIC_SCRIPT = """
    import os, sys, time, torch, importlib
    from _slow_disk import SlowDiskIO
    from _subproc import idle
    family, fabric_pkg, folder, mode = sys.argv[1:5]
    ours = importlib.import_module("asyncckpt." + family)
    io = ours.AsyncCheckpointIO(SlowDiskIO(1.0))
    if mode == "sigterm-after-pickle":  # as a spawn launcher hands it to each worker
        import pickle
        io = pickle.loads(pickle.dumps(io))
    fabric = importlib.import_module(fabric_pkg).Fabric(accelerator="cpu", devices=1, plugins=[io])
    torch.manual_seed(0)
    module = torch.nn.Linear(8, 4)
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.1))
    for i in range(2):
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        started = time.monotonic()
        fabric.save(os.path.join(folder, f"step{i}.ckpt"), {"model": model, "step": i})
        assert time.monotonic() - started < 0.5, "fabric.save waited for the slow write"
    torch.save(model.state_dict(), os.path.join(folder, "expected.pt"))
    print("saved", io.pending, flush=True)
    if mode.startswith("sigterm"):
        idle()
"""


@pytest.mark.parametrize("mode", ["exit", "sigterm", "sigterm-after-pickle"])
def test_a_fabric_script_that_ends_or_is_sent_sigterm_writes_its_queued_saves(fam, tmp_path, mode):
    script = textwrap.dedent(FABRIC_SCRIPT)
    args = (fam.name, fam.fabric_package, tmp_path, mode)
    if mode == "exit":
        result = run_python(script, *args, check=True, timeout=120)
        out = result.stdout
    else:
        proc = start_python(script, *args)
        line = proc.stdout.readline()
        assert line.startswith("saved"), line + proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        rest, err = finish(proc, timeout=120)
        out = line + rest
        assert proc.returncode == -signal.SIGTERM, err[-3000:]
    assert out.split()[1] != "0", "the saves were written before fabric.save returned"
    expected = torch.load(tmp_path / "expected.pt")
    last = torch.load(tmp_path / "step1.ckpt")
    assert last["step"] == 1
    assert all(torch.equal(last["model"][k], expected[k]) for k in expected)
    assert torch.load(tmp_path / "step0.ckpt")["step"] == 0
    assert sorted(os.listdir(tmp_path)) == ["expected.pt", "step0.ckpt", "step1.ckpt"]


DDP_SCRIPT = """
    import os, sys, importlib, torch
    from _slow_disk import SlowDiskIO


    def main():
        family, fabric_pkg, folder = sys.argv[1:4]
        io = importlib.import_module("asyncckpt." + family).AsyncCheckpointIO(SlowDiskIO(1.0))
        fabric = importlib.import_module(fabric_pkg).Fabric(accelerator="cpu", devices=2, strategy="ddp", plugins=[io])
        fabric.launch()
        torch.manual_seed(0)
        module = torch.nn.Linear(4, 2)
        model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.1))
        path = os.path.join(folder, "a.ckpt")
        fabric.save(path, {"model": model, "step": 7})  # rank 0 writes it, slowly
        step = fabric.load(path)["step"]
        with open(os.path.join(folder, f"rank{fabric.global_rank}.txt"), "w") as f:  # not stdout: ranks share it
            f.write(f"loaded step {step}")


    if __name__ == "__main__":
        main()
"""


def test_fabric_load_on_every_ddp_rank_reads_the_save_that_rank_zero_is_still_writing(fam, tmp_path):
    """Under DDP only rank 0 saves, and ``fabric.save``'s barrier comes after the call, not the
    write: ``fabric.load`` right after it found no file on rank 1 (FileNotFoundError)."""
    script = tmp_path / "ddp_fabric.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    run_python(script, fam.name, fam.fabric_package, tmp_path, check=True, timeout=180)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "loaded step 7"
