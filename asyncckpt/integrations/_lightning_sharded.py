"""Compatibility path; the code lives in :mod:`asyncckpt.integrations.lightning.sharded`."""

from __future__ import annotations

from .lightning.sharded import (
    META_FILE,
    LightningShardedIO,
    connect,
    connected_engine,
    settle_meta,
    warn_if_bypassed,
)
from .lightning.stage import sharded_model_key

__all__ = [
    "META_FILE",
    "LightningShardedIO",
    "connect",
    "connected_engine",
    "settle_meta",
    "sharded_model_key",
    "warn_if_bypassed",
]
