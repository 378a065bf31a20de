"""Lazy staging on CUDA: device-to-pinned copies on a side stream the training stream does not
wait for. Skipped without a GPU (never faked)."""

from __future__ import annotations

import copy

import pytest
import torch

from asyncckpt import AsyncCheckpointIO
from asyncckpt.lazy import TensorModifiedError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a.cpu(), b.cpu())
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            _equal(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_cuda_lazy_point_in_time_under_optimizer_steps(tmp_path, impl):
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.BatchNorm1d(1024), torch.nn.Linear(1024, 1024))
    model = model.cuda()
    opt = torch.optim.Adam(model.parameters(), **{impl: True})
    io = AsyncCheckpointIO(staging="lazy", handle_sigterm=False)
    x = torch.randn(64, 1024, device="cuda")
    expected = []
    for step in range(4):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        state = {"model": model.state_dict(), "opt": opt.state_dict()}
        expected.append(_cpu(state))
        io.save_checkpoint(state, tmp_path / f"{step}.ckpt")
    io.teardown()
    for step in range(4):
        _equal(torch.load(tmp_path / f"{step}.ckpt", weights_only=False), expected[step])


def test_cuda_training_stream_does_not_wait_for_the_lazy_copy(tmp_path):
    big = torch.randn(256 * 2**20, device="cuda")  # 1 GiB: its device-to-host copy takes tens of ms
    io = AsyncCheckpointIO(staging="lazy", handle_sigterm=False)
    try:
        io.save_checkpoint({"big": big}, tmp_path / "a.ckpt")
        (job,) = io.stager.unfinished()
        assert job.cuda_event is not None
        y = torch.ones(16, device="cuda") * 2  # queued on the training stream after the call
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        assert not job.cuda_event.query(), "the training stream waited for the lazy copy"
        io.flush()
        assert torch.equal(torch.load(tmp_path / "a.ckpt")["big"], big.cpu())
        assert y.sum().item() == 32
    finally:
        io.teardown()


def test_cuda_modification_outside_the_guards_is_loud(tmp_path):
    weight = torch.randn(4096, 1024, device="cuda")
    io = AsyncCheckpointIO(staging="lazy", handle_sigterm=False)
    io.save_checkpoint({"state_dict": {"w": weight}}, tmp_path / "a.ckpt")
    weight.mul_(2)
    with pytest.raises(TensorModifiedError, match=r"state_dict\.w"):
        io.flush()
    io.teardown()
