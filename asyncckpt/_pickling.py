"""Compatibility path; the code lives in asyncckpt._staging.skeleton (split, restore),
asyncckpt._staging.devices (move_xla_to_cpu) and asyncckpt._diagnose (describe_unpicklable)."""

from ._diagnose import describe_unpicklable, find_unpicklable
from ._staging.devices import move_xla_to_cpu
from ._staging.skeleton import TensorCollector, is_stageable, restore, restore_with_placeholders, split

__all__ = [
    "TensorCollector",
    "describe_unpicklable",
    "find_unpicklable",
    "is_stageable",
    "move_xla_to_cpu",
    "restore",
    "restore_with_placeholders",
    "split",
]
