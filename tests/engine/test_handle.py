"""``save_checkpoint`` / ``asave_checkpoint`` return a SaveHandle (a concurrent.futures.Future
of that one save): real saves with both writers, a failing save, a timeout, a redacted path."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
import torch

from asyncckpt import AsyncCheckpointIO, CheckpointSaveError, SaveStats
from conftest import FailingIO, load


def test_a_save_handle_completes_with_the_saves_stats(tmp_path, writer):
    io = AsyncCheckpointIO(writer=writer)
    weight = torch.randn(64, 64)
    handle = io.save_checkpoint({"w": weight}, tmp_path / "a.ckpt")
    assert isinstance(handle, concurrent.futures.Future)
    assert handle.bytes == weight.numel() * weight.element_size()
    assert handle.wait(30) and handle.done()
    stats = handle.result(0)
    assert isinstance(stats, SaveStats) and handle.timings is stats
    assert stats.tensor_bytes == handle.bytes and stats in io.stats
    assert handle.exception(0) is None and not handle.cancel()
    assert handle.path == str(tmp_path / "a.ckpt") and "written" in repr(handle)
    assert torch.equal(load(tmp_path / "a.ckpt")["w"], weight)
    io.teardown()


def test_a_failed_saves_handle_holds_the_error_the_next_call_raises_once(tmp_path, writer):
    io = AsyncCheckpointIO(FailingIO(), writer=writer)
    handle = io.save_checkpoint({"x": torch.ones(2)}, tmp_path / "fail.ckpt")
    assert handle.wait(30)
    error = handle.exception(0)
    assert isinstance(error, CheckpointSaveError) and handle.timings is None
    with pytest.raises(CheckpointSaveError) as raised:
        handle.result(0)
    assert raised.value is error
    # The handle did not consume the engine's inbox: the next call raises it, once.
    with pytest.raises(CheckpointSaveError) as raised:
        io.flush()
    assert raised.value is error
    io.flush()
    io.teardown()


def test_waiting_on_a_handle_times_out_while_the_write_is_held(tmp_path, gated_io):
    io = AsyncCheckpointIO(gated_io)
    gated_io.gate.clear()
    handle = io.save_checkpoint({"x": torch.ones(2)}, tmp_path / "a.ckpt")
    assert not handle.wait(0.2) and not handle.done() and "pending" in repr(handle)
    assert not handle.cancel() and not handle.cancelled()  # a queued save cannot be cancelled
    with pytest.raises(concurrent.futures.TimeoutError):
        handle.result(timeout=0.1)
    gated_io.gate.set()
    assert handle.wait(30) and handle.result(0).tensor_bytes == 8
    io.teardown()


class _RecordingIO:
    """Takes any path (a URL with credentials included) and writes nothing."""

    def __init__(self) -> None:
        self.saved = []

    def check_path(self, path):
        pass

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.saved.append(path)

    def load_checkpoint(self, path, **kwargs):
        raise NotImplementedError

    def remove_checkpoint(self, path):
        pass

    def teardown(self):
        pass


def test_a_handle_shows_the_path_without_credentials():
    recording = _RecordingIO()
    io = AsyncCheckpointIO(recording)
    url = "ftp://alice:hunter2@host/ckpt/x.ckpt?sig=s3cret"
    handle = io.save_checkpoint({"x": torch.ones(2)}, url)
    assert handle.wait(30) and recording.saved == [url]  # written with the URL as given
    for text in (handle.path, repr(handle), handle.result(0).path):
        assert "hunter2" not in text and "s3cret" not in text and "host/ckpt/x.ckpt" in text
    io.teardown()


def test_asave_returns_the_handle_too(tmp_path):
    io = AsyncCheckpointIO()

    async def main():
        return await io.asave_checkpoint({"w": torch.ones(3)}, tmp_path / "a.ckpt")

    handle = asyncio.run(main())
    assert handle.wait(30) and handle.result(0).tensor_bytes == 12
    io.teardown()
