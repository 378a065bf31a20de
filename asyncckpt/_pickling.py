"""Pickling for staging and for error messages.

:func:`split` is staging's single pickling pass: every plain tensor, wherever it sits (dicts,
lists, namedtuples, dataclasses, a module's ``_parameters``), is set aside by ``persistent_id``;
everything else is serialized into a small "skeleton", the point-in-time copy of all non-tensor
state. Pickling it on the caller's thread surfaces an unpicklable object where the user can act
on it; :func:`describe_unpicklable` then names the key. :func:`restore` is the inverse.
"""

from __future__ import annotations

import io
import pickle
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .errors import NotSerializableError

_DIAGNOSE_MAX_DEPTH = 64


class _SkipTensors(pickle.Pickler):
    """Pickles everything but tensors, which are checked separately, so diagnosis stays cheap."""

    def persistent_id(self, obj: Any) -> Optional[str]:
        if isinstance(obj, torch.Tensor) and type(obj) in (torch.Tensor, torch.nn.Parameter):
            return "tensor"
        return None


def _picklable(obj: Any) -> Optional[BaseException]:
    try:
        _SkipTensors(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
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


# -- the staging pass: one pickler that sets tensors aside and serializes everything else ----


def is_stageable(obj: Any) -> bool:
    """Plain dense CPU, CUDA or XLA tensors go through the staging buffers; others are pickled by value.

    Runs once per tensor on the caller's thread, so it uses the cheapest attribute checks.
    """
    return (
        type(obj) is torch.Tensor
        and (obj.is_cpu or obj.is_cuda or obj.is_xla)
        and obj.layout is torch.strided
        and not obj.is_nested
        and not obj.is_quantized
        and not obj.is_conj()
        and not obj.is_neg()
        and not obj.__dict__
    )


_STORAGE_TYPES = (torch.TypedStorage, torch.UntypedStorage)


def move_xla_to_cpu(tensors: List[Any]) -> bool:
    """Replace each XLA tensor among :func:`split`'s tensors (its storages are never XLA) by its
    CPU copy, all in one batched transfer; returns whether there was any.

    ``is_xla`` rather than ``device.type``: building a device object per tensor cost 27 ms of
    the call for 20,000 tensors.
    """
    xla = [i for i, t in enumerate(tensors) if type(t) is torch.Tensor and t.is_xla]
    if not xla:
        return False
    from .xla import transfer_to_cpu

    for i, cpu_tensor in zip(xla, transfer_to_cpu([tensors[i] for i in xla]), strict=True):
        tensors[i] = cpu_tensor
    return True


def _is_stageable_storage(obj: Any) -> bool:
    """A storage on the CPU or a CUDA device: a bare one, or the one a tensor pickled by value
    (a tensor with attributes, a nested tensor) reduces to. Staging it as a storage keeps its
    memory shared with the plain tensors that view it, as ``torch.save`` does."""
    return type(obj) in _STORAGE_TYPES and obj.device.type in ("cpu", "cuda")


_PARAMETER_REDUCE = torch.nn.Parameter.__reduce_ex__


def _reduce_parameter(param: torch.Tensor) -> Any:
    """``Parameter.__reduce_ex__`` with ``param.detach()`` in place of ``param.data``.

    Both alias the parameter's memory, but ``.data`` comes with a version counter of its own,
    which an in-place change of the parameter (``with torch.no_grad(): p.zero_()``, an EMA
    update, ``load_state_dict``) does not move; ``detach()`` shares the parameter's counter, so
    lazy staging watches the counter those changes bump. The file is the same: ``torch.save``
    pickles the same rebuild call with an equal tensor.
    """
    reduced = _PARAMETER_REDUCE(param, pickle.HIGHEST_PROTOCOL)
    rebuild, args = reduced[0], reduced[1]
    if not (isinstance(args, tuple) and args and isinstance(args[0], torch.Tensor)):
        return reduced  # a layout this code does not know: pickled as torch would
    return (rebuild, (param.detach(), *args[1:]), *reduced[2:])


class TensorCollector(pickle.Pickler):
    """Pickles the non-tensor skeleton and collects stageable tensors and storages as persistent ids.

    Parameters (whole modules, ``state_dict(keep_vars=True)``) are collected through
    :func:`_reduce_parameter`, so each staged tensor shares the version counter of its parameter.
    """

    def __init__(self, buffer: io.BytesIO) -> None:
        super().__init__(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: List[Any] = []
        self._index: Dict[int, int] = {}

    def persistent_id(self, obj: Any) -> Optional[int]:
        if type(obj) is torch.Tensor:
            if not is_stageable(obj):
                return None
        elif not _is_stageable_storage(obj):
            return None
        index = self._index.get(id(obj))
        if index is None:
            index = len(self.tensors)
            self._index[id(obj)] = index
            self.tensors.append(obj)  # keeps the object alive, so its id stays unique
        return index

    def reducer_override(self, obj: Any) -> Any:
        # Called for objects persistent_id passed on, except builtin containers and atoms.
        if isinstance(obj, torch.Tensor) and type(obj).__reduce_ex__ is _PARAMETER_REDUCE:
            return _reduce_parameter(obj)
        return NotImplemented


class _TensorRestorer(pickle.Unpickler):
    def __init__(self, data: bytes, tensors: Sequence[Any]) -> None:
        super().__init__(io.BytesIO(data))
        self._tensors = tensors

    def persistent_load(self, pid: Any) -> Any:
        return self._tensors[pid]


class _PlaceholderRestorer(_TensorRestorer):
    """Rebuilds with placeholders in place of tensors: torch's rebuild calls (a parameter's
    ``_rebuild_parameter``) return the placeholder they were given instead of a tensor."""

    def __init__(self, data: bytes, placeholders: Sequence[Any]) -> None:
        super().__init__(data, placeholders)
        self._ids = {id(p) for p in placeholders}

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if module.startswith("torch.") and name.startswith("_rebuild"):
            return self._placeholder_of
        return found

    def _placeholder_of(self, *args: Any) -> Any:
        return next((a for a in args if id(a) in self._ids), None)


def split(checkpoint: Any, path: str) -> Tuple[bytes, List[Any]]:
    """One pickling pass: the skeleton (every non-tensor object, by value) and the tensors (and
    storages) set aside.

    An object the pickler refuses raises :class:`NotSerializableError` naming its key.
    """
    buffer = io.BytesIO()
    collector = TensorCollector(buffer)
    try:
        collector.dump(checkpoint)
    except Exception as err:
        raise NotSerializableError(describe_unpicklable(checkpoint, path, err), path) from err
    return buffer.getvalue(), collector.tensors


def restore(skeleton: bytes, tensors: Sequence[Any]) -> Any:
    """Rebuild the checkpoint object from its skeleton and staged tensors."""
    return _TensorRestorer(skeleton, tensors).load()


def restore_with_placeholders(skeleton: bytes, placeholders: Sequence[Any]) -> Any:
    """Rebuild the checkpoint's structure with ``placeholders[i]`` where tensor ``i`` was (to name
    tensors by their key path): a parameter is its placeholder there, not a parameter around it."""
    return _PlaceholderRestorer(skeleton, placeholders).load()
