"""A 2-process Lightning run with ModelParallelStrategy (FSDP2) on CPU (see test_lightning_sharded.py).

``python _lightning_sharded_child.py FAMILY MODE OUT [STRATEGY]``: FAMILY is ``lightning`` or
``pytorch_lightning``; MODE ``sync`` (the strategy's own DCP save) or ``async`` (asyncckpt's
plugin and callback) or ``plugin_only`` (the plugin without the callback: the strategy saves
synchronously and the plugin must warn; only the first fit). Lightning starts the second rank
by running this script again. It fits 8 steps with
``ModelCheckpoint(save_top_k=2, save_last=True, every_n_train_steps=2)``, then resumes from
``last.ckpt`` in a new Trainer, fits to step 12, and calls ``trainer.save_checkpoint``
(``OUT/manual.ckpt``). Rank 0 writes ``OUT/result.json``. STRATEGY is ``model_parallel``
(the default: ``ModelParallelStrategy``, CPU, 2 processes) or ``fsdp``
(``FSDPStrategy(state_dict_type="sharded")`` on every visible GPU, up to 2; it needs a GPU).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings

import torch

FAMILY, MODE, OUT = sys.argv[1], sys.argv[2], sys.argv[3]
STRATEGY = sys.argv[4] if len(sys.argv) > 4 else "model_parallel"
pl = importlib.import_module("lightning.pytorch" if FAMILY == "lightning" else "pytorch_lightning")
ours = importlib.import_module("asyncckpt.lightning" if FAMILY == "lightning" else "asyncckpt.pytorch_lightning")

from asyncckpt.integrations.lightning.sharded import connected_engine  # noqa: E402


class Sharded(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def configure_model(self) -> None:
        if STRATEGY != "model_parallel":
            return  # FSDPStrategy wraps the model itself
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        loss = self.net(batch).pow(2).mean()
        # deterministic and not monotone, so top-k keeps and removes checkpoints
        self.log("score", float((self.global_step * 7) % 5), sync_dist=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1 + self.global_rank)
        return torch.utils.data.DataLoader(torch.randn(64, 16, generator=g), batch_size=4)


def trainer(max_steps: int) -> object:
    plugins, callbacks = [], []
    if MODE in ("async", "plugin_only"):
        plugins.append(ours.AsyncCheckpointIO())
    if MODE == "async":
        callbacks.append(ours.AsyncCheckpointCallback(log_stats=False))
    callbacks.append(
        pl.callbacks.ModelCheckpoint(
            dirpath=os.path.join(OUT, "ckpt"),
            filename="{step}",
            monitor="score",
            mode="max",
            save_top_k=2,
            save_last=True,
            every_n_train_steps=2,
        )
    )
    if STRATEGY == "fsdp":
        hardware = dict(accelerator="cuda", devices=min(2, torch.cuda.device_count()))
        strategy = pl.strategies.FSDPStrategy(state_dict_type="sharded")
    else:
        hardware = dict(accelerator="cpu", devices=2)
        strategy = pl.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return pl.Trainer(
        **hardware,
        strategy=strategy,
        max_steps=max_steps,
        plugins=plugins,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def plugin_only() -> None:
    first = trainer(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first.fit(Sharded())
    if first.is_global_zero:
        result = {
            "after_first": sorted(os.listdir(os.path.join(OUT, "ckpt"))),
            "warnings": [str(w.message) for w in caught if "asyncckpt" in str(w.message)],
            "engine_saves": len(first.strategy.checkpoint_io.stats),
        }
        with open(os.path.join(OUT, "result.json"), "w") as f:
            json.dump(result, f)


def main() -> None:
    if MODE == "plugin_only":
        plugin_only()
        return
    first = trainer(8)
    first.fit(Sharded())
    after_first = sorted(os.listdir(os.path.join(OUT, "ckpt")))
    second = trainer(12)
    second.fit(Sharded(), ckpt_path=os.path.join(OUT, "ckpt", "last.ckpt"))
    second.save_checkpoint(os.path.join(OUT, "manual.ckpt"))  # outside a running stage
    if second.is_global_zero:
        io = second.strategy.checkpoint_io
        result = {
            "after_first": after_first,
            "after_resume": sorted(os.listdir(os.path.join(OUT, "ckpt"))),
            "resumed_at": second.global_step,
            "engine_saves": len(io.stats) if hasattr(io, "stats") else None,
            "connected": connected_engine(second.strategy) is not None,
            "staging_threads": getattr(io, "staging_threads", None),
            "num_processes": second.strategy.num_processes,
        }
        with open(os.path.join(OUT, "result.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
