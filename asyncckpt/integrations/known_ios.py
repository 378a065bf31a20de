"""Facts about well-known wrapped IOs, as data: which ones write with ``torch.save`` and how
they refuse ``storage_options``.

The engine needs these facts even when it wraps a framework's IO directly and no integration
module was ever imported; kept here as data (this module imports nothing), they keep framework
names out of the engine. :func:`io_traits` applies them to an IO's class.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

#: Top-level packages of the Lightning family, whose ``TorchCheckpointIO``/``XLACheckpointIO``
#: write with ``torch.save``.
LIGHTNING_PACKAGES = ("lightning", "lightning_fabric", "pytorch_lightning")

#: Class names of the IOs, ours or Lightning's, whose ``save_checkpoint`` writes with ``torch.save``.
TORCH_SAVE_CLASSES = ("TorchCheckpointIO", "XLACheckpointIO")

#: Lightning's own error text for ``Trainer.save_checkpoint(..., storage_options=...)`` with an
#: IO that does not take storage options (``{name}``: the IO's class name).
LIGHTNING_STORAGE_OPTIONS_REFUSAL = (
    "`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg"
    " is not supported for `{name}`. Please implement your custom `CheckpointIO`"
    " to define how you'd like to use `storage_options`."
)


class IOTraits(NamedTuple):
    """What is known of an IO from the class that defines its ``save_checkpoint``."""

    #: Its ``save_checkpoint`` is one known to write with ``torch.save`` (not overridden below).
    writes_with_torch_save: bool
    #: The ``TypeError`` text its own save raises for any ``storage_options``; None: unknown.
    storage_options_refusal: Optional[str]


def save_owner(cls: type) -> Optional[type]:
    """The class in ``cls``'s MRO that defines ``save_checkpoint``."""
    return next((c for c in cls.__mro__ if "save_checkpoint" in vars(c)), None)


def io_traits(io: Any) -> IOTraits:
    """The known traits of ``io``, by the class that defines its ``save_checkpoint``."""
    owner = save_owner(type(io))
    if owner is None or owner.__name__ not in TORCH_SAVE_CLASSES:
        return IOTraits(False, None)
    package = owner.__module__.split(".")[0]
    lightning = package in LIGHTNING_PACKAGES
    refusal = LIGHTNING_STORAGE_OPTIONS_REFUSAL.format(name=type(io).__name__) if lightning else None
    return IOTraits(lightning or package == "asyncckpt", refusal)
