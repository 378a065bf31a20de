"""One way for the tests to start Python subprocesses: the environment they get, how they are run
and waited for, and the paths of the repository, the tests and the child scripts.

Many tests run real child processes (signals, exits, crashes, spawned writers, several ranks).
They all get the same environment from :func:`child_env` (this checkout and the test helpers
importable, faulthandler on), and a child that hangs is killed and its output shown, so a
deadlock fails the test instead of the run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple, Union

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
CHILDREN = os.path.join(TESTS, "_children")  # the child scripts (_crash_child, _dist_child, _slow_disk ...)

Script = Union[str, "os.PathLike[str]"]


def _fail(message: str) -> NoReturn:
    import pytest  # here, not at the top: child scripts import this module (through _slow_disk)

    pytest.fail(message)


def idle(seconds: float = 120.0) -> None:
    """What a child does while it waits for the test's signal: sleep, in slices.

    A process-directed signal may go to one of torch's own threads (its OpenMP pool and others,
    started with the main thread's mask, which asyncckpt cannot change). CPython then runs the
    Python handler once the main thread executes bytecode again: a training loop does so every
    step, one ``time.sleep(120)`` only after 120 s (a SIGTERM test hung so about once in 150
    runs under load). Short slices keep the main thread as responsive as a training loop's.
    """
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)


def child_env(**extra: str) -> Dict[str, str]:
    """The environment for a child: this checkout, the tests and the child scripts importable
    (in that order, replacing any ``PYTHONPATH``), ``PYTHONFAULTHANDLER=1``, plus ``extra``."""
    paths: List[str] = []
    for path in (ROOT, TESTS, CHILDREN):
        if path not in paths:
            paths.append(path)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONFAULTHANDLER="1", **extra)


def _argv(code_or_script: Script, args: Sequence[Any]) -> List[str]:
    """``python <script> args`` for a path (a ``PathLike``, or one line ending in ``.py``),
    ``python -m ...``/``python -`` for a flag, else ``python -c <dedented code> args``."""
    rest = [str(a) for a in args]
    if isinstance(code_or_script, os.PathLike):
        return [sys.executable, os.fspath(code_or_script), *rest]
    if code_or_script.startswith("-"):
        return [sys.executable, code_or_script, *rest]
    if "\n" not in code_or_script and code_or_script.endswith(".py"):
        return [sys.executable, code_or_script, *rest]
    return [sys.executable, "-c", textwrap.dedent(code_or_script), *rest]


def run_python(
    code_or_script: Script,
    *args: Any,
    timeout: float = 180,
    cwd: Optional[Script] = None,
    env: Optional[Dict[str, str]] = None,
    input: Optional[str] = None,
    check: bool = False,
    **popen: Any,
) -> subprocess.CompletedProcess:
    """Run a child to the end (text output captured); ``env`` defaults to :func:`child_env`.
    With ``check``, a non-zero exit fails the test with the end of the child's output."""
    result = subprocess.run(
        _argv(code_or_script, args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=child_env() if env is None else env,
        input=input,
        **popen,
    )
    if check and result.returncode != 0:
        _fail(f"child exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def start_python(
    code_or_script: Script, *args: Any, env: Optional[Dict[str, str]] = None, **popen: Any
) -> subprocess.Popen:
    """Start a child with text pipes for stdout and stderr (``popen`` overrides them, e.g.
    ``stderr=subprocess.STDOUT``); ``env`` defaults to :func:`child_env`."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    popen.setdefault("text", True)
    return subprocess.Popen(_argv(code_or_script, args), env=child_env() if env is None else env, **popen)


def finish(
    proc: subprocess.Popen, timeout: float = 180, what: str = "the child did not finish in time"
) -> Tuple[str, str]:
    """Wait for ``proc`` and return its (stdout, stderr), ``""`` for a stream not piped. If it
    runs past ``timeout`` it is killed and the test fails with ``what`` and its output."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        _fail(f"{what}:\n{(out or '')[-3000:]}\n{(err or '')[-3000:]}")
    return out or "", err or ""


def finish_all(
    procs: Sequence[subprocess.Popen], timeout: float = 180, what: str = "ranks did not finish in time"
) -> List[str]:
    """:func:`finish` for processes running side by side, under one deadline; their stdouts."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        _fail(f"{what}:\n" + "\n".join((p.communicate()[0] or "")[-3000:] for p in procs))
    return outputs


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(script: Script, world: int, *args: Any, env: Optional[Dict[str, str]] = None) -> List[subprocess.Popen]:
    """Start ``world`` ranks of ``script`` (``RANK``, ``WORLD_SIZE``, one fresh ``MASTER_PORT``,
    ``OMP_NUM_THREADS=1``), stdout and stderr merged into one text pipe each."""
    port = free_port()
    base = child_env() if env is None else env
    return [
        start_python(
            script,
            *args,
            env=dict(base, RANK=str(rank), WORLD_SIZE=str(world), MASTER_PORT=str(port), OMP_NUM_THREADS="1"),
            stderr=subprocess.STDOUT,
        )
        for rank in range(world)
    ]
