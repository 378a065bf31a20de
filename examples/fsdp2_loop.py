"""A plain PyTorch FSDP2 loop that saves sharded checkpoints in the background and resumes.

    torchrun --nproc_per_node 2 examples/fsdp2_loop.py --dir ckpt --steps 20   # saves every 5 steps
    torchrun --nproc_per_node 3 examples/fsdp2_loop.py --dir ckpt --steps 30   # resumes at 3 ranks
    python examples/fsdp2_loop.py --dir ckpt --steps 40                         # or in one process

Runs on CPU with gloo (or on GPUs with nccl: the checkpoint's own collectives use a gloo group
either way). See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import asyncckpt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="ckpt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    args = parser.parse_args()

    if "RANK" not in os.environ:  # a single process: a world of one, so the same code runs
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29577")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    # Each rank stages only its own shards, then returns; the writer thread runs DCP's save.
    io = asyncckpt.AsyncCheckpointIO(asyncckpt.DistributedCheckpointIO(), max_pending=2)
    last = os.path.join(args.dir, "last")

    start = 0
    if os.path.exists(os.path.join(last, ".metadata")):  # resume, at any world size
        msd, osd = get_state_dict(model, opt)
        state = io.load_checkpoint(last, state={"model": msd, "optim": osd, "step": 0})
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = state["step"]
        if rank == 0:
            print(f"resumed at step {start} with {dist.get_world_size()} rank(s)")

    for step in range(start, args.steps):
        torch.manual_seed(step * 100 + rank)
        model(torch.randn(32, 64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % args.every == 0:
            msd, osd = get_state_dict(model, opt)  # sharded: DTensors, no all-gather
            io.save_checkpoint({"model": msd, "optim": osd, "step": step + 1}, last)

    io.teardown()  # waits for the last save on every rank
    if rank == 0:
        print(f"saved {last} at step {args.steps}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
