"""The skeleton: staging's one pickling pass, its inverse, and the key paths it can name.

:func:`split` is staging's single pickling pass: every plain tensor, wherever it sits (dicts,
lists, namedtuples, dataclasses, a module's ``_parameters``), is set aside by the pickler's
``reducer_override`` and stands in the skeleton as a call of :func:`staged_item`; everything
else is serialized into a small "skeleton", the point-in-time copy of all non-tensor state.
Pickling it on the caller's thread surfaces an unpicklable object where the user can act on it;
:func:`asyncckpt._diagnose.describe_unpicklable` then names the key. :func:`restore` is the
inverse, and :func:`key_paths` names staged tensors (``state_dict.layer3.weight``) from the
skeleton when a save fails.
"""

from __future__ import annotations

import functools
import gc
import io
import itertools
import operator
import pickle
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
from torch import _utils as torch_utils  # torch's private sparse rebuild and its list

from .._diagnose import TORCH_SAVE_PROTOCOL, describe_unpicklable
from ..errors import NotSerializableError

__all__ = [
    "TensorCollector",
    "without_attributes",
    "is_stageable",
    "key_paths",
    "restore",
    "restore_with_placeholders",
    "split",
    "split_lean",
]


# -- the staging pass: one pickler that sets tensors aside and serializes everything else ----


_attributes = operator.attrgetter("__dict__")  # creates an empty dict on a tensor that had none
_is_dict = functools.partial(operator.is_, dict)


def _referents_without_attributes(tensors: Sequence[torch.Tensor]) -> bool:
    """No tensor has attributes, read from what the garbage collector sees of each tensor (its
    type, its ``__dict__`` if it has one, ...): one C call for all of them, which creates no
    ``__dict__`` on a tensor that has none (reading ``tensor.__dict__`` does)."""
    referents = gc.get_referents(*tensors)
    kinds = list(map(type, referents))
    if dict not in kinds:
        return True
    return not any(map(len, itertools.compress(referents, map(_is_dict, kinds))))


def _attribute_reads_without_attributes(tensors: Sequence[torch.Tensor]) -> bool:
    return not any(map(_attributes, tensors))


def _referents_show_attributes() -> bool:
    """Whether the collector's view of a tensor shows its attributes, on tensors made for it."""
    try:
        plain, empty, noted = torch.zeros(1), torch.zeros(1), torch.zeros(1)
        empty.__dict__  # noqa: B018 - an empty attribute dict, as reading it leaves one
        noted.note = 1
        return (
            _referents_without_attributes([plain, empty]) is True
            and _referents_without_attributes([plain, empty, noted]) is False
        )
    except Exception:  # noqa: BLE001 - another interpreter: the attribute reads stand
        return False


#: Whether no tensor of a list has attributes (which ``torch.save`` pickles, so that such a
#: tensor is pickled by value, not staged). The full pass asks it of each tensor, the warm
#: pass (:mod:`asyncckpt._staging.warm`) of all of them at once.
without_attributes: Callable[[Sequence[torch.Tensor]], bool] = (
    _referents_without_attributes if _referents_show_attributes() else _attribute_reads_without_attributes
)


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
        and without_attributes((obj,))
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
    reduced = _PARAMETER_REDUCE(param, TORCH_SAVE_PROTOCOL)
    rebuild, args = reduced[0], reduced[1]
    if not (isinstance(args, tuple) and args and isinstance(args[0], torch.Tensor)):
        return reduced  # a layout this code does not know: pickled as torch would
    return (rebuild, (param.detach(), *args[1:]), *reduced[2:])


def staged_item() -> Any:
    """What a skeleton calls where a staged tensor (or storage) was: the unpicklers here give
    each call the next staged item, in the order the pickler set them aside. Anywhere else a
    skeleton is not meant to be loaded."""
    raise pickle.UnpicklingError("an asyncckpt skeleton is loaded by asyncckpt._staging.skeleton.restore")


#: The reduce value a collector returns for an item it sets aside: the skeleton holds a call
#: of :func:`staged_item` there. A constant, so setting an item aside allocates nothing; the
#: pickler memoizes the item, so an object met again is a reference to the first meeting.
_STAGED = (staged_item, ())


class TensorCollector(pickle.Pickler):
    """Pickles the non-tensor skeleton and sets stageable tensors and storages aside.

    Items are caught in ``reducer_override``, which the pickler calls only for objects that are
    not atoms or builtin containers (a ``persistent_id`` is called for every object: 55,000
    calls for a checkpoint of 20,000 tensors, where this is called 20,000 times). Parameters
    (whole modules, ``state_dict(keep_vars=True)``) are collected through
    :func:`_reduce_parameter`, so each staged tensor shares the version counter of its parameter.
    """

    def __init__(self, buffer: io.BytesIO) -> None:
        super().__init__(buffer, protocol=TORCH_SAVE_PROTOCOL)  # refuses what torch.save refuses
        self.tensors: List[Any] = []
        self._set_aside = self.tensors.append

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is _TENSOR:
            if not is_stageable(obj):
                return NotImplemented  # pickled by value; its storage comes back here
            self._set_aside(obj)
            return _STAGED
        if kind in _STORAGE_TYPES:
            if not _is_stageable_storage(obj):
                return NotImplemented
            self._set_aside(obj)
            return _STAGED
        if isinstance(obj, torch.Tensor) and kind.__reduce_ex__ is _PARAMETER_REDUCE:
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
        self._next_item = iter(tensors).__next__

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "staged_item":
            return self._next_item
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
    """A bare storage: the lean pass cannot stand in for :func:`split`."""


class _LeanCollector(TensorCollector):
    """:class:`TensorCollector` that sets aside every plain ``torch.Tensor`` without asking
    :func:`is_stageable` (a dozen attribute reads each), and gives up at a bare storage.

    Whether the tensors it took are stageable is checked afterwards, in bulk, by the caller
    (:mod:`asyncckpt._staging.warm`).
    """

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is _TENSOR:
            self._set_aside(obj)
            return _STAGED
        if kind in _STORAGE_TYPES:
            raise _NotLean
        if isinstance(obj, torch.Tensor) and kind.__reduce_ex__ is _PARAMETER_REDUCE:
            return _reduce_parameter(obj)
        return NotImplemented


_TENSOR = torch.Tensor


def split_lean(checkpoint: Any) -> Optional[Tuple[bytes, List[torch.Tensor]]]:
    """:func:`split` for a checkpoint whose tensors are all stageable, at a fraction of its cost.

    Returns None where the result could differ from :func:`split`'s (a bare storage, or any
    error: :func:`split` then raises it with its key). Where every tensor returned passes
    :func:`is_stageable`, the skeleton and the tensors are exactly :func:`split`'s: both pickle
    the same objects in the same order, and set each tensor object aside once; the caller must
    check that.
    """
    buffer = io.BytesIO()
    collector = _LeanCollector(buffer)
    try:
        collector.dump(checkpoint)
    except Exception:  # noqa: BLE001 - split() runs next and raises it with the key
        return None
    return buffer.getvalue(), collector.tensors


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
