"""Lightning fit with ``staging="lazy"`` writes the same checkpoints as with eager staging.

A real Trainer, for both package families: automatic optimization with gradient accumulation,
and manual optimization; ``ModelCheckpoint`` saves at train-batch end, validation end and
epoch end. The model has BatchNorm (statistics mutated by every forward) and weights above
the eager-copy size, so the lazy path and both guards (the optimizer hook, the small-tensor
rule) are exercised.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict

import pytest
import torch
from _lightning_helpers import make_trainer

from asyncckpt._staging import copier
from asyncckpt.lazy import EAGER_MAX_BYTES

pytestmark = pytest.mark.lightning
WIDTH = 160  # 160x160 fp32 = 100 KiB > EAGER_MAX_BYTES



def make_module(pl: Any, manual: bool) -> Any:
    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Linear(WIDTH, WIDTH), torch.nn.BatchNorm1d(WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, 1)
            )
            self.automatic_optimization = not manual

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> Any:
            loss = self.body(batch).square().mean()
            if not manual:
                return loss
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return None

        def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
            self.log("val_loss", self.body(batch).square().mean())

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

        def train_dataloader(self) -> Any:
            data = torch.randn(48, WIDTH, generator=torch.Generator().manual_seed(0))
            return torch.utils.data.DataLoader(data, batch_size=4)

        val_dataloader = train_dataloader

    torch.manual_seed(0)
    return Net()


def _fit(fam: Any, root: Any, staging: str, manual: bool) -> Dict[str, Dict[str, Any]]:
    folder = root / staging
    callbacks = [
        fam.pl.callbacks.ModelCheckpoint(dirpath=folder, filename="batch-{step}", every_n_train_steps=1, save_top_k=-1),
        fam.pl.callbacks.ModelCheckpoint(
            dirpath=folder, filename="val-{epoch}", monitor="val_loss", save_top_k=-1, save_on_train_epoch_end=False
        ),
        fam.pl.callbacks.ModelCheckpoint(
            dirpath=folder, filename="epoch-{epoch}", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True
        ),
    ]
    io = fam.ours.AsyncCheckpointIO(staging=staging, handle_sigterm=False)
    extra = {} if manual else {"accumulate_grad_batches": 2}
    trainer = make_trainer(
        fam, root, plugins=[io], callbacks=callbacks, max_steps=-1, max_epochs=2, limit_train_batches=6, **extra
    )
    trainer.fit(make_module(fam.pl, manual))
    assert io.staging == staging and io.pending == 0
    return {name: torch.load(folder / name, weights_only=False) for name in sorted(os.listdir(folder))}


def _same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")


@pytest.fixture
def slow_copy(monkeypatch):
    """Fault injection: every lazy copy starts 30 ms late, so it is still running when the next
    batch's forward, backward and optimizer step come (on a quiet machine it would be done)."""
    original = copier.memmove_pairs

    def slow(dst: Any, src: Any) -> None:
        time.sleep(0.03)
        original(dst, src)

    monkeypatch.setattr(copier, "memmove_pairs", slow)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic-accumulate", "manual"])
def test_lazy_fit_writes_the_files_of_an_eager_fit(fam, tmp_path, manual, slow_copy):
    assert WIDTH * WIDTH * 4 > EAGER_MAX_BYTES
    eager = _fit(fam, tmp_path, "eager", manual)
    lazy = _fit(fam, tmp_path, "lazy", manual)
    assert list(lazy) == list(eager)
    assert any(n.startswith("batch-") for n in eager) and any(n.startswith("val-") for n in eager)
    assert any(n.startswith("epoch-") for n in eager)
    for name in eager:
        for key in ("state_dict", "optimizer_states", "global_step", "epoch", "loops"):
            _same(lazy[name][key], eager[name][key], f"{name}:{key}")
