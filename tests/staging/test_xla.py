"""torch_xla, run for real on the CPU PJRT device (the tox ``xla`` environment; skipped elsewhere)."""

from __future__ import annotations

import collections
import os

import pytest
import torch

pytestmark = pytest.mark.xla

torch_xla = pytest.importorskip("torch_xla", reason="torch_xla runs in the tox 'xla' environment")

from _subproc import run_python  # noqa: E402
from asyncckpt import AsyncCheckpointIO, XLACheckpointIO  # noqa: E402

Point = collections.namedtuple("Point", "x y")


@pytest.fixture(scope="module")
def device():
    return torch_xla.device()


def test_every_async_save_holds_its_own_step_while_the_device_moves_on(tmp_path, device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    io = AsyncCheckpointIO(max_pending=2)
    expected = []
    for step in range(5):
        x = torch.randn(8, 16).to(device)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch_xla.sync()
        expected.append({k: v.cpu().clone() for k, v in model.state_dict().items()})
        io.save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "step": step},
                           tmp_path / f"step{step}.ckpt")
        with torch.no_grad():  # changed on the device right after the save returns
            for p in model.parameters():
                p.add_(100.0)
        torch_xla.sync()
    io.teardown()
    for step in range(5):
        out = torch.load(tmp_path / f"step{step}.ckpt", weights_only=True)
        assert out["step"] == step
        for key, value in expected[step].items():
            assert out["model"][key].device.type == "cpu"
            assert torch.equal(out["model"][key], value), (step, key)
        assert all(t.device.type == "cpu" for t in out["opt"]["state"][0].values() if torch.is_tensor(t))


def test_nested_structure_and_mixed_devices_round_trip(tmp_path, device):
    sd = collections.OrderedDict(a=torch.arange(4.0).to(device))
    sd._metadata = {"": {"version": 2}}
    ckpt = {
        "sd": sd,
        "mixed": [torch.ones(3), torch.full((2,), 7.0).to(device), (torch.tensor([1, 2]).to(device), "tag")],
        "point": Point(torch.zeros(2).to(device), 3),
        "bf16": torch.randn(5).to(torch.bfloat16).to(device),
        "meta": {"epoch": 3, "name": "run"},
        "param": torch.nn.Parameter(torch.ones(2).to(device)),
    }
    for io in (AsyncCheckpointIO(), XLACheckpointIO()):
        path = tmp_path / f"{type(io).__name__}.ckpt"
        io.save_checkpoint(ckpt, path)
        io.teardown()
        out = torch.load(path, weights_only=False)
        assert type(out["sd"]) is collections.OrderedDict and out["sd"]._metadata == {"": {"version": 2}}
        assert torch.equal(out["sd"]["a"], torch.arange(4.0))
        assert torch.equal(out["mixed"][0], torch.ones(3))
        assert torch.equal(out["mixed"][1], torch.full((2,), 7.0))
        assert isinstance(out["mixed"][2], tuple) and out["mixed"][2][1] == "tag"
        assert type(out["point"]).__name__ == "Point" and out["point"].y == 3
        assert out["bf16"].dtype == torch.bfloat16
        assert torch.equal(out["bf16"], ckpt["bf16"].cpu())
        assert isinstance(out["param"], torch.nn.Parameter)
        assert out["meta"] == {"epoch": 3, "name": "run"}
        tensors = [out["sd"]["a"], out["mixed"][1], out["point"].x, out["bf16"], out["param"]]
        assert all(t.device.type == "cpu" for t in tensors)


def test_staging_uses_one_batched_transfer(tmp_path, device, monkeypatch):
    xlac = torch_xla._XLAC
    calls = []
    original = xlac._xla_get_cpu_tensors
    monkeypatch.setattr(xlac, "_xla_get_cpu_tensors", lambda ts: calls.append(len(ts)) or original(ts))
    ckpt = {f"t{i}": torch.full((10,), float(i)).to(device) for i in range(20)}
    io = AsyncCheckpointIO()
    io.save_checkpoint(ckpt, tmp_path / "a.ckpt")
    io.teardown()
    assert calls == [20]
    out = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert all(torch.equal(out[f"t{i}"], torch.full((10,), float(i))) for i in range(20))


def test_xla_checkpoint_io_master_only_writes_on_the_master(tmp_path, device, monkeypatch):
    import torch_xla.core.xla_model as xm

    ckpt = {"w": torch.ones(2).to(device)}
    XLACheckpointIO().save_checkpoint(ckpt, tmp_path / "master.ckpt")
    assert torch.equal(torch.load(tmp_path / "master.ckpt", weights_only=True)["w"], torch.ones(2))
    # A second ordinal cannot be run on one CPU PJRT process; fault injection of the ordinal only.
    monkeypatch.setattr(xm, "is_master_ordinal", lambda local=True: False)
    XLACheckpointIO().save_checkpoint(ckpt, tmp_path / "replica.ckpt")
    assert not (tmp_path / "replica.ckpt").exists()
    XLACheckpointIO(master_only=False).save_checkpoint(ckpt, tmp_path / "every.ckpt")
    assert (tmp_path / "every.ckpt").exists()


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_storage_options_for_a_local_path_are_refused_at_the_call(tmp_path, device, writer):
    io = AsyncCheckpointIO(XLACheckpointIO(), writer=writer)
    with pytest.raises(TypeError, match="only used for fsspec URLs"):
        io.save_checkpoint({"w": torch.ones(2).to(device)}, tmp_path / "a.ckpt", storage_options={"x": 1})
    assert io.pending == 0 and list(tmp_path.iterdir()) == []
    io.save_checkpoint({"w": torch.ones(2).to(device)}, tmp_path / "b.ckpt")  # the engine works on
    io.teardown()
    assert torch.equal(torch.load(tmp_path / "b.ckpt", weights_only=True)["w"], torch.ones(2))


def test_process_writer_with_xla_io_never_starts_xla_in_the_writer(tmp_path, device):
    io = AsyncCheckpointIO(XLACheckpointIO(), writer="process")
    io.save_checkpoint({"w": torch.arange(6.0).to(device)}, tmp_path / "a.ckpt")
    io.teardown()
    assert torch.equal(torch.load(tmp_path / "a.ckpt", weights_only=True)["w"], torch.arange(6.0))


def test_file_loads_without_torch_xla(tmp_path, device):
    io = AsyncCheckpointIO()
    io.save_checkpoint({"w": torch.arange(3.0).to(device)}, tmp_path / "a.ckpt")
    io.teardown()
    code = (
        "import sys; sys.modules['torch_xla'] = None; sys.modules['asyncckpt'] = None\n"
        "import torch\n"
        f"print(torch.load({str(tmp_path / 'a.ckpt')!r}, weights_only=True)['w'].tolist())\n"
    )
    out = run_python(code, cwd="/")
    assert out.stdout.strip() == "[0.0, 1.0, 2.0]", out.stderr


def _cpu_xla_accelerator():
    """Lightning's XLAAccelerator, told that the CPU PJRT device is there.

    Lightning counts TPU chips on the PCI bus and asks the TPU metadata server, so on a machine
    without a TPU it refuses; these four overrides are the only change, no patching.
    """
    from lightning.pytorch.accelerators import XLAAccelerator

    class CPUXLAAccelerator(XLAAccelerator):
        @staticmethod
        def is_available() -> bool:
            return True

        @staticmethod
        def auto_device_count() -> int:
            return 1

        @staticmethod
        def parse_devices(devices):
            return 1

        @staticmethod
        def get_parallel_devices(devices):
            return [torch.device("xla", 0)]

    return CPUXLAAccelerator()


@pytest.mark.parametrize("base_io", ["default", "ours"])
def test_lightning_fit_on_the_xla_strategy_with_our_plugin(tmp_path, device, base_io):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import SingleDeviceXLAStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from asyncckpt.lightning import AsyncCheckpointIO as LightningAsyncIO

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 2)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    gen = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(48, 8, generator=gen), torch.randn(48, 2, generator=gen)), batch_size=8)
    plugin = LightningAsyncIO(XLACheckpointIO() if base_io == "ours" else None)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, save_last=True)
    trainer = pl.Trainer(
        accelerator=_cpu_xla_accelerator(),
        strategy=SingleDeviceXLAStrategy(device=device, checkpoint_io=plugin),
        max_steps=6,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Tiny()
    trainer.fit(model, data)
    names = sorted(os.listdir(tmp_path))
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6
    assert last["state_dict"]["layer.weight"].device.type == "cpu"
    assert torch.equal(last["state_dict"]["layer.weight"], model.layer.weight.detach().cpu())
