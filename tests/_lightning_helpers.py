"""Shared pieces for the Lightning tests: the two package families, a tiny module, held IOs.

The "held" IOs are fault injection: a real ``asyncckpt.TorchCheckpointIO`` whose writes wait on a
``threading.Event``, so saves (and removes queued behind them) stay pending while Lightning runs on.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
import types
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch

import asyncckpt
from asyncckpt.storage import is_temp_file

FAMILIES = ("lightning", "pytorch_lightning")


def writer_threads() -> List[str]:
    """Names of the asyncckpt writer threads alive now (there must be none once a stage returned)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("asyncckpt-writer")]


@pytest.fixture(autouse=True)
def no_writer_thread_left() -> Any:
    """Autouse in every Lightning test module that imports it: no test leaves a writer thread."""
    before = set(writer_threads())
    yield
    assert set(writer_threads()) <= before, "a writer thread outlived the test"


def load_family(name: str) -> types.SimpleNamespace:
    """The family's modules, or skip when that package is not installed."""
    if name == "lightning":
        pl = pytest.importorskip("lightning.pytorch")
        fabric_package = "lightning.fabric"
        ours = importlib.import_module("asyncckpt.lightning")
        wrapper = importlib.import_module("lightning.pytorch.plugins.io.wrapper")._WrappingCheckpointIO
        family = "lightning.pytorch"
    else:
        pl = pytest.importorskip("pytorch_lightning")
        fabric_package = "lightning_fabric"
        ours = importlib.import_module("asyncckpt.pytorch_lightning")
        wrapper = importlib.import_module("pytorch_lightning.plugins.io.wrapper")._WrappingCheckpointIO
        family = "pytorch_lightning"
    return types.SimpleNamespace(
        name=name,
        family=family,
        pl=pl,
        ours=ours,
        TorchIO=importlib.import_module(f"{fabric_package}.plugins").TorchCheckpointIO,
        fabric_package=fabric_package,  # the family's Fabric (lightning.fabric or lightning_fabric)
        Wrapping=wrapper,
        strategies=importlib.import_module(f"{family}.strategies"),
    )


class Boom(RuntimeError):
    """The training exception the tests raise on purpose."""


def _tiny_class(pl: Any, name: str) -> type:
    """The test LightningModule for one family, defined once and findable by pickle (ddp_spawn)."""
    qualname = f"Tiny_{name}"
    if qualname in globals():
        return globals()[qualname]

    class Tiny(pl.LightningModule):
        """An 8->2 linear layer; logs a deterministic, non-monotone ``score``."""

        def __init__(self, fail_at: Optional[int] = None) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 2)
            self.fail_at = fail_at
            self.start_step: Optional[int] = None
            self.tested: List[float] = []

        def on_train_start(self) -> None:
            if self.start_step is None:
                self.start_step = self.global_step

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            if self.fail_at is not None and self.global_step == self.fail_at:
                raise Boom(f"failing on purpose at step {self.fail_at}")
            # Score pattern 0,2,4,1,3,0,...: top-k keeps changing, so old files are removed.
            self.log("score", torch.tensor(float((self.global_step * 2) % 5)))
            return self.layer(batch).pow(2).mean()

        def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
            self.log("val_loss", self.layer(batch).pow(2).mean())

        def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
            self.tested.append(float(self.layer.weight.sum()))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(
                torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), batch_size=4
            )

        val_dataloader = test_dataloader = train_dataloader

    Tiny.__name__ = Tiny.__qualname__ = qualname
    Tiny.__module__ = __name__
    globals()[qualname] = Tiny
    return Tiny


def __getattr__(name: str) -> Any:
    """Lets pickle find ``Tiny_<family>`` in a spawned process before anything built it there."""
    if name.startswith("Tiny_"):
        return _tiny_class(load_family(name[len("Tiny_") :]).pl, name[len("Tiny_") :])
    raise AttributeError(name)


def make_module(pl: Any, fail_at: Optional[int] = None) -> Any:
    """A fresh, seeded instance of the family's test module (see :func:`_tiny_class`)."""
    name = "lightning" if pl.__name__.startswith("lightning") else "pytorch_lightning"
    torch.manual_seed(0)
    return _tiny_class(pl, name)(fail_at)


def make_trainer(fam: types.SimpleNamespace, root: Any, plugins: Any = None, callbacks: Any = (), **kw: Any) -> Any:
    options: Dict[str, Any] = dict(
        default_root_dir=str(root),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        limit_test_batches=2,
        max_steps=8,
    )
    options.update(kw)
    return fam.pl.Trainer(plugins=plugins, callbacks=list(callbacks), **options)


class HeldIO(asyncckpt.TorchCheckpointIO):
    """Fault injection: every save waits for ``release`` before writing; records the op order."""

    def __init__(self) -> None:
        super().__init__(durable=False)
        self.release = threading.Event()
        self.ops: List[Tuple[str, str]] = []

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        assert self.release.wait(60), "test never released the held write"
        super().save_checkpoint(checkpoint, path, storage_options)
        self.ops.append(("save", os.path.basename(os.fspath(path))))

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        self.ops.append(("remove", os.path.basename(os.fspath(path))))


class FailingIO(asyncckpt.TorchCheckpointIO):
    """Fault injection: every save fails in the background, as a full disk would."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        raise OSError(28, "No space left on device (injected)")


class FullDiskAtIO(asyncckpt.TorchCheckpointIO):
    """Fault injection (a full disk cannot be produced here): the save of the file named ``name``
    waits for ``release``, then fails with ENOSPC; every other save is written. Records the op order."""

    def __init__(self, name: str) -> None:
        super().__init__(durable=False)
        self.name = name
        self.release = threading.Event()
        self.ops: List[Tuple[str, str]] = []

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if os.path.basename(os.fspath(path)) == self.name:
            assert self.release.wait(60), "test never released the held write"
            raise OSError(28, "No space left on device (injected)")
        super().save_checkpoint(checkpoint, path, storage_options)
        self.ops.append(("save", os.path.basename(os.fspath(path))))

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        self.ops.append(("remove", os.path.basename(os.fspath(path))))


def listing(folder: Any) -> Dict[str, Optional[str]]:
    """File name -> symlink target (None for a regular file)."""
    return {
        name: (os.readlink(os.path.join(folder, name)) if os.path.islink(os.path.join(folder, name)) else None)
        for name in os.listdir(folder)
    }


def check_files(folder: Any, last_step: Optional[int] = None) -> None:
    """No temp files; each checkpoint loads and holds the step its name says."""
    for name in os.listdir(folder):
        assert not is_temp_file(name), f"stray temp file {name}"
        ckpt = torch.load(os.path.join(folder, name), weights_only=False)
        match = re.search(r"step=(\d+)", name)
        if match:
            assert ckpt["global_step"] == int(match.group(1)), name
        elif name.startswith("last") and last_step is not None:
            assert ckpt["global_step"] == last_step, name


def steps(folder: Any) -> Dict[str, int]:
    """File name -> the ``global_step`` stored in it (links followed)."""
    return {
        name: torch.load(os.path.join(folder, name), weights_only=False)["global_step"] for name in os.listdir(folder)
    }
