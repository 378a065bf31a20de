"""Naming what cannot be pickled: the key path of the first unpicklable object in a checkpoint.

A leaf (it imports only torch): both staging's pickling pass and ``TorchCheckpointIO`` use it to
turn a pickler's refusal into a message that names the key and says what to do.
"""

from __future__ import annotations

import io
import pickle
import sys
from typing import Any, Optional, Tuple

import torch

#: The pickle protocol ``torch.save`` uses by default (2). The skeleton is pickled with it, so an
#: object that ``torch.save`` cannot pickle (a global reached by a dotted name, such as
#: ``torch.channels_last``; bytes over 4 GiB) is refused at the call, not in the background.
TORCH_SAVE_PROTOCOL: int = getattr(torch.serialization, "DEFAULT_PROTOCOL", 2)

_DIAGNOSE_MAX_DEPTH = 64


class _SkipTensors(pickle.Pickler):
    """Pickles everything but tensors, which are checked separately, so diagnosis stays cheap."""

    def persistent_id(self, obj: Any) -> Optional[str]:
        if isinstance(obj, torch.Tensor) and type(obj) in (torch.Tensor, torch.nn.Parameter):
            return "tensor"
        return None


def _picklable(obj: Any) -> Optional[BaseException]:
    try:
        _SkipTensors(io.BytesIO(), protocol=TORCH_SAVE_PROTOCOL).dump(obj)
    except Exception as err:  # noqa: BLE001 - any failure here is what we are looking for
        return err
    return None


def find_unpicklable(obj: Any) -> Tuple[Optional[str], Optional[BaseException]]:
    """Return ``(key_path, error)`` for the first object in ``obj`` that cannot be pickled.

    ``key_path`` looks like ``['optimizer']['state'][0]``; it is None when the whole object fails
    without one container item to blame.
    """
    error = _picklable(obj)
    if error is None:
        return None, None
    key, deepest = _descend(obj, "", error, 0)
    return (key or None), deepest


def _descend(obj: Any, prefix: str, error: BaseException, depth: int) -> Tuple[str, BaseException]:
    if depth >= _DIAGNOSE_MAX_DEPTH:
        return prefix, error
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return prefix, error
    for key, value in items:
        child_error = _picklable(value)
        if child_error is not None:
            return _descend(value, f"{prefix}[{key!r}]", child_error, depth + 1)
    return prefix, error


def describe_unpicklable(obj: Any, path: str, cause: BaseException) -> str:
    """A one-line message naming the path, the key and what to do."""
    key, error = find_unpicklable(obj)
    what = f" at key {key}" if key else ""
    reason = error if error is not None else cause
    if isinstance(cause, RecursionError) or isinstance(error, RecursionError):
        start = key or "<the checkpoint itself>"
        start = start if len(start) <= 80 else start[:80] + "..."
        return (
            f"cannot save checkpoint {path!r}: it is nested too deeply to pickle (RecursionError: more levels of "
            f"containers than Python's recursion limit, {sys.getrecursionlimit()}, allows, at key "
            f"{start}); torch.save fails on it too: "
            "flatten that structure, or raise the limit with sys.setrecursionlimit"
        )
    return (
        f"cannot save checkpoint {path!r}: the object{what} cannot be pickled by torch.save "
        f"({type(reason).__name__}: {reason}); remove it from the checkpoint or convert it to "
        "tensors, numbers, strings, lists or dicts"
    )
