"""Bad input gets a clear error at the call and never leaves a file; odd but valid input round-trips."""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import shutil
import threading

import pytest
import torch

from asyncckpt import (
    AsyncCheckpointIO,
    CheckpointIO,
    FlushTimeoutError,
    InvalidPathError,
    NotSerializableError,
    TorchCheckpointIO,
)
from conftest import load, temp_files


@pytest.fixture(params=["async", "sync"])
def any_io(request):
    io = AsyncCheckpointIO() if request.param == "async" else TorchCheckpointIO()
    yield io
    if request.param == "async":
        io.teardown()


@pytest.mark.parametrize("staging", ["eager", "lazy"])
@pytest.mark.parametrize("warm", [False, True], ids=["first save", "warm save"])
def test_an_object_torch_save_cannot_pickle_at_its_protocol_is_refused_at_the_call(tmp_path, staging, warm):
    """``torch.save`` pickles with protocol 2, where a global reached by a dotted name, such as
    ``torch.channels_last``, cannot be pickled. The skeleton was pickled with the highest
    protocol, which takes it: the call returned and the save failed in the background. Now the
    call refuses it, naming the key, and queues nothing."""
    with pytest.raises(TypeError):
        torch.save({"fmt": torch.channels_last}, io.BytesIO())  # what torch.save itself does
    engine = AsyncCheckpointIO(TorchCheckpointIO(), staging=staging)
    try:
        state = {"w": torch.ones(3), "hparams": {"lr": 0.1}}
        if warm:
            for step in range(3):  # the layout repeats: the warm path
                engine.save_checkpoint(state, tmp_path / f"{step}.ckpt")
            engine.flush()
        bad = {"w": torch.ones(3), "hparams": {"lr": 0.1, "memory_format": torch.channels_last}}
        with pytest.raises(NotSerializableError) as info:
            engine.save_checkpoint(bad, tmp_path / "bad.ckpt")
        assert "['hparams']['memory_format']" in str(info.value)
        engine.flush()  # nothing failed in the background
        assert not (tmp_path / "bad.ckpt").exists()
    finally:
        engine.teardown()


def test_unpicklable_object_names_the_path_and_the_key(tmp_path, any_io):
    target = tmp_path / "a.ckpt"
    ckpt = {"model": {"w": torch.ones(3)}, "callbacks": {"early_stop": {"lock": threading.Lock()}}}
    with pytest.raises(NotSerializableError) as info:
        any_io.save_checkpoint(ckpt, target)
    message = str(info.value)
    assert str(target) in message
    assert "['callbacks']['early_stop']['lock']" in message
    assert "lock" in message
    if isinstance(any_io, AsyncCheckpointIO):
        any_io.flush()
    assert not target.exists()
    assert temp_files(str(tmp_path)) == []


def test_lambda_in_a_list_is_refused_at_the_call(tmp_path):
    io = AsyncCheckpointIO()
    with pytest.raises(NotSerializableError, match=r"\['hooks'\]\[1\]"):
        io.save_checkpoint({"hooks": [1, lambda: 0]}, tmp_path / "a.ckpt")
    # the refused save held no slot and queued nothing
    assert io.free_slots == io.max_pending and io.pending == 0
    io.save_checkpoint({"ok": 1}, tmp_path / "a.ckpt")
    io.teardown()
    assert load(tmp_path / "a.ckpt") == {"ok": 1}


def test_existing_folder_as_path_is_a_clear_error(tmp_path, any_io):
    (tmp_path / "ckpts").mkdir()
    with pytest.raises(InvalidPathError, match="existing folder.*last.ckpt"):
        any_io.save_checkpoint({"x": 1}, tmp_path / "ckpts")
    assert os.listdir(tmp_path / "ckpts") == []


@pytest.mark.parametrize("name", ["new/", "new/.", "new/..", "file://new/"])
def test_a_path_naming_a_folder_not_yet_there_is_refused_at_the_call(tmp_path, any_io, monkeypatch, name):
    """``ckpts/`` (or ``ckpts/.``) names a folder even before it exists: torch.save cannot write
    it, and the save used to be accepted and fail in the background at the rename."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidPathError, match="names a folder"):
        any_io.save_checkpoint({"x": 1}, name)
    if isinstance(any_io, AsyncCheckpointIO):
        any_io.flush()
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("a\x00b.ckpt", "NUL byte"),
        ("n" * 256 + ".ckpt", "261 bytes long"),
        ("deep/" + "/".join(["d" * 200] * 21) + "/a.ckpt", "bytes long in all"),
        ("memory://", "names no file"),
        ("memory://run/", "names a folder"),
        ("s3://bucket", "names a bucket"),
        ("simplecache::gs://AKIA:secret@bucket", "names a bucket"),
    ],
)
def test_a_path_no_filesystem_can_hold_is_refused_at_the_call(tmp_path, any_io, monkeypatch, name, pattern):
    """Found by attack: a NUL byte, a name over 255 bytes, a path over the system's limit and a
    URL that names no file were accepted and failed only in the background (as ``ValueError`` or
    ``ENAMETOOLONG`` at the rename), where the training loop had moved on."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidPathError, match=pattern) as refused:
        any_io.save_checkpoint({"x": 1}, name)
    assert "secret" not in str(refused.value)
    if isinstance(any_io, AsyncCheckpointIO):
        any_io.flush()
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("name, pattern", [("a\x00b.ckpt", "NUL byte"), ("n" * 256, "256 bytes long")])
def test_a_load_or_remove_of_a_path_no_filesystem_can_hold_is_refused_at_the_call(tmp_path, any_io, name, pattern):
    """Found by attack: a load of a path with a NUL byte said "not found" (printing the NUL as a
    space), and its remove, or the remove of an over-long name, failed in the background."""
    with pytest.raises(InvalidPathError, match=pattern):
        any_io.load_checkpoint(tmp_path / name)
    with pytest.raises(InvalidPathError, match=pattern):
        any_io.remove_checkpoint(tmp_path / name)
    if isinstance(any_io, AsyncCheckpointIO):
        any_io.flush()


@pytest.mark.parametrize(
    "content, says",
    [
        (b"", "is empty"),
        (b"hello, not a checkpoint", "not a zip-format torch checkpoint"),
        ("truncated", "truncated or damaged"),
    ],
)
def test_a_file_torch_load_cannot_read_gets_a_note_saying_what_is_wrong_with_it(tmp_path, any_io, content, says):
    """Found by attack: ``torch.load`` says ``EOFError``, ``KeyError: 101`` or "failed finding
    central directory ... internal miniz error" for an empty, foreign or cut-short file. The
    error keeps its type (callers may catch it); a note says what the file is."""
    path = tmp_path / "bad.ckpt"
    if content == "truncated":
        torch.save({"w": torch.ones(100)}, path)
        content = path.read_bytes()[:-100]
    path.write_bytes(content)
    with pytest.raises(Exception) as caught:
        any_io.load_checkpoint(path)
    assert not isinstance(caught.value, InvalidPathError)
    assert any(says in note for note in getattr(caught.value, "__notes__", [])), caught.value


class _UserConfig:
    def __init__(self, lr):
        self.lr = lr


def test_a_sound_file_torch_load_refuses_for_another_reason_gets_no_note(tmp_path, any_io):
    """A ``weights_only`` refusal of a sound file is torch's to explain: no note, and no read of
    the whole file to find nothing wrong with it."""
    torch.save({"cfg": _UserConfig(0.1)}, tmp_path / "sound.ckpt")
    with pytest.raises(pickle.UnpicklingError) as caught:
        any_io.load_checkpoint(tmp_path / "sound.ckpt", weights_only=True)
    assert not getattr(caught.value, "__notes__", [])


def test_empty_path_is_a_clear_error(any_io):
    with pytest.raises(InvalidPathError, match="empty"):
        any_io.save_checkpoint({"x": 1}, "")


def test_path_of_the_wrong_type_is_a_clear_error(any_io):
    with pytest.raises(InvalidPathError, match="str or os.PathLike"):
        any_io.save_checkpoint({"x": 1}, 42)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"when_full": "drop"}, r"when_full='drop'.*'wait', 'raise'"),
        ({"writer": "fork"}, r"writer='fork'.*'thread'"),
        ({"max_pending": 0}, r"max_pending"),
        ({"max_pending": 1.5}, r"max_pending"),
        ({"exit_timeout": -1}, r"exit_timeout"),
        ({"exit_timeout": float("nan")}, r"exit_timeout"),
        ({"exit_timeout": "5"}, r"exit_timeout"),
    ],
)
def test_unknown_options_list_the_allowed_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        AsyncCheckpointIO(**kwargs)


def test_misspelled_option_is_refused():
    with pytest.raises(TypeError, match="max_pendng"):
        AsyncCheckpointIO(max_pendng=2)


def test_storage_options_on_a_local_path_is_explained(tmp_path):
    io = TorchCheckpointIO()
    with pytest.raises(TypeError, match="only used for fsspec URLs"):
        io.save_checkpoint({"x": 1}, tmp_path / "a.ckpt", storage_options={"anon": True})
    assert not (tmp_path / "a.ckpt").exists()


@pytest.mark.parametrize("writer", ["sync", "thread", "process"])
def test_storage_options_refused_at_the_call_never_show_their_credentials(tmp_path, writer):
    """The refusal names the option keys, never their values (a secret key given by mistake)."""
    io = TorchCheckpointIO() if writer == "sync" else AsyncCheckpointIO(writer=writer)
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    options = {"key": "AKIAEXAMPLEKEYID", "secret": secret, "client_kwargs": {"aws_secret_access_key": secret}}
    try:
        with pytest.raises(TypeError, match="only used for fsspec URLs") as info:
            io.save_checkpoint({"x": 1}, tmp_path / "a.ckpt", storage_options=options)
        assert "'secret'" in str(info.value)
        assert secret not in str(info.value) and "AKIAEXAMPLEKEYID" not in str(info.value)
    finally:
        if writer != "sync":
            io.teardown()
    assert not (tmp_path / "a.ckpt").exists()


def test_missing_parent_folders_are_created_and_pathlike_and_str_work(tmp_path):
    io = AsyncCheckpointIO()
    io.save_checkpoint({"x": 1}, tmp_path / "a" / "b" / "c.ckpt")
    io.save_checkpoint({"x": 2}, str(tmp_path / "d" / "e.ckpt"))
    io.save_checkpoint({"x": 3}, pathlib.PurePosixPath(tmp_path / "f.ckpt"))
    io.teardown()
    assert load(tmp_path / "a" / "b" / "c.ckpt") == {"x": 1}
    assert load(tmp_path / "d" / "e.ckpt") == {"x": 2}
    assert load(tmp_path / "f.ckpt") == {"x": 3}


def test_unicode_paths(tmp_path):
    io = AsyncCheckpointIO()
    target = tmp_path / "чекпойнт" / "ステップ=3 ✓.ckpt"
    io.save_checkpoint({"w": torch.ones(2)}, target)
    io.teardown()
    assert torch.equal(load(target)["w"], torch.ones(2))


def test_fsspec_memory_and_file_urls(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    io = AsyncCheckpointIO()
    io.save_checkpoint({"w": torch.arange(4)}, "memory://ckpts/a.ckpt")
    io.save_checkpoint({"w": torch.arange(5)}, f"file://{tmp_path}/b.ckpt")
    io.flush()
    assert torch.equal(io.load_checkpoint("memory://ckpts/a.ckpt")["w"], torch.arange(4))
    assert torch.equal(load(tmp_path / "b.ckpt")["w"], torch.arange(5))
    io.remove_checkpoint("memory://ckpts/a.ckpt")
    io.flush()
    assert not fsspec.filesystem("memory").exists("/ckpts/a.ckpt")
    io.teardown()


def test_load_of_a_missing_file_is_file_not_found(tmp_path):
    io = AsyncCheckpointIO()
    with pytest.raises(FileNotFoundError, match="a.ckpt"):
        io.load_checkpoint(tmp_path / "a.ckpt")
    io.teardown()


def test_remove_of_a_missing_file_is_not_an_error(tmp_path):
    io = AsyncCheckpointIO()
    io.remove_checkpoint(tmp_path / "nothing.ckpt")
    io.teardown()


def test_odd_tensors_round_trip_as_torch_save_gives(tmp_path):
    sparse = torch.sparse_coo_tensor([[0, 2], [1, 0]], [3.0, 4.0], (3, 3))
    quantized = torch.quantize_per_tensor(torch.tensor([1.0, 2.0]), 0.1, 0, torch.qint8)
    conj = torch.tensor([1 + 2j]).conj()
    ckpt = {
        "sparse": sparse,
        "quantized": quantized,
        "conj": conj,
        "param": torch.nn.Parameter(torch.ones(2)),
        "deep": {"a": [[[[{"b": (torch.ones(1),)}]]]]},
        "grad_tensor": torch.ones(2, requires_grad=True) * 2,
    }
    io = AsyncCheckpointIO()
    plain_path = tmp_path / "plain.ckpt"
    torch.save(ckpt, plain_path)
    plain = load(plain_path)
    io.save_checkpoint(ckpt, tmp_path / "a.ckpt")
    sparse._values().mul_(0)  # point in time holds for tensors pickled by value too
    io.teardown()
    out = load(tmp_path / "a.ckpt")
    assert torch.equal(out["sparse"].to_dense(), plain["sparse"].to_dense())
    assert torch.equal(out["quantized"].dequantize(), plain["quantized"].dequantize())
    assert torch.equal(out["conj"].resolve_conj(), plain["conj"].resolve_conj())
    assert type(out["param"]) is torch.nn.Parameter
    assert torch.equal(out["deep"]["a"][0][0][0][0]["b"][0], torch.ones(1))
    assert out["grad_tensor"].requires_grad == plain["grad_tensor"].requires_grad
    assert torch.equal(out["grad_tensor"], plain["grad_tensor"])


def test_options_rebuild_an_equal_engine():
    io = AsyncCheckpointIO(max_pending=3, when_full="raise", staging_threads=1, exit_timeout=5, handle_sigterm=False)
    again = AsyncCheckpointIO(**io.options())
    assert again.options() == io.options()
    assert io.options()["staging_threads"] == 1 and io.options()["when_full"] == "raise"
    io.teardown()
    again.teardown()


class _PlainPickleIO(CheckpointIO):
    """A user's own IO that writes with plain pickle, which has no rule against two dtypes."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with open(path, "wb") as f:
            pickle.dump(checkpoint, f)

    def load_checkpoint(self, path, map_location=None):
        with open(path, "rb") as f:
            return pickle.load(f)

    def remove_checkpoint(self, path):
        os.remove(path)


def _two_dtypes_one_storage():
    ints = torch.arange(8, dtype=torch.int32)
    return {"step": 1, "model": {"ints": ints, "as_floats": ints.view(torch.float32)}}


@pytest.mark.parametrize(
    "options",
    [{"writer": "thread"}, {"writer": "process"}, {"staging": "lazy"}],
    ids=["thread", "process", "lazy"],
)
def test_two_dtypes_viewing_one_storage_are_refused_at_the_call_as_torch_save_refuses_them(tmp_path, options):
    """torch.save raises for this at once; the engine used to accept the call and fail in the
    background, where the user learnt of it one save later (found by an attack script)."""
    with pytest.raises(RuntimeError, match="view the same data as different types"):
        torch.save(_two_dtypes_one_storage(), tmp_path / "plain.ckpt")
    raw = torch.ones(4)
    with pytest.raises(RuntimeError, match="view the same data as different types"):
        torch.save({"t": raw, "s": raw.untyped_storage()}, tmp_path / "plain.ckpt")  # a bare storage reads as uint8
    io = AsyncCheckpointIO(**options)
    names = r"model\.ints \(torch\.int32\) and model\.as_floats \(torch\.float32\)"
    with pytest.raises(NotSerializableError, match=names) as err:
        io.save_checkpoint(_two_dtypes_one_storage(), tmp_path / "a.ckpt")
    assert ".clone()" in str(err.value)
    with pytest.raises(NotSerializableError, match="view the same memory as different dtypes"):
        io.save_checkpoint({"t": raw, "s": raw.untyped_storage()}, tmp_path / "a.ckpt")
    io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "b.ckpt")  # the engine goes on
    io.teardown()
    assert not (tmp_path / "a.ckpt").exists() and temp_files(str(tmp_path)) == []
    assert torch.equal(load(tmp_path / "b.ckpt")["w"], torch.ones(3))


def test_an_io_without_torch_saves_rule_gets_two_dtypes_on_one_storage(tmp_path):
    io = AsyncCheckpointIO(_PlainPickleIO())
    checkpoint = _two_dtypes_one_storage()
    io.save_checkpoint(checkpoint, tmp_path / "a.pkl")
    io.teardown()
    out = _PlainPickleIO().load_checkpoint(tmp_path / "a.pkl")
    assert torch.equal(out["model"]["ints"], checkpoint["model"]["ints"])
    assert torch.equal(out["model"]["as_floats"].view(torch.int32), checkpoint["model"]["ints"])


def test_a_checkpoint_nested_past_the_recursion_limit_is_refused_at_the_call_saying_so(tmp_path):
    deep = inner = []
    for _ in range(5000):
        inner.append([])
        inner = inner[0]
    with pytest.raises(RecursionError):
        torch.save({"deep": deep}, tmp_path / "plain.ckpt")
    io = AsyncCheckpointIO()
    expected = r"nested too deeply.*at key \['deep'\]\[0\].*setrecursionlimit"
    with pytest.raises(NotSerializableError, match=expected) as err:
        io.save_checkpoint({"deep": deep}, tmp_path / "a.ckpt")
    assert len(str(err.value)) < 500
    io.teardown()
    assert not (tmp_path / "a.ckpt").exists()


def _one_tensor_of_every_dtype_torch_save_takes():
    """A small tensor of each dtype torch has that ``torch.save`` writes and ``torch.load``
    reads back, made by viewing raw bytes (so the bit types, float8 and the quantized dtypes
    without a quantizer are there too)."""
    found = {}
    for dtype in sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str):
        try:
            raw = torch.arange(24, dtype=torch.uint8)
            tensor = raw.view(dtype) if dtype.itemsize in (1, 2, 4, 8) else None
            if tensor is None:
                continue
            buffer = io.BytesIO()
            torch.save(tensor, buffer)
            buffer.seek(0)
            torch.load(buffer)
        except Exception:  # noqa: BLE001 - torch itself does not take this dtype
            continue
        found[str(dtype)] = tensor
    return found


@pytest.mark.parametrize("writer,staging", [("thread", "eager"), ("thread", "lazy"), ("process", "eager")])
def test_a_tensor_of_every_dtype_torch_save_takes_is_saved_as_torch_save_saves_it(tmp_path, writer, staging):
    """Found by attack: a dense tensor of a quantized dtype without a quantizer (a byte view as
    ``torch.qint8``; ``is_quantized`` is False) failed the save with "Quantized copy only works
    with kFloat as source Tensor", where ``torch.save`` writes it."""
    state = _one_tensor_of_every_dtype_torch_save_takes()
    assert {"torch.qint8", "torch.float8_e4m3fn", "torch.uint16", "torch.bits8", "torch.complex32"} <= set(state)
    reference = io.BytesIO()
    torch.save(state, reference)
    engine = AsyncCheckpointIO(writer=writer, staging=staging)
    try:
        for _ in range(2):  # the second save takes the warm path
            engine.save_checkpoint(state, tmp_path / "all.ckpt")
            engine.flush()
            assert (tmp_path / "all.ckpt").read_bytes() == reference.getvalue()
    finally:
        engine.teardown()


@pytest.mark.parametrize("writer,staging", [("thread", "eager"), ("thread", "lazy"), ("process", "eager")])
def test_sparse_tensors_are_saved_again_and_again_without_keeping_staging_memory(tmp_path, writer, staging, caplog):
    """Found by attack: rebuilding a sparse tensor for the write goes through torch's
    ``_rebuild_sparse_tensor``, which appends it to a module-level list that only ``torch.load``
    empties. Every save's sparse tensors (views of the slot's staging memory) stayed referenced
    there: the engine read that as the wrapped IO keeping them (a false warning, and new staging
    memory allocated at every save) and the old memory was never freed."""
    import logging

    from torch import _utils as torch_utils  # torch's private list, the one that leaked

    coo = torch.sparse_coo_tensor([[0, 2], [1, 0]], [3.0, 4.0], (3, 3))
    csr = torch.eye(4).to_sparse_csr()
    engine = AsyncCheckpointIO(writer=writer, staging=staging)
    try:
        with caplog.at_level(logging.WARNING, logger="asyncckpt"):
            for step in range(3):
                engine.save_checkpoint({"coo": coo * step, "csr": csr, "step": step}, tmp_path / "s.ckpt")
                engine.flush()
                assert not torch_utils._sparse_tensors_to_validate
        out = load(tmp_path / "s.ckpt")
        assert torch.equal(out["coo"].to_dense(), (coo * 2).to_dense())
        assert torch.equal(out["csr"].to_dense(), torch.eye(4))
        assert not [r.getMessage() for r in caplog.records if "kept" in r.getMessage()]
    finally:
        engine.teardown()


@pytest.mark.parametrize("writer,staging", [("thread", "eager"), ("thread", "lazy"), ("process", "eager")])
def test_a_checkpoint_holding_a_reference_cycle_reuses_its_staging_memory(tmp_path, writer, staging, caplog):
    """Found by attack: a checkpoint whose objects form a reference cycle (a list holding itself,
    an object pointing back at its owner) is rebuilt for the write with the same cycle, which
    only the cyclic collector frees. Its tensors were still referenced when the wrapped IO
    returned: the engine read that as the IO keeping them (a false warning naming
    ``TorchCheckpointIO``) and gave the slot new staging memory at every save, the old memory
    living on until a collection."""
    import logging

    looped = [torch.arange(1000.0)]
    looped.append(looped)
    engine = AsyncCheckpointIO(writer=writer, staging=staging)
    try:
        with caplog.at_level(logging.WARNING, logger="asyncckpt"):
            for step in range(3):
                looped[0].fill_(step)
                engine.save_checkpoint({"looped": looped, "step": step}, tmp_path / "c.ckpt")
                engine.flush()
        assert not [r.getMessage() for r in caplog.records if "kept" in r.getMessage()]
        assert [s.allocated_bytes for s in engine.stats][1:] == [0, 0]  # the slot's memory, reused
        out = load(tmp_path / "c.ckpt")
        assert out["looped"][1] is out["looped"] and torch.equal(out["looped"][0], torch.full((1000,), 2.0))
    finally:
        engine.teardown()


@pytest.mark.parametrize("spelling", ["a linked folder", "'..' after a link", "a file link to it"])
def test_a_load_by_another_spelling_through_a_symlink_waits_for_the_queued_save(tmp_path, gated_io, spelling):
    """Every spelling of one file orders as one path, symlinks on the way included: a load (and
    ``wait_for_path``) waits for the save queued under another spelling, and reads its file.
    Before, the keys were the paths as text: the load read the old file at once (or, for a
    ``..`` after a link, waited on a file the save never touched)."""
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    (tmp_path / "sublink").symlink_to(real / "sub", target_is_directory=True)
    (tmp_path / "last.ckpt").symlink_to(real / "x.ckpt")  # as ModelCheckpoint(save_last="link") makes it
    saved_as, read_as = {
        "a linked folder": (tmp_path / "link" / "x.ckpt", real / "x.ckpt"),
        "'..' after a link": (tmp_path / "sublink" / ".." / "x.ckpt", real / "x.ckpt"),  # the OS: real/x.ckpt
        "a file link to it": (real / "x.ckpt", tmp_path / "last.ckpt"),
    }[spelling]
    torch.save({"v": torch.zeros(2)}, real / "x.ckpt")  # the old file, which the load must not read
    io = AsyncCheckpointIO(gated_io)
    try:
        gated_io.gate.clear()
        io.save_checkpoint({"v": torch.ones(2)}, saved_as)
        assert gated_io.started.wait(30)
        with pytest.raises(FlushTimeoutError):
            io.wait_for_path(read_as, timeout=0.2)  # the save is held: a wait on that file times out
        waiter = threading.Thread(target=lambda: loaded.append(io.load_checkpoint(read_as)))
        loaded: list = []
        waiter.start()
        waiter.join(0.3)
        gated_io.gate.set()
        waiter.join(30)
        assert torch.equal(loaded[0]["v"], torch.ones(2))
        assert not (tmp_path / "x.ckpt").exists()  # '..' is the link target's parent, not the link's
    finally:
        gated_io.gate.set()
        io.teardown()


def test_a_path_with_dot_dot_after_a_link_to_another_filesystem_is_written_where_the_os_opens_it(tmp_path, any_io):
    """``link/../x.ckpt`` names a file beside the link's *target*, as the operating system (and
    ``torch.save``) opens it. The temp file, the folder fsynced and the removal's folder are that
    folder's; taken as text (``os.path.abspath``), the temp file was made beside the link, on
    another filesystem, and the rename failed (EXDEV)."""
    other = pathlib.Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than the test's folder")
    elsewhere = other / f"asyncckpt-test-{os.getpid()}-{tmp_path.name}"
    (elsewhere / "sub").mkdir(parents=True)
    try:
        (tmp_path / "link").symlink_to(elsewhere / "sub", target_is_directory=True)
        path = tmp_path / "link" / ".." / "x.ckpt"
        any_io.save_checkpoint({"v": torch.ones(2)}, path)
        if isinstance(any_io, AsyncCheckpointIO):
            any_io.flush()
        assert torch.equal(load(elsewhere / "x.ckpt")["v"], torch.ones(2))
        assert not (tmp_path / "x.ckpt").exists()
        assert temp_files(str(tmp_path)) == [] and temp_files(str(elsewhere)) == []
        any_io.remove_checkpoint(path)
        if isinstance(any_io, AsyncCheckpointIO):
            any_io.flush()
        assert not (elsewhere / "x.ckpt").exists()
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_a_symlinked_file_is_replaced_and_a_symlinked_folder_is_followed(tmp_path, any_io):
    """The documented choice (docs/index.md, edge 13): the atomic rename replaces a link named as
    the path, as Lightning's own IO does, and never writes into another file through it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    torch.save({"v": 0}, elsewhere / "target.pt")
    (tmp_path / "link.pt").symlink_to(elsewhere / "target.pt")
    (tmp_path / "linked_folder").symlink_to(elsewhere, target_is_directory=True)
    any_io.save_checkpoint({"v": torch.ones(1)}, tmp_path / "link.pt")
    any_io.save_checkpoint({"v": torch.full((1,), 2.0)}, tmp_path / "linked_folder" / "in_folder.pt")
    if isinstance(any_io, AsyncCheckpointIO):
        any_io.flush()
    assert not (tmp_path / "link.pt").is_symlink()
    assert torch.equal(load(tmp_path / "link.pt")["v"], torch.ones(1))
    assert load(elsewhere / "target.pt") == {"v": 0}
    assert torch.equal(load(elsewhere / "in_folder.pt")["v"], torch.full((1,), 2.0))
    assert (tmp_path / "linked_folder").is_symlink()
