"""The two built-in CPU training workloads of the step-time benchmark.

``compute``: an MLP of square ``Linear`` layers whose parameters make up the checkpoint. The
step is big matrix multiplies that release the GIL, so a background writer competes mainly for
cores and memory bandwidth.

``python``: a deep stack of tiny ``Linear`` layers run in a Python loop (thousands of small ops a
step), plus a large frozen buffer so the checkpoint is still ``ckpt_mb``. The step is mostly
Python, so a writer thread that holds the GIL (pickling) slows it down: this is the workload
where a writer *process* should pay off.

``many``: a checkpoint of many small tensors, as a transformer's per-layer weights plus Adam
state are: ``blocks`` residual blocks of ``Linear(128, 128)`` + ``LayerNorm`` run in a Python
loop, trained with Adam (for-loop implementation), so the checkpoint holds 4 tensors per
parameter (the parameter, ``exp_avg``, ``exp_avg_sq``, ``step``): about 20,000 tensors for 256 MB.
Both the step and the checkpoint's serialization are Python-heavy: the case a writer process is
for (the thread writer's pickling of 20,000 records competes with the training loop's Python).

``compute`` and ``python`` use SGD without momentum, so the optimizer adds no state and the
checkpoint is the model.
Gradients are zeroed in place (``set_to_none=False``) so that every step does not re-fault
hundreds of MB of fresh gradient memory, which would swamp the step time with page faults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict

import torch
from torch import nn

WORKLOADS = ("compute", "python", "many")
_MLP_LAYERS = 4
_TINY = 32


@dataclass
class Workload:
    """A model, its optimizer, one training step, and the checkpoint the loop saves."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], float]

    def checkpoint(self, step: int) -> Dict[str, Any]:
        """What a training loop saves: model, optimizer and loop state (live tensors)."""
        return {"step": step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}


def _mlp_width(ckpt_bytes: int) -> int:
    """Width of ``_MLP_LAYERS`` square fp32 layers holding about ``ckpt_bytes`` of weights."""
    return max(64, int(round(math.sqrt(ckpt_bytes / (4 * _MLP_LAYERS)) / 64)) * 64)


def _compute(ckpt_bytes: int, batch: int) -> Workload:
    width = _mlp_width(ckpt_bytes)
    layers = []
    for _ in range(_MLP_LAYERS):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, width), torch.randn(batch, width)

    def step() -> float:
        optimizer.zero_grad(set_to_none=False)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return Workload("compute", model, optimizer, step)


class _TinyStack(nn.Module):
    """``depth`` tiny layers applied ``repeats`` times in Python, plus a frozen table."""

    def __init__(self, depth: int, repeats: int, table_bytes: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(_TINY, _TINY) for _ in range(depth))
        self.repeats = repeats
        self.register_buffer("table", torch.rand(max(1, table_bytes // 4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.repeats):
            for layer in self.layers:
                x = torch.tanh(layer(x)) + 0.5 * x
        return x


def _python(ckpt_bytes: int, batch: int, depth: int = 200, repeats: int = 24) -> Workload:
    param_bytes = depth * (_TINY * _TINY + _TINY) * 4
    model = _TinyStack(depth, repeats, ckpt_bytes - param_bytes)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, _TINY)

    def step() -> float:
        optimizer.zero_grad(set_to_none=False)
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return Workload("python", model, optimizer, step)


_MANY_WIDTH = 128


class _Blocks(nn.Module):
    """``blocks`` residual blocks ``x + tanh(linear(norm(x)))``, applied in a Python loop."""

    def __init__(self, blocks: int, width: int) -> None:
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linear, norm in zip(self.linears, self.norms, strict=True):
            x = x + torch.tanh(linear(norm(x)))
        return x


def _many(ckpt_bytes: int, batch: int) -> Workload:
    width = _MANY_WIDTH
    # per block: weight + bias + 2 LayerNorm vectors; Adam keeps two more copies of each
    block_bytes = 3 * 4 * (width * width + 3 * width)
    model = _Blocks(max(1, round(ckpt_bytes / block_bytes)), width)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=False)
    x = torch.randn(batch, width)

    def step() -> float:
        optimizer.zero_grad(set_to_none=False)
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    step()  # Adam's state exists from here on, so every checkpoint holds all of it
    return Workload("many", model, optimizer, step)


def build(name: str, ckpt_mb: float, batch: int) -> Workload:
    """Build workload ``name`` whose checkpoint holds about ``ckpt_mb`` MB (10**6 bytes) of tensors."""
    ckpt_bytes = int(ckpt_mb * 1e6)
    if name == "compute":
        return _compute(ckpt_bytes, batch)
    if name == "python":
        return _python(ckpt_bytes, batch)
    if name == "many":
        return _many(ckpt_bytes, batch)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
