"""A slow disk for the subprocess tests: saves are still pending when the process ends.

Fault injection: the sleep stands in for a slow disk; the write after it is the real one.
Child scripts import it with the tests folder on ``PYTHONPATH`` (see ``_subproc.child_env``).
"""

from __future__ import annotations

import time
from typing import Any, Dict

from _subproc import child_env  # noqa: F401  (child scripts and older tests import it from here)
from asyncckpt import TorchCheckpointIO


class SlowDiskIO(TorchCheckpointIO):
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Any = None) -> None:
        time.sleep(self.delay)
        super().save_checkpoint(checkpoint, path, storage_options)
