"""Would allocating the checkpoint file while the call copies shorten the time to durable?

``python -m bench.prealloc_probe [--mb 1024] [--rounds 15] [--folder /dev/shm]``

A probe of the filesystem, not of asyncckpt: on tmpfs most of a write's time is the kernel
allocating pages for the file, and a snapshot-then-write engine pays the call's copy on top of
it. Per round, interleaved, each into a fresh file, fsynced:

- ``floor``: the bytes written raw (``bench.durable``'s write floor);
- ``copy, then write``: one copy into a warm buffer, then the write (what the engines do);
- ``copy || fallocate, then write``: ``fallocate`` of the whole file on a second thread while
  the copy runs, then the write into the allocated file.

It was measured for issue 23 (``docs/benchmarks.md``) and not adopted.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

_libc = ctypes.CDLL(None, use_errno=True)


def _fallocate(fd: int, nbytes: int) -> None:
    if _libc.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(nbytes)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prealloc_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--folder", default="/dev/shm")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    nbytes = args.mb << 20
    source = torch.randn(nbytes // 4)
    buffer = torch.empty_like(source).fill_(0)
    data = memoryview(buffer.numpy()).cast("B")
    path = os.path.join(args.folder, f"asyncckpt-prealloc-probe-{os.getpid()}.bin")

    def write(fd: int) -> None:
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)

    def fresh() -> int:
        return os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)

    def floor() -> None:
        write(fresh())

    def copy_then_write() -> None:
        buffer.copy_(source)
        write(fresh())

    def copy_beside_fallocate() -> None:
        fd = fresh()
        allocating = threading.Thread(target=_fallocate, args=(fd, nbytes))
        allocating.start()
        buffer.copy_(source)
        allocating.join()
        write(fd)

    ways: Dict[str, Callable[[], None]] = {
        "floor": floor,
        "copy, then write": copy_then_write,
        "copy || fallocate, then write": copy_beside_fallocate,
    }
    times: Dict[str, List[float]] = {name: [] for name in ways}
    try:
        for _ in range(args.rounds):
            for name, way in ways.items():
                os.sync()
                started = time.perf_counter()
                way()
                times[name].append(time.perf_counter() - started)
                os.remove(path)
    finally:
        if os.path.exists(path):
            os.remove(path)
    print(f"{args.mb} MB into {args.folder}, {args.rounds} rounds (seconds)")
    for name, values in times.items():
        print(f"{name:32s} median {statistics.median(values):.3f}  min {min(values):.3f}  "
              f"rounds over 2x the median floor: {sum(v > 2 * statistics.median(times['floor']) for v in values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
