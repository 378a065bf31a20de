"""The ``CheckpointIO`` interface: the same four methods, with the same signatures, as Lightning's.

A user's subclass written against Lightning's base moves here unchanged, and the other way round.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any, Dict, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointIO(ABC):
    """Saves, loads and removes checkpoints at a path. Subclass it to change how bytes are stored."""

    @abstractmethod
    def save_checkpoint(
        self, checkpoint: Dict[str, Any], path: PathLike, storage_options: Optional[Any] = None
    ) -> None:
        """Write ``checkpoint`` to ``path``."""

    @abstractmethod
    def load_checkpoint(
        self, path: PathLike, map_location: Optional[Any] = None, weights_only: Optional[bool] = None
    ) -> Dict[str, Any]:
        """Read the checkpoint at ``path``."""

    @abstractmethod
    def remove_checkpoint(self, path: PathLike) -> None:
        """Delete the checkpoint at ``path``; a missing path is not an error."""

    def teardown(self) -> None:  # noqa: B027 - optional hook, a no-op unless overridden
        """Release what the IO holds; called once training ends."""


def load_options(map_location: Any, weights_only: Optional[bool], verify: bool = False) -> Dict[str, Any]:
    """The keyword arguments to pass on to a wrapped ``load_checkpoint``: only those given, so
    the wrapped IO's own defaults (Lightning's ``map_location`` among them) still apply."""
    kwargs: Dict[str, Any] = {}
    if map_location is not None:
        kwargs["map_location"] = map_location
    if weights_only is not None:
        kwargs["weights_only"] = weights_only
    if verify:
        kwargs["verify"] = True
    return kwargs
