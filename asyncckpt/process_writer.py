"""Compatibility path; the code lives in asyncckpt._writers.process and asyncckpt._writers.spawn_check.

The engine imports ``ProcessWriter`` and ``check_picklable`` from here.
"""

from ._writers.process import ProcessWriter, RemoteWriterError, check_picklable, writer_main
from ._writers.spawn_check import check_main_references, main_is_importable, main_names

__all__ = [
    "ProcessWriter",
    "RemoteWriterError",
    "check_main_references",
    "check_picklable",
    "main_is_importable",
    "main_names",
    "writer_main",
]
