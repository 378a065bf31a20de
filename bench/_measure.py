"""Measurements shared by the benchmarks: the copy floor and peak memory.

Both are taken inside the process that trains, so they see the same memory bandwidth, the same
allocator and the same neighbours as the saves they are compared with.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Dict, Iterable, List, Optional

import torch


def state_tensors(state: object) -> List[torch.Tensor]:
    """Every tensor in a nested dict/list checkpoint, each storage once."""
    found: List[torch.Tensor] = []
    seen = set()

    def visit(obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                found.append(obj)
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)

    visit(state)
    return found


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def copy_floor_seconds(tensors: List[torch.Tensor], repeats: int = 5) -> float:
    """Median time to copy ``tensors`` once into warm, preallocated host buffers.

    The buffers are allocated and written once before timing, so the figure is pure copy
    bandwidth: no page faults, no allocator. This is the least a point-in-time snapshot can
    cost, and the yardstick for a save's blocking time.
    """
    with torch.no_grad():
        buffers = [torch.empty_like(t, device="cpu") for t in tensors]
        for dst, src in zip(buffers, tensors, strict=True):
            dst.copy_(src)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            for dst, src in zip(buffers, tensors, strict=True):
                dst.copy_(src)
            times.append(time.perf_counter() - started)
    del buffers
    return statistics.median(times)


class RssSampler:
    """Samples memory every ``interval`` seconds in a background thread; keeps the peak.

    Counted: this process's RSS, plus for each descendant process (a writer process) its RSS
    minus its shared pages, so that shared-memory staging mapped by both is counted once (in
    this process) and shared library pages are not counted twice.

    The list of descendants is refreshed every ``refresh`` samples, not at every sample: finding
    them scans every process on the machine (2.4 ms here, against 0.04 ms for one RSS read), and
    at every 10 ms sample that took about a fifth of a core, mostly holding the GIL, from the
    training loop being measured. A writer process lives for the whole run, so it is found
    within ``refresh * interval`` seconds of its start.
    """

    def __init__(self, interval: float = 0.01, refresh: int = 20) -> None:
        import psutil

        self._process = psutil.Process()
        self._psutil = psutil
        self.interval = interval
        self.refresh = refresh
        self._children: list = []
        self._since_refresh = refresh
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def current(self) -> int:
        total = self._process.memory_info().rss
        self._since_refresh += 1
        if self._since_refresh >= self.refresh:
            self._children = self._process.children(recursive=True)
            self._since_refresh = 0
        for child in self._children:
            try:
                info = child.memory_info()
            except self._psutil.Error:  # exited between listing and reading
                continue
            total += max(0, info.rss - getattr(info, "shared", 0))
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.current())


def summary(values: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
