"""Real I/O faults, produced for real (no injected exceptions): a file size limit (EFBIG), a
folder the process may not write (EACCES), a read-only filesystem (EROFS) and a full one
(ENOSPC). For each, with both writers: the next call raises ``CheckpointSaveError`` naming the
path, with a message that says what to do and the ``OSError`` (errno kept) as its cause; the
previous file is intact; no temp file is left; and the engine keeps working afterwards.

The tmpfs cases need root (``mount``); they are skipped, saying why, where mounting fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

from _subproc import run_python
from asyncckpt import AsyncCheckpointIO, CheckpointSaveError
from conftest import temp_files

# Runs in a subprocess, the body inside main() (the process writer is spawned, so the script is
# imported again there). The last line of output is a JSON report for the test to check.
CHILD_PRELUDE = textwrap.dedent(
    """
    import errno, json, os, resource, signal, sys
    import torch
    from asyncckpt import AsyncCheckpointIO, CheckpointSaveError
    from asyncckpt.storage import is_temp_file

    report = {}

    def failure(io):
        try:
            io.flush()
        except CheckpointSaveError as err:
            cause = err.__cause__
            return {"path": err.path, "message": str(err), "cause": type(cause).__name__,
                    "errno": getattr(cause, "errno", None)}
        return None

    def temps(folder):
        return [n for n in os.listdir(folder) if is_temp_file(n)]
    """
)


def run_child(body: str, folder: str, writer: str, preexec_fn=None) -> dict:
    script = os.path.join(folder, "..", f"child-{writer}.py")
    with open(script, "w") as f:
        f.write(
            CHILD_PRELUDE
            + "\ndef main(folder, writer):\n"
            + textwrap.indent(textwrap.dedent(body), "    ")
            + "\nif __name__ == '__main__':\n    main(sys.argv[1], sys.argv[2])\n    print(json.dumps(report))\n"
        )
    result = run_python(script, folder, writer, timeout=120, preexec_fn=preexec_fn)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_file_size_limit_efbig(tmp_path, writer):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    report = run_child(
        """
        # Without this the kernel kills the process with SIGXFSZ at the first write past the
        # limit; ignored, the write fails with EFBIG. Both settings pass to the writer process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, resource.RLIM_INFINITY))
        io = AsyncCheckpointIO(writer=writer)
        target = os.path.join(folder, "a.ckpt")
        io.save_checkpoint({"w": torch.full((1000,), 1.0)}, target)
        io.flush()
        big = {"w": torch.full((1 << 20,), 2.0)}  # 4 MB, over the 2 MB limit
        if writer == "process":
            # The staging arena is a memfd, a file to the kernel, so a job-wide limit refuses the
            # save at the call, before anything is queued. Then only the writer keeps the limit.
            try:
                io.save_checkpoint(big, target)
                report["staging_errno"] = None
            except OSError as err:
                report["staging_errno"] = err.errno
                report["staging_message"] = str(err)
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        io.save_checkpoint(big, target)
        report["error"] = failure(io)
        report["previous"] = torch.load(target)["w"][0].item()
        report["temps"] = temps(folder)
        # raise the limit for this process and its writer process, and save again
        import psutil
        for pid in [os.getpid()] + [c.pid for c in psutil.Process().children()]:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        io.save_checkpoint({"w": torch.full((1 << 20,), 3.0)}, target)
        io.teardown()
        report["after"] = torch.load(target)["w"][0].item()
        """,
        str(folder),
        writer,
    )
    error = report["error"]
    assert error is not None, "the failed write was not reported"
    assert error["path"] == str(folder / "a.ckpt")
    assert error["errno"] == errno.EFBIG
    assert "file too large" in error["message"] and "ulimit -f" in error["message"]
    assert str(folder / "a.ckpt") in error["message"]
    assert report["previous"] == 1.0
    assert report["temps"] == []
    assert report["after"] == 3.0
    if writer == "process":
        assert report["staging_errno"] == errno.EFBIG
        assert "staging memory" in report["staging_message"] and "ulimit -f" in report["staging_message"]


def _drop_root_permission_bypass() -> None:
    """In the child before exec: remove CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the
    capability bounding set, so file mode bits apply to this root process as to any user.

    (Running as ``nobody`` instead is not possible here: the interpreter lives under /root,
    mode 0700.)
    """
    libc = ctypes.CDLL(None, use_errno=True)
    PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _permission_bypass_can_be_dropped() -> bool:
    if os.geteuid() != 0:
        return True  # an ordinary user: mode bits apply anyway
    probe = subprocess.run(
        [sys.executable, "-c", "import os; os.mkdir('/proc/no')"],
        preexec_fn=_drop_root_permission_bypass,
        capture_output=True,
    )
    return b"prctl" not in probe.stderr


def test_folder_not_writable_eacces(tmp_path, writer):
    if not _permission_bypass_can_be_dropped():
        pytest.skip("cannot drop root's CAP_DAC_OVERRIDE here (prctl refused), so no folder is read-only to us")
    base = tempfile.mkdtemp(prefix="asyncckpt-ro-")  # outside pytest's 0700 tmp root
    try:
        readonly = os.path.join(base, "readonly")
        writable = os.path.join(base, "writable")
        os.mkdir(readonly)
        os.mkdir(writable)
        torch.save({"w": torch.full((10,), 1.0)}, os.path.join(readonly, "a.ckpt"))
        os.chmod(readonly, 0o555)  # readable and listable, not writable
        report = run_child(
            """
            io = AsyncCheckpointIO(writer=writer)
            target = os.path.join(folder, "a.ckpt")
            io.save_checkpoint({"w": torch.full((10,), 2.0)}, target)
            report["error"] = failure(io)
            report["temps"] = temps(folder)
            other = os.path.join(os.path.dirname(folder), "writable", "a.ckpt")
            io.save_checkpoint({"w": torch.full((10,), 3.0)}, other)
            io.teardown()
            report["after"] = torch.load(other)["w"][0].item()
            """,
            readonly,
            writer,
            preexec_fn=_drop_root_permission_bypass if os.geteuid() == 0 else None,
        )
        error = report["error"]
        assert error is not None, "the failed write was not reported"
        assert error["path"] == os.path.join(readonly, "a.ckpt")
        assert error["errno"] == errno.EACCES and error["cause"] == "PermissionError"
        assert "permission denied" in error["message"] and "writable" in error["message"]
        assert readonly in error["message"]
        assert torch.load(os.path.join(readonly, "a.ckpt"))["w"][0].item() == 1.0
        assert report["temps"] == [] and os.listdir(readonly) == ["a.ckpt"]
        assert report["after"] == 3.0
    finally:
        with contextlib.suppress(OSError):
            os.chmod(os.path.join(base, "readonly"), 0o755)
        subprocess.run(["rm", "-rf", base], check=False)


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs mounted for the test (root only); unmounted afterwards."""
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); needs root")
    try:
        yield mountpoint
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mountpoint)], capture_output=True)
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def _checkpoint(value: float, nbytes: int) -> dict:
    return {"w": torch.full((nbytes // 4,), value)}


def test_full_filesystem_enospc(tmpfs, writer):
    target = tmpfs / "a.ckpt"
    filler = tmpfs / "old-checkpoint.bin"
    io = AsyncCheckpointIO(writer=writer)
    io.save_checkpoint(_checkpoint(1.0, 100_000), target)
    io.flush()
    filler.write_bytes(b"\0" * 600_000)
    io.save_checkpoint(_checkpoint(2.0, 400_000), target)  # 400 KB, with about 300 KB free
    with pytest.raises(CheckpointSaveError) as info:
        io.flush()
    err = info.value
    assert err.path == str(target)
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ENOSPC
    assert "no space left" in str(err) and "free space" in str(err) and str(tmpfs) in str(err)
    assert torch.load(target)["w"][0].item() == 1.0
    assert temp_files(str(tmpfs)) == []
    filler.unlink()  # free space: the same engine saves again
    io.save_checkpoint(_checkpoint(3.0, 400_000), target)
    io.teardown()
    assert torch.load(target)["w"][0].item() == 3.0
    assert temp_files(str(tmpfs)) == []


def test_read_only_filesystem_erofs(tmpfs, writer):
    target = tmpfs / "a.ckpt"
    io = AsyncCheckpointIO(writer=writer)
    io.save_checkpoint(_checkpoint(1.0, 1000), target)
    io.flush()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    io.save_checkpoint(_checkpoint(2.0, 1000), target)
    with pytest.raises(CheckpointSaveError) as info:
        io.flush()
    err = info.value
    assert err.path == str(target)
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.EROFS
    assert "read-only" in str(err) and str(tmpfs) in str(err)
    assert torch.load(target)["w"][0].item() == 1.0
    assert temp_files(str(tmpfs)) == []
    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    io.save_checkpoint(_checkpoint(3.0, 1000), target)
    io.teardown()
    assert torch.load(target)["w"][0].item() == 3.0
