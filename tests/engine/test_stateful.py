"""Order under stress: random sequences of save, remove, load and flush over a few paths, with
writes of random small delays so operations overlap, checked against a model of the folder
(path -> expected value, or absent). One engine per writer kind serves every example (a fresh
folder each), as a long training run would use it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import tempfile
import time

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from asyncckpt import AsyncCheckpointError, AsyncCheckpointIO, TorchCheckpointIO
from conftest import temp_files

PATHS = ["a.ckpt", "b.ckpt", os.path.join("sub", "c.ckpt")]


class JitteryIO(TorchCheckpointIO):
    """Fault injection: a disk with random latency (0-3 ms before each save or remove), so
    queued operations overlap with the caller's. The writes themselves are real."""

    def __init__(self) -> None:
        super().__init__(durable=False)
        self._rng = random.Random(0)

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        time.sleep(self._rng.uniform(0, 0.003))
        super().save_checkpoint(checkpoint, path, storage_options)

    def remove_checkpoint(self, path):
        time.sleep(self._rng.uniform(0, 0.003))
        super().remove_checkpoint(path)


_ENGINES: dict = {}
RUNS: dict = {}


def _engine(writer: str) -> AsyncCheckpointIO:
    if writer not in _ENGINES:
        _ENGINES[writer] = AsyncCheckpointIO(JitteryIO(), writer=writer, max_pending=2)
    return _ENGINES[writer]


@pytest.fixture(scope="module", autouse=True)
def _teardown_engines():
    yield
    for engine in _ENGINES.values():
        engine.teardown()
    _ENGINES.clear()


def _content(value: int) -> dict:
    return {"v": value, "w": torch.full((64,), float(value))}


def _value_of(obj: dict) -> int:
    assert torch.equal(obj["w"], torch.full((64,), float(obj["v"]))), "a mixed checkpoint"
    return obj["v"]


def make_machine(writer: str):
    class FolderModel(RuleBasedStateMachine):
        @initialize()
        def start(self) -> None:
            self.io = _engine(writer)
            RUNS[writer] = RUNS.get(writer, 0) + 1
            self.folder = tempfile.mkdtemp(prefix="asyncckpt-stateful-")
            self.model: dict = {}
            self.counter = 0
            self.live: dict = {}

        def path(self, name: str) -> str:
            return os.path.join(self.folder, name)

        @rule(name=st.sampled_from(PATHS), mutate=st.booleans())
        def save(self, name: str, mutate: bool) -> None:
            self.counter += 1
            ckpt = _content(self.counter)
            self.io.save_checkpoint(ckpt, self.path(name))
            if mutate:  # point in time: a change after return never reaches the file
                ckpt["w"].add_(1000)
                ckpt["v"] = -1
            self.model[name] = self.counter

        @rule(name=st.sampled_from(PATHS))
        def remove(self, name: str) -> None:
            self.io.remove_checkpoint(self.path(name))
            self.model.pop(name, None)

        @rule(name=st.sampled_from(PATHS))
        def load(self, name: str) -> None:
            if name in self.model:
                assert _value_of(self.io.load_checkpoint(self.path(name))) == self.model[name]
            else:
                with pytest.raises(FileNotFoundError):
                    self.io.load_checkpoint(self.path(name))

        @rule()
        def flush(self) -> None:
            self.io.flush()
            self.check_folder()

        @precondition(lambda self: hasattr(self, "folder"))
        @invariant()
        def nothing_failed(self) -> None:
            assert not self.io.pending_errors, "a background failure is waiting to be raised"

        def check_folder(self) -> None:
            on_disk = {}
            for name in PATHS:
                if os.path.exists(self.path(name)):
                    on_disk[name] = _value_of(torch.load(self.path(name), weights_only=True))
            assert on_disk == self.model
            assert temp_files(self.folder) == []

        def teardown(self) -> None:
            if hasattr(self, "folder"):
                try:
                    self.io.flush()
                    self.check_folder()
                finally:
                    shutil.rmtree(self.folder, ignore_errors=True)

    FolderModel.__name__ = f"FolderModel_{writer}"
    return FolderModel


SETTINGS = settings(
    max_examples=200,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["thread", "process"])
def test_random_operations_match_the_model_of_the_folder(writer):
    machine = make_machine(writer)
    started = time.monotonic()
    machine.TestCase.settings = SETTINGS
    machine.TestCase("runTest").runTest()
    print(f"\nstateful, writer={writer}: {RUNS[writer]} runs of up to 15 operations, no divergence "
          f"({time.monotonic() - started:.0f}s)")
    assert RUNS[writer] >= 200


# -- failing saves and the remove-skip rule ------------------------------------------------------

FAIL_PATHS = ["fail-x.ckpt", "fail-y.ckpt"]


class FailingJitteryIO(JitteryIO):
    """Fault injection: a full disk for file names starting with ``fail`` (ENOSPC before anything
    is written); other saves are real, with the jitter of :class:`JitteryIO`."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if os.path.basename(os.fspath(path)).startswith("fail"):
            time.sleep(self._rng.uniform(0, 0.003))
            raise OSError(28, "No space left on device (injected)")
        super().save_checkpoint(checkpoint, path, storage_options)


_FAILING_ENGINES: dict = {}
FAILING_RUNS: dict = {}


def _reported(err: BaseException, folder: str) -> "tuple[list, list]":
    """The failed saves and the kept files an error (and its notes) reports, by name in ``folder``."""
    saves, kept = [], []
    for text in [str(err), *getattr(err, "__notes__", [])]:
        text = text.removeprefix("also failed: ")
        save = re.match(r"saving checkpoint '([^']*)' failed", text)
        skip = re.match(r"checkpoint '([^']*)' was kept, not removed", text)
        assert save or skip, f"an error that is neither a failed save nor a kept file: {text}"
        (saves if save else kept).append(os.path.relpath((save or skip).group(1), folder))
    return saves, kept


def make_failing_machine(writer: str):
    """The folder model with saves that fail in the background. Exact in one thread: a remove is
    skipped (its file kept, a RemoveSkippedError raised once) if and only if a save queued before
    it failed and that failure had not been raised to the caller before the remove was called."""

    class FailingFolderModel(RuleBasedStateMachine):
        @initialize()
        def start(self) -> None:
            if writer not in _FAILING_ENGINES:
                _FAILING_ENGINES[writer] = AsyncCheckpointIO(FailingJitteryIO(), writer=writer, max_pending=2)
            self.io = _FAILING_ENGINES[writer]
            FAILING_RUNS[writer] = FAILING_RUNS.get(writer, 0) + 1
            self.folder = tempfile.mkdtemp(prefix="asyncckpt-stateful-fail-")
            self.model: dict = {}
            self.counter = 0
            self.unraised: list = []  # failing saves queued whose failure was not raised yet
            self.kept: list = []  # files of skipped removes, whose RemoveSkippedError is to come

        def path(self, name: str) -> str:
            return os.path.join(self.folder, name)

        def call(self, fn, *args):
            """Run an engine call; a background failure it raises must be one the model expects,
            raised for the first time. Returns whether the call raised one."""
            try:
                fn(*args)
            except AsyncCheckpointError as err:
                saves, kept = _reported(err, self.folder)
                for name in saves:
                    assert name in self.unraised, f"{name}: raised twice, or never failed: {err}"
                    self.unraised.remove(name)
                for name in kept:
                    assert name in self.kept, f"{name}: reported kept, but no remove of it was to be skipped: {err}"
                    self.kept.remove(name)
                return True
            return False

        @rule(name=st.sampled_from(PATHS + FAIL_PATHS))
        def save(self, name: str) -> None:
            self.counter += 1
            if self.call(self.io.save_checkpoint, _content(self.counter), self.path(name)):
                return  # it raised an earlier failure: nothing was queued
            if name in FAIL_PATHS:
                self.unraised.append(name)
            else:
                self.model[name] = self.counter

        @rule(name=st.sampled_from(PATHS))
        def remove(self, name: str) -> None:
            if self.call(self.io.remove_checkpoint, self.path(name)):
                return
            if self.unraised:
                self.kept.append(name)  # a save queued before it failed or will fail: kept
            else:
                self.model.pop(name, None)

        @rule(name=st.sampled_from(PATHS))
        def load(self, name: str) -> None:
            got: list = []
            try:
                if self.call(lambda: got.append(self.io.load_checkpoint(self.path(name)))):
                    return
            except FileNotFoundError:
                assert name not in self.model
                return
            assert _value_of(got[0]) == self.model[name]

        @rule()
        def flush(self) -> None:
            self.call(self.io.flush)
            self.check_folder()

        def check_folder(self) -> None:
            on_disk = {}
            for name in PATHS + FAIL_PATHS:
                if os.path.exists(self.path(name)):
                    on_disk[name] = _value_of(torch.load(self.path(name), weights_only=True))
            assert on_disk == self.model
            assert temp_files(self.folder) == []

        def teardown(self) -> None:
            if hasattr(self, "folder"):
                try:
                    self.call(self.io.flush)
                    self.call(self.io.flush)  # a flush raises once: the second finds nothing left
                    assert self.unraised == [] and self.kept == [], (self.unraised, self.kept)
                    self.check_folder()
                finally:
                    shutil.rmtree(self.folder, ignore_errors=True)

    FailingFolderModel.__name__ = f"FailingFolderModel_{writer}"
    return FailingFolderModel


@pytest.fixture(scope="module", autouse=True)
def _teardown_failing_engines():
    yield
    for engine in _FAILING_ENGINES.values():
        with contextlib.suppress(AsyncCheckpointError):
            engine.teardown()
    _FAILING_ENGINES.clear()


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["thread", "process"])
def test_random_operations_with_failing_saves_keep_files_and_raise_each_failure_once(writer):
    machine = make_failing_machine(writer)
    machine.TestCase.settings = settings(SETTINGS, max_examples=100)
    machine.TestCase("runTest").runTest()
    assert FAILING_RUNS[writer] >= 100
