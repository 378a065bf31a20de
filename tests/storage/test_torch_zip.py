"""Local files are written at the speed of the write: CRC32 on helper threads, same bytes.

``asyncckpt._storage.torch_zip`` writes with torch's own zip writer and pickler with the CRC32
off for that one writer, computes each record's CRC on helper threads (a big record in chunks,
combined), and fills the CRC fields and the serialization id in place. What a user can check:
the file is ``torch.save``'s, byte for byte, a valid zip (``testzip``), loadable by plain
``torch.load``, through every writer and staging mode; and a ``torch.save`` on another thread
meanwhile still gets its CRCs (no global switch).
"""

from __future__ import annotations

import io
import os
import threading
import zipfile
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt import AsyncCheckpointIO, TorchCheckpointIO
from asyncckpt._storage import torch_zip


def _torch_save_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _ours(obj, path, threads: int = 2) -> bytes:
    with open(path, "w+b") as f:
        torch_zip.save_to_file(obj, f, threads)
    with open(path, "rb") as f:
        return f.read()


def test_this_torch_has_the_fast_path():
    """The suite runs on torch versions whose writer takes the CRC switch; a silent fallback to
    plain torch.save would hide that every test below measures nothing new."""
    assert torch_zip.fast_path_available()


@settings(max_examples=200, deadline=None)
@given(a=st.binary(max_size=300), b=st.binary(max_size=300))
def test_crc32_combine_is_zlibs(a, b):
    assert torch_zip.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int64,
           torch.bool, torch.complex64]


def _tensor(dtype, n, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g) * 100
    if dtype == torch.bool:
        return t > 0
    if dtype == torch.complex64:
        return torch.complex(t, t.flip(0))
    return t.to(dtype)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=0, max_size=8),
    dtypes=st.lists(st.sampled_from(_DTYPES), min_size=8, max_size=8),
    shape=st.sampled_from(["plain", "views", "shared", "nested"]),
    threads=st.sampled_from([1, 2, 4]),
)
def test_bytes_are_torch_saves(tmp_path_factory, sizes, dtypes, shape, threads):
    tensors = [_tensor(dtypes[i], n, i) for i, n in enumerate(sizes)]
    obj: object
    if shape == "plain":
        obj = {f"t{i}": t for i, t in enumerate(tensors)}
    elif shape == "views":
        obj = {f"t{i}": t[1::2] if t.numel() > 2 else t for i, t in enumerate(tensors)}
    elif shape == "shared":
        raw = torch.arange(10, dtype=torch.uint8)  # an untyped storage is saved as uint8
        obj = {"all": tensors, "again": tensors[:1], "storage": raw.untyped_storage(), "raw": raw[2:]}
    else:
        obj = {"epoch": 3, "name": "x" * 50, "nested": [{"t": t, "i": i} for i, t in enumerate(tensors)]}
    path = tmp_path_factory.mktemp("zip") / "a.ckpt"
    assert _ours(obj, path, threads) == _torch_save_bytes(obj)


def test_a_record_bigger_than_a_chunk_is_crcd_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_zip, "CHUNK", 1 << 20)  # so that a 5 MB record is six pieces
    obj = {"big": torch.randn(5 * (1 << 20) // 4 + 7), "small": torch.arange(3)}
    ours = _ours(obj, tmp_path / "a.ckpt", threads=3)
    assert ours == _torch_save_bytes(obj)
    assert zipfile.ZipFile(io.BytesIO(ours)).testzip() is None


@pytest.mark.parametrize(
    "writer, staging", [("thread", "eager"), ("process", "eager"), ("thread", "lazy")]
)
def test_files_through_the_engine_are_torch_saves(tmp_path, writer, staging):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    checkpoint = {"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 2,
                  "tied": [model[0].weight, model[0].weight[3:]], "big": torch.randn(6 << 20)}
    expected = _torch_save_bytes(checkpoint)
    io_ = AsyncCheckpointIO(writer=writer, staging=staging, handle_sigterm=False)
    try:
        io_.save_checkpoint(checkpoint, tmp_path / "a.ckpt")
        io_.flush()
    finally:
        io_.teardown()
    data = (tmp_path / "a.ckpt").read_bytes()
    assert data == expected
    assert zipfile.ZipFile(tmp_path / "a.ckpt").testzip() is None


@pytest.mark.parametrize(
    "writer, staging", [("thread", "eager"), ("process", "eager"), ("thread", "lazy")]
)
def test_torch_save_settings_of_the_calling_thread_make_the_file(tmp_path, writer, staging):
    """torch keeps user settings of ``torch.utils.serialization.config`` per thread: a
    ``config.save.storage_alignment = 4096`` (page-aligned storages, for ``mmap`` loads) or
    ``compute_crc32 = False`` in the training thread shapes its ``torch.save`` files, and was
    not seen by the writer thread nor the writer process: their files were aligned to 64 bytes,
    with CRCs. The file is ``torch.save``'s with the settings of the thread that called, and a
    later call without them gets a file without them."""
    from torch.utils.serialization import config

    checkpoint = {"w": torch.randn(1000), "b": torch.ones(7), "step": 3}
    io_ = AsyncCheckpointIO(writer=writer, staging=staging, handle_sigterm=False)
    try:
        io_.save_checkpoint(checkpoint, tmp_path / "warm.ckpt")
        io_.flush()  # the writer runs, with torch's default settings
        with config.patch({"save.storage_alignment": 4096, "save.compute_crc32": False}):
            expected = _torch_save_bytes(checkpoint)
            io_.save_checkpoint(checkpoint, tmp_path / "set.ckpt")
        io_.save_checkpoint(checkpoint, tmp_path / "unset.ckpt")
        io_.flush()
    finally:
        io_.teardown()
    assert (tmp_path / "set.ckpt").read_bytes() == expected
    assert (tmp_path / "unset.ckpt").read_bytes() == _torch_save_bytes(checkpoint) != expected
    offsets = [i.header_offset for i in zipfile.ZipFile(tmp_path / "set.ckpt").infolist()]
    assert offsets[1] >= 4096  # the record after data.pkl starts at the next 4096-byte boundary
    assert torch.equal(torch.load(tmp_path / "set.ckpt")["w"], checkpoint["w"])


def test_torch_save_on_another_thread_keeps_its_crcs(tmp_path):
    """The CRC switch is per writer: a user's torch.save racing ours is a normal file."""
    obj = {"w": torch.randn(8 << 20)}
    stop = threading.Event()
    bad = []

    def user_saves():
        i = 0
        while not stop.is_set():
            buffer = io.BytesIO()
            torch.save({"u": torch.full((1000,), float(i))}, buffer)
            if zipfile.ZipFile(buffer).testzip() is not None:
                bad.append(i)
            i += 1

    thread = threading.Thread(target=user_saves)
    thread.start()
    try:
        for i in range(5):
            TorchCheckpointIO().save_checkpoint(obj, tmp_path / f"{i}.ckpt")
    finally:
        stop.set()
        thread.join()
    assert not bad
    assert zipfile.ZipFile(tmp_path / "0.ckpt").testzip() is None


def test_an_object_torch_save_refuses_raises_and_the_process_lives_on(tmp_path):
    """A refusal mid-archive (found while writing this module: the unfinished writer, dropped,
    aborted the process)."""
    t = torch.arange(4.0)
    with pytest.raises(RuntimeError, match="different types"):
        _ours({"a": t, "b": t.untyped_storage()}, tmp_path / "a.ckpt")
    import gc

    gc.collect()


def test_a_failed_write_leaves_no_file_and_says_why(tmp_path):
    """A file-size limit hit in the middle of the archive: the real OSError, no partial file."""
    import resource
    import subprocess
    import sys

    code = (
        "import resource, signal, torch, os, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "from asyncckpt import TorchCheckpointIO\n"
        "try:\n"
        "    TorchCheckpointIO().save_checkpoint({'w': torch.randn(1 << 20)}, sys.argv[1])\n"
        "except OSError as err:\n"
        "    print('OSError', err.errno)\n"
        "print(sorted(os.listdir(os.path.dirname(sys.argv[1]))))\n"
    )
    del resource
    from _subproc import child_env

    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.ckpt")], capture_output=True, text=True,
                         env=child_env(), timeout=120)
    assert "OSError 27" in out.stdout, out.stdout + out.stderr  # EFBIG
    assert out.stdout.strip().endswith("[]"), out.stdout


def _fold_ids(infos) -> bytes:
    """torch's serialization id, second half: c10::hash_combine over the non-empty records' CRCs."""
    mask = (1 << 64) - 1
    seed = 0
    for info in infos:
        if info.file_size:
            seed = (seed ^ ((info.CRC + 0x9E3779B9 + ((seed << 6) & mask) + (seed >> 2)) & mask)) & mask
    return b"%020d" % seed


@pytest.mark.slow
def test_an_archive_over_4_gib_gets_its_crcs_in_the_zip64_layout():
    """Records past 4 GiB and a record over 4 GiB use zip64 fields; the CRCs must land anyway.
    Written to /dev/shm (4 GiB on this VM's disk would measure the disk); about 15 s."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    import tempfile

    with tempfile.TemporaryDirectory(dir=folder) as d:
        big = torch.zeros((1 << 32) + 4096, dtype=torch.uint8)  # untouched zero pages: no RSS
        big[-10:] = 7
        obj = {"big": big, "after": torch.arange(1000.0)}
        path = os.path.join(d, "a.ckpt")
        with open(path, "w+b") as f:
            torch_zip.save_to_file(obj, f, 2)
        archive = zipfile.ZipFile(path)
        infos = archive.infolist()
        assert infos[-1].header_offset > 0xFFFFFFFF and infos[-4].file_size > 0xFFFFFFFF
        expected = {"archive/data/0": zlib.crc32(memoryview(big.numpy())),
                    "archive/data/1": zlib.crc32(memoryview(obj["after"].numpy()).cast("B"))}
        for info in infos:
            if info.filename in expected:
                assert info.CRC == expected[info.filename], info.filename
            else:
                assert info.CRC == zlib.crc32(archive.read(info.filename)), info.filename
        assert archive.read("archive/.data/serialization_id")[20:] == _fold_ids(infos[:-1])
        loaded = torch.load(path, mmap=True, weights_only=True)
        assert torch.equal(loaded["after"], obj["after"]) and loaded["big"][-1] == 7
