"""The skeleton: staging's one pickling pass, its inverse, and the key paths it can name.

:func:`split` is staging's single pickling pass: every plain tensor, wherever it sits (dicts,
lists, namedtuples, dataclasses, a module's ``_parameters``), is set aside by ``persistent_id``;
everything else is serialized into a small "skeleton", the point-in-time copy of all non-tensor
state. Pickling it on the caller's thread surfaces an unpicklable object where the user can act
on it; :func:`asyncckpt._diagnose.describe_unpicklable` then names the key. :func:`restore` is
the inverse, and :func:`key_paths` names staged tensors (``state_dict.layer3.weight``) from the
skeleton when a save fails.
"""

from __future__ import annotations

import io
import itertools
import pickle
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
from torch import _utils as torch_utils  # torch's private sparse rebuild and its list

from .._diagnose import describe_unpicklable
from ..errors import NotSerializableError

__all__ = [
    "TensorCollector",
    "is_stageable",
    "key_paths",
    "restore",
    "restore_with_placeholders",
    "split",
    "split_lean",
]


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


def _rebuild_sparse_tensor_unlisted(*args: Any) -> Any:
    """torch's ``_rebuild_sparse_tensor``, minus its entry in torch's list of sparse tensors to
    validate: only ``torch.load`` empties that list, so every sparse tensor rebuilt here (views
    of staging memory) stayed referenced from it, save after save. The values came from the
    caller's own tensors: nothing to validate."""
    result = torch_utils._rebuild_sparse_tensor(*args)
    pending = getattr(torch_utils, "_sparse_tensors_to_validate", None)
    if isinstance(pending, list):
        for i in range(len(pending) - 1, -1, -1):  # by identity: == on tensors compares values
            if pending[i] is result:
                del pending[i]
                break
    return result


class _TensorRestorer(pickle.Unpickler):
    def __init__(self, data: bytes, tensors: Sequence[Any]) -> None:
        super().__init__(io.BytesIO(data))
        self._tensors = tensors

    def persistent_load(self, pid: Any) -> Any:
        return self._tensors[pid]

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_sparse_tensor":
            return _rebuild_sparse_tensor_unlisted
        return super().find_class(module, name)


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


class _NotLean(Exception):
    """A bare storage, or a tensor pickled by value: the lean pass cannot stand in for :func:`split`."""


class _LeanCollector(TensorCollector):
    """:class:`TensorCollector` that sets aside every plain ``torch.Tensor`` without asking
    :func:`is_stageable` (a dozen attribute reads each), and gives up at a bare storage.

    ``persistent_id`` runs for every object pickled (55,000 of them for 20,000 tensors), so it
    does one type test; whether the tensors it took are stageable is checked afterwards, in bulk,
    by the caller (:mod:`asyncckpt._staging.warm`).
    """

    def persistent_id(self, obj: Any) -> Optional[int]:
        kind = type(obj)
        if kind is _TENSOR:
            index = self._index.get(id(obj))
            if index is None:
                index = self._index[id(obj)] = len(self.tensors)
                self.tensors.append(obj)
            return index
        if kind in _STORAGE_TYPES:
            raise _NotLean
        return None


class _FastCollector(_LeanCollector):
    """:class:`_LeanCollector` without the lookup by identity: each tensor pickled gets the next
    id, so a tensor object pickled twice gets two (:func:`split_lean` checks for that afterwards,
    in one pass over the ids). Half the Python per tensor; bare storages are caught where
    ``persistent_id`` passes them on, in ``reducer_override``, which atoms never reach.
    """

    def __init__(self, buffer: io.BytesIO) -> None:
        super().__init__(buffer)
        self._append = self.tensors.append
        self._next_id = itertools.count().__next__

    def persistent_id(self, obj: Any) -> Optional[int]:
        if type(obj) is _TENSOR:
            self._append(obj)
            return self._next_id()
        return None

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) in _STORAGE_TYPES:
            raise _NotLean
        return super().reducer_override(obj)


_TENSOR = torch.Tensor


def split_lean(checkpoint: Any, distinct_storages_required: bool = False) -> Optional[Tuple[bytes, List[torch.Tensor]]]:
    """:func:`split` for a checkpoint whose tensors are all stageable, in a fifth of its time.

    Returns None where the result could differ from :func:`split`'s (a bare storage, or any
    error: :func:`split` then raises it with its key). Where every tensor returned passes
    :func:`is_stageable`, the skeleton and the tensors are exactly :func:`split`'s: both pickle
    the same objects in the same order; the caller must check that.

    The first pass (:class:`_FastCollector`) does not look tensors up by identity; where one
    tensor object turned out to be pickled twice, its ids would differ from :func:`split`'s, and
    the pass that looks them up (:class:`_LeanCollector`) runs instead.

    ``distinct_storages_required``: the caller uses the result only if the tensors' storages
    are all distinct, which no tensor object met twice passes (both meetings have one storage);
    the check for one is then the caller's, and is not made here.
    """
    for collector_class in (_FastCollector, _LeanCollector):
        buffer = io.BytesIO()
        collector = collector_class(buffer)
        try:
            collector.dump(checkpoint)
        except Exception:  # noqa: BLE001 - split() runs next and raises it with the key
            return None
        tensors = collector.tensors
        if (
            collector_class is _LeanCollector
            or distinct_storages_required
            or len(set(map(id, tensors))) == len(tensors)
        ):
            return buffer.getvalue(), tensors
    return None  # not reached: the second pass always returns


def restore(skeleton: bytes, tensors: Sequence[Any]) -> Any:
    """Rebuild the checkpoint object from its skeleton and staged tensors."""
    return _TensorRestorer(skeleton, tensors).load()


def restore_with_placeholders(skeleton: bytes, placeholders: Sequence[Any]) -> Any:
    """Rebuild the checkpoint's structure with ``placeholders[i]`` where tensor ``i`` was (to name
    tensors by their key path): a parameter is its placeholder there, not a parameter around it."""
    return _PlaceholderRestorer(skeleton, placeholders).load()


# -- key paths ---------------------------------------------------------------------------------


class _Marker:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def key_paths(skeleton: bytes, count: int, wanted: Iterable[int]) -> Dict[int, str]:
    """Key paths (``state_dict.layer3.weight``, ``optimizer_states[0].state.3.exp_avg``) of tensors.

    Rebuilt from the pickled skeleton, so the path is the one at the call, whatever the caller
    did to its containers since. Only run when a save fails, so the call pays nothing for it.
    """
    wanted = set(wanted)
    found: Dict[int, str] = {}
    try:
        root = restore_with_placeholders(skeleton, [_Marker(i) for i in range(count)])
    except Exception:  # noqa: BLE001 - a name is a nicety; the error is raised without it
        return found
    seen: Set[int] = set()
    stack: List[Tuple[Any, str, int]] = [(root, "", 0)]
    while stack and len(found) < len(wanted):
        obj, prefix, depth = stack.pop()
        if isinstance(obj, _Marker):
            if obj.index in wanted and obj.index not in found:
                found[obj.index] = prefix or "<the checkpoint itself>"
            continue
        if id(obj) in seen or depth > 64:
            continue
        seen.add(id(obj))
        children: List[Tuple[Any, str]] = []
        stands_for = getattr(type(obj), "key_path_stands_for", None)
        if stands_for is not None:  # a wrapper that stands in for its tensor under the same key
            children = [(getattr(obj, stands_for), prefix)]
        elif isinstance(obj, torch.nn.Module):  # by the names state_dict() gives, then any other attribute
            named = [*obj.named_parameters(recurse=False), *obj.named_buffers(recurse=False), *obj.named_children()]
            children = [(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in [*named, *vars(obj).items()]]
        elif isinstance(obj, dict):
            children = [(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple)):
            children = [(v, f"{prefix}[{i}]") for i, v in enumerate(obj)]
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            children = [(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in vars(obj).items()]
        stack.extend((child, name, depth + 1) for child, name in reversed(children))
    return found
