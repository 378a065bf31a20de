"""The save call for many small tensors, side by side with one ``torch._foreach_copy_`` of them.

    python -m bench.many_call                      # 20,000 tensors of 1 KB, 2 rounds: < 1 minute
    python -m bench.many_call --compare /work/main # also the asyncckpt of another tree, same run
    python -m bench.many_call --tensors 20000 --bytes 1024 --saves 7 --rounds 2
    python -m bench.many_call --parts              # where a warm eager call's time goes (this tree)

The checkpoint is a training loop's: ``{"epoch", "global_step", "state_dict":
model.state_dict(), "optimizer_states": [optimizer.state_dict()]}`` built anew for every save
(``state_dict()`` returns new detached tensors over the same storages each time), from a model
of ``tensors / 4`` parameters of ``bytes`` each and Adam's state (``exp_avg``, ``exp_avg_sq``,
``step``): four tensors per parameter. The global step changes at every save.

Each round runs in a fresh process per engine tree; in it, after warm-up saves, the warm eager
call and the warm lazy call (``staging="eager"`` and ``staging="lazy"``, thread writer,
``max_pending=1``) are timed in turn, the order swapped at every save; each is preceded by a
flush of both engines and by one ``torch._foreach_copy_`` of the same tensors into preallocated
buffers (the copy floor, timed too), so the three see the same machine and the same warmth of
the tensors' memory. Figures are medians over every measured save of every round; ratios are of
medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGINGS = ("eager", "lazy")


def small_tensor_checkpoint(tensors: int, nbytes: int) -> Callable[[int], Dict[str, Any]]:
    """A builder of the checkpoint described above (module docstring)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    params = max(1, tensors // 4)
    model = nn.ParameterList(nn.Parameter(torch.randn(max(1, nbytes // 4))) for _ in range(params))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # Adam's state exists from here on

    def checkpoint(step: int) -> Dict[str, Any]:
        return {
            "epoch": 0,
            "global_step": step,
            "state_dict": model.state_dict(),
            "optimizer_states": [optimizer.state_dict()],
        }

    return checkpoint


def _tensors_of(state: Any) -> List[Any]:
    """Every tensor of a nested dict/list checkpoint, each object once (no bench import: a
    child may run another tree's asyncckpt, whose bench/ may differ)."""
    import torch

    found: Dict[int, Any] = {}
    stack = [state]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            found.setdefault(id(obj), obj)
        elif isinstance(obj, dict):
            stack.extend(reversed(list(obj.values())))
        elif isinstance(obj, (list, tuple)):
            stack.extend(reversed(obj))
    return list(found.values())


def measure(
    checkpoint: Callable[[int], Dict[str, Any]], saves: int, warmup: int = 2, staging_threads: Optional[int] = None
) -> Dict[str, Any]:
    """Time the warm eager call, the warm lazy call and the copy floor, interleaved, in this process."""
    import torch

    import asyncckpt

    first = checkpoint(0)
    tensors = _tensors_of(first)
    buffers = [torch.empty_like(t) for t in tensors]
    del first
    folder = tempfile.mkdtemp(prefix="asyncckpt-many-call-")
    ios = {
        s: asyncckpt.AsyncCheckpointIO(staging=s, writer="thread", max_pending=1, staging_threads=staging_threads)
        for s in STAGINGS
    }
    times: Dict[str, List[float]] = {"floor": [], **{s: [] for s in STAGINGS}}
    try:
        for index in range(warmup + saves):
            # Each call right after a floor copy of its own, with no write running (every
            # engine flushed first), the two stagings in turn first: each finds the machine,
            # and the tensors' memory, as the other does.
            order = list(STAGINGS) if index % 2 == 0 else list(reversed(STAGINGS))
            for staging in order:
                for io in ios.values():
                    io.flush()
                with torch.no_grad():
                    started = time.perf_counter()
                    torch._foreach_copy_(buffers, tensors)
                    floor = time.perf_counter() - started
                state = checkpoint(index)
                path = os.path.join(folder, f"{staging}.ckpt")
                started = time.perf_counter()
                ios[staging].save_checkpoint(state, path)
                took = time.perf_counter() - started
                del state
                ios[staging].wait_staged()
                if index >= warmup:
                    times["floor"].append(floor)
                    times[staging].append(took)
    finally:
        for io in ios.values():
            io.teardown()
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)
    return {"engine": os.path.dirname(os.path.dirname(os.path.abspath(asyncckpt.__file__))),
            "tensors": len(tensors), "times": times}


def summarise(times: Dict[str, List[float]]) -> Dict[str, float]:
    floor = statistics.median(times["floor"])
    out = {"floor_ms": floor * 1e3}
    for staging in STAGINGS:
        median = statistics.median(times[staging])
        out[f"{staging}_ms"] = median * 1e3
        out[f"{staging}_x_floor"] = median / floor
    return out


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """One line per engine tree: the copy floor, each call, and each call as a multiple of it."""
    lines = [
        f"{'engine':32s} {'tensors':>8s} {'foreach_copy_ ms':>16s} {'eager ms':>9s} {'x copy':>7s} "
        f"{'lazy ms':>8s} {'x copy':>7s} {'lazy/eager':>10s}"
    ]
    for row in rows:
        s = row["summary"]
        lines.append(
            f"{row['engine'][-32:]:32s} {row['tensors']:8d} {s['floor_ms']:16.1f} {s['eager_ms']:9.1f} "
            f"{s['eager_x_floor']:7.2f} {s['lazy_ms']:8.1f} {s['lazy_x_floor']:7.2f} "
            f"{s['lazy_ms'] / s['eager_ms']:10.2f}"
        )
    return "\n".join(lines)


def _child(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    if args.workload:  # a step-time workload's own checkpoint (bench/_workloads.py)
        sys.path.insert(0, REPO_ROOT)
        from bench import _workloads

        build = _workloads.build(args.workload, args.ckpt_mb, 8).checkpoint
    else:
        build = small_tensor_checkpoint(args.tensors, args.bytes)
    result = measure(build, args.saves, staging_threads=args.staging_threads)
    print(json.dumps(result))
    return 0


def _run_child(engine: str, args: argparse.Namespace) -> Dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": engine}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--tensors", str(args.tensors),
           "--bytes", str(args.bytes), "--saves", str(args.saves)]
    if args.staging_threads is not None:
        cmd += ["--staging-threads", str(args.staging_threads)]
    # This file run as a script, from the engine's tree: its asyncckpt is the one imported.
    proc = subprocess.run(cmd, cwd=engine, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child for {engine} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def workload_table(workload: str, ckpt_mb: float, saves: int = 5) -> str:
    """The table for a step-time workload's checkpoint (``python -m bench --workload many``), in
    a fresh process of this tree."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--workload", workload,
           "--ckpt-mb", str(ckpt_mb), "--saves", str(saves)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT},
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return f"(the save-call table failed: {proc.stderr[-2000:]})"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    row = {"engine": result["engine"], "tensors": result["tensors"], "summary": summarise(result["times"])}
    return (
        f"warm save call beside one torch._foreach_copy_ of the same {result['tensors']} tensors into "
        f"preallocated buffers (medians of {saves} saves, one process; python -m bench.many_call for the "
        "1 KB-tensor case)\n" + format_table([row])
    )


def parts(tensors: int, nbytes: int, repeats: int = 15) -> str:
    """Where a warm eager call of this tree goes, step by step, beside the copy floor (medians).

    The steps run one after the other here; in the call, the packed runs are copied on a helper
    thread while the checks run, so the whole ``stage()`` is less than their sum.
    """
    import torch

    from asyncckpt._staging import copier, skeleton, warm
    from asyncckpt._staging.eager import EagerStager
    from asyncckpt._staging.protocol import StagingSlot

    torch.set_num_threads(1)
    build = small_tensor_checkpoint(tensors, nbytes)
    stager, slot = EagerStager(2), StagingSlot(0)
    for step in range(3):
        stager.stage(build(step), slot, "parts")
    cache = slot.warm
    if cache is None or cache.unpacked:
        return "this tree keeps no warm cache, or not one of packed small tensors only"
    found = _tensors_of(build(0))
    buffers = [torch.empty_like(t) for t in found]
    times: Dict[str, List[float]] = {}

    def note(name: str, started: float) -> float:
        now = time.perf_counter()
        times.setdefault(name, []).append(now - started)
        return now

    for step in range(repeats):
        state = build(step)
        with torch.no_grad():
            t = time.perf_counter()
            torch._foreach_copy_(buffers, found)
            t = note("one _foreach_copy_ (the floor)", t)
            skeleton_bytes, staged = skeleton.split_lean(state)
            t = note("pickling pass (split_lean)", t)
            if cache.guards is not None:
                cache.guards.check(*staged)
                t = note("torch's tensor guards", t)
            storages = list(map(warm._storage_of, staged))
            list(map(warm._storage_id, storages))
            t = note("storages and their ids", t)
            if cache.guards is not None:
                warm._same_rest(cache, staged, storages)
                t = note("storage sizes, attributes", t)
            else:
                warm._same(cache, staged, storages)
                t = note("the other checks (_same)", t)
            copier.copy_runs(cache.runs, staged)
            t = note("the copy alone (packed runs)", t)
        del skeleton_bytes, staged, storages
        t = time.perf_counter()
        stager.stage(state, slot, "parts")
        note("the whole warm stage()", t)
    stager.copier.close()
    return "\n".join(f"{name:32s} {statistics.median(v) * 1e3:7.1f} ms" for name, v in times.items())


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.many_call", description=__doc__.split("\n\n")[0])
    p.add_argument("--tensors", type=int, default=20000, help="tensors in the checkpoint (default 20000)")
    p.add_argument("--bytes", type=int, default=1024, help="bytes per parameter tensor (default 1024)")
    p.add_argument("--saves", type=int, default=7, help="measured saves per round (default 7)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each in a fresh process per tree (default 2)")
    p.add_argument("--staging-threads", type=int, default=None, help="AsyncCheckpointIO staging_threads")
    p.add_argument("--compare", nargs="*", default=[], help="other source trees whose asyncckpt to run too")
    p.add_argument("--parts", action="store_true", help="only: where a warm eager call's time goes (this tree)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workload", default=None, help=argparse.SUPPRESS)  # python -m bench --workload many
    p.add_argument("--ckpt-mb", type=float, default=256.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    if args.parts:
        print(parts(args.tensors, args.bytes))
        return 0
    engines = [REPO_ROOT, *[os.path.abspath(e) for e in args.compare]]
    runs: Dict[str, List[Dict[str, Any]]] = {e: [] for e in engines}
    for rnd in range(args.rounds):
        order = engines[rnd % len(engines):] + engines[: rnd % len(engines)]
        for engine in order:
            runs[engine].append(_run_child(engine, args))
            print(f"round {rnd + 1}/{args.rounds}: {engine} done", file=sys.stderr, flush=True)
    rows = []
    for results in runs.values():
        merged = {k: [t for r in results for t in r["times"][k]] for k in results[0]["times"]}
        rows.append({"engine": results[0]["engine"], "tensors": results[0]["tensors"], "summary": summarise(merged)})
    print(f"warm save call, {rows[0]['tensors']} tensors ({args.bytes} B per parameter tensor), medians of "
          f"{args.rounds} rounds x {args.saves} saves; 'x copy': the call / one torch._foreach_copy_ of the "
          "same tensors into preallocated buffers, measured beside it")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
