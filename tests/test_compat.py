"""Compatibility guards: pickles written by earlier versions, and every public import path.

Users keep asyncckpt objects in pickles they did not write on purpose: ``ddp_spawn`` and
``torch.save(trainer)`` pickle the Lightning plugin, its wrapped ``TorchCheckpointIO`` and the
``ModelCheckpoint.file_exists`` stand-in. The golden files in ``tests/data/pickles`` were written
by the code before the restructure of issue 22 (``tests/data/pickles/make.py``); they must keep
loading into the same classes with the same settings, and a fresh pickle must name only stable
public modules, so that it still loads in an older release (rollback) and in later ones.
"""

from __future__ import annotations

import importlib
import os
import pickle
import pickletools
import sys
from typing import Any, Dict, Optional, Set, Tuple

import pytest

import asyncckpt
from _subproc import ROOT, TESTS
from asyncckpt.remote import RetryPolicy
from asyncckpt.torch_io import TorchCheckpointIO

PICKLES = os.path.join(TESTS, "data", "pickles")

# Modules whose names may appear in a pickle although they start with ``asyncckpt._``: the
# ModelCheckpoint stand-in has been pickled under this name since it was written.
ALLOWED_PRIVATE_PICKLE_MODULES = {"asyncckpt.integrations._lightning_common"}

# family -> (public module, the Lightning package it needs)
FAMILIES = {
    "lightning": ("asyncckpt.lightning", "lightning.pytorch"),
    "pytorch_lightning": ("asyncckpt.pytorch_lightning", "pytorch_lightning"),
}


def _load(name: str) -> Any:
    with open(os.path.join(PICKLES, f"{name}.pkl"), "rb") as f:
        return pickle.load(f)


def pickled_globals(data: bytes) -> Set[Tuple[str, str]]:
    """Every (module, name) a pickle imports (GLOBAL and STACK_GLOBAL opcodes)."""
    found: Set[Tuple[str, str]] = set()
    memo: Dict[int, Any] = {}
    pushed: list = []  # values pushed on the stack, as far as this tracks them (strings, else None)
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            module, name = arg.split(" ", 1)
            found.add((module, name))
            pushed.append(None)
        elif op.name == "STACK_GLOBAL":
            module, name = pushed[-2], pushed[-1]
            assert isinstance(module, str) and isinstance(name, str), "STACK_GLOBAL from untracked values"
            found.add((module, name))
            pushed.append(None)
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            pushed.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = pushed[-1] if pushed else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(int(arg)))
        elif op.stack_after:
            pushed.append(None)
    return found


def check_fresh_pickle(obj: Any, golden: str) -> None:
    """A fresh pickle of ``obj`` names only stable modules, and the same asyncckpt globals the
    golden file does (so today's release can load it)."""
    fresh = pickled_globals(pickle.dumps(obj, protocol=4))
    private = {
        m
        for m, _ in fresh
        if m.startswith("asyncckpt.")
        and any(p.startswith("_") for p in m.split(".")[1:])
        and m not in ALLOWED_PRIVATE_PICKLE_MODULES
    }
    assert not private, f"a pickle of {type(obj).__name__} names private modules: {sorted(private)}"
    with open(os.path.join(PICKLES, f"{golden}.pkl"), "rb") as f:
        old = pickled_globals(f.read())
    ours = {g for g in fresh if g[0].split(".")[0] == "asyncckpt"}
    assert ours == {g for g in old if g[0].split(".")[0] == "asyncckpt"}


def family_module(family: str) -> Any:
    module, package = FAMILIES[family]
    pytest.importorskip(package)
    return importlib.import_module(module)


# -- the pickle reader itself ----------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickled_globals_sees_every_class(protocol: int) -> None:
    """The opcode walk finds both classes, also when the module name is memoized and re-used."""
    data = pickle.dumps([TorchCheckpointIO(retry=RetryPolicy(2)), RetryPolicy(3)], protocol=protocol)
    found = pickled_globals(data)
    assert ("asyncckpt.torch_io", "TorchCheckpointIO") in found
    assert ("asyncckpt.remote", "RetryPolicy") in found


# -- golden pickles ----------------------------------------------------------------------------


def check_torch_io(io: Any) -> None:
    assert type(io) is TorchCheckpointIO
    assert io.checksum is True
    assert io.durable is True
    assert io.storage_options is None
    assert type(io.retry) is RetryPolicy
    assert io.retry == RetryPolicy(3)
    assert (io.part_bytes, io.max_inflight_parts) == (16 * 1024 * 1024, 4)


def test_torch_io_pickle() -> None:
    io = _load("torch_io")
    check_torch_io(io)
    assert asyncckpt.TorchCheckpointIO is TorchCheckpointIO and asyncckpt.RetryPolicy is RetryPolicy
    check_fresh_pickle(io, "torch_io")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plugin_pickle(family: str) -> None:
    mod = family_module(family)
    plugin = _load(f"{family}_plugin")
    try:
        assert type(plugin) is mod.AsyncCheckpointIO
        assert isinstance(plugin, asyncckpt.AsyncCheckpointIO)
        options = plugin.options()
        staging_threads = options.pop("staging_threads")
        assert isinstance(staging_threads, int) and staging_threads >= 1
        assert options == dict(
            max_pending=3,
            when_full="wait",
            writer="thread",
            writer_nice=0,
            exit_timeout=300.0,
            handle_sigterm=False,  # the plugin's default
            staging="lazy",
        )
        check_torch_io(plugin.checkpoint_io)
        # Lightning's own field, carried by the plugin's pickle state.
        assert plugin._base_checkpoint_io_configured is True
        check_fresh_pickle(plugin, f"{family}_plugin")
        again = pickle.loads(pickle.dumps(plugin))
        try:
            assert type(again) is mod.AsyncCheckpointIO and again.options() == plugin.options()
        finally:
            again.teardown()
    finally:
        plugin.teardown()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_callback_pickle(family: str) -> None:
    mod = family_module(family)
    callback = _load(f"{family}_callback")
    assert type(callback) is mod.AsyncCheckpointCallback
    state = vars(callback)
    # The attribute names are the pickle format: renaming one breaks pickles users hold.
    expected = {"log_stats": False, "_io": None, "_last_logged": None, "_expected_saves": None, "_warned_bypass": False}
    assert {k: state.get(k, "missing") for k in expected} == expected
    assert callback.async_io is None
    check_fresh_pickle(callback, f"{family}_callback")


def test_queue_aware_file_exists_pickle() -> None:
    from asyncckpt.integrations import _lightning_common

    obj = _load("queue_aware_file_exists")
    assert type(obj) is _lightning_common._QueueAwareFileExists
    assert vars(obj) == {"_mc": None, "_prior": None}
    check_fresh_pickle(obj, "queue_aware_file_exists")


# -- public import paths (plan 22, section 4) --------------------------------------------------

PUBLIC_NAMES = {
    "asyncckpt": (
        "AsyncCheckpointIO CheckpointIO TorchCheckpointIO RetryPolicy SaveStats cleanup_temp_files "
        "DistributedCheckpointIO AsyncCheckpointError CheckpointLoadError CheckpointRemoveError "
        "CheckpointSaveError FlushTimeoutError IntegrityError InvalidPathError NotSerializableError "
        "QueueFullError RemoteStorageError RemoveSkippedError WriterDiedError __version__ __all__"
    ),
    "asyncckpt.errors": (
        "AsyncCheckpointError CheckpointLoadError CheckpointRemoveError CheckpointSaveError FlushTimeoutError "
        "IntegrityError InvalidPathError NotSerializableError QueueFullError RemoteStorageError "
        "RemoveSkippedError WriterDiedError"
    ),
    "asyncckpt.checkpoint_io": "CheckpointIO load_options",
    "asyncckpt.stats": "SaveStats",
    "asyncckpt.xla": "XLACheckpointIO transfer_to_cpu checkpoint_to_cpu",
    "asyncckpt.distributed": (
        "DistributedCheckpointIO METADATA_FILE LocalShard ShardedSaveError RanksOutOfStepError "
        "committed_token BeforeCommit"
    ),
    "asyncckpt.lazy": (
        "TensorModifiedError EAGER_MAX_BYTES key_paths finish_all LazyStager LazyCopy STAGING_CHOICES check_staging"
    ),
    "asyncckpt.__main__": "main EXIT_OK EXIT_DAMAGED",
    # Documented internals (docs/index.md, docs/benchmarks.md, docs/object-storage.md) and test imports.
    "asyncckpt.writer": "Writer Operation",
    "asyncckpt.staging": "collection_paused",
    "asyncckpt._copier": "CopyPlan",
    "asyncckpt.redaction": "shown",
    "asyncckpt.storage": "is_temp_file temp_path_for HOST_ID cleanup_temp_files",
    "asyncckpt.integrity": "verify_file read_record record_path sha256_file",
    "asyncckpt.remote": "pending_aborts RetryPolicy",
    "asyncckpt.torch_io": "TorchCheckpointIO",
    "asyncckpt.integrations._lightning_common": "_QueueAwareFileExists",
    "asyncckpt.integrations._lightning_sharded": "META_FILE LightningShardedIO",
}
FAMILY_NAMES = "AsyncCheckpointIO AsyncCheckpointCallback UnsupportedStrategyError check_strategy find_async_io"


@pytest.mark.parametrize("module", sorted(PUBLIC_NAMES))
def test_public_path_imports(module: str) -> None:
    """asyncckpt.xla imports without torch_xla (torch_xla is imported on first use)."""
    mod = importlib.import_module(module)
    missing = [n for n in PUBLIC_NAMES[module].split() if not hasattr(mod, n)]
    assert not missing, f"{module} lost {missing}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_path_imports(family: str) -> None:
    mod = family_module(family)
    missing = [n for n in FAMILY_NAMES.split() if not hasattr(mod, n)]
    assert not missing, f"{mod.__name__} lost {missing}"
    assert mod.AsyncCheckpointIO.__module__ == mod.__name__
    assert mod.AsyncCheckpointIO.__qualname__ == "AsyncCheckpointIO"
    assert mod.AsyncCheckpointCallback.__module__ == mod.__name__
    assert mod.AsyncCheckpointCallback.__qualname__ == "AsyncCheckpointCallback"
    assert issubclass(mod.AsyncCheckpointIO, asyncckpt.AsyncCheckpointIO)
    assert issubclass(mod.UnsupportedStrategyError, asyncckpt.AsyncCheckpointError)


def test_top_level_all_resolves() -> None:
    """Every name in ``asyncckpt.__all__`` resolves (XLACheckpointIO through the lazy
    ``__getattr__``, which needs no torch_xla to hand out the class)."""
    from asyncckpt.distributed import DistributedCheckpointIO
    from asyncckpt.xla import XLACheckpointIO

    for name in asyncckpt.__all__:
        assert getattr(asyncckpt, name) is not None, name
    assert asyncckpt.XLACheckpointIO is XLACheckpointIO
    assert asyncckpt.DistributedCheckpointIO is DistributedCheckpointIO


def test_class_modules_stay() -> None:
    """Classes that sit in users' pickles keep the module they are pickled under."""
    from asyncckpt.integrations._lightning_common import _QueueAwareFileExists
    from asyncckpt.xla import XLACheckpointIO

    assert (TorchCheckpointIO.__module__, TorchCheckpointIO.__qualname__) == ("asyncckpt.torch_io", "TorchCheckpointIO")
    assert (RetryPolicy.__module__, RetryPolicy.__qualname__) == ("asyncckpt.remote", "RetryPolicy")
    assert XLACheckpointIO.__module__ == "asyncckpt.xla"
    assert _QueueAwareFileExists.__module__ == "asyncckpt.integrations._lightning_common"


def test_tensor_modified_error_is_one_class() -> None:
    import asyncckpt.errors
    import asyncckpt.lazy

    assert issubclass(asyncckpt.lazy.TensorModifiedError, asyncckpt.errors.CheckpointSaveError)
    # Issue 22 moves it into asyncckpt.errors; then both paths must give the same class object.
    in_errors: Optional[type] = getattr(asyncckpt.errors, "TensorModifiedError", None)
    assert in_errors is None or in_errors is asyncckpt.lazy.TensorModifiedError


def test_cli_entry_point() -> None:
    """``pyproject.toml``'s console script and ``python -m asyncckpt`` reach the same main."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the suite runs on 3.11+
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts == {"asyncckpt": "asyncckpt.__main__:main"}
    module, attr = scripts["asyncckpt"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
