"""XLA staging figure: the batched XLA-to-CPU transfer floor beside asyncckpt's staging time.

Run in an environment with torch_xla (the tox ``xla`` env, or ``torch==2.9.0 torch-xla==2.9.0``):

    PJRT_DEVICE=CPU python -m bench.xla_staging [--mb 256] [--tensors 64] [--repeats 7]

Reports medians: the transfer floor (one sync, then ``_xla_get_cpu_tensors`` for the whole state
dict), per-tensor ``.cpu()`` for contrast, the CPU memcpy floor of the same bytes, and the time
``AsyncCheckpointIO.save_checkpoint`` blocks (staging = transfer + copy into the slot's arena).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="state dict size in MB")
    parser.add_argument("--tensors", type=int, default=64, help="number of tensors")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    import torch
    import torch_xla

    from asyncckpt import AsyncCheckpointIO

    torch.set_num_threads(1)
    device = torch_xla.device()
    numel = args.mb * 1024 * 1024 // 4 // args.tensors
    state = {f"t{i}": torch.randn(numel).to(device) for i in range(args.tensors)}
    torch_xla.sync()
    tensors = list(state.values())

    def batched() -> None:
        torch_xla._XLAC._xla_sync_multi(tensors, devices=[], wait=True, sync_xla_data=False)
        torch_xla._XLAC._xla_get_cpu_tensors(tensors)

    def per_tensor() -> None:
        for t in tensors:
            t.cpu()

    cpu = [t.cpu() for t in tensors]
    dst = [torch.empty_like(t) for t in cpu]

    def memcpy() -> None:
        for d, s in zip(dst, cpu, strict=True):
            d.copy_(s)

    folder = tempfile.mkdtemp(prefix="xla-bench-")
    io = AsyncCheckpointIO(max_pending=1)
    blocking = []

    def save() -> None:
        io.flush()  # a free, warm slot: measure staging only
        started = time.perf_counter()
        io.save_checkpoint(state, os.path.join(folder, "x.ckpt"))
        blocking.append(time.perf_counter() - started)

    # Interleaved rounds, so that noise and allocator warm-up fall on every method alike.
    methods = [
        ("batched transfer (floor)", batched),
        ("per-tensor .cpu()", per_tensor),
        ("CPU memcpy of the same bytes", memcpy),
        ("asyncckpt save_checkpoint (blocking)", save),
    ]
    times: dict = {name: [] for name, _ in methods}
    for fn in (batched, per_tensor, memcpy, save):
        fn()  # warm up
    blocking.clear()
    for _ in range(args.repeats):
        for name, fn in methods:
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    io.teardown()
    times["asyncckpt save_checkpoint (blocking)"] = blocking
    rows = [(name, statistics.median(times[name]) * 1e3) for name, _ in methods]
    floor = rows[0][1]
    print(f"XLA (CPU PJRT) state dict: {args.mb} MB in {args.tensors} tensors, median of {args.repeats}")
    print(f"{'what':40s} {'ms':>9s} {'x transfer floor':>17s}")
    for name, ms in rows:
        print(f"{name:40s} {ms:9.1f} {ms / floor:17.2f}")


if __name__ == "__main__":
    main()
