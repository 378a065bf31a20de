"""The process that tests/writers/test_crash.py kills: a fork server and the save loop it runs.

A fork server ("zygote") imports torch once; each run is a fresh process forked from it, in its
own session, so one ``killpg(SIGKILL)`` kills the run and its writer process together, like a
node losing power under the job. The zygote is a child subreaper: it reaps the run and its
orphaned writer process, so their pids are really gone before the next run looks at the folder.

Progress markers go to a log file with one ``O_APPEND`` ``write`` each: a marker written before
the kill is in the file after it (the kernel holds it), so the test can tell which phase each kill
landed in and which saves had been committed. Markers:

    ready R          the run's engine is warm (its first save is committed)
    stage S / staged S     the training thread staging step S (both saves) / done
    write P S        the writer starts torch.save of step S into a temp file beside P
    sync P S         torch.save returned; fsync, checksum record, rename, fsync of the folder
    commit P S       save_checkpoint returned: the file at P holds step S, durably
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from typing import Any, Dict

import torch

import asyncckpt._storage.torch_io as torch_io
from asyncckpt import AsyncCheckpointIO, TorchCheckpointIO

ELEMENTS = 1 << 20  # 4 MB of float32 per checkpoint


def checkpoint_for(step: int) -> Dict[str, Any]:
    """The checkpoint of ``step``: every value a function of the step, so a file can be checked."""
    return {
        "step": step,
        "w": torch.full((ELEMENTS,), float(step)),
        "b": torch.arange(1000, dtype=torch.int64) + step,
        "meta": {"step": step, "name": f"step-{step}"},
    }


def matches(obj: Any, step: int) -> bool:
    """Whether a loaded checkpoint is exactly ``checkpoint_for(step)``."""
    want = checkpoint_for(step)
    return (
        obj["step"] == step
        and obj["meta"] == want["meta"]
        and torch.equal(obj["w"], want["w"])
        and torch.equal(obj["b"], want["b"])
    )


def mark(line: str) -> None:
    fd = os.open(os.environ["CRASH_PHASE_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


_real_torch_save_to_file = torch_io.torch_save_to_file
_writing = ""  # "<target> <step>" of the save in progress; one writer runs one save at a time


def _marked_torch_save_to_file(checkpoint: Any, path: str) -> None:
    _real_torch_save_to_file(checkpoint, path)
    mark(f"sync {_writing}")




class PhaseIO(TorchCheckpointIO):
    """The real TorchCheckpointIO, with progress markers around each save. No fault injected."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Any = None) -> None:
        global _writing
        # Patched here, in the killed process or its writer process only, never in the test's:
        # adds the "sync" marker after torch.save; the write itself is the real one.
        torch_io.torch_save_to_file = _marked_torch_save_to_file
        _writing = f"{os.path.basename(os.fspath(path))} {checkpoint['step']}"
        mark(f"write {_writing}")
        super().save_checkpoint(checkpoint, path, storage_options)
        mark(f"commit {_writing}")


def run(folder: str, writer: str, first_step: int, checksum: bool) -> None:
    """Save steps ``first_step, first_step + 1, ...`` until killed."""
    torch.set_num_threads(1)
    io = AsyncCheckpointIO(PhaseIO(checksum=checksum), writer=writer, max_pending=2)
    step = first_step
    io.save_checkpoint(checkpoint_for(step), os.path.join(folder, "last.ckpt"))
    io.flush()
    mark(f"ready {first_step}")
    while True:
        step += 1
        ckpt = checkpoint_for(step)
        mark(f"stage {step}")
        io.save_checkpoint(ckpt, os.path.join(folder, f"step-{step}.ckpt"))
        io.save_checkpoint(ckpt, os.path.join(folder, "last.ckpt"))
        mark(f"staged {step}")
        if step % 4 == 0:
            io.flush()


def _become_subreaper() -> None:
    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def zygote() -> None:
    """Read ``{"folder", "writer", "first_step", "checksum", "log"}`` lines; fork one run for each.

    Prints ``pid N`` when a run starts and ``exit N STATUS`` once it and every process it
    started are reaped.
    """
    _become_subreaper()
    print("zygote ready", flush=True)
    for line in sys.stdin:
        args = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.setsid()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.environ["CRASH_PHASE_LOG"] = args["log"]
            try:
                run(args["folder"], args["writer"], args["first_step"], args["checksum"])
            finally:
                os._exit(70)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        while True:  # orphaned writer processes were reparented to us: reap them all
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
        print(f"exit {pid} {status}", flush=True)


if __name__ == "__main__":
    zygote()
