"""``python -m bench.sharded_parts``: which part of a background write slows sharded training.

The setup of ``python -m bench --sharded`` (2 CPU ranks, gloo, the same FSDP2 MLP, 1 intra-op
thread, 16 steps, something started after steps 4, 8 and 12), but what runs in the background
after those steps is not a checkpoint save: it is one part of what a save's write does, on
this rank's 128 MB of local state, each part alone:

- ``memcpy``: two passes over the bytes in memory (what ``write()`` into the page cache costs the
  memory bus: one read, one write), no file;
- ``crc``: CRC32 over the bytes (``torch.save`` computes one per record), no file;
- ``write``: the bytes written to a file (into the page cache), no fsync;
- ``write+fsync``: the same, then fsync (the page cache written to the disk);
- ``none``: nothing (the reference).

Printed per part (rank 0; medians over rounds): lost time against the run's own quiet steps
(as ``lost, in-run`` in the sharded benchmark), and the step after each start against the
quiet steps. It answers where a sharded save's lost time comes from on this machine, so the
figure is not read as the engine's overhead.

    python -m bench.sharded_parts --rounds 3
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time
import zlib
from datetime import timedelta
from typing import Any, Dict, List

PARTS = ("none", "memcpy", "crc", "write", "write+fsync")


def worker(rank: int, world: int, port: int, cfg: Dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    from bench.sharded import fsdp2_training, lost_in_run, quiet_step

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
    )
    _, _, step = fsdp2_training(cfg["ckpt_mb"])  # the model of bench/sharded.py
    local_bytes = int(cfg["ckpt_mb"] * 1e6 / world)
    src = torch.randn(local_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    data = memoryview(src.numpy()).cast("B")
    path = os.path.join(cfg["tmp"], f"part-{rank}.bin")

    def part(kind: str) -> None:
        if kind == "memcpy":
            for _ in range(2):
                dst.copy_(src)
        elif kind == "crc":
            zlib.crc32(data)
        elif kind in ("write", "write+fsync"):
            with open(path, "wb") as f:
                for i in range(0, len(data), 8 << 20):
                    f.write(data[i : i + (8 << 20)])
                if kind == "write+fsync":
                    os.fsync(f.fileno())
            os.unlink(path)

    step()
    every, steps_n = 4, 16
    runs: Dict[str, List[List[float]]] = {p: [] for p in cfg["parts"]}
    for round_ in range(cfg["rounds"] + 1):  # round 0 is not measured
        for kind in cfg["parts"]:
            dist.barrier()
            steps, job = [], None
            for i in range(steps_n):
                t = time.perf_counter()
                step()
                if kind != "none" and (i + 1) % every == 0 and i + 1 < steps_n:
                    if job is not None:
                        job.join()
                    job = threading.Thread(target=part, args=(kind,))
                    job.start()
                steps.append(time.perf_counter() - t)
            t = time.perf_counter()
            if job is not None:
                job.join()
            steps[-1] += time.perf_counter() - t  # a part still running at the end is lost time too
            if round_:
                runs[kind].append(steps)
    if rank == 0:
        print(f"rank 0: {local_bytes / 1e6:.0f} MB per part, {cfg['rounds']} rounds")
        print("| background part | lost, in-run | next step + (ms) |")
        print("| --- | ---: | ---: |")
        for kind, per_round in runs.items():
            lost, nxt = [], []
            for steps in per_round:
                lost.append(lost_in_run({"step_s": steps, "blocking_s": []}, every))
                nxt.append(statistics.median(steps[i] for i in range(every, steps_n, every)) - quiet_step(steps, every))
            print(f"| {kind} | {statistics.median(lost):.1f}% | {statistics.median(nxt) * 1e3:+.0f} |", flush=True)
    dist.destroy_process_group()


def main(argv: Any = None) -> None:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(prog="python -m bench.sharded_parts", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ckpt-mb", type=float, default=256.0, help="parameters + Adam state over both ranks")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--tmp", default=None, help="folder for the files (default: the system's temp folder)")
    args = p.parse_args(argv)
    parts = ["none"] + [x for x in args.parts if x != "none"]
    with tempfile.TemporaryDirectory(prefix="asyncckpt-bench-parts-", dir=args.tmp) as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = {"rounds": args.rounds, "ckpt_mb": args.ckpt_mb, "parts": parts, "tmp": tmp}
        mp.start_processes(worker, args=(2, port, cfg), nprocs=2, join=True, start_method="spawn")


if __name__ == "__main__":
    main()
