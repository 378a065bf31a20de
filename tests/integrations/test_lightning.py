"""asyncckpt as a Lightning plugin, with the real Trainer, for both package families.

Every test runs once for ``lightning`` and once for ``pytorch_lightning`` (skipped where that
family is not installed). Writes are slowed with ``threading.Event`` (fault injection, see
``_lightning_helpers.HeldIO``) so that Lightning really runs on while saves are pending.
"""

from __future__ import annotations

import json
import os
import pickle
import textwrap
import threading
import warnings

import pytest
import torch
from _lightning_helpers import (
    Boom,
    FailingIO,
    FullDiskAtIO,
    HeldIO,
    check_files,
    listing,
    make_module,
    make_trainer,
    no_writer_thread_left,  # noqa: F401 - autouse fixture
    steps,
)

from _subproc import ROOT, child_env, run_python
from asyncckpt.errors import CheckpointSaveError, NotSerializableError

pytestmark = pytest.mark.lightning



def _release_on_train_end(fam, held, seen):
    """A callback that lets the held writes go once the training loop is over."""

    class Release(fam.pl.Callback):
        def on_train_end(self, trainer, pl_module):
            seen["pending"] = trainer.strategy.checkpoint_io.pending
            seen["ops_before_release"] = list(held.ops)
            held.release.set()

    return Release()


TOPK_LAST = dict(save_top_k=2, monitor="score", mode="max", save_last=True, every_n_train_steps=1, filename="{step}")
TOPK_LINK = dict(TOPK_LAST, save_last="link")
# One name for every save: ModelCheckpoint adds -v1, -v2 when the name exists. Without the
# callback, a queued save is not on disk yet and the top-3 collapse into one file.
VERSIONED = dict(save_top_k=3, monitor="score", mode="max", every_n_train_steps=1, filename="{epoch}")


@pytest.mark.parametrize(
    "config,held",
    [(TOPK_LAST, False), (TOPK_LINK, False), (TOPK_LAST, True), (TOPK_LINK, True), (VERSIONED, True)],
    ids=["last", "link", "last-held", "link-held", "versioned-held"],
)
def test_model_checkpoint_leaves_the_same_files_as_sync(fam, tmp_path, config, held):
    # The synchronous default, for reference.
    sync_dir = tmp_path / "sync"
    make_trainer(fam, tmp_path, callbacks=[fam.pl.callbacks.ModelCheckpoint(dirpath=sync_dir, **config)]).fit(
        make_module(fam.pl)
    )

    async_dir = tmp_path / "async"
    callbacks = [fam.pl.callbacks.ModelCheckpoint(dirpath=async_dir, **config)]
    seen = {}
    if held:
        # Every write waits until training is over (#14035): top-k removals queue up behind saves.
        base = HeldIO()
        io = fam.ours.AsyncCheckpointIO(base, max_pending=32)
        callbacks += [_release_on_train_end(fam, base, seen), fam.ours.AsyncCheckpointCallback()]
    else:
        io = fam.ours.AsyncCheckpointIO()
    trainer = make_trainer(fam, tmp_path, plugins=[io], callbacks=callbacks)
    trainer.fit(make_module(fam.pl))

    assert io.pending == 0
    assert listing(async_dir) == listing(sync_dir)
    assert steps(async_dir) == steps(sync_dir)
    check_files(async_dir, last_step=8)
    if held:
        assert seen["ops_before_release"] == []  # nothing had been written while training ran
        if config is not VERSIONED:
            removes = [name for kind, name in base.ops if kind == "remove"]
            assert removes, "the score pattern should make ModelCheckpoint remove old top-k files"
            assert seen["pending"] == len(base.ops)  # every save and removal was still queued at release
            for name in removes:  # each removal ran after that file's save, never before
                assert base.ops.index(("save", name)) < base.ops.index(("remove", name))
    else:
        assert isinstance(io.checkpoint_io, fam.TorchIO)  # the strategy filled in its default


@pytest.mark.parametrize("how", ["plugin", "inner-wrapper", "outer-wrapper", "strategy"])
def test_the_strategy_fills_in_its_default_io(fam, tmp_path, how):
    class PassThrough(fam.Wrapping):
        """A user's wrapping IO; deliberately does not forward teardown (Lightning's base doesn't)."""

    callbacks = [fam.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)]
    kw = {}
    if how == "plugin":
        io = fam.ours.AsyncCheckpointIO()
        kw["plugins"] = [io]
    elif how == "inner-wrapper":
        inner = PassThrough()
        io = fam.ours.AsyncCheckpointIO(inner)
        kw["plugins"] = [io]
    elif how == "outer-wrapper":
        io = fam.ours.AsyncCheckpointIO()
        kw["plugins"] = [PassThrough(io)]
        callbacks.append(fam.ours.AsyncCheckpointCallback())  # flushes: the outer wrapper won't
    else:
        io = fam.ours.AsyncCheckpointIO()
        kw["strategy"] = fam.strategies.SingleDeviceStrategy("cpu", checkpoint_io=io)
    trainer = make_trainer(fam, tmp_path, callbacks=callbacks, max_steps=4, **kw)
    trainer.fit(make_module(fam.pl))

    base = inner.checkpoint_io if how == "inner-wrapper" else io.checkpoint_io
    assert type(base) is fam.TorchIO
    assert io.pending == 0 and len(io.stats) == 2
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    check_files(tmp_path / "ckpt")


def test_load_waits_for_a_pending_write(fam, tmp_path):
    held = HeldIO()
    io = fam.ours.AsyncCheckpointIO(held, max_pending=2)
    ckpt_dir = tmp_path / "ckpt"
    mc = fam.pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1, save_last=True)
    model = make_module(fam.pl)
    trainer = make_trainer(fam, tmp_path, plugins=[io], callbacks=[mc], max_steps=4)
    timer = threading.Timer(0.5, held.release.set)  # the writes are held until then
    timer.start()
    trainer.fit(model)  # teardown waits for the held writes
    final = model.layer.weight.detach().clone()
    trainer.test(model, ckpt_path="last")
    assert torch.equal(model.layer.weight, final) and model.tested

    # A save queued inside the stage, still pending when a load of it comes (held writes).
    held.release.clear()
    path = tmp_path / "manual.ckpt"
    seen = {}

    class SaveThenLoad(fam.pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                trainer.save_checkpoint(path)
                seen["saved"] = pl_module.layer.weight.detach().clone()
                seen["pending"], seen["exists"] = io.pending, path.exists()
                with torch.no_grad():
                    pl_module.layer.weight.add_(100.0)  # must not reach the file: it was saved before this
                threading.Timer(0.5, held.release.set).start()
                seen["loaded"] = trainer.strategy.load_checkpoint(path)  # waits for the held write

    trainer2 = make_trainer(fam, tmp_path, plugins=[io], callbacks=[SaveThenLoad()], max_steps=6)
    trainer2.fit(model)
    assert seen["pending"] == 1 and not seen["exists"]
    assert torch.equal(seen["loaded"]["state_dict"]["layer.weight"], seen["saved"])
    assert seen["loaded"]["global_step"] == 5


def test_exception_in_training_step(fam, tmp_path):
    config = dict(every_n_train_steps=1, save_top_k=-1, filename="{step}")
    with pytest.raises(Boom):
        make_trainer(
            fam, tmp_path, callbacks=[fam.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "sync", **config)]
        ).fit(make_module(fam.pl, fail_at=5))

    held = HeldIO()
    io = fam.ours.AsyncCheckpointIO(held, max_pending=8)
    threading.Timer(0.5, held.release.set).start()  # saves 1..5 are still queued when step 5 raises
    mc = fam.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "async", **config)
    trainer = make_trainer(fam, tmp_path, plugins=[io], callbacks=[mc, fam.ours.AsyncCheckpointCallback()])
    with pytest.raises(Boom):
        trainer.fit(make_module(fam.pl, fail_at=5))
    assert io.pending == 0
    assert listing(tmp_path / "async") == listing(tmp_path / "sync")
    assert sorted(os.listdir(tmp_path / "async")) == [f"step={i}.ckpt" for i in range(1, 6)]
    check_files(tmp_path / "async")


@pytest.mark.parametrize("training_fails", [False, True])
def test_a_failed_save_is_loud_and_never_hides_the_training_error(fam, tmp_path, training_fails):
    io = fam.ours.AsyncCheckpointIO(FailingIO())
    mc = fam.pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(fam, tmp_path, plugins=[io], callbacks=[mc], max_steps=5)
    model = make_module(fam.pl, fail_at=3 if training_fails else None)
    if training_fails:
        with pytest.raises(Boom) as info:
            trainer.fit(model)
        assert any("No space left" in note for note in getattr(info.value, "__notes__", []))
    else:
        with pytest.raises(CheckpointSaveError, match="No space left"):
            trainer.fit(model)
    assert [n for n in os.listdir(tmp_path) if n.endswith(".ckpt") or "asyncckpt-tmp" in n] == []


# save_top_k=1: the second step is the new best; saving it fails, and the old best must survive.
BEST_ONLY = dict(save_top_k=1, monitor="score", mode="max", every_n_train_steps=1, filename="{step}")


def test_a_best_save_that_fails_in_the_background_keeps_the_previous_best(fam, tmp_path):
    class FullDiskSync(fam.TorchIO):  # Lightning's default IO on a disk that fills at step=2
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            if os.path.basename(path) == "step=2.ckpt":
                raise OSError(28, "No space left on device (injected)")
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)

    mc = fam.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "sync", **BEST_ONLY)
    with pytest.raises(OSError, match="No space left"):
        make_trainer(fam, tmp_path, plugins=[FullDiskSync()], callbacks=[mc], max_steps=2).fit(make_module(fam.pl))
    assert steps(tmp_path / "sync") == {"step=1.ckpt": 1}  # the exception came before the removal

    full = FullDiskAtIO("step=2.ckpt")  # held until training ends: the removal is queued behind it
    seen = {}

    class Release(fam.pl.Callback):
        def on_train_end(self, trainer, pl_module):
            seen["queued"] = trainer.strategy.checkpoint_io.queued_kind(tmp_path / "async" / "step=1.ckpt")
            full.release.set()

    mc = fam.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "async", **BEST_ONLY)
    callbacks = [mc, fam.ours.AsyncCheckpointCallback(), Release()]
    trainer = make_trainer(fam, tmp_path, plugins=[fam.ours.AsyncCheckpointIO(full)], callbacks=callbacks, max_steps=2)
    with pytest.raises(CheckpointSaveError, match="step=2.ckpt") as info:
        trainer.fit(make_module(fam.pl))
    assert seen["queued"] == "remove"  # ModelCheckpoint queued the removal behind the failing save
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == 28
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "step=1.ckpt" in notes and "kept" in notes, notes
    assert full.ops == [("save", "step=1.ckpt")]  # never removed
    assert listing(tmp_path / "async") == listing(tmp_path / "sync")
    check_files(tmp_path / "async")


def test_a_best_save_refused_at_the_call_leaves_the_previous_best(fam, tmp_path):
    class Unpicklable(fam.pl.Callback):  # step=2's checkpoint cannot be pickled: refused at the call
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            if trainer.global_step == 2:
                checkpoint["hook"] = lambda: None

    for name, plugins in (("sync", None), ("async", [fam.ours.AsyncCheckpointIO()])):
        mc = fam.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / name, **BEST_ONLY)
        trainer = make_trainer(fam, tmp_path, plugins=plugins, callbacks=[Unpicklable(), mc], max_steps=2)
        with pytest.raises(Exception, match="lambda|pickle") as info:
            trainer.fit(make_module(fam.pl))
        if name == "async":
            assert isinstance(info.value, NotSerializableError)  # raised by save_checkpoint, nothing queued
        assert steps(tmp_path / name) == {"step=1.ckpt": 1}


def test_validate_fit_fit_with_one_plugin(fam, tmp_path):
    io = fam.ours.AsyncCheckpointIO()
    logger = fam.pl.loggers.CSVLogger(tmp_path, name="logs", version=0)
    mc = fam.pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}"
    )
    cb = fam.ours.AsyncCheckpointCallback()
    trainer = make_trainer(
        fam, tmp_path, plugins=[io], callbacks=[mc, cb], max_steps=4, logger=logger, log_every_n_steps=1
    )
    model = make_module(fam.pl)
    trainer.validate(model)
    trainer.fit(model)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step=2.ckpt", "step=4.ckpt"]
    trainer.fit_loop.epoch_loop.max_steps = 8
    trainer.fit(model)  # the writer was stopped by teardown; it starts again
    assert sorted(os.listdir(tmp_path / "ckpt")) == [f"step={i}.ckpt" for i in (2, 4, 6, 8)]
    check_files(tmp_path / "ckpt")
    assert cb.async_io is io and len(io.stats) == 4
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    header, *rows = metrics.strip().splitlines()
    column = header.split(",").index("asyncckpt/blocking_s")
    assert sum(1 for row in rows if row.split(",")[column]) == 4


def test_strategies_that_ignore_checkpoint_io_are_refused(fam):
    S = fam.strategies
    # deepspeed is not installed: DeepSpeedStrategy() itself refuses to construct, so check an
    # instance made without __init__; the check looks at the class, as it would for a real one.
    with pytest.raises(fam.ours.UnsupportedStrategyError, match="deepspeed"):
        fam.ours.check_strategy(object.__new__(S.DeepSpeedStrategy))
    # the sharded modes are no longer refused: the callback connects them (test_lightning_sharded.py)
    fam.ours.check_strategy(S.FSDPStrategy(state_dict_type="sharded"))
    fam.ours.check_strategy(S.FSDPStrategy(state_dict_type="full"))
    fam.ours.check_strategy(S.ModelParallelStrategy())
    fam.ours.check_strategy(S.ModelParallelStrategy(save_distributed_checkpoint=False))
    fam.ours.check_strategy(S.SingleDeviceStrategy("cpu"))


def test_a_strategy_that_saves_on_its_own_is_reported(fam, tmp_path):
    class SelfSaving(fam.strategies.SingleDeviceStrategy):
        """Like DeepSpeedStrategy: writes the file itself and never calls its checkpoint_io."""

        def save_checkpoint(self, checkpoint, filepath, storage_options=None):
            os.makedirs(os.path.dirname(filepath), exist_ok=True)
            torch.save(checkpoint, filepath)

    io = fam.ours.AsyncCheckpointIO()
    mc = fam.pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    strategy = SelfSaving("cpu", checkpoint_io=io)
    trainer = make_trainer(
        fam, tmp_path, strategy=strategy, callbacks=[mc, fam.ours.AsyncCheckpointCallback()], max_steps=4
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_module(fam.pl))
    assert sum("bypassed" in str(w.message) for w in caught) == 1
    assert io.saves_requested == 0


def test_plugin_pickles_for_ddp_spawn(fam):
    io = fam.ours.AsyncCheckpointIO(max_pending=3, when_full="raise", handle_sigterm=False)
    copy = pickle.loads(pickle.dumps(io))
    assert type(copy) is type(io) and copy.max_pending == 3 and copy.when_full == "raise"
    assert copy.checkpoint_io is None and copy._base_checkpoint_io_configured is False


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    sys.path.insert(0, sys.argv[3])
    from tests._lightning_helpers import load_family, make_module, make_trainer
    import asyncckpt

    class LoggingIO(asyncckpt.TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            super().save_checkpoint(checkpoint, path, storage_options)
            with open(os.path.join(out, f"writes-{os.getpid()}.log"), "a") as f:
                f.write(os.path.basename(path) + "\\n")

    fam, out = load_family(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    io = fam.ours.AsyncCheckpointIO(LoggingIO())
    mc = fam.pl.callbacks.ModelCheckpoint(
        dirpath=os.path.join(out, "ckpt"), every_n_train_steps=2, save_top_k=-1, save_last=True, filename="{step}"
    )
    trainer = make_trainer(
        fam, out, plugins=[io], callbacks=[mc, fam.ours.AsyncCheckpointCallback()], max_steps=6,
        strategy="ddp", devices=2,
    )
    model = make_module(fam.pl)
    trainer.fit(model)
    with open(os.path.join(out, f"done-{trainer.global_rank}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "saves": io.saves_requested, "pending": io.pending,
                   "weight": model.layer.weight.detach().tolist()}, f)
    """
)


def test_ddp_two_processes_only_rank_zero_writes(fam, tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = child_env(OMP_NUM_THREADS="1")
    env.pop("MASTER_PORT", None)
    proc = run_python(script, fam.name, tmp_path, ROOT, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = [json.loads((tmp_path / f"done-{rank}.json").read_text()) for rank in (0, 1)]
    assert done[0]["saves"] == 6 and done[1]["saves"] == 0  # 3 top-k + 3 last, on rank 0 only
    assert all(d["pending"] == 0 for d in done)
    writers = sorted(p.name for p in tmp_path.glob("writes-*.log"))
    assert writers == [f"writes-{done[0]['pid']}.log"]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["last.ckpt", "step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]
    check_files(tmp_path / "ckpt", last_step=6)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    for d in done:  # DDP keeps ranks in sync; the file holds the final weights
        assert torch.allclose(last["state_dict"]["layer.weight"], torch.tensor(d["weight"]))


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoLightning(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, NoLightning())
    import asyncckpt
    assert not [m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")]
    for public in ("asyncckpt.lightning", "asyncckpt.pytorch_lightning"):
        try:
            importlib.import_module(public)
        except ModuleNotFoundError as err:
            assert "lightning" in str(err)
        else:
            raise AssertionError(public + " imported without Lightning")
    print("ok", asyncckpt.__version__)
    """
)


def test_core_imports_without_lightning():
    proc = run_python(BLOCKER, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
