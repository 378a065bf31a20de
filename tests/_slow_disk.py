"""A slow disk for the subprocess tests: saves are still pending when the process ends.

Fault injection: the sleep stands in for a slow disk; the write after it is the real one.
Child scripts import it with the tests folder on ``PYTHONPATH`` (see ``child_env``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict

from asyncckpt import TorchCheckpointIO

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


class SlowDiskIO(TorchCheckpointIO):
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Any = None) -> None:
        time.sleep(self.delay)
        super().save_checkpoint(checkpoint, path, storage_options)


def child_env() -> Dict[str, str]:
    """The environment for a child script: the repository and this folder importable."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]))
