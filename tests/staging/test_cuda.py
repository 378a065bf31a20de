"""The CUDA staging path: pinned buffers, a side stream, an event. Skipped without a GPU (never faked)."""

from __future__ import annotations

import pytest
import torch

from asyncckpt import AsyncCheckpointIO
from conftest import load

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_cuda_point_in_time_while_the_next_steps_run(tmp_path, writer):
    model = torch.nn.Linear(1024, 1024).cuda()
    opt = torch.optim.Adam(model.parameters())
    io = AsyncCheckpointIO(max_pending=2, writer=writer)
    expected = []
    for step in range(4):
        model(torch.randn(64, 1024, device="cuda")).sum().backward()
        opt.step()
        expected.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        io.save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / f"{step}.ckpt")
        with torch.no_grad():  # queued on the current stream right after the save returns
            for p in model.parameters():
                p.mul_(-3.0).add_(7.0)
    io.teardown()
    for step in range(4):
        out = load(tmp_path / f"{step}.ckpt")
        for key, value in expected[step].items():
            assert out["model"][key].device.type == "cpu"
            assert torch.equal(out["model"][key], value), (step, key)


@pytest.mark.parametrize("training_stream_waits", [True, False])
def test_side_stream_copy_orders_the_training_stream_only_when_asked(training_stream_waits):
    """SideStreamCopy, the one device-to-host copy of both stagers: the side stream waits for
    the values the training stream produced before it; the training stream waits for the copy
    only when asked (eager staging; lazy staging orders it at a guard point). A CPU source is
    copied on the side stream too."""
    from asyncckpt._staging.devices import SideStreamCopy

    big = torch.randn(64 * 2**20, device="cuda")  # 256 MiB: its copy takes milliseconds
    src = [big * 2, torch.arange(5.0)]  # the first is produced on the training stream just before
    dst = [torch.empty(big.shape, pin_memory=True), torch.empty(5, pin_memory=True)]
    event = SideStreamCopy().start(dst, src, training_stream_waits=training_stream_waits)
    after = torch.cuda.Event()
    after.record()  # on the training stream, after start()
    after.synchronize()
    if training_stream_waits:
        assert event.query(), "the training stream ran past a copy it was to wait for"
    event.synchronize()
    assert torch.equal(dst[0], (big * 2).cpu()) and torch.equal(dst[1], src[1])


def test_cuda_staging_uses_pinned_buffers_reused_across_saves(tmp_path):
    io = AsyncCheckpointIO(max_pending=1)
    weight = torch.randn(4096, 256, device="cuda")
    io.save_checkpoint({"w": weight}, tmp_path / "a.ckpt")
    io.flush()
    (before,) = io.staging_buffers()
    assert before.kind == "pinned" and before.pinned
    weight.add_(1)
    io.save_checkpoint({"w": weight}, tmp_path / "b.ckpt")
    io.flush()
    (after,) = io.staging_buffers()
    assert after.arena_id == before.arena_id
    io.teardown()
    assert torch.equal(load(tmp_path / "b.ckpt")["w"], weight.cpu())


def test_cuda_staging_does_not_allocate_gpu_memory(tmp_path):
    weight = torch.randn(8192, 1024, device="cuda")  # 32 MB
    io = AsyncCheckpointIO()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    io.save_checkpoint({"w": weight}, tmp_path / "a.ckpt")
    io.flush()
    assert torch.cuda.max_memory_allocated() <= before  # no clone on the GPU (Lightning #21630)
    io.teardown()


@pytest.mark.parametrize("writer, staging", [("thread", "eager"), ("thread", "lazy"), ("process", "eager")])
def test_cuda_staging_under_a_default_device_of_cuda_allocates_no_gpu_memory(tmp_path, writer, staging):
    """``torch.set_default_device("cuda")``: staging memory is made on the CPU all the same (its
    factories named no device, and followed the default: a second copy of the state on the GPU)."""
    weight = torch.randn(8192, 1024, device="cuda")  # 32 MB
    bias = torch.randn(1024)  # a CPU tensor: plain staging memory
    io = AsyncCheckpointIO(writer=writer, staging=staging)
    torch.set_default_device("cuda")
    try:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for i in range(2):
            io.save_checkpoint({"w": weight, "b": bias}, tmp_path / f"{i}.ckpt")
        io.flush()
        assert torch.cuda.max_memory_allocated() < before + (1 << 20)
    finally:
        torch.set_default_device(None)
        io.teardown()
    out = load(tmp_path / "1.ckpt")
    assert torch.equal(out["w"].cpu(), weight.cpu()) and torch.equal(out["b"].cpu(), bias)


def test_cuda_sharded_save_metadata_loads_into_fsdp1_style_allocations(tmp_path):
    """Staged in pinned buffers, recorded as not pinned: FSDP1's sharded optimizer loader
    allocates each tensor on the GPU from ``.metadata``'s properties (pin_memory included)."""
    from torch.distributed.checkpoint import FileSystemReader

    from asyncckpt import DistributedCheckpointIO

    state = {"w": torch.randn(256, 256, device="cuda"), "opt": {"step": torch.tensor(3.0), "m": torch.ones(4096)}}
    io = AsyncCheckpointIO(DistributedCheckpointIO())
    io.save_checkpoint(state, tmp_path / "ck")
    io.teardown()
    metadata = FileSystemReader(str(tmp_path / "ck")).read_metadata()
    for md in metadata.state_dict_metadata.values():
        properties = getattr(md, "properties", None)
        if properties is not None:
            torch.empty(md.size, dtype=properties.dtype, pin_memory=properties.pin_memory, device="cuda")
    whole = DistributedCheckpointIO().load_checkpoint(tmp_path / "ck")
    assert torch.equal(whole["w"], state["w"].cpu()) and torch.equal(whole["opt"]["m"], torch.ones(4096))


@pytest.mark.parametrize(
    "writer, staging", [("thread", "eager"), ("process", "eager"), ("thread", "lazy")]
)
def test_cuda_files_are_torch_saves_and_load_onto_the_same_devices(tmp_path, writer, staging):
    """Issue 23: the file records each storage's device ("cuda:0"), as torch.save's does, and
    has torch.save's bytes (to a file object: torch.save to a path names its records after the
    file, a temp file's name here)."""
    import io as _io

    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.LayerNorm(256)).cuda()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.randn(8, 256, device="cuda")).sum().backward()
    opt.step()
    checkpoint = {"model": model.state_dict(), "opt": opt.state_dict(), "tied": [model[0].weight],
                  "cpu": torch.arange(10.0), "epoch": 1}
    if torch.cuda.device_count() > 1:
        checkpoint["other"] = torch.arange(5.0, device="cuda:1")
    reference = _io.BytesIO()
    torch.save(checkpoint, reference)
    io = AsyncCheckpointIO(writer=writer, staging=staging)
    try:
        io.save_checkpoint(checkpoint, tmp_path / "a.ckpt")
        io.flush()
    finally:
        io.teardown()
    assert (tmp_path / "a.ckpt").read_bytes() == reference.getvalue()
    ours = torch.load(tmp_path / "a.ckpt", weights_only=True)
    theirs = torch.load(_io.BytesIO(reference.getvalue()), weights_only=True)
    assert {k: v.device for k, v in ours["model"].items()} == {k: v.device for k, v in theirs["model"].items()}
    assert ours["model"]["0.weight"].device == torch.device("cuda:0") and ours["cpu"].device.type == "cpu"
