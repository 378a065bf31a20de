"""Step-time benchmark on a CUDA GPU: what a save costs a GPU training loop, per implementation.

``python -m bench.cuda_step`` (needs a CUDA device; exits with a message without one). One
process, one model: an MLP of square fp32 ``Linear`` layers trained with fused Adam, so the
checkpoint (model + Adam state) is about ``--ckpt-gb``. Each step syncs the GPU (as a loop that
logs its loss does), so a step's wall time includes any wait a save puts on the training stream.
Every implementation runs the same loop, rounds interleaved:

- ``none``: no saves (the baseline).
- ``sync``: asyncckpt's ``TorchCheckpointIO`` on the training thread (Lightning's default path).
- ``lightning``: Lightning's ``AsyncCheckpointIO``.
- ``dcp``: ``torch.distributed.checkpoint.async_save`` (its default stager copies to host memory
  at the call), waiting for the previous save before the next, as its documentation asks.
- ``thread``: asyncckpt, eager staging: device-to-pinned copies on a side stream, queued at the
  call; the training stream waits for them before its next kernels (point in time by stream
  order), so the call returns at once and the copy's cost shows in the next step.
- ``lazy``: asyncckpt, ``staging="lazy"``: the copy runs on a side stream that the training
  stream does not wait for, while the next forward and backward run; the optimizer step waits
  for it.

Columns: blocking ms (median time inside the save call); x floor (blocking / the copy floor: one
device-to-host copy of every tensor into warm pinned buffers); lost % (loop time with saves over
the baseline's); final s (the wait for the last save after the loop, one write, kept apart so
that it does not swamp the loop's figure); next step ms (median time of the step after a save:
a copy the training stream waited for shows here); write ms (the engine's own write time per
save, asyncckpt rows); GPU MB (peak GPU memory above the baseline's); host MB (peak RSS).
Writes ``cuda_step.json`` and ``cuda_step.png`` (step times around a save) into ``--out``.

``--first-save``: what the first saves cost a loop, with and without ``reserve()``. Each of
``thread`` (eager) and ``thread + reserve()`` gets one engine that runs the loop twice: the first
loop holds its first saves (each slot's memory made inside the call, or reserved with
``io.reserve(checkpoint)`` just before the loop, as the Lightning callback does after the first
optimizer step), the second is warm. Columns: lost % of each loop against the baseline's, their
difference in percentage points, and the first save's blocking ms. Writes ``cuda_first_save.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import torch

from ._impls import LABELS, Unavailable, make_saver
from ._measure import RssSampler, state_tensors, tensor_bytes

IMPLS = ("none", "sync", "lightning", "dcp", "thread", "lazy")

#: "cpu" for ``--cpu-dry-run``: the same code on the CPU, to try the script before device time
#: is spent on it (its figures mean nothing).
DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (a dry run: no figure means anything)"


def _empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def build(ckpt_gb: float, width: int, batch: int) -> Dict[str, Any]:
    """Model, optimizer and one training step, sized so that params + Adam state ~ ckpt_gb."""
    params = ckpt_gb * 2**30 / 4 / 3  # fp32, parameter + exp_avg + exp_avg_sq
    layers = max(1, round(params / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6, fused=True)
    x = torch.randn(batch, width, device=DEVICE)

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        optimizer.step()

    step()  # Adam's state exists from here on
    _sync()
    return {"model": model, "optimizer": optimizer, "step": step, "layers": layers}


def checkpoint(run: Dict[str, Any], step: int) -> Dict[str, Any]:
    return {"step": step, "model": run["model"].state_dict(), "optimizer": run["optimizer"].state_dict()}


def copy_floor_seconds(tensors: List[torch.Tensor], repeats: int = 3) -> float:
    """Median time of one device-to-host copy of ``tensors`` into warm pinned buffers."""
    buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=DEVICE == "cuda") for t in tensors]
    times = []
    for _ in range(repeats + 1):
        _sync()
        started = time.perf_counter()
        for dst, src in zip(buffers, tensors, strict=True):
            dst.copy_(src, non_blocking=True)
        _sync()
        times.append(time.perf_counter() - started)
    del buffers
    return statistics.median(times[1:])


def run_once(
    run: Dict[str, Any], impl: str, args: argparse.Namespace, folder: str, saver: Any = None
) -> Dict[str, Any]:
    """One loop of ``args.steps`` steps with a save every ``args.every``; a ``saver`` given is
    used and left open (``--first-save`` runs two loops on one engine), else one is made."""
    owned = saver is None
    if owned:
        saver = None if impl == "none" else make_saver(impl, max_pending=2)
    step = run["step"]
    for _ in range(args.warmup):
        step()
    _sync()
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_seconds, blocking, saved_at = [], [], []
    with RssSampler() as rss:
        started = time.perf_counter()
        for i in range(1, args.steps + 1):
            t0 = time.perf_counter()
            step()
            _sync()  # the loop reads its loss: the step ends when the GPU is done
            if saver is not None and i % args.every == 0:
                s0 = time.perf_counter()
                saver.save(checkpoint(run, i), saver.path_for(folder, str((i // args.every) % 2)))
                blocking.append(time.perf_counter() - s0)
                saved_at.append(i - 1)
            step_seconds.append(time.perf_counter() - t0)
        loop = time.perf_counter() - started
        if saver is not None:
            saver.wait()
        total = time.perf_counter() - started
    peak_gpu = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0
    stats = saver.engine_stats() if saver is not None else []
    if saver is not None and owned:
        saver.close()
    return {
        "loop_seconds": loop,
        "final_wait_seconds": total - loop,
        "total_seconds": total,
        "write_seconds": [x["write_seconds"] for x in stats if "write_seconds" in x],
        "step_seconds": step_seconds,
        "blocking_seconds": blocking,
        "saved_at": saved_at,
        "peak_gpu_bytes": peak_gpu,
        "peak_rss_bytes": rss.peak,
    }


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cuda_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt-gb", type=float, default=2.0, help="checkpoint size (params + Adam state)")
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4096, help="sets the step time (about 75 ms on an H200)")
    parser.add_argument("--steps", type=int, default=135)
    parser.add_argument(
        "--every", type=int, default=45, help="save every N steps; keep the interval longer than one write"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--tmp", default=None, help="folder for checkpoint files (default: system temp)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--first-save", action="store_true",
                        help="the first saves' cost, with and without reserve() (see the module docstring)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the same code on the CPU (try the script before a GPU session; no figures)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = "cpu" if args.cpu_dry_run else "cuda"
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench.cuda_step needs a CUDA device; none is visible here", file=sys.stderr)
        return 2
    if args.first_save:
        return first_save(args)
    impls = ["none", *[i for i in args.impls if i != "none"]]
    torch.backends.cuda.matmul.allow_tf32 = False
    run = build(args.ckpt_gb, args.width, args.batch)
    tensors = state_tensors(checkpoint(run, 0))
    nbytes = tensor_bytes(tensors)
    floor = copy_floor_seconds(tensors)
    del tensors
    print(
        f"{_device_name()}: {run['layers']} x Linear({args.width}), checkpoint "
        f"{nbytes / 2**20:.0f} MB, copy floor (device to pinned host) {floor * 1e3:.1f} ms "
        f"= {nbytes / floor / 1e9:.1f} GB/s; {args.steps} steps, a save every {args.every}, {args.rounds} rounds",
        flush=True,
    )
    results: Dict[str, List[Dict[str, Any]]] = {name: [] for name in impls}
    skipped: Dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="asyncckpt-cuda-bench-") as folder:
        for r in range(args.rounds):
            for impl in impls:
                if impl in skipped:
                    continue
                try:
                    results[impl].append(run_once(run, impl, args, folder))
                except Unavailable as err:
                    skipped[impl] = str(err)
                    continue
                last = results[impl][-1]
                print(f"  round {r + 1} {impl:10s} total {last['total_seconds']:.2f} s", flush=True)
                gc.collect()
                _empty_cache()
    base = results["none"]
    base_loop = statistics.median(x["loop_seconds"] for x in base)
    base_gpu = min(x["peak_gpu_bytes"] for x in base)
    base_step = statistics.median(s for x in base for s in x["step_seconds"])
    rows = []
    header = (
        f"{'implementation':36s} {'blocking ms':>11s} {'x floor':>8s} {'lost %':>7s} {'final s':>7s} "
        f"{'next step ms':>12s} {'write ms':>8s} {'GPU MB':>7s} {'host MB':>8s}"
    )
    print(f"\nstep {base_step * 1e3:.1f} ms without saves\n{header}\n{'-' * len(header)}")
    for impl in impls:
        if impl in skipped or not results[impl]:
            print(f"{LABELS[impl]:36s} skipped: {skipped.get(impl, 'no result')}")
            continue
        runs = results[impl]
        blocking = [b for x in runs for b in x["blocking_seconds"]]
        after = [x["step_seconds"][i + 1] for x in runs for i in x["saved_at"] if i + 1 < len(x["step_seconds"])]
        row = {
            "impl": impl,
            "blocking_ms": statistics.median(blocking) * 1e3 if blocking else 0.0,
            "x_floor": statistics.median(blocking) / floor if blocking else 0.0,
            "lost_pct": (statistics.median(x["loop_seconds"] for x in runs) - base_loop) / base_loop * 100,
            "final_wait_s": statistics.median(x["final_wait_seconds"] for x in runs),
            "write_ms": statistics.median(w for x in runs for w in x["write_seconds"]) * 1e3
            if any(x["write_seconds"] for x in runs)
            else float("nan"),
            "next_step_ms": statistics.median(after) * 1e3 if after else base_step * 1e3,
            "gpu_extra_mb": (max(x["peak_gpu_bytes"] for x in runs) - base_gpu) / 2**20,
            "host_peak_mb": max(x["peak_rss_bytes"] for x in runs) / 2**20,
        }
        rows.append(row)
        print(
            f"{LABELS[impl]:36s} {row['blocking_ms']:11.1f} {row['x_floor']:8.2f} {row['lost_pct']:7.1f} "
            f"{row['final_wait_s']:7.2f} {row['next_step_ms']:12.1f} {row['write_ms']:8.0f} "
            f"{row['gpu_extra_mb']:7.0f} {row['host_peak_mb']:8.0f}"
        )
    by = {row["impl"]: row for row in rows}
    if "lazy" in by:
        print(f"\nlazy blocking = {by['lazy']['x_floor']:.3f}x the copy floor", end="")
        if "thread" in by and by["thread"]["blocking_ms"]:
            print(f", {by['lazy']['blocking_ms'] / by['thread']['blocking_ms']:.3f}x eager's", end="")
        if "dcp" in by and by["dcp"]["blocking_ms"]:
            print(f", {by['lazy']['blocking_ms'] / by['dcp']['blocking_ms']:.3f}x DCP async_save's", end="")
        print()
    os.makedirs(args.out, exist_ok=True)
    summary = {
        "device": _device_name(),
        "torch": torch.__version__,
        "checkpoint_bytes": nbytes,
        "copy_floor_seconds": floor,
        "base_step_seconds": base_step,
        "args": vars(args),
        "rows": rows,
        "skipped": skipped,
        "runs": results,
    }
    with open(os.path.join(args.out, "cuda_step.json"), "w") as f:
        json.dump(summary, f, indent=1)
    _plot(results, args, os.path.join(args.out, "cuda_step.png"))
    return 0


def first_save(args: argparse.Namespace) -> int:
    """``--first-save``: per engine, a loop holding its first saves, then a warm one (docstring)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    run = build(args.ckpt_gb, args.width, args.batch)
    nbytes = tensor_bytes(state_tensors(checkpoint(run, 0)))
    print(f"{_device_name()}: checkpoint {nbytes / 2**20:.0f} MB; {args.steps} steps, "
          f"a save every {args.every}; first loop, then a warm loop, per engine", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="asyncckpt-cuda-first-") as folder:
        base = statistics.median(run_once(run, "none", args, folder)["loop_seconds"] for _ in range(2))
        for reserved in (False, True):
            saver = make_saver("thread", max_pending=2)
            try:
                if reserved:
                    saver.io.reserve(checkpoint(run, 0))  # on a background thread, as the callback does
                first = run_once(run, "thread", args, folder, saver)
                warm = run_once(run, "thread", args, folder, saver)
                stats = saver.engine_stats()
            finally:
                saver.close()
            lost = [(x["loop_seconds"] - base) / base * 100 for x in (first, warm)]
            row = {
                "engine": "thread + reserve()" if reserved else "thread",
                "first_loop_lost_pct": lost[0],
                "warm_loop_lost_pct": lost[1],
                "difference_points": lost[0] - lost[1],
                "first_blocking_ms": first["blocking_seconds"][0] * 1e3,
                "warm_blocking_ms": statistics.median(warm["blocking_seconds"]) * 1e3,
                "stats": stats,
            }
            rows.append(row)
            print(f"  {row['engine']:20s} first loop lost {lost[0]:6.2f} %, warm loop {lost[1]:6.2f} % "
                  f"(difference {row['difference_points']:+.2f} points); first call "
                  f"{row['first_blocking_ms']:.1f} ms, warm calls {row['warm_blocking_ms']:.1f} ms", flush=True)
            gc.collect()
            _empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cuda_first_save.json"), "w") as f:
        json.dump({"device": _device_name(), "torch": torch.__version__, "checkpoint_bytes": nbytes,
                   "base_loop_seconds": base, "args": vars(args), "rows": rows}, f, indent=1)
    return 0


def _plot(results: Dict[str, List[Dict[str, Any]]], args: argparse.Namespace, path: str) -> None:
    """Step times of the last round (staging buffers warm), with the saves marked: whole, and
    zoomed on the baseline's step time, where a copy the training stream waited for shows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    base = statistics.median(results["none"][-1]["step_seconds"]) * 1e3
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, zoom in zip(axes, (False, True), strict=True):
        for impl in ("none", "dcp", "thread", "lazy"):
            if results.get(impl):
                last = results[impl][-1]
                ax.plot(range(1, len(last["step_seconds"]) + 1), [t * 1e3 for t in last["step_seconds"]],
                        label=LABELS[impl], lw=1.2)
        for i in range(args.every, args.steps + 1, args.every):
            ax.axvline(i, color="grey", lw=0.5, ls=":")
        ax.set_xlabel("step (dotted: a save at the end of the step)")
        if zoom:
            ax.set_ylim(0.8 * base, 1.8 * base)
            ax.set_title("zoomed: the step after a save")
        else:
            ax.set_ylabel("step time, ms (save call included)")
            ax.set_title("step times, last round")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def replot(json_path: str, png_path: str) -> None:
    """Redraw the plot from a saved ``cuda_step.json``."""
    with open(json_path) as f:
        data = json.load(f)
    _plot(data["runs"], argparse.Namespace(**data["args"]), png_path)


if __name__ == "__main__":
    sys.exit(main())
