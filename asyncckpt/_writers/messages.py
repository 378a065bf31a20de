"""The messages between the training process and its writer process, one frozen slotted class each.

Every message crosses the command pipe pickled, so each carries only what the other side cannot
know already: a save names its arena and the pickled non-tensor skeleton (the tensor bytes are in
the shared arena), and its layout only when it differs from that arena's last save's (pickling
20,000 tensor specs costs about 20 ms). Slotted dataclasses pickle in microseconds.

The writer process dispatches on the class (``match``); a message it does not know is an error
that ends it, never something it skips.
"""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing import reduction
from typing import Any, Dict, Optional, Tuple

# -- to the writer process ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SaveMsg:
    """Write the checkpoint rebuilt from ``skeleton`` and arena ``arena_id`` to ``target``.

    ``layout`` is ``(groups, specs, group_locations)``, or None for the same layout as this
    arena's last save; ``group_locations`` names each group's original device (``"cuda:0"``),
    or is None when every storage came from the CPU.
    """

    seq: int
    target: Any
    storage_options: Any
    skeleton: bytes
    arena_id: int
    layout: Optional[Tuple[Any, Any, Any]]
    #: torch's serialization settings of the calling thread, or None for those of the last save
    #: that sent them (they rarely change).
    settings: Optional[Dict[str, Any]] = None


@dataclass(frozen=True, slots=True)
class RemoveMsg:
    """Remove ``target``, unless one of the saves ``depends_on`` (this process's) failed."""

    seq: int
    target: Any
    depends_on: Tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AbortMsg:
    """Take part in a collective save that this rank could not stage, failing it on every rank."""

    seq: int
    target: Any


@dataclass(frozen=True, slots=True)
class ShareArenaMsg:
    """Map arena ``arena_id`` of ``nbytes``; its descriptor follows (``send_handle``)."""

    arena_id: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class DropArenaMsg:
    """Arena ``arena_id`` was released in the training process: unmap it, forget its layout."""

    arena_id: int


@dataclass(frozen=True, slots=True)
class ImportMainMsg:
    """Import the training program's main module (``("name", "pkg.mod")`` or ``("path",
    "/abs/train.py")``) before the next save: that save's checkpoint holds its classes."""

    source: Tuple[str, str]


@dataclass(frozen=True, slots=True)
class ProcessStateMsg:
    """The training process's ``sys.path`` (relative entries made absolute against its working
    folder), umask, environment and recursion limit, sent before an operation when they changed
    since the writer process started or was last told: classes of a folder put on ``sys.path``
    later unpickle, files get the mode the umask at the call gives, as with ``torch.save`` there,
    the wrapped IO sees credentials set later, and a checkpoint nested as deep as the training
    process pickles is rebuilt and pickled again. ``umask`` is None where it cannot be read
    without changing it."""

    import_paths: Tuple[Any, ...]
    umask: Optional[int]
    environment: Dict[str, str]
    recursion_limit: int


@dataclass(frozen=True, slots=True)
class StopMsg:
    """Tear down the wrapped IO, answer :class:`StoppedMsg`, and exit."""


# -- from the writer process --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DoneMsg:
    """Operation ``seq`` finished; ``error`` is its exception (made portable), or None;
    ``kept_staged``: the wrapped IO kept references into the save's staging memory."""

    seq: int
    error: Optional[BaseException]
    write_seconds: float
    kept_staged: bool = False


@dataclass(frozen=True, slots=True)
class SkippedMsg:
    """Remove ``seq`` was not carried out: save ``failed_seq``, which it depends on, failed."""

    seq: int
    failed_seq: int


@dataclass(frozen=True, slots=True)
class StoppedMsg:
    """The writer process tore down the wrapped IO and exits."""


class UnknownMessageError(TypeError):
    """A message that is none of the above: the two sides disagree, so the reader stops."""

    def __init__(self, message: Any, side: str) -> None:
        super().__init__(f"the {side} got a message it does not know: {type(message).__name__} {message!r:.200}")


def encode(message: Any) -> bytes:
    """``message`` pickled as ``Connection.send`` would (``ForkingPickler``), for ``send_bytes``:
    pickled before the send, a message that cannot be pickled fails before any byte is sent."""
    return bytes(reduction.ForkingPickler.dumps(message))
