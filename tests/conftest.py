"""Shared helpers for the test suite: real torch, real files; writes held with events where a
test needs an operation to be in flight (fault injection by design, said where used)."""

from __future__ import annotations

import os
import threading
from typing import Any, Dict, List

import pytest
import torch

from asyncckpt import TorchCheckpointIO
from asyncckpt.storage import is_temp_file

torch.set_num_threads(1)


class GatedIO(TorchCheckpointIO):
    """A real TorchCheckpointIO whose saves wait for ``gate`` first.

    Holding the gate keeps a write in flight for as long as a test needs, deterministically.
    File names starting with ``fail`` raise ENOSPC after the gate (fault injection: a storage
    backend error).
    """

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.log: List[str] = []
        self.lock = threading.Lock()

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with self.lock:
            self.log.append(f"save-start {os.fspath(path)}")
        self.started.set()
        assert self.gate.wait(60), "test gate never opened"
        if os.path.basename(os.fspath(path)).startswith("fail"):
            raise OSError(28, "No space left on device (injected)")
        super().save_checkpoint(checkpoint, path, storage_options)
        with self.lock:
            self.log.append(f"save-done {os.fspath(path)}")

    def remove_checkpoint(self, path: Any) -> None:
        with self.lock:
            self.log.append(f"remove {os.fspath(path)}")
        super().remove_checkpoint(path)


class FailingIO(GatedIO):
    """Saves to file names starting with ``fail`` raise; no gate held."""


def temp_files(folder: str) -> List[str]:
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if is_temp_file(f)]
    return found


def model_checkpoint(step: int, width: int = 64) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "model_obj": model}


@pytest.fixture
def gated_io() -> GatedIO:
    return GatedIO()


def load(path: Any) -> Any:
    return torch.load(path, weights_only=False)
