"""``TorchCheckpointIO``: ``torch.save`` / ``torch.load``, durable and atomic.

Local paths stream straight into a temp file beside the target (no in-memory copy of the whole
checkpoint), which is fsynced and renamed over the target. fsspec URLs (``memory://``,
``file://``, any installed protocol) are written inside an fsspec transaction, so a failed write
commits nothing.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any, Dict, Optional

import torch

from ._pickling import describe_unpicklable
from .checkpoint_io import CheckpointIO, PathLike
from .errors import InvalidPathError, NotSerializableError
from .storage import atomic_write, check_target, local_path_of, remove_path

log = logging.getLogger(__name__)

_PICKLING_ERRORS = (pickle.PicklingError, TypeError, AttributeError)


def _is_pickling_error(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, pickle.PicklingError) or (
        isinstance(err, _PICKLING_ERRORS) and ("pickle" in text or "Can't get local object" in text)
    )


class TorchCheckpointIO(CheckpointIO):
    """Saves with ``torch.save`` and loads with ``torch.load``; files are ordinary torch files.

    Args:
        durable: fsync the file and its folder before the save counts as done (default). Turn
            off only where losing the newest checkpoint in a power cut is acceptable.
    """

    def __init__(self, *, durable: bool = True) -> None:
        self.durable = durable

    def check_path(self, path: PathLike) -> str:
        """Validate ``path`` and return it as a string; raises :class:`InvalidPathError`."""
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidPathError(
                f"checkpoint path must be a str or os.PathLike, not {type(path).__name__}", None
            )
        text = os.fspath(path)
        check_target(text)
        return text

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], path: PathLike, storage_options: Optional[Any] = None
    ) -> None:
        target = self.check_path(path)
        try:
            local = local_path_of(target)
            if local is None:
                self._save_url(checkpoint, target, storage_options)
            else:
                if storage_options is not None:
                    raise TypeError(
                        f"storage_options={storage_options!r} is only used for fsspec URLs; "
                        f"{target!r} is a local path, so pass storage_options=None"
                    )
                atomic_write(local, lambda tmp: torch.save(checkpoint, tmp), durable=self.durable)
        except Exception as err:
            if _is_pickling_error(err):
                raise NotSerializableError(describe_unpicklable(checkpoint, target, err), target) from err
            raise
        log.debug("asyncckpt: wrote %s", target)

    def _save_url(self, checkpoint: Dict[str, Any], url: str, storage_options: Optional[Any]) -> None:
        import fsspec

        fs, fs_path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        parent = os.path.dirname(fs_path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        if fs.isdir(fs_path):
            raise InvalidPathError(f"checkpoint path {url!r} is an existing folder; pass a file path inside it", url)
        with fs.transaction:
            with fs.open(fs_path, "wb") as f:
                torch.save(checkpoint, f)

    def load_checkpoint(
        self, path: PathLike, map_location: Optional[Any] = None, weights_only: Optional[bool] = None
    ) -> Dict[str, Any]:
        target = os.fspath(path)
        local = local_path_of(target)
        if local is None:
            import fsspec

            fs, fs_path = fsspec.core.url_to_fs(target)
            if not fs.exists(fs_path):
                raise FileNotFoundError(f"checkpoint file not found: {target}")
            with fs.open(fs_path, "rb") as f:
                return torch.load(f, map_location=map_location, weights_only=weights_only)
        if os.path.isdir(local):
            raise InvalidPathError(f"checkpoint path {target!r} is a folder, not a checkpoint file", target)
        if not os.path.exists(local):
            raise FileNotFoundError(f"checkpoint file not found: {target}")
        return torch.load(local, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: PathLike) -> None:
        target = os.fspath(path)
        local = local_path_of(target)
        if local is None:
            import fsspec

            fs, fs_path = fsspec.core.url_to_fs(target)
            if fs.exists(fs_path):
                fs.rm(fs_path, recursive=True)
            return
        if remove_path(local):
            log.debug("asyncckpt: removed %s", target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(durable={self.durable})"
