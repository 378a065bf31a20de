"""asyncckpt's exception types.

Every error that comes from a background operation names the checkpoint path it was about and
chains the original exception as ``__cause__``, so a traceback shows both what failed and why.
"""

from __future__ import annotations

from typing import Optional

from .redaction import shown


class AsyncCheckpointError(Exception):
    """Base class of every error asyncckpt raises on its own account.

    Its message and ``path`` show URLs without their credentials (user info, signed query
    values; see :func:`asyncckpt.redaction.shown`).
    """

    def __init__(self, message: str, path: Optional[str] = None) -> None:
        super().__init__(shown(message))
        self.path = shown(path)

    def add_note(self, note: str) -> None:
        note = shown(note)
        parent = getattr(super(), "add_note", None)  # Python 3.11+
        if parent is not None:
            parent(note)
        else:
            self.__notes__ = [*getattr(self, "__notes__", []), note]


class CheckpointSaveError(AsyncCheckpointError):
    """A save failed in the background; raised by the next call into the engine."""


class CheckpointRemoveError(AsyncCheckpointError):
    """A queued remove failed in the background; raised by the next call into the engine."""


class RemoveSkippedError(CheckpointRemoveError):
    """A queued remove was not carried out because a save queued before it failed.

    A remove depends on every save queued before it (a keep-last-N rotation removes the old file
    only because the new one replaces it): when one of them fails, the file is kept, so the run
    still has its last good checkpoint. ``path`` is the file kept; ``failed_save`` the save that failed.
    """

    def __init__(self, message: str, path: Optional[str] = None, failed_save: Optional[str] = None) -> None:
        super().__init__(message, path)
        self.failed_save = failed_save


class CheckpointLoadError(AsyncCheckpointError):
    """A load failed."""


class NotSerializableError(AsyncCheckpointError, TypeError):
    """The checkpoint holds an object that ``torch.save`` cannot pickle.

    Raised on the caller's thread by ``save_checkpoint``, before anything is queued or written.
    """

    def __init__(self, message: str, path: Optional[str] = None, key: Optional[str] = None) -> None:
        super().__init__(message, path)
        self.key = key


class InvalidPathError(AsyncCheckpointError, ValueError):
    """The checkpoint path cannot be written: empty, a folder, or under a file."""


class QueueFullError(AsyncCheckpointError):
    """``when_full="raise"`` and all ``max_pending`` staging slots are busy."""


class WriterDiedError(AsyncCheckpointError):
    """The writer (thread or process) stopped without finishing its work."""


class FlushTimeoutError(AsyncCheckpointError, TimeoutError):
    """``flush(timeout=...)`` ran out of time with operations still pending."""


class IntegrityError(AsyncCheckpointError):
    """A checkpoint file does not match its checksum record, or cannot be read as a checkpoint."""


class RemoteStorageError(AsyncCheckpointError, OSError):
    """A request to object storage failed for good (after its retries); names the URL.

    Its text never holds credentials: values of secret-looking ``storage_options``, of the
    usual credential environment variables, and a URL's user info and query values are
    replaced by ``***``.
    """


class TensorModifiedError(CheckpointSaveError):
    """A tensor was modified in place while ``staging="lazy"`` copied it; that save was not written.

    Attributes:
        key: the tensor's key path in the checkpoint, e.g. ``state_dict.layer3.weight``.
    """

    def __init__(self, message: str, path: Optional[str] = None, key: Optional[str] = None) -> None:
        super().__init__(message, path)
        self.key = key
