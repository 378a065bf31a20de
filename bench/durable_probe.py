"""Two ways a snapshot-then-write engine might get closer to the write floor, probed without it.

``python -m bench.durable_probe [--mb 1024] [--rounds 15] [--folder /dev/shm]``

A probe of the machine, not of asyncckpt: the engines copy the tensors (the call), then write
the copy; on tmpfs most of a write's time is the kernel allocating the file's pages. Per round,
interleaved, each into a fresh file, fsynced:

- ``floor``: the bytes written raw (``bench.durable``'s write floor);
- ``copy, then write``: one copy into a warm buffer, then the write (what the engines do);
- ``copy || fallocate, then write``: ``fallocate`` of the whole file on a second thread while
  the copy runs, then the write into the allocated file;
- ``copy || write``: the copy in 8 chunks, each written by a second thread as soon as it is
  copied (what the unmerged ``r23-overlap`` branch did inside the engine).

Both were measured for issue 23 (``docs/benchmarks.md``) and not adopted.
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
    p = argparse.ArgumentParser(prog="python -m bench.durable_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--folder", default="/dev/shm")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    nbytes = args.mb << 20
    source = torch.randn(nbytes // 4)
    buffer = torch.empty_like(source).fill_(0)
    data = memoryview(buffer.numpy()).cast("B")
    path = os.path.join(args.folder, f"asyncckpt-durable-probe-{os.getpid()}.bin")

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

    def copy_beside_write(chunks: int = 8) -> None:
        fd = fresh()
        size = -(-nbytes // chunks)
        copied = [threading.Event() for _ in range(chunks)]
        source_bytes, buffer_bytes = source.view(torch.uint8), buffer.view(torch.uint8)

        def write_chunks() -> None:
            for k in range(chunks):
                copied[k].wait()
                os.write(fd, data[k * size : (k + 1) * size])

        writing = threading.Thread(target=write_chunks)
        writing.start()
        for k in range(chunks):
            buffer_bytes[k * size : (k + 1) * size].copy_(source_bytes[k * size : (k + 1) * size])
            copied[k].set()
        writing.join()
        os.fsync(fd)
        os.close(fd)

    ways: Dict[str, Callable[[], None]] = {
        "floor": floor,
        "copy, then write": copy_then_write,
        "copy || fallocate, then write": copy_beside_fallocate,
        "copy || write (8 chunks)": copy_beside_write,
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
