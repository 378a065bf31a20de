"""Contract line 4 under real SIGKILL: a committed checkpoint is never lost, a target path never
holds a partial file, and crash leftovers are recognisable temp files that get cleaned.

A fresh process (forked from a fork server that imported torch once, see tests/_children/_crash_child.py)
saves a deterministic checkpoint per step in a loop through ``AsyncCheckpointIO``; it is killed
with SIGKILL, together with its writer process, at a random moment: a random time, or just after
it reports entering a phase (staging, writing the temp file, fsync + rename) plus a random
jitter. After every kill the folder is checked against what the process had reported committed.

``python -m pytest tests/writers/test_crash.py -s`` prints the figures recorded in docs/reliability.md.
``ASYNCCKPT_CRASH_KILLS`` (default 30) sets the kills per writer, ``ASYNCCKPT_CRASH_SEED`` the seed.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import random
import re
import signal
import subprocess
import threading
import time
from typing import Dict, List, Tuple

import _crash_child
import pytest
import torch

from _subproc import start_python
from asyncckpt import cleanup_temp_files
from asyncckpt.integrity import verify_file
from asyncckpt.storage import is_temp_file

KILLS = int(os.environ.get("ASYNCCKPT_CRASH_KILLS", "30"))
SEED = int(os.environ.get("ASYNCCKPT_CRASH_SEED", str(int(time.time()) % 100000)))
# one kill in four at a random time; the others just after a phase marker, plus a random jitter
TARGETS = ["time", "stage", "write", "sync"]


class Zygote:
    """The fork server: one ``run`` per kill, each a fresh process."""

    def __init__(self) -> None:
        self.proc = start_python("import _crash_child; _crash_child.zygote()", stdin=subprocess.PIPE, stderr=None)
        self.lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.next_line(120) == "zygote ready"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def next_line(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the fork server said nothing for {timeout}s") from None

    def start(self, **args) -> int:
        self.proc.stdin.write(json.dumps(args) + "\n")
        self.proc.stdin.flush()
        line = self.next_line(60)
        assert line.startswith("pid "), line
        return int(line.split()[1])

    def wait_exit(self, pid: int) -> int:
        line = self.next_line(60)
        assert line.startswith(f"exit {pid} "), line
        return int(line.split()[2])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def read_log(path: str) -> List[List[str]]:
    try:
        with open(path) as f:
            return [line.split() for line in f.read().splitlines() if line]
    except FileNotFoundError:
        return []


def wait_for(path: str, predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate(read_log(path)):
            return True
        time.sleep(0.0005)
    return False


def phase_at_kill(log: List[List[str]]) -> Tuple[str, str]:
    """(training thread, writer) states from the last markers before the kill."""
    main, writer = "running", "idle"
    for fields in log:
        if fields[0] in ("stage", "staged"):
            main = "staging" if fields[0] == "stage" else "running"
        elif fields[0] in ("write", "sync", "commit"):
            writer = {"write": "writing", "sync": "fsync+rename", "commit": "idle"}[fields[0]]
    return main, writer


def check_folder(folder: str, log: List[List[str]], failures: List[str]) -> Dict[str, int]:
    """Every committed save is there and exact; every file at a target path is complete."""
    committed = [(f[1], int(f[2])) for f in log if f[0] == "commit"]
    staged = [int(f[1]) for f in log if f[0] in ("stage", "ready")]
    counts = collections.Counter()
    files = {}
    for name in sorted(os.listdir(folder)):
        if is_temp_file(name):
            counts["temp files"] += 1
            continue
        if name.endswith(".sha256") or name.endswith(".log"):
            continue
        match = re.fullmatch(r"step-(\d+)\.ckpt|last\.ckpt", name)
        if not match:
            failures.append(f"unexpected file {name!r}")
            continue
        path = os.path.join(folder, name)
        counts["files at target paths"] += 1
        try:
            verify_file(path)  # CRC32 of every record, or the checksum record
            obj = torch.load(path, weights_only=True)
        except Exception as err:  # noqa: BLE001 - every failure is collected and reported
            failures.append(f"{name}: partial or unreadable: {type(err).__name__}: {err}")
            counts["partial"] += 1
            continue
        files[name] = obj["step"]
        want = int(match.group(1)) if match.group(1) else obj["step"]
        if not _crash_child.matches(obj, want):
            failures.append(f"{name}: holds a mixed or wrong checkpoint (step field {obj['step']})")
            counts["partial"] += 1
    for name, step in committed:
        counts["committed saves checked"] += 1
        if name == "last.ckpt":
            newest = max(s for n, s in committed if n == name)
            ok = name in files and newest <= files[name] <= max(staged)
        else:
            ok = files.get(name) == step
        if not ok:
            counts["lost"] += 1
            failures.append(f"committed {name} (step {step}) lost: folder has {files.get(name)!r}")
    return counts


@pytest.mark.slow
@pytest.mark.timeout(600)
# The process writer's runs (a writer process started in each) split in two sequences of kills
# that run side by side under pytest -n: together the same KILLS runs, each its own folder.
@pytest.mark.parametrize("writer,part,parts", [("thread", 0, 1), ("process", 0, 2), ("process", 1, 2)])
def test_sigkill_at_random_moments_loses_no_committed_checkpoint(tmp_path, writer, part, parts):
    rng = random.Random(f"{SEED}-{writer}" + (f"-{part}" if parts > 1 else ""))
    folder = tmp_path / "ckpts"
    folder.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    zygote = Zygote()
    totals: collections.Counter = collections.Counter()
    phases: collections.Counter = collections.Counter()
    failures: List[str] = []
    previous_temps: List[str] = []
    started = time.monotonic()
    try:
        # Kill target and checksum mode follow the place in this part's sequence, so each folder
        # sees them alternate from run to run as one whole sequence does.
        for place, run in enumerate(range(part, KILLS, parts)):
            log_path = str(logs / f"run-{run}.log")
            pid = zygote.start(
                folder=str(folder), writer=writer, first_step=run * 1000, checksum=place % 2 == 1, log=log_path
            )
            assert wait_for(log_path, lambda log: any(f[0] == "ready" for f in log), 120), read_log(log_path)
            # The run's first save swept the folder: the temp files earlier kills left are gone.
            swept = [t for t in previous_temps if not os.path.exists(t)]
            totals["temp files removed by the next run"] += len(swept)
            if len(swept) != len(previous_temps):
                failures.append(f"run {run}: the sweep left {sorted(set(previous_temps) - set(swept))}")
            target = TARGETS[place % len(TARGETS)]
            if target == "time":
                time.sleep(rng.uniform(0.0, 0.5))
            else:
                nth = rng.randint(1, 5)
                wait_for(log_path, lambda log, t=target, n=nth: sum(f[0] == t for f in log) >= n, 20)
                time.sleep(rng.uniform(0.0, 0.004))
            os.killpg(pid, signal.SIGKILL)
            status = zygote.wait_exit(pid)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
            log = read_log(log_path)
            main, writer_state = phase_at_kill(log)
            phases[f"training thread {main}"] += 1
            phases[f"writer {writer_state}"] += 1
            totals.update(check_folder(str(folder), log, failures))
            previous_temps = [str(folder / n) for n in os.listdir(folder) if is_temp_file(n)]
            for name in os.listdir(folder):  # keep the disk small; last.ckpt carries on
                if name.startswith("step-"):
                    os.unlink(folder / name)
    finally:
        zygote.close()
    removed = cleanup_temp_files(str(folder))
    totals["temp files removed by cleanup_temp_files"] += len(removed)
    assert sorted(removed) == sorted(previous_temps)
    assert [n for n in os.listdir(folder) if is_temp_file(n)] == []
    elapsed = time.monotonic() - started
    print(
        f"\ncrash test, writer={writer}, seed={SEED}, part {part + 1} of {parts}: "
        f"{len(range(part, KILLS, parts))} SIGKILLs in {elapsed:.0f}s; "
        f"phases at kill: {dict(sorted(phases.items()))}; "
        f"committed saves checked {totals['committed saves checked']}, lost {totals['lost']}; "
        f"files at target paths checked {totals['files at target paths']}, partial {totals['partial']}; "
        f"temp files left by kills {totals['temp files']}, removed by the next run "
        f"{totals['temp files removed by the next run']}, by cleanup_temp_files "
        f"{totals['temp files removed by cleanup_temp_files']}"
    )
    assert failures == [], failures
    assert totals["lost"] == 0 and totals["partial"] == 0
    # the kills reached every phase of a save
    for phase in ("training thread staging", "writer writing", "writer fsync+rename"):
        assert phases[phase] > 0, phases
