"""The writer process: real spawned process, real SIGKILL, no zombies, clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from asyncckpt import AsyncCheckpointIO, TorchCheckpointIO, WriterDiedError
from conftest import load, temp_files


def _zombie_children() -> list:
    psutil = pytest.importorskip("psutil")
    return [c for c in psutil.Process().children(recursive=True) if c.status() == psutil.STATUS_ZOMBIE]


def test_tensor_bytes_are_not_pickled_through_the_pipe(tmp_path):
    io = AsyncCheckpointIO(writer="process")
    io.save_checkpoint({"w": torch.ones(1000)}, tmp_path / "warm.ckpt")
    io.flush()
    before = io.writer.message_sizes()
    io.save_checkpoint({"w": torch.ones(4 * 1024 * 1024)}, tmp_path / "big.ckpt")  # 16 MB
    io.flush()
    sent = io.writer.message_sizes()[len(before):]
    assert sent and max(sent) < 64 * 1024, sent
    assert torch.equal(load(tmp_path / "big.ckpt")["w"], torch.ones(4 * 1024 * 1024))
    io.teardown()


def test_writer_killed_mid_save_gives_a_clear_error_and_no_hang(tmp_path, gated_io):
    io = AsyncCheckpointIO(gated_io, writer="process")
    io.save_checkpoint({"v": 0}, tmp_path / "before.ckpt")
    io.flush()
    gated_io.gate.clear()
    io.save_checkpoint({"v": 1}, tmp_path / "a.ckpt")
    assert gated_io.started.wait(30)
    pid = io.writer.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WriterDiedError, match=r"killed by signal 9.*a\.ckpt") as info:
        io.flush(timeout=60)
    assert info.value.path == str(tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists()
    assert load(tmp_path / "before.ckpt") == {"v": 0}
    # documented behaviour: the failure is raised once, then a new writer process takes over
    gated_io.gate.set()
    io.save_checkpoint({"v": 2}, tmp_path / "a.ckpt")
    io.flush()
    assert io.writer.pid != pid
    assert load(tmp_path / "a.ckpt") == {"v": 2}
    io.teardown()
    assert temp_files(str(tmp_path)) == [] or all(str(pid) in t for t in temp_files(str(tmp_path)))


def _wait_until_dead(pid: int) -> None:
    """Until ``pid`` has exited, read from ``/proc``: gone, or a zombie with no other thread left
    (its leader turns zombie while its other threads still exit, holding its open files)."""
    for _ in range(6000):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z" and len(os.listdir(f"/proc/{pid}/task")) <= 1:
                    return
        except (FileNotFoundError, ProcessLookupError):  # reaped meanwhile
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not exit")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_a_remove_after_the_writer_died_with_the_new_save_keeps_the_old_file(tmp_path, gated_io):
    # Real SIGKILL. Once the writer process is reaped, the engine may or may not have failed the
    # new save yet: the removal either raises that death at the call (nothing queued), or is
    # queued, and then the next writer process must not remove. Both happen (about 6:4 here);
    # several rounds, so the second is met, and the old file must survive every one.
    io = AsyncCheckpointIO(gated_io, writer="process")
    for round_ in range(6):
        io.save_checkpoint({"v": round_}, tmp_path / "old.ckpt")
        io.flush()
        gated_io.gate.clear()
        gated_io.started.clear()
        io.save_checkpoint({"v": -1}, tmp_path / "new.ckpt")
        assert gated_io.started.wait(60)
        writer_pid = io.writer.pid
        os.kill(writer_pid, signal.SIGKILL)  # the new save dies with its writer
        _wait_until_dead(writer_pid)
        gated_io.gate.set()
        with pytest.raises(WriterDiedError, match=r"new\.ckpt") as info:
            io.remove_checkpoint(tmp_path / "old.ckpt")
            io.flush(timeout=60)
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert notes == "" or ("old.ckpt" in notes and "kept" in notes), notes
        assert load(tmp_path / "old.ckpt") == {"v": round_}, f"round {round_}"
        assert not (tmp_path / "new.ckpt").exists()
    io.teardown()


def test_writer_death_frees_the_slots_so_saves_do_not_block(tmp_path, gated_io):
    io = AsyncCheckpointIO(gated_io, writer="process", max_pending=1)
    gated_io.gate.clear()
    io.save_checkpoint({"v": 1}, tmp_path / "a.ckpt")
    assert gated_io.started.wait(30)
    os.kill(io.writer.pid, signal.SIGKILL)
    gated_io.gate.set()
    done = threading.Event()

    def save_again():
        try:
            io.save_checkpoint({"v": 2}, tmp_path / "b.ckpt")
        except WriterDiedError:
            io.save_checkpoint({"v": 2}, tmp_path / "b.ckpt")
        done.set()

    thread = threading.Thread(target=save_again, daemon=True)
    thread.start()
    assert done.wait(60), "a save blocked forever after the writer died"
    io.flush()
    assert load(tmp_path / "b.ckpt") == {"v": 2}
    io.teardown()


def test_teardown_reaps_the_writer_process(tmp_path):
    psutil = pytest.importorskip("psutil")
    io = AsyncCheckpointIO(writer="process")
    io.save_checkpoint({"w": torch.ones(10)}, tmp_path / "a.ckpt")
    pid = io.writer.pid
    io.teardown()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert pid not in [c.pid for c in psutil.Process().children(recursive=True)]
    assert _zombie_children() == []


def test_an_unpicklable_wrapped_io_is_refused_clearly(tmp_path):
    class LocalIO(TorchCheckpointIO):  # a local class cannot be pickled by reference
        pass

    with pytest.raises(TypeError, match="writer='process'.*cannot be pickled.*writer='thread'"):
        AsyncCheckpointIO(LocalIO(), writer="process")
    # set later: refused where it is set
    io = AsyncCheckpointIO(writer="process")
    with pytest.raises(TypeError, match="cannot be pickled"):
        io.checkpoint_io = LocalIO()
    io.teardown()


def test_changing_the_wrapped_io_finishes_queued_work_first(tmp_path, gated_io, writer):
    io = AsyncCheckpointIO(gated_io, writer=writer)
    io.save_checkpoint({"v": 1}, tmp_path / "a.ckpt")
    io.checkpoint_io = TorchCheckpointIO()
    assert load(tmp_path / "a.ckpt") == {"v": 1} and gated_io.log[-1].startswith("save-done")
    io.save_checkpoint({"v": 2}, tmp_path / "b.ckpt")
    io.teardown()
    assert load(tmp_path / "b.ckpt") == {"v": 2}
    assert not any("b.ckpt" in line for line in gated_io.log)


def test_writer_process_ignores_sigterm_so_the_parent_can_drain_it(tmp_path, gated_io):
    io = AsyncCheckpointIO(gated_io, writer="process")
    gated_io.gate.clear()
    io.save_checkpoint({"v": 1}, tmp_path / "a.ckpt")
    assert gated_io.started.wait(30)
    os.kill(io.writer.pid, signal.SIGTERM)  # as a job scheduler signals every process
    gated_io.gate.set()
    io.flush()
    assert load(tmp_path / "a.ckpt") == {"v": 1}
    io.teardown()


class _NicenessRecordingIO(TorchCheckpointIO):
    """Writes the niceness of the thread that writes next to each checkpoint (picklable, so
    the process writer can take it too)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        super().save_checkpoint(checkpoint, path, storage_options)
        with open(f"{path}.nice", "w") as f:
            f.write(str(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="niceness is a POSIX notion")
@pytest.mark.parametrize("writer", ["thread", "process"])
def test_writer_nice_lowers_the_writers_priority_and_not_the_callers(tmp_path, writer):
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if before > 14:
        pytest.skip("this process already runs at niceness > 14")
    io = AsyncCheckpointIO(_NicenessRecordingIO(), writer=writer, writer_nice=5)
    io.save_checkpoint({"w": torch.ones(3)}, str(tmp_path / "a.ckpt"))
    io.teardown()
    assert int((tmp_path / "a.ckpt.nice").read_text()) == before + 5
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the process as a whole too
    assert torch.equal(load(tmp_path / "a.ckpt")["w"], torch.ones(3))


@pytest.mark.parametrize("nice", [-1, 20, 1.5, "5"])
def test_writer_nice_outside_0_to_19_is_refused(nice):
    with pytest.raises(ValueError, match="writer_nice must be an integer from 0 to 19"):
        AsyncCheckpointIO(writer_nice=nice)


def test_a_writer_thread_that_cannot_lower_its_priority_writes_anyway_and_says_so(tmp_path, monkeypatch, caplog):
    # Fault injection: setpriority refusing to raise niceness cannot be produced for real here
    # (raising it is always allowed to the owner); some sandboxes forbid the call outright.
    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    io = AsyncCheckpointIO(writer_nice=5)
    io.save_checkpoint({"w": torch.ones(3)}, str(tmp_path / "a.ckpt"))
    io.teardown()
    assert torch.equal(load(tmp_path / "a.ckpt")["w"], torch.ones(3))
    assert "writer_nice not applied" in caplog.text


def test_writer_nice_with_the_thread_writer_off_linux_is_refused_saying_what_to_use(monkeypatch):
    # Fault injection: this suite runs on Linux; another platform is simulated by its name,
    # which is all the check reads.
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(ValueError, match="needs Linux.*writer='process' or writer_nice=0"):
        AsyncCheckpointIO(writer_nice=5)
    AsyncCheckpointIO(writer_nice=0).teardown()  # the default is fine anywhere


def test_a_writer_process_that_cannot_lower_its_priority_writes_anyway_and_says_so(tmp_path, monkeypatch, capfd):
    # Fault injection: a refused os.nice cannot be produced for real here (raising niceness is
    # always allowed); the spawned writer imports this sitecustomize, which makes it refuse.
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "def _refuse(increment):\n"
        "    raise PermissionError(1, 'Operation not permitted')\n"
        "os.nice = _refuse\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")])))
    io = AsyncCheckpointIO(writer="process", writer_nice=5)
    io.save_checkpoint({"w": torch.ones(3)}, str(tmp_path / "a.ckpt"))
    io.save_checkpoint({"w": torch.zeros(3)}, str(tmp_path / "b.ckpt"))
    io.teardown()
    assert torch.equal(load(tmp_path / "a.ckpt")["w"], torch.ones(3))
    assert torch.equal(load(tmp_path / "b.ckpt")["w"], torch.zeros(3))
    assert "writer_nice not applied" in capfd.readouterr().err


_MAIN_CLASS_SCRIPT = """
import io, os, sys, zipfile
import torch
from asyncckpt import AsyncCheckpointIO, TorchCheckpointIO


class MainIO(TorchCheckpointIO):  # the wrapped IO's class lives in __main__ too
    pass


class Config:
    class Inner:
        pass

    def __init__(self):
        self.lr = 0.1
        self.inner = Config.Inner()


def schedule(step):
    return step


def entries(data):
    archive = zipfile.ZipFile(io.BytesIO(data))
    return {{n.split("/", 1)[1]: archive.read(n) for n in archive.namelist() if not n.endswith("serialization_id")}}


if __name__ == "__main__":
    folder = sys.argv[1]
    ckpt = {{"w": torch.arange(5.0), "cfg": Config(), "fn": schedule, "cls": Config.Inner}}
    io_ = AsyncCheckpointIO(MainIO(), writer="process")
    io_.save_checkpoint({{"w": torch.ones(2)}}, os.path.join(folder, "plain.ckpt"))
    io_.save_checkpoint(ckpt, os.path.join(folder, "a.ckpt"))
    io_.teardown()
    reference = io.BytesIO()
    torch.save(ckpt, reference)
    with open(os.path.join(folder, "a.ckpt"), "rb") as f:
        assert entries(f.read()) == entries(reference.getvalue()), "not the records torch.save writes"
    loaded = torch.load(os.path.join(folder, "a.ckpt"), weights_only=False)
    assert type(loaded["cfg"]) is Config and loaded["fn"] is schedule and loaded["cls"] is Config.Inner
    print("done")
"""

_MAIN_CLASS_IN_A_SPAWNED_CHILD = """
import io, os, sys, zipfile, multiprocessing
import torch


class Config:
    lr = 0.1


def entries(data):
    archive = zipfile.ZipFile(io.BytesIO(data))
    return {n.split("/", 1)[1]: archive.read(n) for n in archive.namelist() if not n.endswith("serialization_id")}


def train(folder):
    from asyncckpt import AsyncCheckpointIO

    ckpt = {"cfg": Config(), "w": torch.ones(2)}
    io_ = AsyncCheckpointIO(writer="process")
    io_.save_checkpoint(ckpt, os.path.join(folder, "a.ckpt"))
    io_.teardown()
    reference = io.BytesIO()
    torch.save(ckpt, reference)  # here Config is __mp_main__.Config
    with open(os.path.join(folder, "a.ckpt"), "rb") as f:
        assert entries(f.read()) == entries(reference.getvalue()), "not the records torch.save writes"
    print("done", flush=True)


if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=train, args=(sys.argv[1],))
    child.start()
    child.join()
    sys.exit(child.exitcode)
"""


def test_objects_of_main_saved_from_a_spawned_child_are_written_as_torch_save_writes_them_there(tmp_path):
    """Training in a spawned child: its main module is ``__mp_main__`` already, and stays so."""
    result = _run_main_file(tmp_path, "train_child", _MAIN_CLASS_IN_A_SPAWNED_CHILD, "script")
    assert result.stdout.splitlines()[-1] == "done"


def _run_main_file(folder, name, source, how):
    """Write ``source`` to ``folder/name.py`` and run it as the main module (``python name.py``
    or ``python -m name``, from ``folder``, with ``folder`` as its argument); it must exit 0."""
    from _subproc import child_env

    (folder / f"{name}.py").write_text(source)
    argv = [sys.executable, f"{name}.py"] if how == "script" else [sys.executable, "-m", name]
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    result = subprocess.run([*argv, str(folder)], cwd=folder, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("how", ["script", "module"])
def test_objects_of_main_saved_by_the_writer_process_load_in_the_program_that_saved_them(tmp_path, how):
    """Spawn re-imports the main module as ``__mp_main__``; the writer's torch.save then wrote
    its classes and functions as ``__mp_main__.Config``, which ``torch.load`` in the training
    program (where they are ``__main__.Config``) cannot find. The file must be torch.save's."""
    result = _run_main_file(tmp_path, "train_main", _MAIN_CLASS_SCRIPT.format(), how)
    assert result.stdout.splitlines()[-1] == "done"


_UNGUARDED_SCRIPT = """
import os, sys
import torch
from asyncckpt import AsyncCheckpointIO
from asyncckpt.errors import NotSerializableError

# Everything runs at import: no `if __name__ == "__main__":` guard (common on Linux, where
# nothing else spawns). The writer process must not run this file again. Run from a file, or
# read from standard input (where spawn could not run it again at all).
folder = {folder!r}
with open(os.path.join(folder, "runs.txt"), "a") as f:
    f.write(f"{{os.getpid()}}\\n")


class Config:  # the writer process cannot import it: refused at the call
    lr = 0.1


io = AsyncCheckpointIO(writer="process")
for step in range(2):
    io.save_checkpoint({{"w": torch.full((3,), float(step))}}, os.path.join(folder, f"s{{step}}.ckpt"))
os.chdir("/")  # the main file is still found where the program started
try:
    io.save_checkpoint({{"cfg": Config()}}, os.path.join(folder, "cfg.ckpt"))
except NotSerializableError as err:
    print("REFUSED", err)
io.teardown()
print("done")
"""


@pytest.mark.parametrize("how", ["script", "module"])
def test_an_unguarded_training_script_is_not_run_again_by_the_writer_process(tmp_path, how):
    """Spawn re-imports the main file in the writer process; with no ``__main__`` guard that
    re-ran the whole training script there (a second training run, a second
    ``init_process_group``...) until its own writer start failed, and every save failed as
    ``WriterDiedError``. The writer needs ``__main__`` only for a checkpoint (or wrapped IO)
    holding its classes; such a save from a script that runs its training at import is refused
    at the call, saying what to do."""
    result = _run_main_file(tmp_path, "train_unguarded", _UNGUARDED_SCRIPT.format(folder=str(tmp_path)), how)
    runs = (tmp_path / "runs.txt").read_text().split()
    assert len(runs) == 1, f"the training script ran {len(runs)} times: {runs}"
    for step in range(2):
        assert torch.equal(load(tmp_path / f"s{step}.ckpt")["w"], torch.full((3,), float(step)))
    assert "REFUSED" in result.stdout and "'Config'" in result.stdout, (result.stdout, result.stderr[-2000:])
    assert '__name__ == "__main__"' in result.stdout
    assert not (tmp_path / "cfg.ckpt").exists()
    assert result.stdout.splitlines()[-1] == "done"


@pytest.mark.parametrize(
    "source,runs",
    [
        ('"""doc"""\nimport os\nX = 1\nlog = make_logger()\ndef f():\n    g()\nclass C:\n    pass\n', False),
        ('import sys, logging, torch\nsys.path.insert(0, "..")\nlogging.basicConfig()\ntorch.manual_seed(0)\n'
         "L.seed_everything(42)\n", False),
        ('if __name__ == "__main__":\n    train()\n    for i in range(3):\n        step()\n', False),
        ("try:\n    import apex\nexcept ImportError:\n    apex = None\n", False),
        ("train()\n", True),
        ("trainer.fit(model)\n", True),
        ("for step in range(10):\n    pass\n", True),
        ("with open('x') as f:\n    pass\n", True),
        ("if torch.cuda.is_available():\n    main()\n", True),
        ("try:\n    main()\nfinally:\n    pass\n", True),
        ('if __name__ == "__main__":\n    main()\nelse:\n    worker()\n', True),
    ],
    ids=["definitions", "setup-calls", "guarded", "try-import", "call", "method-call", "loop", "with", "if", "try",
         "guard-else"],
)
def test_which_main_files_count_as_running_code_at_import(source, runs):
    """The rule that decides whether the writer may import the main module for a checkpoint
    holding its classes: code outside the guard other than definitions and setup calls."""
    from asyncckpt._writers.spawn_check import runs_code_at_import

    assert runs_code_at_import(source) is runs


_MAIN_GONE_SCRIPT = """
import multiprocessing, os, sys
import torch
from asyncckpt import AsyncCheckpointIO
from asyncckpt.errors import CheckpointSaveError

# A main module that refuses to be imported by any child process: the writer cannot import it.
assert multiprocessing.parent_process() is None, "run this script directly"


class Config:
    lr = 0.1


if __name__ == "__main__":
    folder = sys.argv[1]
    io = AsyncCheckpointIO(writer="process")
    io.save_checkpoint({"w": torch.ones(2)}, os.path.join(folder, "plain.ckpt"))
    io.save_checkpoint({"cfg": Config()}, os.path.join(folder, "cfg.ckpt"))
    try:
        io.flush()
    except CheckpointSaveError as err:
        print("FAILED", err)
    io.save_checkpoint({"w": torch.zeros(2)}, os.path.join(folder, "after.ckpt"))
    io.teardown()
    print("done")
"""


def test_a_main_module_the_writer_cannot_import_fails_that_save_saying_why_and_not_the_others(tmp_path):
    """The writer imports the main module at the first save holding its classes; where that
    import fails (here the script asserts it is run directly), that save fails naming the cause,
    and the writer goes on with saves that need nothing from it."""
    result = _run_main_file(tmp_path, "train_gone", _MAIN_GONE_SCRIPT, "script")
    assert "FAILED" in result.stdout and "could not import the training program's main module" in result.stdout, (
        result.stdout, result.stderr[-2000:])
    assert not (tmp_path / "cfg.ckpt").exists()
    assert torch.equal(load(tmp_path / "plain.ckpt")["w"], torch.ones(2))
    assert torch.equal(load(tmp_path / "after.ckpt")["w"], torch.zeros(2))
    assert result.stdout.splitlines()[-1] == "done"


@pytest.mark.parametrize("how", ["python - < file", "python - <<heredoc", "python < file"])
def test_a_script_read_from_standard_input_saves_with_the_writer_process(tmp_path, how):
    """``python - < train.py`` (or a heredoc): ``__main__.__file__`` is ``'<stdin>'``, which
    spawn tried to re-run in the writer process (``FileNotFoundError`` there, and the save failed
    later as ``WriterDiedError``). The writer needs nothing from such a ``__main__``; a save
    holding one of its classes is refused at the call, saying why."""
    from _subproc import child_env

    source = _UNGUARDED_SCRIPT.format(folder=str(tmp_path))
    script = tmp_path / "train.py"
    script.write_text(source)
    argv = [sys.executable] + ([] if how == "python < file" else ["-"])
    if how == "python - <<heredoc":
        result = subprocess.run(argv, input=source, capture_output=True, text=True, env=child_env(), timeout=120)
    else:
        with open(script) as stdin:
            result = subprocess.run(argv, stdin=stdin, capture_output=True, text=True, env=child_env(), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(load(tmp_path / "s1.ckpt")["w"], torch.ones(3))
    assert "REFUSED" in result.stdout and "'Config'" in result.stdout and "standard input" in result.stdout, (
        result.stdout, result.stderr[-2000:])
    assert not (tmp_path / "cfg.ckpt").exists()
    assert result.stdout.splitlines()[-1] == "done"


@pytest.mark.parametrize("how", ["sigint", "users-sigterm-handler-exits"])
def test_a_hand_over_interrupted_by_an_exception_from_a_signal_handler_keeps_the_saves_sent_before(tmp_path, how):
    """A save handed to a busy writer process waits in the send; an exception raised there by a
    signal handler (Ctrl-C, or the user's own SIGTERM handler calling ``sys.exit``, installed
    over asyncckpt's) leaves a partial message in the pipe. The writer was then killed, and the
    earlier save it was writing, accepted and counted, was lost. Now its input is ended instead:
    it finishes what it was sent whole, then exits; the interrupted save, not written, is logged
    as such and not raised again."""
    import textwrap

    from _subproc import finish, start_python

    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(
        f"""
        import os, signal, sys, threading
        from asyncckpt import AsyncCheckpointIO
        from _slow_disk import SlowDiskIO

        def users_handler(signum, frame):
            sys.exit(5)

        if __name__ == "__main__":
            folder = sys.argv[1]
            io = AsyncCheckpointIO(SlowDiskIO(2.5), writer="process")
            io.save_checkpoint({{"v": 0}}, os.path.join(folder, "first.ckpt"))
            if {how!r} == "sigint":
                sig = signal.SIGINT
                # Python's own Ctrl-C handler: a background job (a CI runner started with '&')
                # inherits SIGINT ignored, and Python then installs none, so Ctrl-C did nothing.
                signal.signal(signal.SIGINT, signal.default_int_handler)
            else:
                sig = signal.SIGTERM
                signal.signal(signal.SIGTERM, users_handler)  # replaces asyncckpt's
            threading.Timer(1.2, os.kill, (os.getpid(), sig)).start()
            try:  # about 3 MB to pickle: the send waits for the writer, busy with first.ckpt
                io.save_checkpoint({{"big": [f"s{{i}}" for i in range(300_000)]}}, os.path.join(folder, "second.ckpt"))
            except KeyboardInterrupt:
                print("interrupted", flush=True)
            io.flush()
            print("flushed", flush=True)
        """
    ))
    proc = start_python(script, tmp_path)
    try:
        out, err = finish(proc, 60)
    finally:
        proc.kill()
    if how == "sigint":
        assert proc.returncode == 0 and out.split() == ["interrupted", "flushed"], (out, err)
    else:
        assert proc.returncode == 5, (out, err)
    assert torch.load(tmp_path / "first.ckpt", weights_only=True) == {"v": 0}, err
    assert not (tmp_path / "second.ckpt").exists()
    assert "WriterDiedError" not in err, err
    # not raised again (its call raised the interrupt), but said
    stopped_by = "KeyboardInterrupt" if how == "sigint" else "SystemExit"
    assert f"'{tmp_path / 'second.ckpt'}' was not carried out: a {stopped_by} interrupted it" in err, err
    assert not temp_files(tmp_path), err


# -- the messages to and from the writer process --------------------------------------------


def _one_of_each_message() -> list:
    from asyncckpt._writers import messages as m

    return [
        m.SaveMsg(7, "/ckpt/a.ckpt", {"key": "value"}, b"skeleton", 2, (("groups",), ("specs",))),
        m.SaveMsg(8, "/ckpt/a.ckpt", None, b"skeleton", 2, None),
        m.RemoveMsg(9, "/ckpt/old.ckpt", (7, 8)),
        m.AbortMsg(10, "/ckpt/shared"),
        m.ShareArenaMsg(2, 1 << 20),
        m.DropArenaMsg(2),
        m.ImportMainMsg(("path", "/work/train.py")),
        m.ProcessStateMsg(("/work", "/usr/lib/python3.11"), 0o022, {"HOME": "/root"}, 1000),
        m.StopMsg(),
        m.DoneMsg(7, None, 0.25),
        m.SkippedMsg(9, 7),
        m.StoppedMsg(),
    ]


@pytest.mark.parametrize("entry", ["absolute", "relative"])
def test_a_class_of_a_folder_put_on_sys_path_after_the_writer_started_is_saved(tmp_path, monkeypatch, entry):
    """The writer process starts with the training process's ``sys.path`` of that moment. A
    folder put on it later (``sys.path.append("..")``, common in research code) made the
    training process import a module the writer could not: the save of one of its objects
    failed in the background (ModuleNotFoundError), where ``torch.save`` writes it. A relative
    entry means the working folder of the training process, as its own imports take it."""
    name = f"later_module_{entry}_{os.getpid()}"
    for folder in ("spawned", "work", "work/mods"):
        (tmp_path / folder).mkdir()
    source = "class Config:\n    def __init__(self, lr):\n        self.lr = lr\n"
    (tmp_path / "work" / "mods" / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path / "spawned")
    io = AsyncCheckpointIO(TorchCheckpointIO(), writer="process")
    try:
        io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "warm.ckpt")
        io.flush()  # the writer runs, with the sys.path of its start
        monkeypatch.chdir(tmp_path / "work")
        monkeypatch.syspath_prepend(str(tmp_path / "work" / "mods") if entry == "absolute" else "mods")
        module = __import__(name)
        io.save_checkpoint({"w": torch.ones(2), "cfg": module.Config(0.5)}, tmp_path / "x.ckpt")
        io.flush()
        assert load(tmp_path / "x.ckpt")["cfg"].lr == 0.5
    finally:
        io.teardown()
        sys.modules.pop(name, None)


def test_a_checkpoint_nested_deeper_than_the_default_recursion_limit_is_saved_as_torch_save_saves_it(tmp_path):
    """A program that raised ``sys.setrecursionlimit`` to save a deeply nested object (torch.save
    takes it then) had its save fail in the background: the writer process rebuilt and pickled
    the checkpoint under the default limit (RecursionError)."""
    deep: list = []
    inner = deep
    for _ in range(3000):
        inner.append([])
        inner = inner[0]
    inner.append(torch.ones(2))
    old = sys.getrecursionlimit()
    raised_first = AsyncCheckpointIO(TorchCheckpointIO(), writer="process")  # made after the limit was raised
    io = AsyncCheckpointIO(TorchCheckpointIO(), writer="process")
    try:
        io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "warm.ckpt")
        io.flush()  # the writer runs, with the default limit
        sys.setrecursionlimit(20_000)
        raised_first.teardown()  # its next save starts a writer process now, under the raised limit
        torch.save({"deep": deep}, tmp_path / "reference.ckpt")
        io.save_checkpoint({"deep": deep}, tmp_path / "deep.ckpt")
        raised_first.save_checkpoint({"deep": deep}, tmp_path / "deep_first.ckpt")
        io.flush()
        raised_first.flush()
        loaded = [torch.load(tmp_path / name, weights_only=False)["deep"] for name in ("deep.ckpt", "deep_first.ckpt")]
    finally:
        sys.setrecursionlimit(old)
        io.teardown()
        raised_first.teardown()
    for one in loaded:
        for _ in range(3000):
            one = one[0]
        assert torch.equal(one[0], torch.ones(2))


class EnvironmentRecordingIO(TorchCheckpointIO):
    """Writes the value of ``ASYNCCKPT_TEST_SETTING`` in its environment into each file (as an
    IO reading credentials or a region from the environment would use it)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        checkpoint = dict(checkpoint, setting=os.environ.get("ASYNCCKPT_TEST_SETTING"))
        super().save_checkpoint(checkpoint, path, storage_options)


def test_an_environment_variable_set_after_the_writer_started_is_seen_by_the_wrapped_io(tmp_path, monkeypatch):
    """Credentials or settings put into ``os.environ`` after the engine was made (a Trainer is
    made before the secrets are read) reached a thread writer's IO, not the writer process's,
    which kept the environment of its start: saves to object storage failed there for want of
    credentials. Each operation sees the environment at its call."""
    monkeypatch.delenv("ASYNCCKPT_TEST_SETTING", raising=False)
    io = AsyncCheckpointIO(EnvironmentRecordingIO(), writer="process")
    try:
        io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "before.ckpt")
        io.flush()  # the writer runs, with the environment of its start
        monkeypatch.setenv("ASYNCCKPT_TEST_SETTING", "set later")
        io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "after.ckpt")
        monkeypatch.delenv("ASYNCCKPT_TEST_SETTING")
        io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "unset.ckpt")
        io.flush()
    finally:
        io.teardown()
    assert load(tmp_path / "before.ckpt")["setting"] is None
    assert load(tmp_path / "after.ckpt")["setting"] == "set later"
    assert load(tmp_path / "unset.ckpt")["setting"] is None


def test_a_file_gets_the_mode_the_umask_at_its_call_gives_as_torch_save_would(tmp_path):
    """The writer process keeps the umask it was started with; a program that tightened it
    later (``os.umask(0o077)``, to keep checkpoints private) got files readable by everyone.
    Each file gets the mode ``torch.save`` would give it at the call."""
    import stat

    io = AsyncCheckpointIO(TorchCheckpointIO(), writer="process")
    old = os.umask(0o022)
    try:
        io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "open.ckpt")
        io.flush()  # the writer runs, with the umask of its start
        os.umask(0o077)
        io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "private.ckpt")
        torch.save({"w": torch.ones(2)}, tmp_path / "private_reference.ckpt")
        os.umask(0o002)
        io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "shared.ckpt")
        torch.save({"w": torch.ones(2)}, tmp_path / "shared_reference.ckpt")
        io.flush()
    finally:
        os.umask(old)
        io.teardown()

    def mode(name):
        return stat.S_IMODE(os.stat(tmp_path / name).st_mode)

    assert mode("open.ckpt") == 0o644
    assert mode("private.ckpt") == mode("private_reference.ckpt") == 0o600
    assert mode("shared.ckpt") == mode("shared_reference.ckpt") == 0o664


def test_every_message_round_trips_through_pickle_and_stays_small():
    import dataclasses
    import pickle

    from asyncckpt._writers import messages as m

    samples = _one_of_each_message()
    every_class = {c for c in vars(m).values() if dataclasses.is_dataclass(c)}
    assert {type(x) for x in samples} == every_class  # a new message gets a sample here
    for message in samples:
        for clone in (pickle.loads(pickle.dumps(message)), pickle.loads(m.encode(message))):
            assert type(clone) is type(message) and clone == message
        assert not hasattr(message, "__dict__")  # slotted
        if dataclasses.fields(message):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(message, dataclasses.fields(message)[0].name, 0)
    assert len(m.encode(m.SaveMsg(123456, "/ckpt/step=000123.ckpt", None, b"", 3, None))) < 128
    error = ValueError("disk full")
    clone = pickle.loads(m.encode(m.DoneMsg(3, error, 1.5)))
    assert type(clone.error) is ValueError and clone.error.args == error.args and clone.write_seconds == 1.5


@pytest.mark.parametrize("message", [("save", 1, "/ckpt/a.ckpt", ()), None])
def test_an_unknown_message_ends_the_writer_process_loudly(message, capfd):
    """A message the writer process does not know (here: the tuples of the old protocol) is an
    error that ends it with a traceback; it does not skip it and wait for the next one."""
    import multiprocessing
    import pickle

    from asyncckpt._writers.process import writer_main

    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    process = ctx.Process(target=writer_main, args=(child_conn, pickle.dumps(TorchCheckpointIO()), 0, True))
    process.start()
    child_conn.close()
    try:
        parent_conn.send(message)
        process.join(60)
        assert process.exitcode == 1
        with pytest.raises(EOFError):
            parent_conn.recv()  # no reply: nothing was done
    finally:
        if process.exitcode is None:
            process.kill()
            process.join(5)
        parent_conn.close()
    assert "UnknownMessageError" in capfd.readouterr().err


_KILLED_PARENT = """
import multiprocessing, os, signal, sys
import torch
from asyncckpt import AsyncCheckpointIO
from _slow_disk import SlowDiskIO  # fault injection: a slow disk, so saves queue behind the first

if __name__ == "__main__":  # spawn re-imports this file in the writer process
    folder = sys.argv[1]
    io = AsyncCheckpointIO(SlowDiskIO(1.5), writer="process", max_pending=3)
    for i in range(3):
        io.save_checkpoint({"i": i}, os.path.join(folder, f"{i}.ckpt"))
    print(*(p.pid for p in multiprocessing.active_children()), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the training process dies (the OOM killer, say)
"""


def test_a_writer_process_whose_parent_died_ends_its_write_and_exits_quietly(tmp_path):
    """The training process is SIGKILLed with saves queued behind the one being written. The
    writer process, orphaned, finishes that write (atomic, as ever), then exits without starting
    the saves queued behind it (a restarted job may be writing the same paths by then, and an
    orphan's late write would put an older checkpoint back) and without a traceback: it used to
    die of a BrokenPipeError when it reported the first write to the dead parent."""
    psutil = pytest.importorskip("psutil")
    from _subproc import finish, start_python

    script = tmp_path / "script.py"
    script.write_text(_KILLED_PARENT)
    folder = tmp_path / "out"
    folder.mkdir()
    with open(tmp_path / "stderr", "w") as stderr:  # the orphan inherits it; a pipe would stay open
        proc = start_python(script, folder, stderr=stderr)
        out, _ = finish(proc, 60)
    assert proc.returncode == -signal.SIGKILL
    (writer_pid,) = map(int, out.split())
    try:
        psutil.Process(writer_pid).wait(30)
    except psutil.NoSuchProcess:
        pass
    err = (tmp_path / "stderr").read_text()
    assert "Traceback" not in err, err
    assert "is gone" in err, err
    assert load(folder / "0.ckpt") == {"i": 0}
    assert sorted(os.listdir(folder)) == ["0.ckpt"], err


_MAIN_CLASS_AFTER_A_SPARSE_TENSOR = """
import os, sys
import torch
from asyncckpt import AsyncCheckpointIO


class Config:
    lr = 0.1


if __name__ == "__main__":
    folder = sys.argv[1]
    io_ = AsyncCheckpointIO(writer="process")  # nothing of __main__ in the wrapped IO
    io_.save_checkpoint({"sparse": torch.eye(3).to_sparse(), "cfg": Config()}, os.path.join(folder, "a.ckpt"))
    io_.teardown()
    loaded = torch.load(os.path.join(folder, "a.ckpt"), weights_only=False)
    assert type(loaded["cfg"]) is Config
    print("done")
"""


def test_a_main_class_after_a_sparse_tensor_is_saved_by_the_writer_process(tmp_path):
    """End to end, the case ``test_edges.py``'s probe test pins: the first save holding a
    ``__main__`` class holds a sparse tensor before it; the writer must import the main module."""
    result = _run_main_file(tmp_path, "train_sparse_main", _MAIN_CLASS_AFTER_A_SPARSE_TENSOR, "script")
    assert result.stdout.splitlines()[-1] == "done"


_MAIN_CLASS_IN_STORAGE_OPTIONS = """
import os, sys
import torch
from asyncckpt import AsyncCheckpointIO


class TokenProvider:  # a user's credentials helper, handed to fsspec through storage_options
    token = "not-a-secret"


if __name__ == "__main__":
    io_ = AsyncCheckpointIO(writer="process")
    io_.save_checkpoint({"w": torch.ones(2)}, "memory://bucket/a.ckpt", storage_options={"provider": TokenProvider()})
    io_.flush()
    pid = io_.writer.pid  # the same writer process writes the next save
    io_.save_checkpoint({"w": torch.zeros(2)}, "memory://bucket/b.ckpt")
    io_.flush()
    assert io_.writer.pid == pid, "the writer process died"
    io_.teardown()
    print("done")
"""


def test_a_main_class_in_storage_options_is_imported_by_the_writer_process(tmp_path):
    """Found by attack: ``storage_options`` travel to the writer process inside the save's
    message; one holding an object of a ``__main__`` class (a credentials helper defined in the
    training script) could not be unpickled there, which killed the writer process: the save
    failed as ``WriterDiedError``. The main module is now imported first, as for the checkpoint."""
    result = _run_main_file(tmp_path, "train_options_main", _MAIN_CLASS_IN_STORAGE_OPTIONS, "script")
    assert result.stdout.splitlines()[-1] == "done", result.stderr[-2000:]
