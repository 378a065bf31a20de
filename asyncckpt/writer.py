"""Compatibility path; the code lives in asyncckpt._writers.base and asyncckpt._writers.thread.

``asyncckpt.writer.Writer`` and ``Operation`` are cited by docs/index.md, and other modules and
tests import the writer names from here.
"""

from ._writers.base import (
    Operation,
    Writer,
    WriterGoneError,
    abort_collective_save,
    failed_save_before,
    lower_this_threads_priority,
    perform,
    skipped_removal,
)
from ._writers.thread import ThreadWriter

__all__ = [
    "Operation",
    "ThreadWriter",
    "Writer",
    "WriterGoneError",
    "abort_collective_save",
    "failed_save_before",
    "lower_this_threads_priority",
    "perform",
    "skipped_removal",
]
