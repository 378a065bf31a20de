"""Microbenchmarks of the blocking save call: how long each implementation holds the caller.

    python -m pytest bench/test_microbench.py --benchmark-only -s   # -s: also print x floor, us/tensor
    ASYNCCKPT_BENCH_LARGE=1 python -m pytest bench/test_microbench.py --benchmark-only   # + 1 GiB

Each benchmark round is one ``save`` call on a checkpoint of plain CPU tensors. Before every
round the previous save is waited for (untimed), and one warm-up round runs first, so every
measured call is a steady-state save: buffers warm, no queue in front of it. What is timed is
only the call the training thread makes; the write itself happens outside the timing.

Shapes: a few large tensors (4 tensors) at 16 MiB, 256 MiB and 1 GiB (opt-in), and 2,000
tensors of 64 KiB (125 MiB), where per-tensor overhead dominates (``extra_info['us_per_tensor']``).
Each benchmark's ``extra_info`` also holds the copy floor of its checkpoint (warm preallocated
copy, same process) and the median blocking time as a multiple of it.

Environment: ``ASYNCCKPT_BENCH_ROUNDS`` (default 5), ``ASYNCCKPT_BENCH_THREADS`` (intra-op
threads, default 1), ``ASYNCCKPT_BENCH_LARGE=1`` (add the 1 GiB case),
``ASYNCCKPT_BENCH_DIR`` (where files are written; default the system temp folder).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from typing import Any, Dict, Tuple

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench import _impls, _measure  # noqa: E402 - after the importorskip

MiB = 2**20
ROUNDS = int(os.environ.get("ASYNCCKPT_BENCH_ROUNDS", "5"))
LARGE = os.environ.get("ASYNCCKPT_BENCH_LARGE", "") not in ("", "0")
torch.set_num_threads(int(os.environ.get("ASYNCCKPT_BENCH_THREADS", "1")))

# id -> (number of tensors, bytes per tensor)
SHAPES: Dict[str, Tuple[int, int]] = {
    "4x4MiB=16MiB": (4, 4 * MiB),
    "4x64MiB=256MiB": (4, 64 * MiB),
    "4x256MiB=1GiB": (4, 256 * MiB),
    "2000x64KiB=125MiB": (2000, 64 * 1024),
}
LARGE_SHAPES = {"4x256MiB=1GiB"}


def _shape_param(shape_id: str) -> Any:
    if shape_id in LARGE_SHAPES:
        skip = pytest.mark.skipif(not LARGE, reason="1 GiB case: set ASYNCCKPT_BENCH_LARGE=1 to run it")
        return pytest.param(shape_id, marks=[pytest.mark.slow, skip])
    return shape_id


@functools.lru_cache(maxsize=1)
def make_checkpoint(shape_id: str) -> Dict[str, Any]:
    """A Lightning-like checkpoint: a flat state dict of fp32 tensors plus loop state."""
    count, nbytes = SHAPES[shape_id]
    generator = torch.Generator().manual_seed(0)
    weights = {f"layer{i}.weight": torch.rand(nbytes // 4, generator=generator) for i in range(count)}
    return {"epoch": 0, "global_step": 100, "state_dict": weights}


@pytest.fixture
def folder():
    path = tempfile.mkdtemp(prefix="asyncckpt-microbench-", dir=os.environ.get("ASYNCCKPT_BENCH_DIR"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("impl", _impls.SAVING_IMPLS)
@pytest.mark.parametrize("shape_id", [_shape_param(s) for s in SHAPES])
def test_blocking_save(benchmark, shape_id: str, impl: str, folder: str) -> None:
    checkpoint = make_checkpoint(shape_id)
    tensors = _measure.state_tensors(checkpoint)
    try:
        saver = _impls.make_saver(impl)
    except _impls.Unavailable as err:
        pytest.skip(str(err))
    path = saver.path_for(folder, "bench")

    def setup() -> Tuple[tuple, dict]:
        saver.wait()  # untimed: the measured call never queues behind an unfinished write
        return (checkpoint, path), {}

    benchmark.group = shape_id
    benchmark.name = _impls.LABELS[impl]
    try:
        benchmark.pedantic(saver.save, setup=setup, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    finally:
        saver.close()
    floor = _measure.copy_floor_seconds(tensors, repeats=7)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {
            "tensor_bytes": _measure.tensor_bytes(tensors),
            "tensors": len(tensors),
            "copy_floor_ms": round(floor * 1e3, 3),
            "blocking_x_floor": round(median / floor, 3),
            "us_per_tensor": round(median / len(tensors) * 1e6, 2),
        }
    )
    print(  # shown with -s: the figures pytest-benchmark's table has no column for
        f"\n{shape_id:18s} {_impls.LABELS[impl]:36s} median {median * 1e3:8.1f} ms = {median / floor:6.2f}x "
        f"copy floor ({floor * 1e3:.1f} ms), {median / len(tensors) * 1e6:8.1f} us/tensor"
    )
