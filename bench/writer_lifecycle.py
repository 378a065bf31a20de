"""Writer-process lifecycle: what starting and stopping the process writer costs.

    python -m bench.writer_lifecycle               # 8 rounds (about 20 s)
    python -m bench.writer_lifecycle --rounds 20

Each round makes a fresh process writer: one tiny save (which starts the writer process), a
flush, then ``teardown()`` (which stops the process and waits for it to exit). Figures are means
over the rounds:

    start to durable   ms from the first save call until its flush returns (the writer process
                       starts, imports torch, writes): a first save's checkpoint is safe this late
    teardown           ms that ``teardown()`` blocks (the stop command, the process's exit)
    writer CPU         s of CPU each writer process used in all (``RUSAGE_CHILDREN``)
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from typing import List, Optional, Sequence

import torch

from asyncckpt import AsyncCheckpointIO


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="asyncckpt-lifecycle-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    started: List[float] = []
    stopped: List[float] = []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        for i in range(args.rounds):
            io = AsyncCheckpointIO(writer="process", handle_sigterm=False)
            t0 = time.perf_counter()
            io.save_checkpoint({"step": i, "w": torch.zeros(16)}, os.path.join(folder, f"{i}.ckpt"))
            io.flush()
            t1 = time.perf_counter()
            io.teardown()
            t2 = time.perf_counter()
            started.append(t1 - t0)
            stopped.append(t2 - t1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / args.rounds
    print(f"process writer, mean of {args.rounds} rounds")
    print(f"  start to durable  {1000 * sum(started) / len(started):7.0f} ms")
    print(f"  teardown          {1000 * sum(stopped) / len(stopped):7.0f} ms")
    print(f"  writer CPU        {cpu:7.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
