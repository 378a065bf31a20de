"""Compatibility path; the code lives in :mod:`asyncckpt._engine.lifecycle` (interpreter exit,
SIGTERM and fork of the engines, in one registry)."""

from ._engine.lifecycle import (
    after_handover,
    drain_all,
    exiting,
    install_sigterm_handler,
    register,
    stop_writers_before_multiprocessing_exit,
    uninstall_sigterm_handler,
)

__all__ = [
    "after_handover",
    "drain_all",
    "exiting",
    "install_sigterm_handler",
    "register",
    "stop_writers_before_multiprocessing_exit",
    "uninstall_sigterm_handler",
]
