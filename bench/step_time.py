"""Step-time benchmark: what checkpointing costs a CPU training loop, per implementation.

    python -m bench                      # short default: 1 thread, compute workload, 3 rounds
    python -m bench --full               # 1 and 2 threads, compute and Python-heavy, 5 rounds
    python -m bench --s3                 # also the object-storage row (local S3 server; --s3-only: just it)
    python -m bench --rounds 5 --ckpt-mb 64 --threads 1 2 --workload compute python \\
        --impls none sync thread --out bench/results

A small model trains for ``--steps`` steps and saves a checkpoint every ``--every`` steps (never
after the last step, so the run does not just wait on the last write); the final flush is part
of the measured time. Each (round, implementation) runs in a fresh subprocess
(:mod:`bench._child`), in round-robin order rotated every round, and the figures are medians of
the rounds (each implementation's median run against the baseline's median run), so short
bursts of load from neighbours on a shared machine do not decide the result.

Columns:
    blocking ms      median time a save call held the training thread
    x floor          blocking / copy floor (copy of the tensors into warm preallocated buffers)
    lost %           (loop with saves + final flush - loop without saves) / loop without * 100,
                     median run of each
    best %           the same from the fastest run of each: on a shared machine, bursts of load
                     from neighbours only ever add time, so this is the figure least touched by them
    peak RSS +MB     peak memory over the baseline run's peak (x ckpt: as a multiple of the
                     checkpoint's tensor bytes)

Targets (checked here, not by the tests) are printed as PASS/MISS lines; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

from ._impls import IMPLS, LABELS, OURS
from ._workloads import WORKLOADS
from .sharded import IMPLS as SHARDED_IMPLS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "bench", "results")
BATCH = {"compute": 16, "python": 8, "many": 8}
CHILD_TIMEOUT_S = 900


# -- configuration ----------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sharded", action="store_true",
                   help="only the sharded configuration: 2 CPU ranks, FSDP2, DCP vs asyncckpt (bench/sharded.py)")
    p.add_argument("--sharded-impls", nargs="+", default=None,
                   choices=[name for name in SHARDED_IMPLS if name != "none"],
                   help="sharded implementations to run (default all; 'none' is always added)")
    p.add_argument("--full", action="store_true", help="1 and 2 threads, both workloads, 5 rounds, 40 steps")
    p.add_argument("--rounds", type=int, help="rounds of every implementation (default 3; --full 5)")
    p.add_argument("--ckpt-mb", type=float, default=256.0, help="checkpoint tensor size in MB (default 256)")
    p.add_argument("--threads", type=int, nargs="+", help="intra-op thread counts (default 1; --full 1 2)")
    p.add_argument("--workload", nargs="+", choices=WORKLOADS, help="default compute; --full all three")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="implementations to run")
    p.add_argument("--steps", type=int, help="measured steps per run (default 16; --full 40)")
    p.add_argument("--every", type=int, help="save every N steps (default 4; --full 10)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps before the loop")
    p.add_argument("--max-pending", type=int, default=2, help="asyncckpt max_pending (default 2)")
    p.add_argument("--copy-repeats", type=int, default=3, help="repeats of the copy-floor measurement")
    p.add_argument("--tmp", default=None, help="folder for checkpoint files (default: system temp, real disk)")
    p.add_argument("--out", default=DEFAULT_OUT, help="where the JSON and PNG go (default bench/results/)")
    p.add_argument("--lightning-rounds", type=int, default=3,
                   help="rounds of the Lightning fit run (sync, Lightning async, asyncckpt); 0 skips it")
    p.add_argument("--s3", action="store_true",
                   help="also the object-storage row: saves to a local S3 server (moto), see bench/object_storage.py")
    p.add_argument("--s3-only", action="store_true", help="only the object-storage row")
    p.add_argument("--s3-rounds", type=int, default=3, help="rounds of the object-storage row (default 3)")
    p.add_argument("--s3-ckpt-mb", type=float, default=64.0, help="checkpoint size of the object-storage row (MB)")
    p.add_argument("--durable-rounds", type=int, default=2,
                   help="rounds of the time-to-durable table (bench/durable.py); 0 skips it")
    p.add_argument("--durable-mb", type=float, default=256.0,
                   help="checkpoint size of the time-to-durable table in MB (issue 23 measured 1024 on tmpfs)")
    p.add_argument("--durable-only", action="store_true", help="only the time-to-durable table")
    args = p.parse_args(argv)
    full = args.full
    args.rounds = args.rounds or (5 if full else 3)
    args.threads = args.threads or ([1, 2] if full else [1])
    args.workload = args.workload or (list(WORKLOADS) if full else ["compute"])
    args.steps = args.steps or (40 if full else 16)
    args.every = args.every or (10 if full else 4)
    if "none" not in args.impls:
        args.impls = ["none", *args.impls]  # lost time and memory are measured against it
    return args


def child_config(args: argparse.Namespace, impl: str, workload: str, threads: int, rnd: int) -> Dict[str, Any]:
    return {
        "impl": impl,
        "workload": workload,
        "threads": threads,
        "round": rnd,
        "ckpt_mb": args.ckpt_mb,
        "batch": BATCH[workload],
        "steps": args.steps,
        "every": args.every,
        "warmup": args.warmup,
        "max_pending": args.max_pending,
        "copy_repeats": args.copy_repeats,
    }


# -- running ----------------------------------------------------------------------------------


def run_child(config: Dict[str, Any], tmp_root: Optional[str]) -> Dict[str, Any]:
    """Run one (round, implementation) in a fresh interpreter; always removes its checkpoints."""
    folder = tempfile.mkdtemp(prefix="asyncckpt-bench-", dir=tmp_root)
    config = {**config, "folder": folder, "result_path": os.path.join(folder, "result.json")}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench._child", json.dumps(config)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
        )
        if proc.returncode != 0 or not os.path.exists(config["result_path"]):
            tail = (proc.stderr or proc.stdout)[-2000:]
            return {**config, "available": False, "reason": f"run failed (exit {proc.returncode}): {tail}"}
        with open(config["result_path"], encoding="utf-8") as f:
            return json.load(f)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def rotated(items: Sequence[str], rnd: int) -> List[str]:
    k = rnd % len(items)
    return list(items[k:]) + list(items[:k])


def run_rounds(args: argparse.Namespace, workload: str, threads: int) -> List[Dict[str, Any]]:
    """All rounds of one (workload, threads) configuration, implementations interleaved."""
    results = []
    for rnd in range(args.rounds):
        for impl in rotated(args.impls, rnd):
            started = time.perf_counter()
            result = run_child(child_config(args, impl, workload, threads, rnd), args.tmp)
            results.append(result)
            note = "" if result["available"] else f"  unavailable: {result['reason'][:100]}"
            print(
                f"  round {rnd + 1}/{args.rounds} {impl:9s} loop {result.get('total_seconds', 0):6.2f}s "
                f"(run {time.perf_counter() - started:4.1f}s){note}",
                file=sys.stderr,
                flush=True,
            )
    return results


# -- summarising ------------------------------------------------------------------------------


@dataclass
class ImplSummary:
    """Medians over rounds for one implementation in one configuration."""

    impl: str
    available: bool
    reason: str = ""
    blocking_ms: float = float("nan")
    blocking_x_floor: float = float("nan")
    lost_pct: float = float("nan")
    best_lost_pct: float = float("nan")
    peak_over_mb: float = float("nan")
    peak_over_x_ckpt: float = float("nan")
    rounds: int = 0


def _median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise_impl(impl: str, runs: List[Dict[str, Any]], baseline: List[Dict[str, Any]]) -> ImplSummary:
    """Medians over rounds, compared with the median baseline run.

    Medians of each side (not per-round pairs): on a shared machine the noise comes in bursts,
    and a burst during one round's baseline would otherwise skew every implementation of that
    round. Blocking time is compared with the copy floor measured in the same process.
    """
    ok = [r for r in runs if r["available"]]
    if not ok or not baseline:
        reason = runs[0]["reason"] if runs else "not run"
        return ImplSummary(impl, available=False, reason=reason or "no baseline run")
    base_total = _median([r["total_seconds"] for r in baseline])
    base_best = min(r["total_seconds"] for r in baseline)
    base_peak = _median([r["peak_rss_bytes"] for r in baseline])
    saving = [r for r in ok if r["blocking_seconds"]]
    blocking = [statistics.median(r["blocking_seconds"]) for r in saving]
    blocking_x = [statistics.median(r["blocking_seconds"]) / r["copy_floor_seconds"] for r in saving]
    over = _median([r["peak_rss_bytes"] for r in ok]) - base_peak
    return ImplSummary(
        impl,
        available=True,
        blocking_ms=_median(blocking) * 1e3,
        blocking_x_floor=_median(blocking_x),
        lost_pct=(_median([r["total_seconds"] for r in ok]) - base_total) / base_total * 100,
        best_lost_pct=(min(r["total_seconds"] for r in ok) - base_best) / base_best * 100,
        peak_over_mb=over / 1e6,
        peak_over_x_ckpt=over / ok[0]["ckpt_bytes"],
        rounds=len(ok),
    )


def summarise(results: List[Dict[str, Any]], impls: Sequence[str]) -> Dict[str, Any]:
    baseline = [r for r in results if r["impl"] == "none" and r["available"]]
    per_impl = {impl: summarise_impl(impl, [r for r in results if r["impl"] == impl], baseline) for impl in impls}
    ok = [r for r in results if r["available"]]
    base_steps = [s for r in baseline for s in r["step_seconds"]]
    return {
        "impls": per_impl,
        "ckpt_mb": ok[0]["ckpt_bytes"] / 1e6 if ok else float("nan"),
        "copy_floor_ms": _median([r["copy_floor_seconds"] for r in ok]) * 1e3,
        "step_ms": _median(base_steps) * 1e3,
    }


# -- reporting --------------------------------------------------------------------------------


def _fmt(value: float, spec: str) -> str:
    return "-" if value != value else format(value, spec)  # NaN -> "-"


def format_table(summary: Dict[str, Any]) -> str:
    header = (
        f"{'implementation':36s} {'blocking ms':>11s} {'x floor':>8s} {'lost %':>8s} {'best %':>7s} "
        f"{'peak RSS +MB':>13s} {'x ckpt':>7s}"
    )
    lines = [header, "-" * len(header)]
    for s in summary["impls"].values():
        label = LABELS[s.impl]
        if not s.available:
            lines.append(f"{label:36s} not available: {s.reason[:120]}")
            continue
        if s.impl == "none":
            lines.append(f"{label:36s} {'-':>11s} {'-':>8s} {'0.0':>8s} {'0.0':>7s} {'0':>13s} {'-':>7s}")
            continue
        lines.append(
            f"{label:36s} {_fmt(s.blocking_ms, '.0f'):>11s} {_fmt(s.blocking_x_floor, '.2f'):>8s} "
            f"{_fmt(s.lost_pct, '.1f'):>8s} {_fmt(s.best_lost_pct, '.1f'):>7s} "
            f"{_fmt(s.peak_over_mb, '.0f'):>13s} {_fmt(s.peak_over_x_ckpt, '.2f'):>7s}"
        )
    return "\n".join(lines)


def ratio_lines(summary: Dict[str, Any]) -> List[str]:
    """Our lost time as a fraction of each peer's, measured side by side."""
    impls = summary["impls"]
    lines = []
    for ours in OURS:
        mine = impls.get(ours)
        if mine is None or not mine.available:
            continue
        for peer in ("lightning", "dcp"):
            other = impls.get(peer)
            if other is None or not other.available:
                continue
            if mine.lost_pct <= 0 < other.lost_pct:
                lines.append(
                    f"{LABELS[ours]} lost {mine.lost_pct:.1f}% (within the noise of the baseline); "
                    f"{LABELS[peer]} lost {other.lost_pct:.1f}%"
                )
            elif other.lost_pct > 0:
                best = ""
                if other.best_lost_pct > 0:
                    best = f"; best rounds: {mine.best_lost_pct / other.best_lost_pct:.2f}x"
                lines.append(
                    f"{LABELS[ours]} lost {mine.lost_pct:.1f}% = {mine.lost_pct / other.lost_pct:.2f}x "
                    f"{LABELS[peer]}'s ({other.lost_pct:.1f}%){best}"
                )
            else:
                lines.append(
                    f"{LABELS[ours]} lost {mine.lost_pct:.1f}%; {LABELS[peer]} lost {other.lost_pct:.1f}% "
                    "(no ratio: the peer lost nothing measurable)"
                )
    return lines


def engine_lines(results: List[Dict[str, Any]]) -> List[str]:
    """Where our blocking time goes, from the engine's own per-save stats (medians over saves)."""
    lines = []
    for ours in OURS:
        stats = [st for r in results if r["impl"] == ours for st in r.get("engine_stats", [])]
        if not stats:
            continue
        parts = []
        for key, name in (("wait_seconds", "waiting for a slot"), ("staging_seconds", "staging"),
                          ("write_seconds", "background write")):
            values = [st[key] for st in stats if key in st]
            if values:
                parts.append(f"{name} {statistics.median(values) * 1e3:.0f} ms")
        lines.append(f"{LABELS[ours]} per save (engine stats, median of {len(stats)}): {', '.join(parts)}")
    return lines


def position_lines(results: List[Dict[str, Any]], impls: Sequence[str]) -> List[str]:
    """Blocking time by save number (median over rounds): the first saves of a run allocate
    staging memory (page faults), later ones reuse it, so the median of a short run can be a cold
    save; this line shows the steady state next to it."""
    lines = []
    for impl in impls:
        runs = [r["blocking_seconds"] for r in results if r["impl"] == impl and r.get("blocking_seconds")]
        if not runs:
            continue
        by_save = [_median([b[i] for b in runs if len(b) > i]) * 1e3 for i in range(max(len(b) for b in runs))]
        lines.append(f"{LABELS[impl]}: blocking by save: {', '.join(f'{ms:.0f}' for ms in by_save)} ms")
    return lines


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def target_lines(summary: Dict[str, Any], workload: str, max_pending: int) -> List[str]:
    """The product's speed targets, evaluated on this run's medians."""
    impls = summary["impls"]
    lines = []
    for ours in OURS:
        mine = impls.get(ours)
        if mine is None:
            continue
        if not mine.available:
            lines.append(f"SKIP {LABELS[ours]}: not available ({mine.reason[:100]})")
            continue
        most = 0.1 if ours == "lazy" else 1.3
        if ours != "lazy" or workload == "compute":  # lazy's 0.1x is a target for large tensors
            lines.append(
                f"{_verdict(mine.blocking_x_floor <= most)} {LABELS[ours]}: blocking "
                f"{mine.blocking_x_floor:.2f}x copy floor (target <= {most}x)"
            )
        for peer in ("lightning", "dcp"):
            other = impls.get(peer)
            if other is None or not other.available:
                continue
            ok = mine.lost_pct <= other.lost_pct / 3
            verdict = _verdict(ok) if other.lost_pct > 0 else "N/A "  # a ratio to noise says nothing
            lines.append(
                f"{verdict} {LABELS[ours]}: lost {mine.lost_pct:.1f}% vs {LABELS[peer]} {other.lost_pct:.1f}% "
                "(target <= 1/3 of it)"
            )
        limit = max_pending * 1.1
        lines.append(
            f"{_verdict(mine.peak_over_x_ckpt <= limit)} {LABELS[ours]}: peak RSS +{mine.peak_over_x_ckpt:.2f}x ckpt "
            f"(target <= {max_pending} x ckpt + 10% = {limit:.2f}x)"
        )
    thread, process, lazy = impls.get("thread"), impls.get("process"), impls.get("lazy")
    if thread is not None and lazy is not None and thread.available and lazy.available and workload == "compute":
        lines.append(
            f"{_verdict(lazy.lost_pct <= thread.lost_pct / 2)} lazy staging lost {lazy.lost_pct:.1f}% vs "
            f"eager thread writer {thread.lost_pct:.1f}% (target <= 1/2 of it)"
        )
    if workload == "many" and thread is not None and process is not None and thread.available and process.available:
        lines.append(
            f"{_verdict(process.lost_pct <= thread.lost_pct / 2)} many tensors: process writer lost "
            f"{process.lost_pct:.1f}% vs thread writer {thread.lost_pct:.1f}% (target <= 1/2 of it)"
        )
    if workload == "python" and thread is not None and process is not None:
        if thread.available and process.available:
            lines.append(
                f"{_verdict(process.lost_pct < thread.lost_pct)} Python-heavy: process writer lost "
                f"{process.lost_pct:.1f}% vs thread writer {thread.lost_pct:.1f}% (target: less)"
            )
        else:
            lines.append("SKIP Python-heavy process vs thread: process writer not available")
    return lines


def median_round(results: List[Dict[str, Any]], impl: str) -> Optional[Dict[str, Any]]:
    """The run of ``impl`` whose total time is the median of its rounds (for the plot)."""
    runs = sorted((r for r in results if r["impl"] == impl and r["available"]), key=lambda r: r["total_seconds"])
    return runs[(len(runs) - 1) // 2] if runs else None


def plot(results: List[Dict[str, Any]], impls: Sequence[str], title: str, path: str) -> None:
    """Step time across the run, one line per implementation (its median round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for impl in impls:
        run = median_round(results, impl)
        if run is None:
            continue
        steps = range(1, len(run["step_seconds"]) + 1)
        ax.plot(steps, [s * 1e3 for s in run["step_seconds"]], marker=".", label=LABELS[impl])
        for s in run["save_steps"]:
            ax.axvline(s, color="grey", linewidth=0.5, linestyle=":")
    ax.set_xlabel("step (dotted lines: checkpoint saved after this step)")
    ax.set_ylabel("step time (ms), save call included")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------


def run_configuration(args: argparse.Namespace, workload: str, threads: int) -> Dict[str, Any]:
    title = f"workload={workload}, intra-op threads={threads}, checkpoint {args.ckpt_mb:g} MB, every {args.every} steps"
    print(f"\n== {title}, {args.rounds} rounds", file=sys.stderr, flush=True)
    results = run_rounds(args, workload, threads)
    summary = summarise(results, args.impls)
    print(f"\n## {title}")
    print(
        f"checkpoint {summary['ckpt_mb']:.0f} MB of tensors; copy floor {summary['copy_floor_ms']:.0f} ms; "
        f"step {summary['step_ms']:.0f} ms (baseline median); {args.steps} steps, saves after steps "
        f"{', '.join(str(s) for s in range(args.every, args.steps, args.every))}; medians of {args.rounds} rounds"
    )
    print(format_table(summary))
    extra = position_lines(results, args.impls) + engine_lines(results) + ratio_lines(summary)
    for line in extra + target_lines(summary, workload, args.max_pending):
        print(line)
    if workload == "many":  # the call itself, beside one batched copy of the same tensors
        from .many_call import workload_table

        print(workload_table(workload, args.ckpt_mb))
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, f"step_time_{workload}_{threads}t.png")
    plot(results, args.impls, title, png)
    print(f"plot: {png}")
    if "lazy" in args.impls and "thread" in args.impls:
        png = os.path.join(args.out, f"step_time_{workload}_{threads}t_eager_vs_lazy.png")
        plot(results, ["none", "thread", "lazy"], f"eager vs lazy staging: {title}", png)
        print(f"plot: {png}")
    summary_json = {**summary, "impls": {k: asdict(v) for k, v in summary["impls"].items()}}
    return {"workload": workload, "threads": threads, "summary": summary_json, "runs": results}


def engine_version() -> Dict[str, Any]:
    """The commit measured, and whether asyncckpt/ had uncommitted changes (it moves fast)."""

    def git(*cmd: str) -> str:
        try:
            out = subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "asyncckpt_dirty": bool(git("status", "--porcelain", "asyncckpt"))}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.sharded:
        from .sharded import run_sharded

        run_sharded(args)
        return 0
    started = time.perf_counter()
    configurations = []
    if args.s3_only:
        args.workload, args.lightning_rounds, args.s3, args.durable_rounds = [], 0, True, 0
    if args.durable_only:
        args.workload, args.lightning_rounds, args.s3 = [], 0, False
        args.durable_rounds = args.durable_rounds or 2
    for workload in args.workload:
        for threads in args.threads:
            configurations.append(run_configuration(args, workload, threads))
    lightning = None
    if args.lightning_rounds > 0:
        from .lightning_fit import format_table, run_lightning_bench

        print("\n## Lightning fit: the sync default vs Lightning AsyncCheckpointIO vs asyncckpt")
        lightning = run_lightning_bench(rounds=args.lightning_rounds)
        print(format_table(lightning))
    object_storage = None
    if args.s3:
        from . import object_storage as s3_bench

        print("\n## Object storage: saves to a local S3 server")
        object_storage = s3_bench.run(rounds=args.s3_rounds, ckpt_mb=args.s3_ckpt_mb)
        print(s3_bench.format_table(object_storage))
    durable = None
    if args.durable_rounds > 0:
        from . import durable as durable_bench

        print("\n## Time to durable: from the call until the checkpoint is safe, against the write floor")
        durable = durable_bench.run(args.durable_mb, args.durable_rounds, durable_bench.default_folders(args.tmp),
                                    durable_bench.DEFAULT_IMPLS)
        print(durable_bench.format_table(durable, args.durable_mb))
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "args": vars(args),
        "engine": engine_version(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "configurations": configurations,
        "lightning_fit": lightning,
        "object_storage": object_storage,
        "time_to_durable": durable,
        "wall_seconds": time.perf_counter() - started,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "object_storage.json" if args.s3_only else "step_time.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"\nraw results: {path}; total {report['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
