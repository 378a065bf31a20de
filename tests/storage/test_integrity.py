"""Integrity: the opt-in checksum record, ``asyncckpt verify`` and ``load_checkpoint(verify=True)``.

Damage is made for real on real files (truncation, a flipped bit). ``-s`` prints the bit-flip
figures recorded in docs/reliability.md.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import subprocess
import sys

import pytest
import torch

from _subproc import child_env, run_python
from asyncckpt import AsyncCheckpointIO, IntegrityError, TorchCheckpointIO
from asyncckpt.__main__ import main
from asyncckpt.integrity import read_record, record_path, verify_file


def _ckpt(value: float = 1.0) -> dict:
    return {"w": torch.full((50_000,), value), "b": torch.arange(10), "meta": {"epoch": 3}}


def _flip(path, offset: int, bit: int = 0) -> None:
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 1 << bit
    open(path, "wb").write(data)


def _truncate(path, keep: int) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep])


def _tensor_data_offset(path) -> int:
    """An offset inside the bytes of tensor ``w`` (the largest record)."""
    import zipfile

    info = max(zipfile.ZipFile(path).infolist(), key=lambda i: i.file_size)
    return info.header_offset + 200 + info.file_size // 2


def test_checksum_is_off_by_default_and_the_folder_holds_only_the_checkpoint(tmp_path, writer):
    io = AsyncCheckpointIO(writer=writer)
    io.save_checkpoint(_ckpt(), tmp_path / "a.ckpt")
    io.teardown()
    assert os.listdir(tmp_path) == ["a.ckpt"]


def test_checksum_record_matches_the_file_and_is_sha256sum_format(tmp_path, writer):
    io = AsyncCheckpointIO(TorchCheckpointIO(checksum=True), writer=writer)
    for value in (1.0, 2.0, 3.0):  # replaced twice: the record is pruned back to one line
        io.save_checkpoint(_ckpt(value), tmp_path / "a.ckpt")
    io.flush()
    digest = hashlib.sha256((tmp_path / "a.ckpt").read_bytes()).hexdigest()
    assert (tmp_path / "a.ckpt.sha256").read_text() == f"{digest}  a.ckpt\n"
    checked = subprocess.run(["sha256sum", "-c", "a.ckpt.sha256"], cwd=tmp_path, capture_output=True, text=True)
    assert checked.returncode == 0 and "a.ckpt: OK" in checked.stdout
    assert verify_file(str(tmp_path / "a.ckpt")).method == "sha256"
    io.remove_checkpoint(tmp_path / "a.ckpt")  # the record goes with the file
    io.teardown()
    assert os.listdir(tmp_path) == []


def test_record_lists_old_and_new_digest_while_the_rename_is_pending(tmp_path, monkeypatch):
    """The instant between committing the record and renaming the new file over the old one:
    both files are accepted, so a crash there leaves a file that verifies."""
    io = TorchCheckpointIO(checksum=True)
    target = tmp_path / "a.ckpt"
    io.save_checkpoint(_ckpt(1.0), target)
    old = hashlib.sha256(target.read_bytes()).hexdigest()
    seen = {}
    real_replace = os.replace

    def replace_and_look(src, dst):
        if os.fspath(dst) == str(target):  # the checkpoint's rename, not the record's
            seen["record"] = read_record(str(target))
            seen["new"] = hashlib.sha256(open(src, "rb").read()).hexdigest()
            verify_file(str(target))  # the old file verifies right before the rename
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_and_look)
    io.save_checkpoint(_ckpt(2.0), target)
    assert seen["record"] == [seen["new"], old]
    assert read_record(str(target)) == [seen["new"]]


def test_a_plain_save_over_a_checksummed_file_drops_the_stale_record(tmp_path):
    TorchCheckpointIO(checksum=True).save_checkpoint(_ckpt(1.0), tmp_path / "a.ckpt")
    TorchCheckpointIO().save_checkpoint(_ckpt(2.0), tmp_path / "a.ckpt")
    assert not os.path.exists(record_path(str(tmp_path / "a.ckpt")))
    assert verify_file(str(tmp_path / "a.ckpt")).method == "crc32"


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_verify_cli_and_load_verify_reject_a_damaged_file(tmp_path, capsys, checksum, damage):
    target = tmp_path / "a.ckpt"
    TorchCheckpointIO(checksum=checksum).save_checkpoint(_ckpt(), target)
    assert main(["verify", str(target)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK {target}:") and ("sha256" if checksum else "CRC32") in out
    if damage == "truncated":
        _truncate(target, target.stat().st_size - 1000)
    else:
        _flip(target, _tensor_data_offset(target))
    assert main(["verify", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"FAIL {target}:")
    if checksum:
        assert "does not match its checksum record" in err
    assert ("truncated" if damage == "truncated" else "CRC32") in err
    with pytest.raises(IntegrityError):
        TorchCheckpointIO().load_checkpoint(target, verify=True)
    io = AsyncCheckpointIO()
    with pytest.raises(IntegrityError):
        io.load_checkpoint(target, verify=True)
    io.teardown()


def test_torch_load_itself_does_not_notice_a_flipped_bit_in_tensor_data(tmp_path):
    """Why verify reads every record: torch.load skips the CRC32s."""
    target = tmp_path / "a.ckpt"
    torch.save(_ckpt(), target)
    _flip(target, _tensor_data_offset(target), bit=3)
    loaded = torch.load(target, weights_only=True)  # no error
    assert not torch.equal(loaded["w"], _ckpt()["w"])
    with pytest.raises(IntegrityError, match="CRC32"):
        verify_file(str(target))


def test_the_cli_runs_as_a_module_and_a_console_script(tmp_path):
    good, bad = tmp_path / "good.ckpt", tmp_path / "bad.ckpt"
    torch.save(_ckpt(), good)
    torch.save(_ckpt(), bad)
    _truncate(bad, 100)
    env = child_env()
    ok = run_python("-m", "asyncckpt", "verify", good, env=env)
    assert ok.returncode == 0 and ok.stdout.startswith("OK "), ok.stderr
    fail = run_python("-m", "asyncckpt", "verify", good, bad, env=env)
    assert fail.returncode == 1 and "FAIL" in fail.stderr and "truncated" in fail.stderr
    script = os.path.join(os.path.dirname(sys.executable), "asyncckpt")
    if os.path.exists(script):  # installed (pip install -e .): the declared console script
        assert subprocess.run([script, "verify", str(good)], capture_output=True, env=env).returncode == 0


def test_the_cli_reports_a_missing_file_and_a_non_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["verify", str(tmp_path / "missing.ckpt"), str(tmp_path / "notes.txt")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "not a zip-format torch checkpoint" in err


def test_cleanup_command_removes_stale_temp_files(tmp_path, capsys):
    dead = run_python("import os; print(os.getpid())")
    from asyncckpt.storage import HOST_ID

    stale = tmp_path / f".a.ckpt.asyncckpt-tmp-{HOST_ID}-{int(dead.stdout)}-0123abcd"
    stale.write_bytes(b"partial")
    assert main(["cleanup", str(tmp_path)]) == 0
    assert not stale.exists() and "removed 1" in capsys.readouterr().out


def test_every_single_bit_flip_is_detected_or_harmless(tmp_path):
    """One random bit flipped at every byte of a small checkpoint, no checksum record: verify
    either rejects the file or the file loads exactly as saved (the bit carried no data)."""
    original = {"w": torch.arange(50, dtype=torch.float32), "meta": {"step": 3}}
    clean = tmp_path / "clean.ckpt"
    TorchCheckpointIO().save_checkpoint(original, clean)
    data = clean.read_bytes()
    damaged = tmp_path / "damaged.ckpt"
    rng = random.Random(0)
    outcome = collections.Counter()
    for offset in range(len(data)):
        flipped = bytearray(data)
        flipped[offset] ^= 1 << rng.randrange(8)
        damaged.write_bytes(flipped)
        try:
            verify_file(str(damaged))
        except IntegrityError:
            outcome["detected"] += 1
            continue
        loaded = torch.load(damaged, weights_only=True)
        assert loaded.keys() == original.keys() and loaded["meta"] == original["meta"], offset
        assert torch.equal(loaded["w"], original["w"]), offset
        outcome["harmless (loads identical)"] += 1
    print(f"\nbit flips without a checksum record: {len(data)} tried, {dict(outcome)}, missed 0")


# -- AtomicFile: the one atomic write ---------------------------------------------------------


def test_atomic_file_failing_mid_write_leaves_neither_target_nor_temp_file(tmp_path):
    from asyncckpt._storage.local import AtomicFile

    target = tmp_path / "sub" / "ckpt.pt"
    with pytest.raises(OSError, match="disk died"):
        with AtomicFile(str(target)) as atomic:
            with atomic.open() as f:
                f.write(b"half of it")
                raise OSError("disk died")
    assert os.listdir(tmp_path / "sub") == []  # the folder was made; no target, no temp file


def test_atomic_file_target_holds_the_old_file_until_the_complete_new_one_replaces_it(tmp_path):
    from asyncckpt._storage.local import AtomicFile, is_temp_file

    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    seen = []
    with AtomicFile(str(target)) as atomic:
        with atomic.open() as f:
            f.write(b"new and complete")
        assert is_temp_file(os.path.basename(atomic.tmp)) and os.path.dirname(atomic.tmp) == str(tmp_path)
        size = atomic.commit(before=lambda tmp: seen.append((open(tmp, "rb").read(), target.read_bytes())))
    assert seen == [(b"new and complete", b"old")]  # ``before`` runs with both files in place
    assert size == len(b"new and complete") and target.read_bytes() == b"new and complete"
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_atomic_file_failing_before_the_rename_keeps_the_old_file(tmp_path):
    from asyncckpt._storage.local import AtomicFile

    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")

    def refuse(tmp: str) -> None:
        raise RuntimeError("record could not be written")

    with pytest.raises(RuntimeError, match="record"):
        with AtomicFile(str(target)) as atomic:
            with atomic.open() as f:
                f.write(b"new")
            atomic.commit(before=refuse)
    assert os.listdir(tmp_path) == ["ckpt.pt"] and target.read_bytes() == b"old"


def test_atomic_file_keeps_a_callers_temp_name_and_adopt_commits_it_later(tmp_path):
    from asyncckpt._storage.local import AtomicFile

    target = tmp_path / "meta.pt"
    with AtomicFile(str(target), temp_name="meta.pt.abc.pending") as atomic:
        with atomic.open() as f:
            f.write(b"meta")
    assert atomic.tmp == str(tmp_path / "meta.pt.abc.pending")
    assert os.listdir(tmp_path) == ["meta.pt.abc.pending"]  # a normal exit without commit keeps it
    AtomicFile.adopt(atomic.tmp, str(target)).commit()  # crash recovery finishes the rename
    assert os.listdir(tmp_path) == ["meta.pt"] and target.read_bytes() == b"meta"
    with pytest.raises(ValueError):
        with AtomicFile(str(target), temp_name="meta.pt.def.pending") as atomic:
            with open(atomic.tmp, "wb") as f:
                f.write(b"x")
            raise ValueError
    assert os.listdir(tmp_path) == ["meta.pt"]


def test_atomic_file_sync_fsyncs_a_temp_file_written_by_the_caller_once(tmp_path, monkeypatch):
    from asyncckpt._storage.local import AtomicFile

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    target = tmp_path / "ckpt.pt"
    with AtomicFile(str(target)) as atomic:
        with open(atomic.tmp, "wb") as f:  # an async writer's own file
            f.write(b"new")
        atomic.sync()
        assert synced == [atomic.tmp]
        atomic.commit()
    assert synced == [atomic.tmp, str(tmp_path)]  # the temp file once, then the folder
    assert target.read_bytes() == b"new"


def test_atomic_file_keep_on_failed_commit_keeps_the_temp_file_for_recovery(tmp_path, monkeypatch):
    from asyncckpt._storage.local import AtomicFile

    target = tmp_path / "meta.pt"
    with AtomicFile(str(target), temp_name="meta.pt.abc.pending", keep_on_failed_commit=True) as atomic:
        with atomic.open() as f:
            f.write(b"meta")

    def failing_replace(src, dst):
        raise PermissionError(src)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(PermissionError):
        atomic.commit()
    with pytest.raises(PermissionError):
        AtomicFile.adopt(atomic.tmp, str(target), keep_on_failed_commit=True).commit()
    assert os.listdir(tmp_path) == ["meta.pt.abc.pending"]  # still there for crash recovery
    with pytest.raises(PermissionError):
        AtomicFile.adopt(atomic.tmp, str(target)).commit()
    assert os.listdir(tmp_path) == []  # the default discards it


def test_atomic_write_is_an_atomic_file(tmp_path):
    from asyncckpt.storage import atomic_write

    target = tmp_path / "x"
    with pytest.raises(ZeroDivisionError):
        atomic_write(str(target), lambda tmp: (open(tmp, "wb").write(b"part"), 1 / 0))
    assert os.listdir(tmp_path) == []
    assert atomic_write(str(target), lambda tmp: open(tmp, "wb").write(b"data")) == 4
    assert target.read_bytes() == b"data" and os.listdir(tmp_path) == ["x"]


# -- one hash, one local-vs-URL decision ------------------------------------------------------


def test_sha256_tee_during_a_write_equals_sha256_stream_of_the_file(tmp_path):
    from asyncckpt._storage.hashing import Sha256Tee, sha256_stream
    from asyncckpt.integrity import sha256_file

    data = os.urandom(3 * 1024 * 1024 + 17)
    tee = Sha256Tee()
    view = memoryview(data)
    with open(tmp_path / "f", "wb") as f:
        for start in range(0, len(data), 700_001):  # uneven writes, as torch.save makes them
            tee.update(view[start : start + 700_001])
            f.write(view[start : start + 700_001])
    with open(tmp_path / "f", "rb") as f:
        streamed = sha256_stream(f, chunk=1_000_003)
    assert tee.hexdigest() == streamed == sha256_file(str(tmp_path / "f")) == hashlib.sha256(data).hexdigest()


def test_backend_for_chooses_local_files_for_paths_and_file_urls_and_fsspec_for_other_urls(tmp_path, monkeypatch):
    from asyncckpt._storage.backend import FsspecFiles, LocalFiles, S3Files, backend_for

    monkeypatch.setenv("HOME", str(tmp_path))
    for path, local in [
        (str(tmp_path / "a.ckpt"), str(tmp_path / "a.ckpt")),
        ("rel/a.ckpt", "rel/a.ckpt"),
        (f"file://{tmp_path}/a.ckpt", f"{tmp_path}/a.ckpt"),
        (f"local://{tmp_path}/a.ckpt", f"{tmp_path}/a.ckpt"),
        ("file://~/a.ckpt", f"{tmp_path}/a.ckpt"),
    ]:
        backend = backend_for(path)
        assert isinstance(backend, LocalFiles) and backend.is_local and backend.local_path == local, path
    backend = backend_for(str(tmp_path / "a.ckpt"))
    torch.save(_ckpt(), backend.local_path)
    assert backend.exists() and backend.size() == os.path.getsize(backend.local_path)
    assert backend.sha256() == hashlib.sha256(open(backend.local_path, "rb").read()).hexdigest()
    assert backend.remove() and not backend.exists() and not backend.remove()

    url = f"memory://backend-{os.getpid()}/a.ckpt"
    remote = backend_for(url)
    assert isinstance(remote, FsspecFiles) and not isinstance(remote, S3Files)
    assert not remote.is_local and not remote.is_s3 and remote.local_path is None
    remote.fs.pipe_file(remote.fs_path, b"x" * 10)
    remote.fs.pipe_file(remote.fs_path + ".sha256", b"digest line\n")
    assert remote.exists() and remote.size() == 10 and remote.read_record_text() == "digest line\n"
    assert remote.sha256() == hashlib.sha256(b"x" * 10).hexdigest()
    assert remote.remove() and not remote.exists() and not remote.fs.exists(remote.fs_path + ".sha256")
    with pytest.raises(ValueError, match="not an s3:// URL"):
        remote.cleanup(0)
