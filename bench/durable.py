"""Time to durable: from the save call until the checkpoint is safe, against the write floor.

``python -m bench.durable [--mb 1024] [--rounds 3] [--folders DIR ...] [--impls ...] [--device cuda]``;
also a table of ``python -m bench`` (``--durable-mb``, ``--durable-rounds``; 0 rounds leaves it out).

With ``--device cuda`` the tensors live on the GPU: the copy floor is then one device-to-host
copy into pinned buffers made beforehand, and the write floor writes a host copy of the same
bytes (made before the clock starts).

For each folder (default: the benchmark's folder on the real disk, and tmpfs at /dev/shm), each
round measures, side by side:

- the **write floor**: the same tensor bytes written raw with ``write`` and ``fsync``ed, one file;
- the **write floor into allocated pages**: the same write into a file whose pages were allocated
  before the clock starts (on tmpfs the allocation is half of a fresh write's time; asyncckpt's
  ``TorchCheckpointIO`` allocates such a spare file after each save into tmpfs, so its next save
  starts from this floor);
- the **copy floor**: one ``torch._foreach_copy_`` of the tensors into buffers made beforehand
  (what a call that snapshots them must spend before the write can have its bytes);
- ``torch.save`` into a file, then ``fsync`` (the plain way, on the caller);
- asyncckpt's ``TorchCheckpointIO`` (sync) and ``AsyncCheckpointIO`` (thread and process writers),
  Lightning's ``AsyncCheckpointIO`` and DCP's ``async_save``: from the call until each says the
  save is done (``flush()``, ``teardown()``, the future's result).

Each implementation saves twice per round to one path and the second save is timed (the first
pays for staging memory; ``python -m bench.first_save`` measures that apart). Lightning's
``TorchCheckpointIO`` does not fsync: its figure is to written, not to durable. Figures are
medians over rounds; ``x floor`` divides by the same round's write floor in the same folder,
``x (copy + write floor)`` by the sum of both floors (for a snapshot-then-write engine, the
least it can take unless the two overlap).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from ._impls import LABELS, Unavailable, make_saver

DEFAULT_IMPLS = ("torch.save", "sync", "thread", "process", "lightning", "dcp")


def _state(mb: float, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """``mb`` MB of float32 in eight tensors, as a model's largest layers."""
    per = max(1, int(mb * (1 << 20) / 4 / 8))
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per, generator=g).to(device) for i in range(8)}


def _sync(state: Dict[str, torch.Tensor]) -> None:
    if any(t.is_cuda for t in state.values()):
        torch.cuda.synchronize()


def write_floor(state: Dict[str, torch.Tensor], folder: str, allocated: bool = False) -> float:
    """The tensor bytes written raw into one file and fsynced: no serializer can beat it.

    ``allocated``: into a file whose blocks (on tmpfs: pages) were allocated before the clock
    starts, the least a save into a spare file (``TorchCheckpointIO(spare_file=True)``) can take.
    """
    path = os.path.join(folder, "floor.bin")
    if allocated:
        with open(path, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, sum(t.numel() * t.element_size() for t in state.values()))
    started = time.perf_counter()
    with open(path, "r+b" if allocated else "wb") as f:
        for t in state.values():
            f.write(memoryview(t.numpy()).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - started
    os.remove(path)
    return elapsed


def copy_floor(state: Dict[str, torch.Tensor], buffers: List[torch.Tensor]) -> float:
    """One ``torch._foreach_copy_`` of the tensors into host buffers allocated and touched before
    (pinned, for CUDA tensors): the least a call that snapshots them can cost."""
    _sync(state)
    started = time.perf_counter()
    torch._foreach_copy_(buffers, list(state.values()))
    _sync(state)
    return time.perf_counter() - started


def _torch_save(state: Dict[str, torch.Tensor], path: str) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def to_durable(name: str, state: Dict[str, torch.Tensor], folder: str) -> float:
    """Seconds from the second save's call until ``name`` reports it done."""
    if name == "torch.save":
        _torch_save(state, os.path.join(folder, "warm.pt"))
        started = time.perf_counter()
        _torch_save(state, os.path.join(folder, "timed.pt"))
        return time.perf_counter() - started
    saver = make_saver(name)
    try:
        # Both to one path: a slot is chosen by the path it staged last, so the second save is
        # warm (a save to a new path would take the other, still empty, slot). The first file is
        # removed before the timed save, so that no row pays for freeing an old file's pages.
        path = saver.path_for(folder, "timed")
        saver.save(state, path)
        saver.wait()
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.sync()
        started = time.perf_counter()
        saver.save(state, saver.path_for(folder, "timed"))
        saver.wait()
        return time.perf_counter() - started
    finally:
        saver.close()


def _clear(folder: str) -> None:
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def run(
    mb: float, rounds: int, folders: Sequence[str], impls: Sequence[str], device: str = "cpu"
) -> List[Dict[str, Any]]:
    state = _state(mb, device)
    pinned = device != "cpu"
    buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned).fill_(0) for t in state.values()]
    # The write floor writes host bytes: the tensors themselves, or a host copy of them.
    host = state if device == "cpu" else {k: t.cpu() for k, t in state.items()}
    rows: List[Dict[str, Any]] = []
    for folder in folders:
        work = tempfile.mkdtemp(prefix="asyncckpt-durable-", dir=folder)
        try:
            floors: List[float] = []
            allocated: List[float] = []
            copies: List[float] = []
            times: Dict[str, List[float]] = {name: [] for name in impls}
            ratios: Dict[str, List[float]] = {name: [] for name in impls}
            both: Dict[str, List[float]] = {name: [] for name in impls}
            skipped: Dict[str, str] = {}
            for r in range(rounds):
                os.sync()  # each measurement starts with no one else's dirty pages to write back
                floor = write_floor(host, work)
                floors.append(floor)
                allocated.append(write_floor(host, work, allocated=True))
                copy = copy_floor(state, buffers)
                copies.append(copy)
                for name in impls:
                    if name in skipped:
                        continue
                    os.sync()
                    try:
                        seconds = to_durable(name, state, work)
                    except Unavailable as err:
                        skipped[name] = str(err)
                        continue
                    finally:
                        _clear(work)
                    times[name].append(seconds)
                    ratios[name].append(seconds / floor)
                    both[name].append(seconds / (floor + copy))
                print(f"  {folder}: round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
            rows.append({"folder": folder, "impl": "write floor", "seconds": statistics.median(floors), "x_floor": 1.0,
                         "x_both": statistics.median(f / (f + c) for f, c in zip(floors, copies, strict=True))})
            rounds_ = list(zip(floors, allocated, copies, strict=True))
            rows.append({"folder": folder, "impl": "write floor, allocated", "seconds": statistics.median(allocated),
                         "x_floor": statistics.median(a / f for f, a, _ in rounds_),
                         "x_both": statistics.median(a / (f + c) for f, a, c in rounds_)})
            rows.append({"folder": folder, "impl": "copy floor", "seconds": statistics.median(copies),
                         "x_floor": statistics.median(c / f for f, c in zip(floors, copies, strict=True)),
                         "x_both": statistics.median(c / (f + c) for f, c in zip(floors, copies, strict=True))})
            for name in impls:
                if name in skipped:
                    rows.append({"folder": folder, "impl": name, "skipped": skipped[name]})
                    continue
                rows.append({
                    "folder": folder,
                    "impl": name,
                    "seconds": statistics.median(times[name]),
                    "x_floor": statistics.median(ratios[name]),
                    "x_both": statistics.median(both[name]),
                    "all_x_floor": ratios[name],
                })
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def _label(name: str) -> str:
    if name == "torch.save":
        return "torch.save + fsync (on the caller)"
    if name == "write floor, allocated":
        return "write floor, into a file allocated beforehand"
    if name == "lightning":
        return LABELS[name] + " (no fsync)"
    return LABELS.get(name, name)


def format_table(rows: List[Dict[str, Any]], mb: float) -> str:
    lines = [
        f"{mb:.0f} MB of float32 tensors; second save of each, medians over rounds",
        "",
        "| folder | implementation | to durable s | x write floor | x (copy + write floor) "
        "| x write floor, each round |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['folder']} | {_label(row['impl'])} | skipped: {row['skipped']} | | | |")
            continue
        # Each round's ratio beside the median: on a VM a round can land on memory the host must
        # fault in again (seconds for 1 GiB), which a median over few rounds does not hide.
        each = " ".join(f"{x:.2f}" for x in row.get("all_x_floor", []))
        lines.append(
            f"| {row['folder']} | {_label(row['impl'])} | {row['seconds']:.3f} | {row['x_floor']:.2f} "
            f"| {row['x_both']:.2f} | {each} |"
        )
    return "\n".join(lines)


def default_folders(disk_folder: Optional[str] = None) -> List[str]:
    folders = [disk_folder or tempfile.gettempdir()]
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        folders.append("/dev/shm")
    return folders


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.durable", description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=1024.0, help="checkpoint tensor bytes in MB (default 1024)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--folders", nargs="+", help="folders to write into (default: system temp and /dev/shm)")
    p.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS), choices=list(DEFAULT_IMPLS) + ["lazy"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the tensors live (default cpu)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda needs a CUDA device; none is visible here", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    rows = run(args.mb, args.rounds, args.folders or default_folders(), args.impls, args.device)
    print("\n## Time to durable")
    print(format_table(rows, args.mb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
