"""Contract line 8: saves pending at interpreter exit or on SIGTERM are written first, within a
bounded time, and a log line says so. Real subprocesses, real signals."""

from __future__ import annotations

import signal
import subprocess
import textwrap
import time

import pytest
import torch

from _subproc import finish, start_python

PRELUDE = textwrap.dedent(
    """
    import os, sys, time, signal, threading
    import torch
    from asyncckpt import AsyncCheckpointIO
    from _slow_disk import SlowDiskIO as SlowIO  # fault injection: a slow disk, so saves are pending
    from _subproc import idle  # sleeps in slices, so the signal's handler runs at once
    """
)


def run_script(body: str, tmp_path, prelude: str = PRELUDE, **kwargs) -> subprocess.Popen:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(prelude) + textwrap.dedent(body))
    return start_python(script, tmp_path, **kwargs)


def finish_without_deadlock(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait for a script that prints only ``ready``; a hang fails as a deadlock."""
    out, err = finish(proc, timeout, what="deadlocked")
    assert proc.returncode == 0 and out.split() == ["ready"], (out, err)


def wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")


def test_pending_saves_are_written_at_interpreter_exit(tmp_path):
    proc = run_script(
        """
        io = AsyncCheckpointIO(SlowIO(0.3), max_pending=3)
        for i in range(3):
            io.save_checkpoint({"i": i, "w": torch.full((1000,), i)}, os.path.join(sys.argv[1], f"{i}.ckpt"))
        print("ready", flush=True)
        # no flush, no teardown: the interpreter exits with three saves pending
        """,
        tmp_path,
    )
    wait_ready(proc)
    _, err = finish(proc, 60)
    assert proc.returncode == 0, err
    for i in range(3):
        assert torch.load(tmp_path / f"{i}.ckpt", weights_only=True)["i"] == i
    assert "interpreter exit" in err and "pending" in err


def test_pending_saves_are_written_on_sigterm_and_the_exit_status_is_kept(tmp_path):
    proc = run_script(
        """
        io = AsyncCheckpointIO(SlowIO(0.5), max_pending=2)
        for i in range(2):
            io.save_checkpoint({"i": i}, os.path.join(sys.argv[1], f"{i}.ckpt"))
        print("ready", flush=True)
        idle(120)
        """,
        tmp_path,
    )
    wait_ready(proc)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = finish(proc, 60)
    assert proc.returncode == -signal.SIGTERM, err
    assert time.monotonic() - started < 30
    for i in range(2):
        assert torch.load(tmp_path / f"{i}.ckpt", weights_only=True) == {"i": i}
    assert "SIGTERM" in err and "pending" in err


def test_the_users_own_sigterm_handler_still_runs(tmp_path):
    proc = run_script(
        """
        def handler(signum, frame):
            os.write(1, b"user handler ran\\n")  # print() is not reentrant; the signal may land inside one
            sys.exit(7)
        signal.signal(signal.SIGTERM, handler)
        io = AsyncCheckpointIO(SlowIO(0.5))
        io.save_checkpoint({"v": 1}, os.path.join(sys.argv[1], "a.ckpt"))
        print("ready", flush=True)
        idle(120)
        """,
        tmp_path,
    )
    wait_ready(proc)
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc, 60)
    assert proc.returncode == 7, err
    assert "user handler ran" in out
    assert torch.load(tmp_path / "a.ckpt", weights_only=True) == {"v": 1}


def test_exit_waits_no_longer_than_exit_timeout(tmp_path):
    proc = run_script(
        """
        io = AsyncCheckpointIO(SlowIO(60), exit_timeout=1)
        io.save_checkpoint({"v": 1}, os.path.join(sys.argv[1], "a.ckpt"))
        print("ready", flush=True)
        """,
        tmp_path,
    )
    wait_ready(proc)
    started = time.monotonic()
    _, err = finish(proc, 30)
    assert time.monotonic() - started < 15
    assert "not all written" in err
    assert not (tmp_path / "a.ckpt").exists()


@pytest.mark.parametrize("previous", ["ignore", "default"])
def test_sigterm_handler_respects_what_was_there_before(tmp_path, previous):
    proc = run_script(
        f"""
        signal.signal(signal.SIGTERM, signal.SIG_IGN if {previous!r} == "ignore" else signal.SIG_DFL)
        io = AsyncCheckpointIO(SlowIO(0.2))
        io.save_checkpoint({{"v": 1}}, os.path.join(sys.argv[1], "a.ckpt"))
        print("ready", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        print("still running", flush=True)
        """,
        tmp_path,
    )
    wait_ready(proc)
    out, err = finish(proc, 60)
    assert torch.load(tmp_path / "a.ckpt", weights_only=True) == {"v": 1}
    if previous == "ignore":
        assert proc.returncode == 0 and "still running" in out
    else:
        assert proc.returncode == -signal.SIGTERM and "still running" not in out


@pytest.mark.parametrize(
    "writer,staging", [("thread", "eager"), ("thread", "lazy"), ("process", "eager")], ids=["thread", "lazy", "process"]
)
def test_an_os_fork_child_exiting_through_the_interpreter_leaves_the_parents_engine_alone(tmp_path, writer, staging):
    """A raw ``os.fork`` child that exits through the interpreter runs the exit hooks it
    inherited. It hung in the engine's finalizer on a lock copied held (lazy staging), it made
    ``multiprocessing`` terminate the parent's writer process (the parent's save failed as
    lost), and using the engine in the child hung waiting for the parent's saves. The child's
    copy now starts afresh: it saves on its own, and the parent's saves are the parent's."""
    proc = run_script(
        f"""
        def main():  # spawn re-imports this file in the writer process: a main guard
            io = AsyncCheckpointIO(SlowIO(1.5), writer={writer!r}, staging={staging!r}, handle_sigterm=False)
            for use_in_child in (False, True):
                io.save_checkpoint({{"w": torch.arange(1000.0)}}, os.path.join(sys.argv[1], f"a{{use_in_child}}.ckpt"))
                started = time.monotonic()
                pid = os.fork()
                if pid == 0:
                    if use_in_child:
                        io.flush()  # nothing of the child's is pending: returns at once
                        waited = time.monotonic() - started
                        io.save_checkpoint({{"w": torch.full((3,), 7.0)}}, os.path.join(sys.argv[1], "child.ckpt"))
                        io.flush()
                        with open(os.path.join(sys.argv[1], "child.txt"), "w") as f:
                            f.write(str(waited))
                    sys.exit(0)
                _, status = os.waitpid(pid, 0)
                print("child", status, round(time.monotonic() - started, 1), flush=True)
            io.teardown()  # raises if a save of the parent's was lost
            print("ready", flush=True)

        if __name__ == "__main__":
            main()
        """,
        tmp_path,
    )
    try:
        out, err = finish(proc, 90)
    finally:
        proc.kill()
    assert proc.returncode == 0, (out, err)
    lines = [line.split() for line in out.splitlines()]
    assert [line[:2] for line in lines[:2]] == [["child", "0"], ["child", "0"]], (out, err)
    assert lines[2] == ["ready"]
    assert float((tmp_path / "child.txt").read_text()) < 1.0  # did not wait for the parent's 1.5 s write
    assert torch.equal(torch.load(tmp_path / "child.ckpt", weights_only=True)["w"], torch.full((3,), 7.0))
    for name in ("aFalse.ckpt", "aTrue.ckpt"):
        assert torch.equal(torch.load(tmp_path / name, weights_only=True)["w"], torch.arange(1000.0))


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_save_from_a_signal_handler_interrupting_a_save_is_written_not_deadlocked(tmp_path, writer):
    """Lightning saves from its SLURM requeue (SIGUSR1) handler. When the signal lands while the
    main thread's own save holds the only slot, the handler's save waited for that slot forever.
    It is now written synchronously, after what was queued on its path."""
    proc = run_script(
        f"""
        def main():  # spawn re-imports this file in the writer process: a main guard
            import signal, threading
            from asyncckpt import staging

            folder = sys.argv[1]
            io = AsyncCheckpointIO(max_pending=1, writer={writer!r}, handle_sigterm=False)
            io.save_checkpoint({{"v": "queued before"}}, os.path.join(folder, "hpc.ckpt"))
            main_id = threading.main_thread().ident
            real_stage = staging.Stager.stage
            fired = []

            def stage(self, checkpoint, slot, path):
                if not fired:  # fault injection: the signal lands while this call holds the slot
                    fired.append(True)
                    signal.pthread_kill(main_id, signal.SIGUSR1)
                return real_stage(self, checkpoint, slot, path)

            def handler(signum, frame):
                io.save_checkpoint({{"v": "from the handler"}}, os.path.join(folder, "hpc.ckpt"))

            staging.Stager.stage = stage
            signal.signal(signal.SIGUSR1, handler)
            io.save_checkpoint({{"v": "interrupted", "w": torch.ones(4)}}, os.path.join(folder, "a.ckpt"))
            io.teardown()
            print("ready", flush=True)

        if __name__ == "__main__":
            main()
        """,
        tmp_path,
    )
    finish_without_deadlock(proc)
    assert torch.load(tmp_path / "hpc.ckpt", weights_only=True) == {"v": "from the handler"}
    assert torch.load(tmp_path / "a.ckpt", weights_only=True)["v"] == "interrupted"


def test_a_save_from_a_signal_handler_while_waiting_for_a_lazy_copy_is_not_deadlocked(tmp_path):
    """The signal lands while the main thread waits in a guard for a lazy copy (here
    ``wait_staged``; an optimizer step's pre-hook does the same), holding the copy's lock: the
    handler's save waits for the same copy, and deadlocked on that lock."""
    proc = run_script(
        """
        import signal, threading
        from asyncckpt._staging import copier

        folder = sys.argv[1]
        real = copier.memmove_pairs

        def slow_copy(dst, src):
            time.sleep(1.0)  # fault injection: a slow lazy copy, so the signal lands during the wait
            real(dst, src)

        copier.memmove_pairs = slow_copy
        io = AsyncCheckpointIO(staging="lazy", handle_sigterm=False)

        def handler(signum, frame):
            io.save_checkpoint({"v": "from the handler"}, os.path.join(folder, "hpc.ckpt"))

        signal.signal(signal.SIGUSR1, handler)
        weights = torch.arange(1_000_000.0)
        io.save_checkpoint({"w": weights}, os.path.join(folder, "a.ckpt"))
        main_id = threading.main_thread().ident
        threading.Timer(0.3, lambda: signal.pthread_kill(main_id, signal.SIGUSR1)).start()
        io.wait_staged()
        weights.add_(1)  # after the guard: not in the file
        io.teardown()
        print("ready", flush=True)
        """,
        tmp_path,
    )
    finish_without_deadlock(proc)
    assert torch.load(tmp_path / "hpc.ckpt", weights_only=True) == {"v": "from the handler"}
    assert torch.equal(torch.load(tmp_path / "a.ckpt", weights_only=True)["w"], torch.arange(1_000_000.0))


def test_a_forked_child_exits_at_once_with_the_parents_saves_pending(tmp_path):
    proc = run_script(
        """
        import multiprocessing
        io = AsyncCheckpointIO(SlowIO(3))
        io.save_checkpoint({"v": 1}, os.path.join(sys.argv[1], "a.ckpt"))
        io.save_checkpoint({"v": 2}, os.path.join(sys.argv[1], "b.ckpt"))
        # a forked worker (as a DataLoader's) exits while the parent's writes are in flight
        child = multiprocessing.get_context("fork").Process(target=lambda: None)
        started = time.monotonic()
        child.start()
        child.join(60)
        print("child exit", child.exitcode, round(time.monotonic() - started, 1), flush=True)
        print("ready", flush=True)
        """,
        tmp_path,
    )
    first = proc.stdout.readline().split()
    wait_ready(proc)
    _, err = finish(proc, 60)
    assert first[:3] == ["child", "exit", "0"], (first, err)
    assert float(first[3]) < 2.0  # the parent's writes take 6 s; the child did not wait for them
    assert torch.load(tmp_path / "b.ckpt", weights_only=True) == {"v": 2}


EXIT_HOOK_ORDERS = {
    # a weakref.finalize (here a module-level TemporaryDirectory) made before torch imports
    # multiprocessing: multiprocessing's exit handler then runs before the finalizers
    "finalizer-before-import": ("import tempfile\nTMP = tempfile.TemporaryDirectory()\n", ""),
    # the same, and a finalizer made after the engine
    "finalizers-around-the-engine": (
        "import tempfile\nTMP = tempfile.TemporaryDirectory()\n",
        "LATER = tempfile.TemporaryDirectory()\n",
    ),
    # an atexit handler registered after the engine saves once more at exit
    "save-from-a-later-atexit-handler": (
        "import tempfile\nTMP = tempfile.TemporaryDirectory()\n",
        "import atexit\natexit.register(lambda: io.save_checkpoint({'late': 1}, os.path.join(folder, 'late.ckpt')))\n",
    ),
    # no finalizer before the import: the order that always worked
    "import-first": ("", ""),
}


@pytest.mark.parametrize("order", list(EXIT_HOOK_ORDERS))
def test_a_process_writer_without_teardown_exits_whatever_the_order_of_exit_hooks(tmp_path, order):
    """``multiprocessing``'s exit handler sends SIGTERM to its daemonic children and joins them
    with no timeout; the writer process ignores SIGTERM (the parent drains it first) and waits
    for its next command. When that handler ran before the engine's finalizer (any
    ``weakref.finalize`` made before ``import torch`` arranges it), the interpreter never exited."""
    before, after = EXIT_HOOK_ORDERS[order]
    proc = run_script(
        f"""
        if __name__ == "__main__":  # spawn re-imports this file in the writer process
            folder = sys.argv[1]
            io = AsyncCheckpointIO(SlowIO(0.5), writer="process")
{textwrap.indent(after, " " * 12)}
            io.save_checkpoint({{"w": torch.arange(10.0)}}, os.path.join(folder, "a.ckpt"))
            print("ready", flush=True)
            # no flush, no teardown
        """,
        tmp_path,
        prelude=before + PRELUDE,
    )
    wait_ready(proc)
    _, err = finish(proc, 30, what="the interpreter did not exit")  # the writes take 0.5 s each
    assert proc.returncode == 0, err
    assert torch.equal(torch.load(tmp_path / "a.ckpt", weights_only=True)["w"], torch.arange(10.0))
    if "atexit" in order:
        assert torch.load(tmp_path / "late.ckpt", weights_only=True) == {"late": 1}, err


@pytest.mark.parametrize("where", ["main-thread", "other-thread", "main-thread-waiting-for-a-slot"])
@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_save_being_handed_over_when_sigterm_lands_is_written(tmp_path, writer, where):
    """The writer is busy with a slow write, so the next save's skeleton (300,000 strings, far
    more than the pipe holds) blocks in its hand-over to a writer process; SIGTERM lands then.
    That save was neither counted as pending nor written: the drain wrote the first save and the
    process ended. It is written now, before the signal is handed on; so is a save still
    waiting for a staging slot (``max_pending=1``) when the signal lands."""
    proc = run_script(
        f"""
        import threading

        if __name__ == "__main__":  # spawn re-imports this file in the writer process
            folder = sys.argv[1]
            max_pending = 1 if {where!r}.endswith("slot") else 2
            io = AsyncCheckpointIO(SlowIO(1.5), writer={writer!r}, exit_timeout=60, max_pending=max_pending)
            io.save_checkpoint({{"v": 0}}, os.path.join(folder, "first.ckpt"))
            big = [f"s{{i}}" for i in range(300_000)]
            print("ready", flush=True)
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()

            def save():
                io.save_checkpoint({{"big": big, "w": torch.ones(3)}}, os.path.join(folder, "second.ckpt"))

            if {where!r}.startswith("main-thread"):
                save()
            else:
                threading.Thread(target=save).start()
            idle(120)
        """,
        tmp_path,
    )
    wait_ready(proc)
    _, err = finish(proc, 90)
    assert proc.returncode == -signal.SIGTERM, err
    assert torch.load(tmp_path / "first.ckpt", weights_only=True) == {"v": 0}
    second = torch.load(tmp_path / "second.ckpt", weights_only=True)
    assert len(second["big"]) == 300_000 and second["big"][-1] == "s299999", err
    assert "SIGTERM" in err and "not all written" not in err


def test_a_save_still_being_handed_over_at_exit_timeout_is_logged_as_not_written(tmp_path):
    """Where the hand-over cannot finish within ``exit_timeout`` (the writer is busy with an 8 s
    write), the process still ends in bounded time, and the log line names the save in progress
    as not written, with the pending one. (The writer process, orphaned, may finish its write
    later: stderr goes to a file, as the orphan keeps a pipe open.)"""
    script = tmp_path / "script.py"
    script.write_text(PRELUDE + textwrap.dedent(
        """
        import threading

        if __name__ == "__main__":  # spawn re-imports this file in the writer process
            folder = sys.argv[1]
            io = AsyncCheckpointIO(SlowIO(8), writer="process", exit_timeout=1)
            io.save_checkpoint({"v": 0}, os.path.join(folder, "first.ckpt"))
            big = [f"s{i}" for i in range(300_000)]  # built before the timer starts: on a loaded
            # machine building it took longer than the timer, and the signal came before the save
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
            io.save_checkpoint({"big": big}, os.path.join(folder, "second.ckpt"))
            idle(120)
        """
    ))
    with open(tmp_path / "stderr", "w") as stderr:
        proc = start_python(script, tmp_path, stdout=None, stderr=stderr, text=False)
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
    err = (tmp_path / "stderr").read_text()
    assert proc.returncode == -signal.SIGTERM, err
    line = next((line for line in err.splitlines() if "not written:" in line), "")
    assert "first.ckpt" in line and "second.ckpt" in line, err
    assert not (tmp_path / "second.ckpt").exists()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_multiprocessing_child_saving_with_a_process_writer_writes_before_it_ends(tmp_path, method):
    """A ``multiprocessing`` child never runs the interpreter's exit hooks: it ends through
    ``multiprocessing``'s exit handler, which terminated and joined its writer process, and the
    pending save was lost. That handler now drains and stops the writer first."""
    proc = run_script(
        f"""
        import multiprocessing

        def child(folder):
            io = AsyncCheckpointIO(SlowIO(0.5), writer="process")
            io.save_checkpoint({{"w": torch.ones(3)}}, os.path.join(folder, "child.ckpt"))
            global KEEP
            KEEP = io  # no teardown; the engine lives until the child ends

        if __name__ == "__main__":
            p = multiprocessing.get_context({method!r}).Process(target=child, args=(sys.argv[1],))
            p.start()
            p.join(60)
            print("child", p.exitcode, flush=True)
        """,
        tmp_path,
    )
    try:
        out, err = finish(proc, 90)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.split() == ["child", "0"], (out, err)
    assert torch.equal(torch.load(tmp_path / "child.ckpt", weights_only=True)["w"], torch.ones(3)), err


@pytest.mark.parametrize("exit_timeout", [float("inf"), 1e12])
@pytest.mark.parametrize("how", ["sigterm", "interpreter-exit"])
def test_an_unlimited_exit_timeout_waits_for_pending_saves(tmp_path, exit_timeout, how):
    """``exit_timeout=float("inf")`` (or any value beyond what a thread can wait) means no
    limit: the drain waited with that timeout, the wait raised ``OverflowError``, and the
    pending save was lost on SIGTERM."""
    proc = run_script(
        f"""
        io = AsyncCheckpointIO(SlowIO(0.5), exit_timeout={exit_timeout!r})
        io.save_checkpoint({{"v": 1}}, os.path.join(sys.argv[1], "a.ckpt"))
        print("ready", flush=True)
        if {how!r} == "sigterm":
            idle(120)
        """.replace("inf", 'float("inf")'),
        tmp_path,
    )
    wait_ready(proc)
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    _, err = finish(proc, 60)
    assert proc.returncode == (-signal.SIGTERM if how == "sigterm" else 0), err
    assert torch.load(tmp_path / "a.ckpt", weights_only=True) == {"v": 1}, err
    assert "Traceback" not in err and "finished in" in err, err


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_save_and_remove_in_an_atexit_handler_that_runs_after_the_drain_take_effect(tmp_path, writer):
    """An ``atexit`` handler registered before asyncckpt is imported runs after every exit hook
    of asyncckpt's (``atexit`` runs them last-in first-out; ``multiprocessing``'s is registered
    at import). Its save was queued on a writer nobody waited for any more: lost without a word
    with the thread writer; with the process writer a new writer process was started during
    exit and left behind. After the exit drain has begun, saves and removes take effect at the
    call, as a synchronous IO's would."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(
        f"""
        import atexit, os, sys
        folder = sys.argv[1]
        io = None

        def at_the_very_end():
            io.save_checkpoint({{"v": 2}}, os.path.join(folder, "late.ckpt"))
            io.remove_checkpoint(os.path.join(folder, "a.ckpt"))
            print("handler done", flush=True)

        atexit.register(at_the_very_end)  # before asyncckpt and torch are imported

        import torch
        from asyncckpt import AsyncCheckpointIO
        from _slow_disk import SlowDiskIO

        if __name__ == "__main__":  # spawn re-imports this file in the writer process
            io = AsyncCheckpointIO(SlowDiskIO(0.3), writer={writer!r})
            io.save_checkpoint({{"v": 1}}, os.path.join(folder, "a.ckpt"))
            io.save_checkpoint({{"v": 0}}, os.path.join(folder, "other.ckpt"))
        else:
            atexit.unregister(at_the_very_end)
        """
    ))
    proc = start_python(script, tmp_path)
    try:
        out, err = finish(proc, 60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.split() == ["handler", "done"], (out, err)
    assert torch.load(tmp_path / "late.ckpt", weights_only=True) == {"v": 2}, err
    assert torch.load(tmp_path / "other.ckpt", weights_only=True) == {"v": 0}, err
    assert not (tmp_path / "a.ckpt").exists(), err
    assert "Traceback" not in err, err


def test_sigterm_during_a_save_in_a_late_atexit_handler_waits_for_that_save(tmp_path):
    """A save made once exit has begun is written at the call; a SIGTERM landing meanwhile
    killed the process in the middle of it, unlogged. It is handled once that save is written,
    as for a save being staged, and the process still ends with SIGTERM's status."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(
        """
        import atexit, os, sys
        folder = sys.argv[1]
        io = None

        def at_the_very_end():
            print("ready", flush=True)
            io.save_checkpoint({"v": 2}, os.path.join(folder, "late.ckpt"))

        atexit.register(at_the_very_end)  # before asyncckpt is imported: runs after its hooks

        import torch
        from asyncckpt import AsyncCheckpointIO
        from _slow_disk import SlowDiskIO

        io = AsyncCheckpointIO(SlowDiskIO(1.5))
        io.save_checkpoint({"v": 1}, os.path.join(folder, "a.ckpt"))
        """
    ))
    proc = start_python(script, tmp_path)
    try:
        wait_ready(proc)
        time.sleep(0.5)  # inside the 1.5 s write of late.ckpt
        proc.send_signal(signal.SIGTERM)
        _, err = finish(proc, 60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, err
    assert torch.load(tmp_path / "late.ckpt", weights_only=True) == {"v": 2}, err
    assert torch.load(tmp_path / "a.ckpt", weights_only=True) == {"v": 1}, err
    assert "SIGTERM during the save of" in err and "late.ckpt" in err, err


def test_a_child_forked_while_a_sigterm_waits_for_a_hand_over_does_not_act_on_that_signal(tmp_path):
    """A SIGTERM landing while the main thread hands a save to a busy writer is kept until that
    hand-over ends. A child forked meanwhile (by another thread: a DataLoader worker starting)
    kept it too, and its first save handled the parent's signal: the child drained and killed
    itself with SIGTERM. The signal is the parent's; the child forgets it at the fork."""
    proc = run_script(
        """
        import threading

        def fork_a_child(folder):
            pid = os.fork()
            if pid == 0:
                io.save_checkpoint({"c": 1}, os.path.join(folder, "child.ckpt"))
                io.flush()
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            os.write(1, f"child {os.waitstatus_to_exitcode(status)}\\n".encode())

        if __name__ == "__main__":  # spawn re-imports this file in the writer process
            folder = sys.argv[1]
            io = AsyncCheckpointIO(SlowIO(3), writer="process", exit_timeout=60)
            io.save_checkpoint({"v": 0}, os.path.join(folder, "first.ckpt"))
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
            threading.Timer(1.5, fork_a_child, (folder,)).start()
            # about 3 MB to pickle: the send waits for the writer, busy with first.ckpt
            io.save_checkpoint({"big": [f"s{i}" for i in range(300_000)]}, os.path.join(folder, "second.ckpt"))
            idle(120)
        """,
        tmp_path,
    )
    try:
        out, err = finish(proc, 90)
    finally:
        proc.kill()
    assert out.split() == ["child", "0"], (out, err)
    assert torch.load(tmp_path / "child.ckpt", weights_only=True) == {"c": 1}, err
    assert proc.returncode == -signal.SIGTERM, err
    assert torch.load(tmp_path / "first.ckpt", weights_only=True) == {"v": 0}, err
    assert len(torch.load(tmp_path / "second.ckpt", weights_only=True)["big"]) == 300_000, err


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_sigterm_landing_inside_an_engine_call_holding_its_lock_still_drains_at_once(tmp_path, writer):
    """A signal handler runs on the main thread between two instructions, possibly inside an
    engine call that holds the engine's lock (``io.pending``, ``io.stats``, ``queued_kind``: a
    loop polling them was caught there 1 time in 4). The drain then waited for writes whose
    completion needs that lock, the whole ``exit_timeout``, and named them as not written. The
    test holds the lock itself when the signal lands (it stands for those calls, where the
    moment cannot be chosen)."""
    proc = run_script(
        f"""
        if __name__ == "__main__":  # spawn re-imports this file in the writer process
            io = AsyncCheckpointIO(SlowIO(0.3), writer={writer!r}, max_pending=2, exit_timeout=20)
            for i in range(2):
                io.save_checkpoint({{"i": i}}, os.path.join(sys.argv[1], f"{{i}}.ckpt"))
            print("ready", flush=True)
            # White-box on purpose: a signal cannot be timed to land inside the lock for real.
            with io._cv:  # as inside io.pending
                signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # to this thread, inside the lock
                time.sleep(0.2)
            idle(120)
        """,
        tmp_path,
    )
    wait_ready(proc)
    started = time.monotonic()
    _, err = finish(proc, 60)
    assert proc.returncode == -signal.SIGTERM, err
    assert time.monotonic() - started < 10, err
    for i in range(2):
        assert torch.load(tmp_path / f"{i}.ckpt", weights_only=True) == {"i": i}, err
    assert "not written" not in err, err


def test_sigterm_landing_inside_the_lazy_copy_registry_does_not_hang(tmp_path):
    """An optimizer step with a lazy copy in progress briefly holds the registry of lazy
    copies; a SIGTERM landing there drained on the same thread, and finishing the copy needed
    that lock again: the process hung for good, ``exit_timeout`` or not. The test holds the
    registry itself when the signal lands (it stands for the optimizer step's guard, where the
    moment cannot be chosen)."""
    proc = run_script(
        """
        import asyncckpt._staging.lazy

        io = AsyncCheckpointIO(SlowIO(0.3), staging="lazy", exit_timeout=20)
        io.save_checkpoint({"w": torch.ones(1_000_000)}, os.path.join(sys.argv[1], "a.ckpt"))
        print("ready", flush=True)
        # White-box on purpose: a signal cannot be timed to land inside the guard for real.
        with asyncckpt._staging.lazy._registry_lock:  # as inside an optimizer step's guard
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # to this thread, inside the lock
            time.sleep(0.2)
        idle(120)
        """,
        tmp_path,
    )
    wait_ready(proc)
    _, err = finish(proc, 30, what="hung after SIGTERM")
    assert proc.returncode == -signal.SIGTERM, err
    assert torch.equal(torch.load(tmp_path / "a.ckpt", weights_only=True)["w"], torch.ones(1_000_000)), err
