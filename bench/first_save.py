"""First-save benchmark: what the first ``save_checkpoint`` blocks, with and without ``reserve()``.

    python -m bench.first_save                  # 256 MB of CPU tensors, 3 rounds (about a minute)
    python -m bench.first_save --mb 64 --rounds 5

A slot's first save allocates its staging memory and takes a page fault per page while it
copies into it; :meth:`asyncckpt.AsyncCheckpointIO.reserve` does both ahead, on a background
thread. Per configuration (writer thread / process, staging eager / lazy), one process runs, in
each round, a fresh engine without a reservation and a fresh engine after ``reserve(state,
wait=True)``, side by side; each makes a tiny save first (so that a writer process has started
and is not part of the figure), then its first 256 MB save and three warm ones, each flushed
before the next. Figures are medians of the rounds, in ms of blocking (``SaveStats.blocking_seconds``):

    first        first 256 MB save, no reservation
    reserved     first 256 MB save after reserve()
    warm         later saves (both engines)
    alloc MB     staging memory the first save allocated in its call (SaveStats.allocated_bytes)
    lazy         lazy staging returns before the copy: its page faults land in the background
                 copy, which the next optimizer step waits for; so also ms from the call until
                 wait_staged() returns

Target (docs/benchmarks.md): reserved / warm <= 1.5.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch

from asyncckpt import AsyncCheckpointIO

CONFIGS = (("thread", "eager"), ("process", "eager"), ("thread", "lazy"))
TARGET = 1.5


def make_state(mb: int) -> Dict[str, torch.Tensor]:
    """``mb`` MB of float32 CPU tensors in 8 parts (a model's large weights)."""
    per = mb * 1024 * 1024 // 4 // 8
    gen = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per, generator=gen) for i in range(8)}


def one_engine(writer: str, staging: str, state: dict, folder: str, reserve: bool) -> List[tuple]:
    """(blocking s, staged s, allocated bytes) of the first save and three warm ones; staged:
    from the call until ``wait_staged()`` returns (lazy staging copies after the call returns,
    and the next optimizer step waits for that copy; eager: the blocking time again)."""
    io = AsyncCheckpointIO(max_pending=2, writer=writer, staging=staging, handle_sigterm=False)
    try:
        io.save_checkpoint({"warmup": torch.zeros(1)}, os.path.join(folder, "warmup.pt"))
        io.flush()
        if reserve:
            io.reserve(state, wait=True)
        out = []
        for i in range(4):
            started = time.perf_counter()
            handle = io.save_checkpoint(dict(state, step=i), os.path.join(folder, f"ckpt{i}.pt"))
            io.wait_staged()
            staged = time.perf_counter() - started
            io.flush()
            stats = handle.result()
            out.append((stats.blocking_seconds, staged, stats.allocated_bytes))
        return out
    finally:
        io.teardown()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.first_save", description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None, help="folder for the files (default: a temporary one)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    state = make_state(args.mb)
    folder = tempfile.mkdtemp(prefix="asyncckpt-first-", dir=args.dir)
    print(f"# first-save blocking, {args.mb} MB of CPU tensors, {args.rounds} rounds, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, files in {folder}")
    print(f"{'writer':8} {'staging':8} {'first ms':>9} {'reserved ms':>12} {'warm ms':>8} "
          f"{'first/warm':>11} {'reserved/warm':>14} {'alloc MB (first, reserved)':>27}   "
          "lazy: ms to staged (first, reserved, warm)")
    missed = []
    try:
        for writer, staging in CONFIGS:
            first, reserved, warm, alloc_first, alloc_reserved = [], [], [], [], []
            staged_first, staged_reserved, staged_warm = [], [], []
            for _ in range(args.rounds):
                plain = one_engine(writer, staging, state, folder, reserve=False)
                ready = one_engine(writer, staging, state, folder, reserve=True)
                first.append(plain[0][0])
                reserved.append(ready[0][0])
                warm.extend(s[0] for s in plain[1:] + ready[1:])
                staged_first.append(plain[0][1])
                staged_reserved.append(ready[0][1])
                staged_warm.extend(s[1] for s in plain[1:] + ready[1:])
                alloc_first.append(plain[0][2])
                alloc_reserved.append(ready[0][2])
            f, r, w = (statistics.median(x) * 1e3 for x in (first, reserved, warm))
            lazy = ""
            if staging == "lazy":
                sf, sr, sw = (statistics.median(x) * 1e3 for x in (staged_first, staged_reserved, staged_warm))
                lazy = f"   {sf:.1f}, {sr:.1f}, {sw:.1f} (reserved/warm {sr / sw:.2f})"
            print(f"{writer:8} {staging:8} {f:9.1f} {r:12.1f} {w:8.1f} {f / w:11.2f} {r / w:14.2f} "
                  f"{max(alloc_first) / 1e6:13.0f}, {max(alloc_reserved) / 1e6:.0f}{lazy}", flush=True)
            if r / w > TARGET:
                missed.append(f"{writer}/{staging}: reserved/warm {r / w:.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for line in missed:
        print(f"MISS {line} > {TARGET}")
    if not missed:
        print(f"PASS reserved/warm <= {TARGET} for every configuration")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
