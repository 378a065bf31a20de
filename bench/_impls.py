"""The checkpointing implementations compared by the benchmarks, behind one small interface.

Every implementation is driven the same way, so that the only difference between two rows of a
table is the library under test:

- ``save(state, path)`` is the call the training thread makes; its duration is the blocking time.
- ``wait()`` returns when every save so far is on disk (the final flush of a run, and the
  "steady state" barrier between microbenchmark rounds).
- ``close()`` releases threads, processes and staging memory.

Durability differs between the peers and is part of what is measured: asyncckpt's
``TorchCheckpointIO`` and DCP's ``FileSystemWriter`` fsync; Lightning's ``TorchCheckpointIO``
does not.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, List, Optional

# name -> label shown in tables. "none" is the baseline (no checkpoints at all).
LABELS: Dict[str, str] = {
    "none": "none (baseline)",
    "sync": "asyncckpt TorchCheckpointIO (sync)",
    "lightning": "Lightning AsyncCheckpointIO",
    "dcp": "DCP async_save",
    "thread": "asyncckpt thread",
    "process": "asyncckpt process",
    "lazy": "asyncckpt lazy (thread)",
}
IMPLS = tuple(LABELS)
SAVING_IMPLS = tuple(name for name in IMPLS if name != "none")
OURS = ("thread", "process", "lazy")


class Unavailable(Exception):
    """The implementation cannot run here (e.g. the installed engine has no process writer)."""


class Saver:
    """Base: a checkpointing implementation as the training loop sees it."""

    name = "base"

    def save(self, state: Dict[str, Any], path: str) -> None:
        raise NotImplementedError

    def wait(self) -> None:
        """Block until every earlier save is complete on disk."""

    def close(self) -> None:
        self.wait()

    def engine_stats(self) -> List[Dict[str, float]]:
        """Per-save breakdown reported by the engine itself (asyncckpt only; else empty)."""
        return []

    def path_for(self, folder: str, tag: str) -> str:
        """Where save number ``tag`` goes (DCP writes a folder, the others one file)."""
        return os.path.join(folder, f"ckpt-{tag}.pt")


class SyncSaver(Saver):
    """asyncckpt's durable ``TorchCheckpointIO``: ``torch.save`` + fsync + rename on the caller."""

    name = "sync"

    def __init__(self) -> None:
        from asyncckpt import TorchCheckpointIO

        self.io = TorchCheckpointIO()

    def save(self, state: Dict[str, Any], path: str) -> None:
        self.io.save_checkpoint(state, path)


class LightningSaver(Saver):
    """Lightning's ``AsyncCheckpointIO`` over Lightning's ``TorchCheckpointIO``.

    Lightning offers no flush; ``teardown()`` (shut the executor down, waiting) is its public
    way to wait, and the next save starts a fresh executor, as it does in ``Trainer.fit``.
    """

    name = "lightning"

    def __init__(self) -> None:
        from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

        self.io = AsyncCheckpointIO(TorchCheckpointIO())

    def save(self, state: Dict[str, Any], path: str) -> None:
        self.io.save_checkpoint(state, path)

    def wait(self) -> None:
        self.io.teardown()


class DcpSaver(Saver):
    """``torch.distributed.checkpoint.async_save`` with its default stager and thread executor.

    Without an initialized process group (torch >= 2.5) DCP saves on this process alone. Its
    documentation asks the caller to wait for the previous future before the next save, so that
    wait happens inside ``save`` and counts as blocking time, as it would in a training loop.
    """

    name = "dcp"

    def __init__(self) -> None:
        import torch.distributed.checkpoint as dcp

        self._dcp = dcp
        self._future: Optional[Any] = None
        warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint.*")
        warnings.filterwarnings("ignore", message=r".*torch\.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=r".*Detected an existing checkpoint.*")

    def save(self, state: Dict[str, Any], path: str) -> None:
        self.wait()
        self._future = self._dcp.async_save(state, checkpoint_id=path)

    def wait(self) -> None:
        future, self._future = self._future, None
        if future is not None:
            future.result()

    def path_for(self, folder: str, tag: str) -> str:
        return os.path.join(folder, f"ckpt-{tag}.dcp")


class AsyncckptSaver(Saver):
    """asyncckpt's ``AsyncCheckpointIO`` over its durable ``TorchCheckpointIO``."""

    def __init__(self, writer: str, max_pending: int, staging: str = "eager") -> None:
        from asyncckpt import AsyncCheckpointIO, TorchCheckpointIO

        self.name = writer if staging == "eager" else staging
        options = {"staging": staging} if staging != "eager" else {}
        try:
            self.io = AsyncCheckpointIO(
                TorchCheckpointIO(), max_pending=max_pending, writer=writer, handle_sigterm=False, **options
            )
        except (ValueError, TypeError) as err:
            raise Unavailable(
                f"AsyncCheckpointIO(writer={writer!r}, staging={staging!r}) is not available in this build: {err}"
            ) from err

    def save(self, state: Dict[str, Any], path: str) -> None:
        self.io.save_checkpoint(state, path)

    def wait(self) -> None:
        self.io.flush()

    def close(self) -> None:
        self.io.teardown()

    def engine_stats(self) -> List[Dict[str, float]]:
        fields = ("blocking_seconds", "wait_seconds", "staging_seconds", "write_seconds")
        return [{f: getattr(st, f) for f in fields if hasattr(st, f)} for st in self.io.stats]


def make_saver(name: str, max_pending: int = 2) -> Saver:
    """Build implementation ``name``; raises :class:`Unavailable` if it cannot run here."""
    makers: Dict[str, Callable[[], Saver]] = {
        "sync": SyncSaver,
        "lightning": LightningSaver,
        "dcp": DcpSaver,
        "thread": lambda: AsyncckptSaver("thread", max_pending),
        "process": lambda: AsyncckptSaver("process", max_pending),
        "lazy": lambda: AsyncckptSaver("thread", max_pending, staging="lazy"),
    }
    if name not in makers:
        raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(SAVING_IMPLS)}")
    try:
        return makers[name]()
    except ImportError as err:
        raise Unavailable(f"{LABELS[name]} needs a package that is not installed: {err}") from err
