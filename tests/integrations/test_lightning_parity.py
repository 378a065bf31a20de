"""A Trainer with asyncckpt behaves as with Lightning's default IO, around ``fit`` as well as inside it.

Real Trainers of both package families. The only difference allowed is the one inherent to saving
in the background while a stage runs (see docs/lightning.md, "What differs from a synchronous
run"): outside a running stage every operation is done when it returns, and no writer thread is
left once ``fit``/``validate``/``test`` has returned.
"""

from __future__ import annotations

import io as _io
import logging
import os
import pickle
import textwrap
import threading
import time

import pytest
import torch
from _lightning_helpers import (  # noqa: F401 - no_writer_thread_left is an autouse fixture
    FAMILIES,
    load_family,
    make_module,
    make_trainer,
    no_writer_thread_left,
    writer_threads,
)

from _subproc import TESTS, run_python

pytestmark = pytest.mark.lightning



def slow_io(fam, delay=0.3):
    """Lightning's default IO on a slow disk (fault injection: each write starts ``delay`` s late),
    so that a write still in the background when the call returns is seen, not a lucky race."""

    class SlowIO(fam.TorchIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            time.sleep(delay)
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)

    return SlowIO()


def every(n, **kw):
    return dict(every_n_train_steps=n, save_top_k=-1, filename="{step}", **kw)


def test_io_after_fit_is_done_when_it_returns(fam, tmp_path):
    io = fam.ours.AsyncCheckpointIO(slow_io(fam))
    mc = fam.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", **every(2))
    trainer = make_trainer(fam, tmp_path, plugins=[io], callbacks=[mc], max_steps=4)
    model = make_module(fam.pl)
    trainer.fit(model)
    assert len(io.stats) == 2  # the saves inside fit were asynchronous
    assert writer_threads() == []  # and fit's teardown stopped the writer

    path = tmp_path / "after-fit.ckpt"
    trainer.save_checkpoint(path)
    assert os.path.exists(path)
    assert torch.load(path, weights_only=False)["global_step"] == 4
    loaded = type(model).load_from_checkpoint(path)
    assert torch.equal(loaded.layer.weight, model.layer.weight)
    resumed = make_module(fam.pl)
    make_trainer(fam, tmp_path, max_steps=6, enable_checkpointing=False).fit(resumed, ckpt_path=path)
    assert resumed.start_step == 4  # a new Trainer with Lightning's default IO resumed from it

    trainer.strategy.remove_checkpoint(path)
    assert not path.exists()
    trainer.test(model)  # a stage without saves starts no thread either
    assert writer_threads() == [] and len(io.stats) == 2 and io.pending == 0


def test_io_in_on_fit_end_is_done_when_it_returns(fam, tmp_path):
    """``on_fit_end`` runs after the strategy's teardown: nothing would ever flush a save made there."""
    seen = {}

    class SaveAtFitEnd(fam.pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            trainer.save_checkpoint(tmp_path / "fit-end.ckpt")
            seen["exists"] = (tmp_path / "fit-end.ckpt").exists()

    io = fam.ours.AsyncCheckpointIO(slow_io(fam))
    make_trainer(fam, tmp_path, plugins=[io], callbacks=[SaveAtFitEnd()], max_steps=2).fit(make_module(fam.pl))
    assert seen["exists"] and io.pending == 0 and writer_threads() == []


def test_only_the_thread_running_the_stage_saves_in_the_background(fam, tmp_path):
    """Another thread during the stage, and no Trainer at all: the call writes before it returns."""
    seen = {}

    class SaveFromAnotherThread(fam.pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                trainer.save_checkpoint(tmp_path / "stage-thread.ckpt")
                seen["queued"] = trainer.strategy.checkpoint_io.pending == 1

                def other():
                    trainer.strategy.checkpoint_io.save_checkpoint({"x": torch.ones(2)}, tmp_path / "other.ckpt")
                    seen["other_exists"] = (tmp_path / "other.ckpt").exists()

                thread = threading.Thread(target=other)
                thread.start()
                thread.join()

    io = fam.ours.AsyncCheckpointIO(slow_io(fam))
    make_trainer(fam, tmp_path, plugins=[io], callbacks=[SaveFromAnotherThread()], max_steps=3).fit(
        make_module(fam.pl)
    )
    assert seen == {"queued": True, "other_exists": True}
    alone = fam.ours.AsyncCheckpointIO(slow_io(fam))
    alone.save_checkpoint({"x": torch.ones(2)}, tmp_path / "alone.ckpt")
    assert (tmp_path / "alone.ckpt").exists() and alone.pending == 0 and writer_threads() == []


def _restore_env(saved):
    for key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        if key in saved:
            os.environ[key] = saved[key]
        else:
            os.environ.pop(key, None)


@pytest.mark.slow
@pytest.mark.parametrize("family,strategy", [("lightning", "ddp_fork"), ("pytorch_lightning", "ddp_notebook")])
def test_forked_ddp_on_cpu(family, strategy, tmp_path):
    """The fork launcher saves ``.temp.ckpt`` in the worker after teardown and reads it in the parent."""
    fam = load_family(family)

    class SeeFiles(fam.pl.Callback):
        """Runs after the asyncckpt callback's teardown, on every rank: are rank 0's files there?"""

        def teardown(self, trainer, pl_module, stage):
            seen = sorted(os.listdir(tmp_path / "ckpt")) if (tmp_path / "ckpt").exists() else []
            (tmp_path / f"seen-by-{trainer.global_rank}").write_text(",".join(seen))

    saved = dict(os.environ)
    try:
        io = fam.ours.AsyncCheckpointIO(slow_io(fam))  # the worker would exit before a background write
        mc = fam.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", **every(2))
        callbacks = [mc, fam.ours.AsyncCheckpointCallback(), SeeFiles()]
        trainer = make_trainer(
            fam, tmp_path, plugins=[io], callbacks=callbacks, max_steps=4, strategy=strategy, devices=2
        )
        model = make_module(fam.pl)
        trainer.fit(model)
    finally:
        _restore_env(saved)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step=2.ckpt", "step=4.ckpt"]
    for rank in (0, 1):  # as after a synchronous run, every rank's stage ends with the files on disk
        assert (tmp_path / f"seen-by-{rank}").read_text() == "step=2.ckpt,step=4.ckpt"
    last = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=False)
    assert torch.equal(last["state_dict"]["layer.weight"], model.layer.weight)  # the parent got the weights
    path = tmp_path / "after.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["state_dict"]["layer.weight"].equal(model.layer.weight)
    assert io.pending == 0 and writer_threads() == []


@pytest.mark.slow
@pytest.mark.parametrize("family,then", [("lightning", "test"), ("pytorch_lightning", "validate")])
def test_ddp_spawn_then_evaluate_on_the_same_trainer(family, then, tmp_path):
    """The parent reads and removes the workers' ``.temp.ckpt``, then pickles the Trainer again."""
    fam = load_family(family)
    saved = dict(os.environ)
    try:
        io = fam.ours.AsyncCheckpointIO()
        mc = fam.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", **every(2))
        trainer = make_trainer(
            fam,
            tmp_path,
            plugins=[io],
            callbacks=[mc, fam.ours.AsyncCheckpointCallback()],
            max_steps=4,
            strategy="ddp_spawn",
            devices=1,
        )
        model = make_module(fam.pl)
        trainer.fit(model)
        assert io.pending == 0 and writer_threads() == []
        getattr(trainer, then)(model)
    finally:
        _restore_env(saved)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step=2.ckpt", "step=4.ckpt"]
    path = tmp_path / "after.ckpt"
    trainer.save_checkpoint(path)
    assert os.path.exists(path) and io.pending == 0 and writer_threads() == []


VERSIONED = dict(save_top_k=3, monitor="score", mode="max", every_n_train_steps=1, filename="{epoch}")


def test_trainer_and_model_checkpoint_pickle_with_the_callback(fam, tmp_path):
    mc = fam.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", **VERSIONED)
    trainer = make_trainer(
        fam, tmp_path, plugins=[fam.ours.AsyncCheckpointIO()], callbacks=[mc, fam.ours.AsyncCheckpointCallback()]
    )
    trainer.fit(make_module(fam.pl))
    copy = pickle.loads(pickle.dumps(trainer.checkpoint_callback))
    torch.save(trainer, _io.BytesIO())
    existing = str(tmp_path / "ckpt" / "epoch=0.ckpt")
    assert copy.file_exists(existing, trainer) and not copy.file_exists(existing + ".missing", trainer)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch=0-v1.ckpt", "epoch=0-v2.ckpt", "epoch=0.ckpt"]


@pytest.mark.parametrize("kind", ["staticmethod-subclass", "instance-attribute"])
def test_the_callback_keeps_a_model_checkpoints_own_file_exists(fam, tmp_path, kind):
    asked = []

    def own_check(filepath, trainer):
        asked.append(os.path.basename(filepath))
        return os.path.exists(filepath)

    if kind == "staticmethod-subclass":
        cls = type("OwnCheck", (fam.pl.callbacks.ModelCheckpoint,), {"file_exists": staticmethod(own_check)})
        mc = cls(dirpath=tmp_path / "ckpt", **VERSIONED)
    else:
        mc = fam.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", **VERSIONED)
        mc.file_exists = own_check
    trainer = make_trainer(
        fam, tmp_path, plugins=[fam.ours.AsyncCheckpointIO()], callbacks=[mc, fam.ours.AsyncCheckpointCallback()]
    )
    trainer.fit(make_module(fam.pl))
    assert asked  # paths with nothing queued still go to the instance's own check
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch=0-v1.ckpt", "epoch=0-v2.ckpt", "epoch=0.ckpt"]


def test_stats_are_logged_at_lightnings_own_step(fam, tmp_path):
    records = []

    class Recording(fam.pl.loggers.Logger):
        name, version = "recording", 0

        def log_metrics(self, metrics, step=None):
            records.append((step, sorted(metrics)))

        def log_hyperparams(self, *args, **kwargs):
            pass

    io = fam.ours.AsyncCheckpointIO()
    mc = fam.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", **every(1))
    trainer = make_trainer(
        fam,
        tmp_path,
        plugins=[io],
        callbacks=[mc, fam.ours.AsyncCheckpointCallback()],
        logger=Recording(),
        log_every_n_steps=1,
        max_steps=8,
    )
    trainer.fit(make_module(fam.pl))
    ours = [step for step, keys in records if "asyncckpt/blocking_s" in keys]
    lightning = [step for step, keys in records if "score" in keys]
    assert len(ours) == 8 and lightning == list(range(8))
    steps = [step for step, _ in records]
    assert steps == sorted(steps), f"a logged step went backwards: {steps}"
    assert set(ours) <= set(lightning) | {trainer.fit_loop.epoch_loop._batches_that_stepped}


def test_load_arguments_reach_the_wrapped_io_unchanged(fam, tmp_path):
    class Recording(fam.TorchIO):
        def __init__(self):
            self.calls = []

        def load_checkpoint(self, path, **kwargs):
            self.calls.append(kwargs)
            return super().load_checkpoint(path, **kwargs)

    path = tmp_path / "start.ckpt"
    trainer = make_trainer(fam, tmp_path, max_steps=2, enable_checkpointing=False)
    trainer.fit(make_module(fam.pl))
    trainer.save_checkpoint(path)

    reference = Recording()
    make_trainer(fam, tmp_path, plugins=[reference], max_steps=4).fit(make_module(fam.pl), ckpt_path=path)
    wrapped = Recording()
    io = fam.ours.AsyncCheckpointIO(wrapped)
    make_trainer(fam, tmp_path, plugins=[io], max_steps=4).fit(make_module(fam.pl), ckpt_path=path)
    assert wrapped.calls == reference.calls and reference.calls  # Lightning passes weights_only=None
    io.load_checkpoint(path, map_location="cpu")
    assert wrapped.calls[-1] == {"map_location": "cpu"}


def _save_with_storage_options(trainer, path):
    try:
        trainer.save_checkpoint(path, storage_options={"compression": "none"})
    except Exception as err:  # noqa: BLE001 - compared with what the default IO raises
        return err
    return None


def test_storage_options_fail_at_the_call_after_fit(fam, tmp_path):
    reference = make_trainer(fam, tmp_path, max_steps=2, enable_checkpointing=False)
    reference.fit(make_module(fam.pl))
    expected = _save_with_storage_options(reference, tmp_path / "ref.ckpt")
    assert isinstance(expected, TypeError)

    io = fam.ours.AsyncCheckpointIO()
    trainer = make_trainer(fam, tmp_path, plugins=[io], max_steps=2, enable_checkpointing=False)
    trainer.fit(make_module(fam.pl))
    got = _save_with_storage_options(trainer, tmp_path / "ours.ckpt")
    assert type(got) is type(expected) and str(got) == str(expected)
    trainer.save_checkpoint(tmp_path / "ours.ckpt")  # nothing surfaces later
    assert io.pending == 0 and not list(tmp_path.glob("*asyncckpt-tmp*"))


def test_storage_options_fail_at_the_call_during_fit(fam, tmp_path):
    seen = {}

    class SaveWithOptions(fam.pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                seen["error"] = _save_with_storage_options(trainer, tmp_path / "in-fit.ckpt")

    io = fam.ours.AsyncCheckpointIO()
    trainer = make_trainer(fam, tmp_path, plugins=[io], callbacks=[SaveWithOptions()], max_steps=2)
    trainer.fit(make_module(fam.pl))
    assert isinstance(seen["error"], TypeError)


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from _lightning_helpers import load_family, make_module, make_trainer

    for name in ("lightning", "pytorch_lightning"):
        fam = load_family(name)
        for variant in ("default", "asyncckpt"):
            root = os.path.join(sys.argv[2], name, variant)

            class Preempt(fam.pl.Callback):
                def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                    if trainer.global_step == 3:
                        os.kill(os.getpid(), signal.SIGTERM)

            plugins = [fam.ours.AsyncCheckpointIO()] if variant == "asyncckpt" else []
            mc = fam.pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}")
            trainer = make_trainer(fam, root, plugins=plugins, callbacks=[mc, Preempt()], max_steps=8)
            try:
                trainer.fit(make_module(fam.pl))
            except BaseException as err:
                print(name, variant, "raised", type(err).__name__, sorted(os.listdir(root)), flush=True)
    """
)


@pytest.mark.slow
def test_sigterm_during_fit_stops_as_lightning_does(tmp_path):
    """Lightning's SIGTERM handler stops training gracefully (SIGTERMException, then teardown);
    asyncckpt's own handler, chained behind it, used to end the process at once."""
    proc = run_python(SIGTERM_SCRIPT, TESTS, tmp_path, timeout=300)
    lines = [line.split(" ", 2) for line in proc.stdout.splitlines() if " raised " in line]
    outcome = {(name, variant): rest for name, variant, rest in lines}
    assert proc.returncode == 0 and len(outcome) == 4, f"rc={proc.returncode} {proc.stdout} {proc.stderr[-2000:]}"
    for name in FAMILIES:
        assert outcome[(name, "asyncckpt")] == outcome[(name, "default")], outcome
        assert "SIGTERMException" in outcome[(name, "default")]


KEEPING_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from _lightning_helpers import load_family, make_module, make_trainer

    fam = load_family(sys.argv[1])
    kept = []

    class KeepingIO(fam.TorchIO):
        # Keeps what it gets, as Lightning's own async-plugin test does.
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            kept.append(checkpoint["state_dict"]["big"])
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)

    model = make_module(fam.pl)
    model.register_buffer("big", torch.full((4 * 1024 * 1024,), 7.0))  # 16 MB
    io = fam.ours.AsyncCheckpointIO(KeepingIO())
    mc = fam.pl.callbacks.ModelCheckpoint(dirpath=sys.argv[3], every_n_train_steps=2, save_top_k=-1)
    make_trainer(fam, sys.argv[3], plugins=[io], callbacks=[mc], max_steps=4).fit(model)
    assert len(kept) == 2 and all(bool((t == 7.0).all()) for t in kept), "kept tensors changed"
    print("ok")
    """
)


@pytest.mark.slow
def test_a_wrapped_io_may_keep_the_tensors_it_was_given(fam, tmp_path):
    proc = run_python(KEEPING_SCRIPT, fam.name, TESTS, tmp_path, timeout=180)
    assert proc.returncode == 0 and "ok" in proc.stdout, f"rc={proc.returncode} {proc.stderr[-2000:]}"


def test_outside_a_stage_an_io_that_keeps_the_checkpoint_keeps_it_as_it_was_at_the_call(fam, caplog):
    # Lightning's own test of its AsyncCheckpointIO (tests_pytorch/plugins/test_async_checkpoint.py),
    # with ours: no Trainer, an IO that keeps the object it is given, a change right after the call;
    # and a second save, which must not write into what the IO kept.
    class CapturingIO(fam.TorchIO):
        def __init__(self):
            super().__init__()
            self.saved = []

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            time.sleep(0.05)
            self.saved.append(checkpoint)

    base = CapturingIO()
    io = fam.ours.AsyncCheckpointIO(checkpoint_io=base, max_pending=1)
    t = torch.tensor([0.0])
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        for path in ("unused", "unused-too"):
            io.save_checkpoint({"w": t}, path=path)
            t.add_(1.0)
        io.teardown()
    assert [c["w"].item() for c in base.saved] == [0.0, 1.0]
    assert sum("kept" in r.getMessage() for r in caplog.records) == 1


def test_outside_a_stage_saves_from_two_threads_both_write_even_with_when_full_raise(fam, tmp_path):
    # A synchronous save needs a slot only for its copy; it waits for one rather than refusing.
    class SlowCustomIO(fam.TorchIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            time.sleep(0.2)
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)

    io = fam.ours.AsyncCheckpointIO(SlowCustomIO(), max_pending=1, when_full="raise")
    errors = []

    def save(name):
        try:
            io.save_checkpoint({"w": torch.full((8,), float(len(name)))}, tmp_path / name)
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=save, args=(name,)) for name in ("a", "bb")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    io.teardown()
    assert not errors, errors
    for name in ("a", "bb"):
        assert torch.equal(torch.load(tmp_path / name)["w"], torch.full((8,), float(len(name))))


def test_outside_a_stage_a_target_that_is_not_a_path_reaches_the_io_as_given(fam):
    # Outside a stage the wrapped IO decides what a target is (here a buffer), as with Lightning's own.
    class BufferIO(fam.TorchIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            torch.save(checkpoint, path)

    buffer = _io.BytesIO()
    io = fam.ours.AsyncCheckpointIO(BufferIO())
    io.save_checkpoint({"w": torch.ones(2)}, buffer)
    io.teardown()
    buffer.seek(0)
    assert torch.equal(torch.load(buffer)["w"], torch.ones(2))
