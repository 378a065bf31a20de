"""Every duck-typed hook the engine looks for on the wrapped IO, in one place.

The engine wraps any ``CheckpointIO``: ours, a user's, a framework's. Some IOs offer optional
hooks that change how the engine treats their saves (``agree_to_save`` for a collective IO,
``prepare_for_staging`` for sharded state, ``check_path``, ...). :class:`WrappedIO` is the one
place that looks them up, so the engine's verbs read as the data flow and the list of hooks can
be read here. Facts about well-known IOs come from :mod:`asyncckpt.integrations.known_ios`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Optional, Tuple

from .._storage.paths import absolute_path, check_names, check_target, path_key, path_keys
from .._storage.torch_io import TorchCheckpointIO
from ..checkpoint_io import PathLike
from ..errors import InvalidPathError
from ..integrations.known_ios import io_traits, save_owner


def _text_of(path: PathLike) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidPathError(f"checkpoint path must be a str or os.PathLike, not {type(path).__name__}")
    return os.fspath(path)


def path_key_of(path: PathLike) -> str:
    """The ordering key of ``path`` (operations on one key run in order)."""
    text = _text_of(path)
    check_names(text)  # refused at the call for every operation, not later by the writer's os call
    return path_key(text)


def read_keys_of(path: PathLike) -> Tuple[str, ...]:
    """The ordering keys a read of ``path`` waits for: its own, and the key of the file a
    symlink on the way resolves to (see :func:`asyncckpt._storage.paths.path_keys`)."""
    text = _text_of(path)
    check_names(text)  # the same refusals as path_key_of
    return path_keys(text)


def absolute_target(path: PathLike) -> PathLike:
    """A relative local path or ``file://``/``local://`` URL made absolute now: it means the
    working folder at the call, not the writer's when it writes (see :func:`absolute_path`)."""
    text = os.fspath(path)
    absolute = absolute_path(text)
    if absolute == text:
        return path
    return type(path)(absolute) if isinstance(path, pathlib.PurePath) else absolute


def key_and_target(path: PathLike) -> Tuple[str, PathLike]:
    """``path``'s ordering key and the target to write, both from one reading of the working
    folder: another thread's ``os.chdir`` between two readings would key the operation under
    one folder and write the other's file."""
    _text_of(path)  # refused as a key would be, before the target is made of it
    target = absolute_target(path)
    return path_key_of(target), target


def _attrs_up_to(cls: type, owner: type) -> set:
    """Names defined on ``owner`` or on classes below it in ``cls``'s MRO: an IO that overrides
    ``save_checkpoint`` below the class that checks its options may accept other options."""
    names: set = set()
    for c in cls.__mro__:
        names |= set(vars(c))
        if c is owner:
            break
    return names


class WrappedIO:
    """The optional hooks of one wrapped IO (looked up on each use: the IO may change)."""

    __slots__ = ("io",)

    def __init__(self, io: Any) -> None:
        self.io = io

    # -- collective IOs (asyncckpt.DistributedCheckpointIO) --------------------------------

    @property
    def agree_to_save(self) -> Optional[Callable[..., Optional[BaseException]]]:
        """The ranks' agreement on a save, for a collective IO; None for any other."""
        return getattr(self.io, "agree_to_save", None)

    @property
    def remove_is_collective(self) -> bool:
        """Whether removes are collective too (agreed at the call, as saves are)."""
        return self.agree_to_save is not None and bool(getattr(self.io, "remove_is_collective", False))

    @property
    def remove_is_collective_flag(self) -> bool:
        """The IO's ``remove_is_collective`` alone (the async face checks it without an agreement)."""
        return bool(getattr(self.io, "remove_is_collective", False))

    @property
    def is_sharded(self) -> bool:
        """Whether the IO restructures state before staging (a sharded, collective save)."""
        return hasattr(self.io, "prepare_for_staging")

    @property
    def is_collective(self) -> bool:
        """Whether its saves run collectives on a process group (a sharded IO's)."""
        return self.is_sharded or self.agree_to_save is not None

    def stageable_form(self, checkpoint: Any) -> Any:
        """The hook for wrapped IOs whose state is not all plain tensors: an IO with a
        ``prepare_for_staging(checkpoint)`` method returns a form the stager can copy (for
        :class:`asyncckpt.DistributedCheckpointIO`: each DTensor as its local tensor), and its
        ``save_checkpoint`` receives that form back, rebuilt from the staged copy."""
        prepare = getattr(self.io, "prepare_for_staging", None)
        return checkpoint if prepare is None else prepare(checkpoint)

    @property
    def version_owner(self) -> Any:
        """The IO's ``version_owner`` (lazy staging's version checks), or None."""
        return getattr(self.io, "version_owner", None)

    # -- paths and options ----------------------------------------------------------------

    def remember_storage_options(self, path: PathLike, storage_options: Any) -> None:
        """Let this copy of the IO remember a save's options (it loads that path later; a
        writer process saves with its own copy)."""
        remember = getattr(self.io, "remember_storage_options", None)
        if remember is not None:
            remember(path, storage_options)

    def check_path(self, path: PathLike) -> None:
        """Refuse a bad path at the call (the IO's own ``check_path``, else ours)."""
        check_names(_text_of(path))  # what path_key_of refuses
        check = getattr(self.io, "check_path", None)
        if check is not None:
            check(path)
        else:
            check_target(os.fspath(path))

    def check_storage_options(self, path: PathLike, storage_options: Any) -> None:
        """Raise ``TypeError`` where the wrapped IO's own save would refuse ``storage_options``."""
        check = getattr(self.io, "check_storage_options", None)
        owner = save_owner(type(self.io))
        if check is not None and owner is not None and "check_storage_options" in _attrs_up_to(type(self.io), owner):
            check(path, storage_options)
            return
        refusal = io_traits(self.io).storage_options_refusal
        if refusal is not None:
            raise TypeError(refusal)

    def check_save(self, path: PathLike, storage_options: Optional[Any]) -> Tuple[str, Any]:
        """Check a save's arguments at the call; returns the path key and the target to write.

        ``storage_options`` the wrapped IO would refuse raise ``TypeError`` here, as a
        synchronous save would, not later in the background.
        """
        self.check_path(path)
        if storage_options is not None:
            self.check_storage_options(path, storage_options)
        return key_and_target(path)

    # -- how it writes and loads ------------------------------------------------------------

    @property
    def writes_with_torch_save(self) -> bool:
        """Whether its ``save_checkpoint`` is one known to write with ``torch.save``."""
        return io_traits(self.io).writes_with_torch_save

    @property
    def loads_like_torch_checkpoint_io(self) -> bool:
        """Whether its ``load_checkpoint`` is :class:`TorchCheckpointIO`'s own (not overridden)."""
        return type(self.io).load_checkpoint is TorchCheckpointIO.load_checkpoint
