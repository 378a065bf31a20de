"""Shared helpers for the test suite: real torch, real files; writes held with events where a
test needs an operation to be in flight (fault injection by design, said where used)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
from _lightning_helpers import FAMILIES, load_family  # imports no Lightning: load_family does, when asked

from asyncckpt import TorchCheckpointIO
from asyncckpt.storage import is_temp_file

torch.set_num_threads(1)


def same(a: Any, b: Any) -> bool:
    """Equal structure and exactly equal tensors (``torch.equal``), for checkpoint comparisons."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class FileEvent:
    """A ``threading.Event`` look-alike backed by a file, so it works across processes too.

    The process writer runs the wrapped IO in another process; the tests hold its writes with
    these the same way they hold the thread writer's.
    """

    def __init__(self, path: str, initially_set: bool = False) -> None:
        self.path = path
        if initially_set:
            self.set()

    def set(self) -> None:
        open(self.path, "a").close()

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def is_set(self) -> bool:
        return os.path.exists(self.path)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.is_set():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True


class GatedIO(TorchCheckpointIO):
    """A real TorchCheckpointIO whose saves wait for ``gate`` first.

    Holding the gate keeps a write in flight for as long as a test needs, deterministically.
    File names starting with ``fail`` raise ENOSPC after the gate (fault injection: a storage
    backend error). Works in the writer process too (its events and log are files).
    """

    def __init__(self, folder: Optional[str] = None) -> None:
        super().__init__()
        folder = folder or tempfile.mkdtemp(prefix="gated-io-")
        self.gate = FileEvent(os.path.join(folder, "gate-open"), initially_set=True)
        self.started = FileEvent(os.path.join(folder, "save-started"))
        self._log_path = os.path.join(folder, "log")

    @property
    def log(self) -> List[str]:
        try:
            with open(self._log_path) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def _record(self, line: str) -> None:
        with open(self._log_path, "a") as f:
            f.write(line + "\n")

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self._record(f"save-start {os.fspath(path)}")
        self.started.set()
        assert self.gate.wait(60), "test gate never opened"
        if os.path.basename(os.fspath(path)).startswith("fail"):
            raise OSError(28, "No space left on device (injected)")
        super().save_checkpoint(checkpoint, path, storage_options)
        self._record(f"save-done {os.fspath(path)}")

    def remove_checkpoint(self, path: Any) -> None:
        self._record(f"remove {os.fspath(path)}")
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


def made_once(tmp_path_factory: Any, name: str, make: Callable[[str], Any]) -> Tuple[str, Any]:
    """``(folder, make(folder))``, made once per pytest run: under ``pytest -n`` the first test
    process to ask makes it and the others wait for it, then read its folder and its result
    (which must be JSON: it crosses processes). For a module fixture that costs many processes
    (every test process would run it again); the tests must only read the folder. A ``make``
    that raises leaves no mark: the next process to ask makes it again."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this pytest run's folder, above each test process's own
    folder = shared / name
    with open(shared / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # given back as the file closes
        done = shared / f"{name}.json"
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a failed try's
            folder.mkdir()
            done.write_text(json.dumps(make(str(folder))))
        return str(folder), json.loads(done.read_text())


@pytest.fixture
def gated_io(tmp_path) -> GatedIO:
    folder = tmp_path / "gate"
    folder.mkdir()
    return GatedIO(str(folder))


@pytest.fixture(params=FAMILIES)
def fam(request) -> Any:
    """The test once per Lightning package family (skipped where that package is not installed)."""
    return load_family(request.param)


@pytest.fixture(params=["thread", "process"])
def writer(request) -> str:
    """Run a test against both writers; the contract is the same for each."""
    return request.param


def load(path: Any) -> Any:
    return torch.load(path, weights_only=False)


def pytest_collection_modifyitems(config: Any, items: List[Any]) -> None:
    """The tests marked ``slow`` first (in their order), then the rest: under ``pytest -n`` the
    long ones start at once and the short ones fill the workers' time at the end, instead of a
    minute-long test starting last while the other workers idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
