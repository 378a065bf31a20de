"""Lightning's ModelParallelStrategy (FSDP2) on CPU, 2 processes, saving through asyncckpt.

Three real runs of ``_lightning_sharded_child.py`` side by side: the strategy's own synchronous
DCP save (``lightning``), and asyncckpt's plugin + callback in both package families (and the
plugin alone, which cannot reach a sharded save and must say so). Each fits
with top-k and last checkpoints, then resumes from ``last.ckpt`` (Lightning's own loader reads
our folder) and fits on. The async runs must leave the same checkpoints, with the same values,
as the synchronous one. Lightning's ``FSDPStrategy(state_dict_type="sharded")`` needs a GPU: its
test runs the same comparison on the GPUs there are and is skipped without one.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest
import torch

from _subproc import CHILDREN, child_env, finish, start_python
from conftest import made_once, same

pytest.importorskip("lightning")
pytest.importorskip("pytorch_lightning")

from asyncckpt.distributed import METADATA_FILE  # noqa: E402
from asyncckpt.integrations._lightning_sharded import META_FILE, LightningShardedIO  # noqa: E402

CHILD = os.path.join(CHILDREN, "_lightning_sharded_child.py")
RUNS = (("lightning", "sync"), ("lightning", "async"), ("pytorch_lightning", "async"), ("lightning", "plugin_only"))


def _run_side_by_side(base, runs, strategy="model_parallel"):
    """Start every (family, mode) run at once; return {run: (folder, result.json)}."""
    procs = {}
    for family, mode in runs:  # side by side: each run is 2 processes of mostly imports
        out = base / f"{family}-{mode}"
        out.mkdir()
        env = child_env(OMP_NUM_THREADS="1")
        env.pop("MASTER_PORT", None)
        proc = start_python(CHILD, family, mode, out, strategy, env=env, stderr=subprocess.STDOUT)
        procs[(family, mode)] = (out, proc)
    results = {}
    try:
        for key, (out, proc) in procs.items():
            text, _ = finish(proc, 400, what=f"{key} did not finish in time")
            assert proc.returncode == 0, f"{key} exited {proc.returncode}:\n{text[-5000:]}"
            results[key] = (out, json.loads((out / "result.json").read_text()))
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runs, made once per pytest run (8 processes, about 40 s; see conftest.made_once)."""

    def make(folder):
        results = _run_side_by_side(pathlib.Path(folder), RUNS)
        return {"/".join(key): (str(out), result) for key, (out, result) in results.items()}

    _, made = made_once(tmp_path_factory, "lightning_sharded", make)
    return {tuple(key.split("/")): (pathlib.Path(out), result) for key, (out, result) in made.items()}


def _assert_same_checkpoints(runs, family):
    sync_out, sync = runs[("lightning", "sync")]
    out, ours = runs[(family, "async")]
    assert ours["connected"] and ours["engine_saves"], ours
    # top-k removals and last.ckpt: the same names after the first fit and after the resume
    assert ours["after_first"] == sync["after_first"], (ours, sync)
    assert ours["after_resume"] == sync["after_resume"], (ours, sync)
    assert ours["resumed_at"] == sync["resumed_at"] == 12
    names = [os.path.join("ckpt", n) for n in sync["after_resume"]] + ["manual.ckpt"]
    for name in names:
        folder, reference = out / name, sync_out / name
        files = os.listdir(folder)
        assert METADATA_FILE in files and META_FILE in files, files
        assert not [f for f in files if ".tmp" in f], files
        # read whole in this one process with DCP's reader (another world size than the writers)
        mine, theirs = LightningShardedIO().load_checkpoint(folder), LightningShardedIO().load_checkpoint(reference)
        assert same(mine["state_dict"], theirs["state_dict"]), name
        assert same(mine["optimizer_states"], theirs["optimizer_states"]), name
        for key in ("global_step", "epoch"):
            assert mine[key] == theirs[key], (name, key)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["lightning", "pytorch_lightning"])
def test_async_run_keeps_the_same_checkpoints_as_the_synchronous_save(runs, family):
    _assert_same_checkpoints(runs, family)
    _, ours = runs[(family, "async")]
    # 2 ranks on this machine: each stages with its share of the cores
    from asyncckpt._copier import default_staging_threads

    assert ours["staging_threads"] == default_staging_threads(ours["num_processes"]), ours


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy needs a GPU")
def test_fsdp_strategy_sharded_saves_keep_the_same_checkpoints_on_a_gpu(tmp_path):
    """``FSDPStrategy(state_dict_type="sharded")`` on the GPUs there are (up to 2): the same
    fit, resume and manual save as the ModelParallel runs, with both families' plugin."""
    runs = (("lightning", "sync"), ("lightning", "async"), ("pytorch_lightning", "async"))
    results = _run_side_by_side(tmp_path, runs, strategy="fsdp")
    for family in ("lightning", "pytorch_lightning"):
        _assert_same_checkpoints(results, family)


@pytest.mark.slow
def test_plugin_without_the_callback_warns_that_sharded_saves_were_synchronous(runs):
    _, sync = runs[("lightning", "sync")]
    _, alone = runs[("lightning", "plugin_only")]
    assert alone["after_first"] == sync["after_first"]  # saved, by the strategy itself
    assert alone["engine_saves"] == 0
    assert any("AsyncCheckpointCallback" in w and "synchronously" in w for w in alone["warnings"]), alone
