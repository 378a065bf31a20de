"""Where each staged storage came from, so that the file records its original device.

``torch.save`` writes, beside each storage, the location its ``torch.load`` restores it to
(``"cuda:0"``), asking the taggers registered with ``torch.serialization.register_package``.
A staged copy lives in host memory, so the file would say ``"cpu"`` and load every tensor there,
where the file ``torch.save`` writes from the live CUDA tensors loads them on their devices.

While a writer writes a staged checkpoint it declares, on its own thread, which host storages
stand for device storages (:func:`recorded_as`); the tagger registered here answers for those
storages only, and for nobody else: a ``torch.save`` on another thread, or outside a save, sees
no declaration and is tagged as always. Storages are told apart by torch's own storage handle,
the identity ``torch.save`` keys them on; the declaration lasts exactly as long as the write,
while the slot keeps the storages alive.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, Mapping, Optional, Sequence

import torch

__all__ = ["locations_of", "recorded_as", "is_device_location"]

_declared = threading.local()


def is_device_location(location: str) -> bool:
    """Whether a layout's location string names a CUDA device (``"cuda:0"``; ``"cuda"`` too)."""
    return location.startswith("cuda")


def locations_of(storages: Sequence[torch.UntypedStorage], locations: Sequence[str]) -> Dict[int, str]:
    """Host storage handle -> original location, for the storages that stand for device ones."""
    return {st._cdata: location for st, location in zip(storages, locations, strict=True) if location != "cpu"}


@contextlib.contextmanager
def recorded_as(locations: Optional[Mapping[int, str]]) -> Iterator[None]:
    """While the body writes on this thread, ``torch.save`` records these storages' original
    locations (nothing to do for an empty mapping: a checkpoint of CPU tensors)."""
    if not locations:
        yield
        return
    outer = getattr(_declared, "locations", None)
    _declared.locations = locations
    try:
        yield
    finally:
        _declared.locations = outer


class _Tagger:
    """The tagger: a declared storage's location, None for every other storage.

    torch keeps its taggers as ``(priority, tagger, deserializer)`` tuples in a sorted list; two
    entries of equal priority are then ordered by their taggers, which plain functions refuse
    (``TypeError`` from ``register_package``, found when a test registered its own at our
    priority). This one orders before any other of its priority, so a registration never fails.
    """

    def __call__(self, storage: object) -> Optional[str]:
        locations = getattr(_declared, "locations", None)
        if not locations:
            return None
        return locations.get(getattr(storage, "_cdata", None))

    def __lt__(self, other: object) -> bool:
        return True

    def __gt__(self, other: object) -> bool:
        return False


def _restore(storage: object, location: str) -> None:
    return None  # loading is torch's own: the location names a real device


# Before torch's own taggers (CPU is 10, CUDA 20), so a declared host storage is not tagged "cpu".
torch.serialization.register_package(1, _Tagger(), _restore)
