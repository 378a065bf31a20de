"""A real Lightning ``fit`` with checkpoints: sync ``TorchCheckpointIO`` vs Lightning's
``AsyncCheckpointIO`` vs asyncckpt, interleaved over rounds.

Each run is the same small CPU ``fit`` (one intra-op thread, a stack of square linear layers,
SGD with momentum so the checkpoint holds weights and momentum), saving through
``ModelCheckpoint(every_n_train_steps=N, save_top_k=-1)``. The wall time of ``fit`` includes its
teardown, so every background write is finished when it stops. A run without checkpoints gives
the baseline; "lost" is (fit with checkpoints - fit without) / fit without, as DESIGN.md asks.
All three IOs write through Lightning's ``TorchCheckpointIO`` unless ``durable=True``, which gives
asyncckpt its fsyncing ``asyncckpt.TorchCheckpointIO`` (a fair comparison writes the same way).

    python -m bench.lightning_fit --help
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

VARIANTS = ("none", "sync", "lightning_async", "asyncckpt")


def _family(name: str) -> Any:
    import importlib

    if name == "lightning":
        return importlib.import_module("lightning.pytorch"), importlib.import_module("asyncckpt.lightning")
    return importlib.import_module("pytorch_lightning"), importlib.import_module("asyncckpt.pytorch_lightning")


def _module(pl: Any, width: int, layers: int) -> Any:
    import torch

    class Stack(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.net(batch).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-4, momentum=0.9)

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(torch.randn(256, width), batch_size=8)

    torch.manual_seed(0)
    return Stack()


def _one_fit(variant: str, family: str, width: int, layers: int, steps: int, every: int, durable: bool) -> float:
    import asyncckpt

    pl, ours = _family(family)
    folder = tempfile.mkdtemp(prefix="asyncckpt-bench-")
    try:
        plugins: Optional[List[Any]] = None
        callbacks: List[Any] = []
        if variant != "none":
            callbacks.append(
                pl.callbacks.ModelCheckpoint(
                    dirpath=folder, every_n_train_steps=every, save_top_k=-1, filename="{step}"
                )
            )
        if variant == "lightning_async":
            plugins = [pl.plugins.io.AsyncCheckpointIO()]
        elif variant == "asyncckpt":
            plugins = [ours.AsyncCheckpointIO(asyncckpt.TorchCheckpointIO() if durable else None)]
            callbacks.append(ours.AsyncCheckpointCallback(log_stats=False))
        trainer = pl.Trainer(
            default_root_dir=folder,
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=variant != "none",
            plugins=plugins,
            callbacks=callbacks,
        )
        model = _module(pl, width, layers)
        gc.collect()
        started = time.perf_counter()
        trainer.fit(model)
        return time.perf_counter() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_lightning_bench(
    *,
    rounds: int = 3,
    steps: int = 90,
    every: int = 20,
    width: int = 2048,
    layers: int = 4,
    family: str = "lightning",
    durable: bool = False,
    variants: Sequence[str] = VARIANTS,
) -> Dict[str, Any]:
    """Run the interleaved fits; return per-variant wall times (median), lost time, and the raw runs.

    The checkpoint holds ``layers * (width*width + width)`` float32 weights, twice (momentum):
    the defaults give about 134 MB.
    """
    import logging

    import torch

    torch.set_num_threads(1)
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    runs: Dict[str, List[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:  # interleaved: drift on a noisy machine hits every variant alike
            runs[variant].append(_one_fit(variant, family, width, layers, steps, every, durable))
    median = {v: statistics.median(t) for v, t in runs.items()}
    base = median.get("none")
    lost = {v: (m - base) / base * 100.0 for v, m in median.items() if base and v != "none"}
    return {
        "median_seconds": median,
        "lost_percent": lost,
        "runs": runs,
        "checkpoint_mb": 2 * layers * (width * width + width) * 4 / 1e6,
        "saves_per_fit": steps // every,
        "config": dict(
            rounds=rounds, steps=steps, every=every, width=width, layers=layers, family=family, durable=durable
        ),
    }


def format_table(result: Dict[str, Any]) -> str:
    """The wall time of each variant's fit, and its lost time against the fit without checkpoints."""
    config = result["config"]
    lines = [
        f"Lightning fit ({config['family']}): {config['steps']} steps, checkpoint {result['checkpoint_mb']:.0f} MB "
        f"every {config['every']} steps ({result['saves_per_fit']} saves), {config['rounds']} rounds, medians",
        f"{'variant':<18}{'fit s':>9}{'lost %':>9}  runs",
    ]
    for variant, median in result["median_seconds"].items():
        lost = result["lost_percent"].get(variant)
        lost_text = f"{lost:9.1f}" if lost is not None else f"{'-':>9}"
        runs = " ".join(f"{t:.2f}" for t in result["runs"][variant])
        lines.append(f"{variant:<18}{median:9.2f}{lost_text}  {runs}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lightning_fit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--steps", type=int, default=90, help="training steps per fit")
    parser.add_argument("--every", type=int, default=20, help="save every N steps")
    parser.add_argument("--width", type=int, default=2048, help="linear layer width")
    parser.add_argument("--layers", type=int, default=4, help="number of linear layers")
    parser.add_argument("--family", choices=("lightning", "pytorch_lightning"), default="lightning")
    parser.add_argument("--durable", action="store_true", help="asyncckpt writes with its fsyncing TorchCheckpointIO")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    args = parser.parse_args(argv)
    result = run_lightning_bench(
        rounds=args.rounds,
        steps=args.steps,
        every=args.every,
        width=args.width,
        layers=args.layers,
        family=args.family,
        durable=args.durable,
        variants=[v for v in args.variants.split(",") if v],
    )
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
