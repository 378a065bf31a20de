"""Event-loop lag while a ~256 MB checkpoint is saved with the async API, under asyncio and trio.

A ticker task sleeps 1 ms in a loop and records how late each wake-up is. Lag is measured over
the window from the call to ``asave_checkpoint`` to the return of ``aflush``: with the async API
the loop should stall for about the staging copy, not for the write. For contrast, the same save
done with the blocking ``save_checkpoint`` + ``flush()`` called on the loop stalls it for the
whole write.

    python -m bench.aio_lag [--rounds 3] [--mb 256] [--dir DIR]

Medians over rounds. The machines here are noisy; compare the rows, not one absolute time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any, Dict, List, Tuple

import anyio
import torch

from asyncckpt import AsyncCheckpointIO

TICK = 0.001


class Ticker:
    """Sleeps ``TICK`` in a loop; keeps (wake time, lateness) per tick."""

    def __init__(self) -> None:
        self.samples: List[Tuple[float, float]] = []

    async def run(self) -> None:
        last = time.perf_counter()
        while True:
            await anyio.sleep(TICK)
            now = time.perf_counter()
            self.samples.append((now, now - last - TICK))
            last = now

    def lag_between(self, start: float, end: float) -> List[float]:
        """Lateness of every tick that woke inside [start, end], plus the first one after it."""
        inside = [lag for t, lag in self.samples if start <= t <= end]
        after = [lag for t, lag in self.samples if t > end][:1]
        return inside + after


def make_state(megabytes: int) -> Dict[str, Any]:
    n = max(1, megabytes // 4)
    return {"model": {f"layer{i}.weight": torch.randn(1 << 20) for i in range(n)}, "step": 0}


def p99(values: List[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def one_round(io: AsyncCheckpointIO, state: Dict[str, Any], path: str, mode: str) -> Dict[str, float]:
    ticker = Ticker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        await anyio.sleep(0.1)
        start = time.perf_counter()
        if mode == "async":
            await io.asave_checkpoint(state, path)
            await io.aflush()
        else:
            io.save_checkpoint(state, path)  # what not to do on a loop: both calls block it
            io.flush()
        end = time.perf_counter()
        await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    stats = io.stats[-1]
    lags = ticker.lag_between(start, end)
    return {
        "staging_ms": stats.blocking_seconds * 1e3,
        "write_s": stats.write_seconds,
        "max_lag_ms": max(lags) * 1e3,
        "p99_lag_ms": p99(lags) * 1e3,
        "ticks": float(len(lags)),
    }


async def run_backend(args: argparse.Namespace, folder: str) -> List[Tuple[str, Dict[str, float]]]:
    state = make_state(args.mb)
    path = f"{folder}/bench.ckpt"
    rows = []
    async with AsyncCheckpointIO(handle_sigterm=False, max_pending=1) as io:
        await io.asave_checkpoint(state, path)  # warm-up: allocates the slot's buffers
        await io.aflush()
        for mode in ("async", "blocking"):
            results = [await one_round(io, state, path, mode) for _ in range(args.rounds)]
            rows.append((mode, {k: statistics.median(r[k] for r in results) for k in results[0]}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mb", type=int, default=256, help="checkpoint tensor megabytes (MiB)")
    parser.add_argument("--dir", default=None, help="folder for the checkpoint file (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (DESIGN.md measures with 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"checkpoint: {args.mb} MiB of float32 tensors; ticker: {TICK * 1e3:.0f} ms sleeps; "
          f"medians of {args.rounds} rounds; window = asave_checkpoint call .. aflush return")
    header = (
        f"{'backend':8} {'API':9} {'staging ms':>10} {'write s':>8} "
        f"{'max lag ms':>11} {'p99 lag ms':>11} {'ticks':>6}"
    )
    print(header)
    print("-" * len(header))
    for backend in ("asyncio", "trio"):
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            rows = anyio.run(run_backend, args, folder, backend=backend)
        for mode, r in rows:
            print(
                f"{backend:8} {mode:9} {r['staging_ms']:10.1f} {r['write_s']:8.2f} "
                f"{r['max_lag_ms']:11.1f} {r['p99_lag_ms']:11.1f} {r['ticks']:6.0f}"
            )


if __name__ == "__main__":
    main()
