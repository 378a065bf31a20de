"""One (round, implementation) run of the step-time benchmark, in a fresh process.

    python -m bench._child '<config json>'

The parent (:mod:`bench.step_time`) starts one of these per run so that every implementation
starts from the same clean interpreter: its peak memory is its own, and no thread, process or
cached buffer left by another implementation can slow it down. The result is written as JSON to
``config["result_path"]``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch

from . import _impls, _measure, _workloads


@dataclass
class RunResult:
    """What one run measured. Times in seconds, sizes in bytes."""

    impl: str
    workload: str
    threads: int
    round: int
    available: bool = True
    reason: str = ""
    ckpt_bytes: int = 0
    save_steps: List[int] = field(default_factory=list)
    step_seconds: List[float] = field(default_factory=list)
    blocking_seconds: List[float] = field(default_factory=list)
    flush_seconds: float = 0.0
    total_seconds: float = 0.0
    copy_floor_seconds: float = 0.0
    peak_rss_bytes: int = 0
    rss_samples: int = 0
    engine_stats: List[Dict[str, float]] = field(default_factory=list)


def save_steps(steps: int, every: int) -> List[int]:
    """Steps after which a checkpoint is saved: every ``every`` steps, never after the last one."""
    return [s for s in range(every, steps, every)]


def _train(config: Dict[str, Any], workload: _workloads.Workload, saver: Optional[_impls.Saver], result: RunResult):
    """The measured loop: steps, saves at ``result.save_steps``, then the final flush."""
    folder = config["folder"]
    saves = set(result.save_steps) if saver is not None else set()
    with _measure.RssSampler() as rss:
        started = time.perf_counter()
        for index in range(1, config["steps"] + 1):
            step_started = time.perf_counter()
            workload.step()
            if index in saves:
                state = workload.checkpoint(index)
                path = saver.path_for(folder, str(index))
                save_started = time.perf_counter()
                saver.save(state, path)
                result.blocking_seconds.append(time.perf_counter() - save_started)
                del state
            result.step_seconds.append(time.perf_counter() - step_started)
        flush_started = time.perf_counter()
        if saver is not None:
            saver.wait()
        result.flush_seconds = time.perf_counter() - flush_started
        result.total_seconds = time.perf_counter() - started
    result.peak_rss_bytes = rss.peak
    result.rss_samples = rss.samples


def run(config: Dict[str, Any]) -> RunResult:
    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    result = RunResult(
        impl=config["impl"], workload=config["workload"], threads=config["threads"], round=config["round"]
    )
    workload = _workloads.build(config["workload"], config["ckpt_mb"], config["batch"])
    tensors = _measure.state_tensors(workload.checkpoint(0))
    result.ckpt_bytes = _measure.tensor_bytes(tensors)
    saver = None
    if config["impl"] != "none":
        try:
            saver = _impls.make_saver(config["impl"], config["max_pending"])
        except _impls.Unavailable as err:
            result.available, result.reason = False, str(err)
            return result
        result.save_steps = save_steps(config["steps"], config["every"])
    for _ in range(config["warmup"]):
        workload.step()
    try:
        _train(config, workload, saver, result)
        if saver is not None:
            result.engine_stats = saver.engine_stats()
    finally:
        if saver is not None:
            saver.close()
    # After the loop and outside the memory sampler: the floor's own buffers would count as
    # checkpoint memory otherwise.
    result.copy_floor_seconds = _measure.copy_floor_seconds(tensors, config["copy_repeats"])
    return result


def main(argv: List[str]) -> int:
    config = json.loads(argv[0])
    result = run(config)
    with open(config["result_path"], "w", encoding="utf-8") as f:
        json.dump(asdict(result), f)
    sys.stdout.flush()
    # A writer process or thread left behind must not hold the run open.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
