"""Object-storage row: saving checkpoints to a local S3 server (moto's, in its own process).

    python -m bench --s3                 # the step-time bench, then this row (3 rounds, 64 MB)
    python -m bench.object_storage --rounds 5 --ckpt-mb 128

Each round, interleaved and rotated, saves the same checkpoint (``--ckpt-mb`` of float32
tensors plus a small dict) to ``s3://bench/...`` with:

    s3fs alone        ``fs.pipe_file`` of the bytes ``torch.save`` makes of the checkpoint (the
                      serialization is done before the clock starts): what s3fs achieves for
                      these bytes on its own, the upload-throughput reference (one PutObject
                      below 100 MiB, s3fs's 50 MiB multipart above)
    s3fs multipart    the same with ``chunksize=16 MiB``: a multipart upload with asyncckpt's
                      part size, so the server does the same work per byte as for asyncckpt
    lightning sync    Lightning's ``TorchCheckpointIO`` (fsspec; ``torch.save`` into memory, then
                      one write): blocks for the whole save
    asyncckpt sync    ``asyncckpt.TorchCheckpointIO`` alone: ``torch.save`` streams into a
                      multipart upload
    asyncckpt async   ``AsyncCheckpointIO(TorchCheckpointIO())``, thread writer: the call
                      returns after staging; durable once ``flush()`` returns

Columns: ``blocking ms`` (the call, median), ``durable ms`` (until the object is complete on the
server, median), ``MB/s`` (file bytes / durable time), ``x s3fs`` and ``x mp`` (that throughput
over ``s3fs alone``'s and over ``s3fs alone, 16 MiB parts``'s; medians of the rounds). The server
is a real HTTP server on 127.0.0.1; moto keeps objects in Python memory and is CPU-bound, so
absolute figures say little about S3.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

IMPLS = ("s3fs", "s3fs_multipart", "lightning_sync", "asyncckpt_sync", "asyncckpt_async")
LABELS = {
    "s3fs": "s3fs alone (bytes only)",
    "s3fs_multipart": "s3fs alone, 16 MiB parts",
    "lightning_sync": "Lightning TorchCheckpointIO",
    "asyncckpt_sync": "asyncckpt TorchCheckpointIO",
    "asyncckpt_async": "asyncckpt AsyncCheckpointIO",
}
ACCESS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> "tuple[subprocess.Popen, str]":
    """moto's S3 server in a process of its own, so it does not share this process's GIL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto's S3 server did not start within 60 s (is moto[server] installed?)")


def _checkpoint(mb: float) -> Dict[str, Any]:
    import torch

    torch.manual_seed(0)
    n = int(mb * 1e6 / 4)
    layers = 8
    return {"state_dict": {f"layer{i}.weight": torch.randn(n // layers) for i in range(layers)},
            "global_step": 100, "meta": {"lr": 0.1}}


def _median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(rounds: int = 3, ckpt_mb: float = 64.0) -> Dict[str, Any]:
    """Measure every implementation ``rounds`` times, interleaved; returns the raw figures."""
    import s3fs
    import torch

    import asyncckpt

    torch.set_num_threads(1)
    proc, endpoint = start_server()
    saved_env = {k: os.environ.get(k) for k in (*ACCESS, "AWS_ENDPOINT_URL")}
    os.environ.update(ACCESS, AWS_ENDPOINT_URL=endpoint)
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        ckpt = _checkpoint(ckpt_mb)
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        data = buf.getvalue()
        from lightning.fabric.plugins import TorchCheckpointIO as LightningIO

        ours_sync = asyncckpt.TorchCheckpointIO()
        ours_async = asyncckpt.AsyncCheckpointIO(asyncckpt.TorchCheckpointIO(), handle_sigterm=False)
        lightning_io = LightningIO()

        def timed(save: Callable[[], None], finish: Optional[Callable[[], None]] = None) -> Dict[str, float]:
            started = time.perf_counter()
            save()
            blocking = time.perf_counter() - started
            if finish is not None:
                finish()
            return {"blocking": blocking, "durable": time.perf_counter() - started}

        runs: Dict[str, Callable[[str], Dict[str, float]]] = {
            "s3fs": lambda key: timed(lambda: fs.pipe_file(f"bench/{key}", data)),
            "s3fs_multipart": lambda key: timed(lambda: fs.pipe_file(f"bench/{key}", data, chunksize=16 << 20)),
            "lightning_sync": lambda key: timed(lambda: lightning_io.save_checkpoint(ckpt, f"s3://bench/{key}")),
            "asyncckpt_sync": lambda key: timed(lambda: ours_sync.save_checkpoint(ckpt, f"s3://bench/{key}")),
            "asyncckpt_async": lambda key: timed(lambda: ours_async.save_checkpoint(ckpt, f"s3://bench/{key}"),
                                                 ours_async.flush),
        }
        for name in IMPLS:  # warm-up: imports, connections, first staging allocation
            runs[name](f"warmup-{name}")
        results: Dict[str, List[Dict[str, float]]] = {name: [] for name in IMPLS}
        for rnd in range(rounds):
            order = IMPLS[rnd % len(IMPLS):] + IMPLS[: rnd % len(IMPLS)]
            for name in order:
                results[name].append(runs[name](f"{name}-{rnd}.ckpt"))
                fs.rm(f"bench/{name}-{rnd}.ckpt")  # moto keeps objects in memory
        ours_async.teardown()
        size = len(data)
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
    summary = {}
    for name in IMPLS:
        durable = _median([r["durable"] for r in results[name]])
        summary[name] = {
            "blocking_ms": _median([r["blocking"] for r in results[name]]) * 1e3,
            "durable_ms": durable * 1e3,
            "mb_per_s": size / 1e6 / durable,
        }
    reference = summary["s3fs"]["mb_per_s"]
    for name in IMPLS:
        summary[name]["x_s3fs"] = summary[name]["mb_per_s"] / reference
        summary[name]["x_s3fs_multipart"] = summary[name]["mb_per_s"] / summary["s3fs_multipart"]["mb_per_s"]
    return {"rounds": rounds, "ckpt_mb": ckpt_mb, "file_bytes": size, "summary": summary, "runs": results}


def format_table(result: Dict[str, Any]) -> str:
    lines = [
        f"object storage (moto S3 server on 127.0.0.1), {result['file_bytes'] / 1e6:.0f} MB file, "
        f"medians of {result['rounds']} rounds",
        f"{'implementation':32} {'blocking ms':>12} {'durable ms':>11} {'MB/s':>7} {'x s3fs':>7} {'x mp':>6}",
    ]
    for name in IMPLS:
        row = result["summary"][name]
        lines.append(f"{LABELS[name]:32} {row['blocking_ms']:12.0f} {row['durable_ms']:11.0f} "
                     f"{row['mb_per_s']:7.0f} {row['x_s3fs']:7.2f} {row['x_s3fs_multipart']:6.2f}")
    ours = result["summary"]["asyncckpt_sync"]
    for ratio, against in ((ours["x_s3fs"], "s3fs alone"), (ours["x_s3fs_multipart"], "s3fs alone, 16 MiB parts")):
        lines.append(f"{'PASS' if ratio >= 0.8 else 'MISS'} upload throughput >= 0.8 x {against}: {ratio:.2f} "
                     "(asyncckpt's save, serialization included, vs s3fs writing bytes already serialized)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.object_storage", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ckpt-mb", type=float, default=64.0)
    args = p.parse_args(argv)
    print(format_table(run(args.rounds, args.ckpt_mb)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
