"""``python -m bench.sharded_scale``: the coordinator's share of a sharded save at N ranks, simulated.

What grows with the number of ranks in a DCP save is done by one process, the coordinator:
it unpickles N local plans, deduplicates them and builds the global plan and metadata, and
after the writes it pickles and writes ``.metadata``, which names every chunk of every rank.
This script builds the N local plans a FSDP-style job would send (every tensor ``Shard(0)``
over N ranks, plus replicated plain objects on every rank), and times those steps for real on
this machine in one process; the collectives' network time is not included (see
docs/distributed.md for how the figure is put together).

    python -m bench.sharded_scale --ranks 2 16 128 1024 --tensors 600
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import tempfile
import time
from typing import Any, Dict, List


def local_plan(rank: int, world: int, tensors: int, rows: int, cols: int) -> Any:
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import (
        BytesIOWriteData,
        SavePlan,
        TensorWriteData,
        WriteItem,
        WriteItemType,
    )

    share = -(-rows // world)
    start = min(rows, rank * share)
    length = max(0, min(rows, start + share) - start)
    items = []
    for t in range(tensors):
        fqn = f"model.layers.{t // 3}.{('weight', 'exp_avg', 'exp_avg_sq')[t % 3]}"
        offsets = torch.Size([start, 0])
        items.append(
            WriteItem(
                index=MetadataIndex(fqn, offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size([length, cols])),
                    properties=TensorProperties(dtype=torch.float32),
                    size=torch.Size([rows, cols]),
                ),
            )
        )
    for key in ("step", "epoch", "rng"):  # replicated: every rank plans it, one writes it
        items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO, bytes_io_data=BytesIOWriteData(8)))
    return SavePlan(items)


def measure(world: int, tensors: int, rows: int, cols: int, folder: str) -> Dict[str, Any]:
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    plans = [local_plan(r, world, tensors, rows, cols) for r in range(world)]
    sent = [pickle.dumps(p) for p in plans]
    started = time.perf_counter()
    received = [pickle.loads(b) for b in sent]  # what the gather hands the coordinator
    unpickle_s = time.perf_counter() - started
    planner = DefaultSavePlanner()
    planner.set_up_planner({}, is_coordinator=True)
    planner.flatten_state_dict = False
    started = time.perf_counter()
    global_plan, metadata = planner.create_global_plan(received)
    plan_s = time.perf_counter() - started
    scatter_bytes = sum(len(pickle.dumps(p)) for p in global_plan)
    storage = {}
    for rank, plan in enumerate(global_plan):
        for n, item in enumerate(plan.items):
            storage[item.index] = _StorageInfo(f"__{rank}_0123456789ab_0.distcp", n * 4096, 4096)
    metadata.storage_data = storage
    started = time.perf_counter()
    buf = io.BytesIO()
    pickle.dump(metadata, buf)
    path = os.path.join(folder, f".metadata-{world}")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    commit_s = time.perf_counter() - started
    os.unlink(path)
    return {
        "ranks": world,
        "items_per_rank": len(plans[0].items),
        "plan_bytes_per_rank": len(sent[0]),
        "gathered_bytes": sum(len(b) for b in sent),
        "scatter_bytes": scatter_bytes,
        "coordinator_unpickle_s": unpickle_s,
        "coordinator_global_plan_s": plan_s,
        "metadata_bytes": len(buf.getvalue()),
        "metadata_pickle_write_fsync_s": commit_s,
    }


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 16, 128, 1024])
    p.add_argument("--tensors", type=int, default=600, help="sharded tensors per rank (params + Adam moments)")
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        print("| ranks | plan per rank (KB) | gathered (MB) | unpickle (s) | global plan (s) | "
              ".metadata (MB) | .metadata pickle+write+fsync (s) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for world in args.ranks:
            r = measure(world, args.tensors, args.rows, args.cols, folder)
            rows.append(r)
            print(
                f"| {world} | {r['plan_bytes_per_rank'] / 1e3:.0f} | {r['gathered_bytes'] / 1e6:.1f} | "
                f"{r['coordinator_unpickle_s']:.2f} | {r['coordinator_global_plan_s']:.2f} | "
                f"{r['metadata_bytes'] / 1e6:.1f} | {r['metadata_pickle_write_fsync_s']:.2f} |",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
