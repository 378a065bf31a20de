"""Per-save measurements, so users can see what checkpointing costs their training loop."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SaveStats:
    """What one completed save cost.

    Attributes:
        path: where the checkpoint was written.
        blocking_seconds: time ``save_checkpoint`` held the caller (waiting for a slot + staging).
        wait_seconds: the part of ``blocking_seconds`` spent waiting for a free staging slot.
        staging_seconds: the part spent copying the checkpoint into host memory.
        write_seconds: time the writer spent serializing and committing the file.
        tensor_bytes: bytes of tensor data staged (the size of the copy).
        allocated_bytes: staging memory allocated (and first touched) inside the call, part of
            ``staging_seconds``; 0 when the slot's memory was reused, from an earlier save or
            from :meth:`asyncckpt.AsyncCheckpointIO.reserve`.
    """

    path: str
    blocking_seconds: float
    wait_seconds: float
    staging_seconds: float
    write_seconds: float
    tensor_bytes: int
    allocated_bytes: int = 0

    @property
    def tensor_megabytes(self) -> float:
        return self.tensor_bytes / 1e6
