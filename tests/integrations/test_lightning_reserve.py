"""``AsyncCheckpointCallback`` reserves the first saves' staging memory after the first optimizer
step, so the first checkpoint of a real Trainer run allocates nothing in the training step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _lightning_helpers import make_trainer

pytestmark = pytest.mark.lightning
WIDTH = 256  # 256x256 fp32 weights: Adam's two moments make the optimizer state twice the model's



def make_module(pl: Any) -> Any:
    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, 1))

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> Any:
            loss = self.body(batch).square().mean()
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-3)  # its state exists after the first step

        def train_dataloader(self) -> Any:
            data = torch.randn(32, WIDTH, generator=torch.Generator().manual_seed(0))
            return torch.utils.data.DataLoader(data, batch_size=4)

    torch.manual_seed(0)
    return Net()


@pytest.mark.parametrize("reserve", [True, False])
def test_first_checkpoint_of_a_fit_allocates_no_staging_memory_in_the_step(tmp_path, fam, reserve):
    io = fam.ours.AsyncCheckpointIO(max_pending=2)
    checkpoints = fam.pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, monitor="loss", save_last=True
    )
    trainer = make_trainer(
        fam, tmp_path, plugins=[io], callbacks=[fam.ours.AsyncCheckpointCallback(reserve=reserve), checkpoints]
    )
    trainer.fit(make_module(fam.pl))
    stats = io.stats
    assert len(stats) == 8  # steps 2, 4, 6, 8: a step file and last.ckpt each
    if reserve:
        # each of the two slots got reserved memory, and every save staged into it
        assert [s.allocated_bytes for s in stats] == [0] * 8
    else:
        assert stats[0].allocated_bytes > 0
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == 8 and len(last["optimizer_states"][0]["state"]) == 4
    assert io.staging_bytes == 0  # the stage's teardown freed the memory, reserved or not
