"""``python -m bench --sharded``: sharded saves on 2 CPU ranks (gloo, FSDP2), side by side.

Each rank trains an FSDP2 MLP whose parameters plus Adam state add up to ``--ckpt-mb`` (default
256 MB over both ranks, so about half of it per rank) for ``--steps`` steps (default 16), saving
every ``--every`` steps (default 4), never after the last step (as ``python -m bench`` does: the
loop then ends on its final flush, not on a whole write), with:

- ``write-floor``: not a checkpoint but the lost-time yardstick: a background thread writes this
  rank's local tensor bytes as they are (no snapshot, no format) to one file and fsyncs it. It is
  what putting these bytes durably on this disk costs training, whoever writes them;
- ``sync``: ``dcp.save(state, checkpoint_id=folder)`` on the training thread, default group
  (what Lightning's ModelParallelStrategy does);
- ``dcp``: ``dcp.async_save(..., process_group=<a gloo group of its own>)``, thread executor;
  the previous save's future is waited for inside the next save (as its docs require);
- ``dcp-process``: the same with ``async_checkpointer_type=PROCESS``;
- ``thread``: ``asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(), max_pending=2)``;
- ``thread-1``: the same with ``staging_threads=1`` (no helper threads for the copy);
- ``thread-nice``: ``thread`` with ``writer_nice=19`` (the writer thread yields the core to
  training whenever both want it);
- ``lazy``: ``thread`` with ``staging="lazy"`` (the copy overlaps the next forward and backward;
  the optimizer step waits for it);
- ``process``: ``writer="process"``, which asyncckpt refuses (reported as such).

Per rank: blocking per save (the call), as a multiple of the copy floor (copying this rank's
local tensors once into warm preallocated buffers, the ranks in turn; and, second column, with
every rank copying at once, as a collective save makes them, sharing the memory bandwidth), how
much slower the step after a save runs than the steps two and three after one ("next step +",
where the background write lands), the final flush's wait, lost time against the loop without
saves (final wait included; "lost time"), the same against the run's own quiet steps ("lost,
in-run": steadier, see ``lost_in_run``) and as a multiple of ``write-floor``'s, the peak RSS
increase during the run, and the staging memory an asyncckpt engine keeps between saves (made
in the warm-up round, so not in that increase). One unmeasured round of every implementation
first (it starts process groups, buffers, DCP's writer process); then rounds are interleaved,
and medians are reported. Each asyncckpt engine lives for the whole run, as it would in
training (its staging slots and process group are reused); DCP's ``async_save`` allocates its
staging copy per save, its default.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Tuple

IMPLS = ("none", "write-floor", "sync", "dcp", "dcp-process", "thread", "thread-1", "thread-nice", "lazy", "process")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS every few ms on a thread; ``peak - start`` in bytes."""

    def __init__(self) -> None:
        self.start = _rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss()) - self.start


def fsdp2_training(ckpt_mb: float) -> Tuple[Any, Any, Callable[[], None]]:
    """The benchmark's model, optimizer and training step: an FSDP2 MLP (4 square ``Linear``
    layers, no bias) whose float32 parameters plus Adam's two states add up to ``ckpt_mb``
    over all ranks, a batch of 16. Call in each rank after ``init_process_group``."""
    import torch
    from torch.distributed.fsdp import fully_shard

    layers = 4
    params = ckpt_mb * 1e6 / 4 / 3  # float32 parameters; Adam keeps two more of each
    width = int(math.sqrt(params / layers))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = torch.randn(16, width)

    def step() -> None:
        model(batch).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    return model, opt, step


def worker(rank: int, world: int, port: int, cfg: Dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    import asyncckpt
    from asyncckpt.distributed import DistributedCheckpointIO

    torch.set_num_threads(cfg["threads"])
    os.environ["LOCAL_WORLD_SIZE"] = str(world)  # as torchrun sets it: all ranks on this machine
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
    )
    model, opt, step = fsdp2_training(cfg["ckpt_mb"])
    step()
    side_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=600))

    def state() -> Dict[str, Any]:
        msd, osd = get_state_dict(model, opt)
        return {"model": msd, "optim": osd}

    locals_ = []

    def collect(obj: Any) -> None:
        if isinstance(obj, DTensor):
            obj = obj.to_local()
        if isinstance(obj, torch.Tensor):
            locals_.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                collect(v)

    collect(state())
    local_bytes = sum(t.numel() * t.element_size() for t in locals_)
    buffers = [torch.empty_like(t) for t in locals_]
    torch._foreach_copy_(buffers, locals_)  # warm

    def copy_seconds(dst: List[Any]) -> float:
        t = time.perf_counter()
        torch._foreach_copy_(dst, locals_)
        return time.perf_counter() - t

    alone, together = [], []
    for _ in range(5):
        for turn in range(world):  # the ranks in turn: the copy floor proper
            dist.barrier()
            if turn == rank:
                alone.append(copy_seconds(buffers))
        dist.barrier()  # every rank at once, as a collective save makes them copy
        together.append(copy_seconds(buffers))
    floor, floor_together = min(alone), min(together)
    del buffers

    root = cfg["tmp"]

    def write_raw(target: str) -> None:
        """The lost-time yardstick: this rank's local tensor bytes, as they are (no snapshot,
        no format), written to one file and fsynced, replacing the file of two saves ago, as
        a checkpoint of the same size is."""
        os.makedirs(os.path.dirname(target), exist_ok=True)
        path = f"{target}-{rank}.bin"
        if os.path.exists(path):
            os.unlink(path)
        with open(path, "wb") as f:
            for t in locals_:
                f.write(memoryview(t.detach().numpy()).cast("B"))
            os.fsync(f.fileno())
    results: Dict[str, Any] = {
        "rank": rank,
        "local_mb": local_bytes / 1e6,
        "floor_s": floor,
        "floor_together_s": floor_together,
        "every": cfg["every"],
        "runs": {name: [] for name in cfg["impls"]},
    }

    engines: Dict[str, Any] = {}  # one per implementation for the whole run, as in training

    def run(name: str, round_: int) -> Optional[Dict[str, Any]]:
        folder = os.path.join(root, name)
        engine = engines.get(name)
        pending: List[Any] = []
        if engine is not None:
            pass
        elif name == "thread":
            engine = engines[name] = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(), max_pending=2)
        elif name == "thread-1":  # staging copies on the training thread alone
            engine = engines[name] = asyncckpt.AsyncCheckpointIO(
                DistributedCheckpointIO(), max_pending=2, staging_threads=1
            )
        elif name == "thread-nice":  # the writer thread at niceness 19: training first
            engine = engines[name] = asyncckpt.AsyncCheckpointIO(
                DistributedCheckpointIO(), max_pending=2, writer_nice=19
            )
        elif name == "lazy":
            engine = engines[name] = asyncckpt.AsyncCheckpointIO(
                DistributedCheckpointIO(), max_pending=2, staging="lazy"
            )
        elif name == "process":
            try:
                asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(), writer="process")
            except TypeError as err:
                return {"unavailable": f"refused: {str(err).split(':')[0]}"}
        if name == "dcp-process":
            from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        def save(target: str) -> None:
            s = state()
            if name == "write-floor":  # the yardstick: these bytes written and fsynced, nothing else
                if pending:
                    pending.pop().join()
                job = threading.Thread(target=write_raw, args=(target,))
                job.start()
                pending.append(job)
            elif name == "sync":
                dcp.save(s, checkpoint_id=target)
            elif name in ("dcp", "dcp-process"):
                if pending:
                    pending.pop().result()
                kwargs = {"async_checkpointer_type": AsyncCheckpointerType.PROCESS} if name == "dcp-process" else {}
                pending.append(dcp.async_save(s, checkpoint_id=target, process_group=side_group, **kwargs))
            else:
                engine.save_checkpoint(s, target)

        dist.barrier()
        rss = PeakRSS()
        blocking, steps = [], []
        started = time.perf_counter()
        for i in range(cfg["steps"]):
            t = time.perf_counter()
            step()
            steps.append(time.perf_counter() - t)
            if name != "none" and (i + 1) % cfg["every"] == 0 and i + 1 < cfg["steps"]:
                t = time.perf_counter()
                save(os.path.join(folder, "ab"[(i // cfg["every"]) % 2]))
                blocking.append(time.perf_counter() - t)
        t = time.perf_counter()
        if pending:
            last = pending.pop()
            if isinstance(last, threading.Thread):  # write-floor's
                last.join()
            else:  # DCP's future
                last.result()
        if engine is not None:
            engine.flush()
        final_wait = time.perf_counter() - t
        # asyncckpt's staging slots are allocated by the first save and kept (the warm-up round
        # made them, so the RSS increase of a measured round leaves them out): counted here
        held = sum(buffer.nbytes for buffer in engine.staging_buffers()) if engine is not None else 0
        loop = time.perf_counter() - started
        peak = rss.stop()
        dist.barrier()
        return {
            "round": round_, "loop_s": loop, "blocking_s": blocking, "peak_rss_mb": peak / 1e6,
            "step_s": steps, "final_wait_s": final_wait, "staging_held_mb": held / 1e6,
        }

    for name in cfg["impls"]:  # an unmeasured round: process groups, buffers, writer processes start
        try:
            run(name, -1)
        except Exception:  # noqa: BLE001 - the measured rounds report it
            dist.barrier()
    for round_ in range(cfg["rounds"]):
        for name in cfg["impls"]:
            try:
                results["runs"][name].append(run(name, round_))
            except Exception as err:  # noqa: BLE001 - reported in the table, the others still run
                results["runs"][name].append({"unavailable": f"{type(err).__name__}: {err}"[:200]})
                dist.barrier()
    for engine in engines.values():
        engine.teardown()
    with open(os.path.join(cfg["out_dir"], f"sharded-rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def quiet_step(steps: List[float], every: int) -> float:
    """The median of a run's steps before its first save and two and three after each save."""
    return statistics.median(s for i, s in enumerate(steps) if i < every or i % every in (2, 3))


def lost_in_run(entry: Dict[str, Any], every: int) -> float:
    """Lost time against the run's own quiet steps, in %: every step's excess over the median
    of the steps before the first save and two and three after each save, plus the blocking
    and the final wait, over the loop at that median step.

    Between runs, the baseline loop itself drifts by 5-8% here (more than the differences
    being measured); within one run it does not. This assumes a save's write is over two steps
    after it (the final wait shows one that is not).
    """
    steps = entry["step_s"]
    quiet = quiet_step(steps, every)
    excess = sum(s - quiet for s in steps) + sum(entry["blocking_s"]) + entry.get("final_wait_s", 0.0)
    return excess / (len(steps) * quiet) * 100


def _summarize(rank_results: Dict[str, Any]) -> List[Dict[str, Any]]:
    runs = rank_results["runs"]
    base = [r["loop_s"] for r in runs.get("none", []) if r and "loop_s" in r]
    rows = []
    for name, entries in runs.items():
        ok = [e for e in entries if e and "loop_s" in e]
        if not ok:
            reason = next((e["unavailable"] for e in entries if e and "unavailable" in e), "not run")
            rows.append({"impl": name, "unavailable": reason})
            continue
        lost = [
            (e["loop_s"] - b) / b * 100 for e, b in zip(ok, base, strict=False)
        ] if base else []
        blocks = [b for e in ok for b in e["blocking_s"]]
        every = rank_results.get("every", 4)
        after = [e["step_s"][i] for e in ok for i in range(every, len(e.get("step_s", [])), every)]
        quiet = [e["step_s"][i] for e in ok for i in range(len(e.get("step_s", []))) if i % every in (2, 3)]
        in_run = [lost_in_run(e, every) for e in ok if e.get("step_s")]
        rows.append(
            {
                "impl": name,
                "blocking_ms": statistics.median(blocks) * 1e3 if blocks else 0.0,
                "x_floor": statistics.median(blocks) / rank_results["floor_s"] if blocks else 0.0,
                "x_floor_together": statistics.median(blocks) / rank_results["floor_together_s"] if blocks else 0.0,
                "lost_pct": statistics.median(lost) if lost else 0.0,
                # the step after each save against the steps two and three after one: what the
                # background write costs the step it overlaps most
                "next_step_ms": (statistics.median(after) - statistics.median(quiet)) * 1e3 if after and quiet else 0.0,
                "final_wait_ms": statistics.median(e.get("final_wait_s", 0.0) for e in ok) * 1e3,
                "lost_in_run_pct": statistics.median(in_run) if in_run else float("nan"),
                "peak_rss_mb": statistics.median(e["peak_rss_mb"] for e in ok),
                "staging_held_mb": statistics.median(e.get("staging_held_mb", 0.0) for e in ok),
            }
        )
    floor_row = next((r for r in rows if r["impl"] == "write-floor" and "lost_pct" in r), None)
    for row in rows:
        if floor_row is not None and floor_row["lost_in_run_pct"] > 0 and "lost_in_run_pct" in row:
            row["x_write_floor"] = row["lost_in_run_pct"] / floor_row["lost_in_run_pct"]
    return rows


def format_table(rank: int, rank_results: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    lines = [
        f"rank {rank}: local state {rank_results['local_mb']:.0f} MB, copy floor "
        f"{rank_results['floor_s'] * 1e3:.1f} ms alone, "
        f"{rank_results.get('floor_together_s', float('nan')) * 1e3:.1f} ms with every rank copying at once",
        "| impl | blocking per save (ms) | x floor | x floor, all ranks at once | next step + (ms) "
        "| final wait (ms) | lost time | lost, in-run | x write-floor (in-run) | peak RSS increase (MB) "
        "| staging kept (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "unavailable" in row:
            lines.append(f"| {row['impl']} | not available: {row['unavailable']} | | | | | | | | | |")
        elif row["impl"] == "none":
            lines.append(
                f"| none | - | - | - | - | - | 0 (reference) | {row['lost_in_run_pct']:.1f}% | - "
                f"| {row['peak_rss_mb']:.0f} | - |"
            )
        else:
            blocking = "-" if row["impl"] == "write-floor" else f"{row['blocking_ms']:.1f}"
            x_floor = "-" if row["impl"] == "write-floor" else f"{row['x_floor']:.2f}x"
            x_together = "-" if row["impl"] == "write-floor" else f"{row.get('x_floor_together', float('nan')):.2f}x"
            x_write = f"{row['x_write_floor']:.2f}x" if "x_write_floor" in row else "-"
            lines.append(
                f"| {row['impl']} | {blocking} | {x_floor} | {x_together} | {row['next_step_ms']:+.0f} "
                f"| {row['final_wait_ms']:.0f} | {row['lost_pct']:.1f}% | {row['lost_in_run_pct']:.1f}% | {x_write} "
                f"| {row['peak_rss_mb']:.0f} | {row['staging_held_mb']:.0f} |"
            )
    return "\n".join(lines)


def run_sharded(args: Any) -> Dict[str, Any]:
    """Start the 2 ranks, wait for them, print and return the per-rank tables."""
    import torch.multiprocessing as mp

    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="asyncckpt-bench-sharded-", dir=args.tmp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    impls = [i for i in (args.sharded_impls or IMPLS) if i != "none"]
    cfg = {
        "ckpt_mb": args.ckpt_mb,
        "threads": (args.threads or [1])[0],
        "steps": args.steps or 16,
        "every": args.every or 4,
        "rounds": args.rounds or 2,
        "impls": ["none"] + impls,
        "tmp": tmp,
        "out_dir": args.out,
    }
    print(f"## Sharded: 2 ranks, FSDP2, {cfg['ckpt_mb']:.0f} MB of parameters + Adam state in total, "
          f"{cfg['steps']} steps, a save every {cfg['every']}, {cfg['rounds']} rounds", flush=True)
    try:
        mp.start_processes(worker, args=(2, port, cfg), nprocs=2, join=True, start_method="spawn")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"config": cfg, "ranks": []}
    for rank in range(2):
        with open(os.path.join(args.out, f"sharded-rank{rank}.json")) as f:
            rank_results = json.load(f)
        rows = _summarize(rank_results)
        report["ranks"].append({"raw": rank_results, "rows": rows})
        print(format_table(rank, rank_results, rows), flush=True)
    path = os.path.join(args.out, "sharded.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    _plot(report, os.path.join(args.out, "sharded.png"))
    print(f"raw results: {path}")
    return report


def _plot(report: Dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for rank, entry in enumerate(report["ranks"]):
        rows = [r for r in entry["rows"] if "unavailable" not in r and r["impl"] != "none"]
        names = [r["impl"] for r in rows]
        offset = (rank - 0.5) * 0.38
        xs = [i + offset for i in range(len(rows))]
        blocking = [float("nan") if r["impl"] == "write-floor" else r["x_floor"] for r in rows]
        axes[0].bar(xs, blocking, width=0.38, label=f"rank {rank}")
        axes[1].bar(xs, [r.get("lost_in_run_pct", r["lost_pct"]) for r in rows], width=0.38, label=f"rank {rank}")
        for ax in axes:
            ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
    axes[0].set_title("blocking per save, x local copy floor")
    axes[0].set_yscale("log")
    axes[1].set_title("lost time, % (against the run's own quiet steps)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit("run it as: python -m bench --sharded")
