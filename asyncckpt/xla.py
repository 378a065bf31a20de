"""torch_xla support: ``XLACheckpointIO``, and the batched XLA-to-CPU transfer used by staging
(``transfer_to_cpu``, whose code lives in asyncckpt._staging.devices).

torch_xla is imported only when an XLA tensor is seen or ``XLACheckpointIO`` is built, so the
core never needs it. All device work (sync and transfer) runs on the caller's thread: torch_xla
races when a worker thread syncs lazy tensors while training syncs its own graph, so the writer
only ever sees CPU tensors.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from ._staging.devices import import_torch_xla, move_xla_to_cpu, transfer_to_cpu
from ._staging.skeleton import restore, split
from ._storage.torch_io import TorchCheckpointIO
from .checkpoint_io import PathLike

__all__ = ["XLACheckpointIO", "checkpoint_to_cpu", "transfer_to_cpu"]


def checkpoint_to_cpu(checkpoint: Any) -> Any:
    """A copy of ``checkpoint`` with every XLA tensor moved to the CPU in one batched transfer.

    Structure is kept exactly (OrderedDict and its ``_metadata``, tuples, namedtuples,
    Parameters), unlike torch_xla's own converter, because it reuses staging's pickling pass.
    """
    skeleton, tensors = split(checkpoint, "<xla checkpoint>")
    if not move_xla_to_cpu(tensors):
        return checkpoint
    return restore(skeleton, tensors)


class XLACheckpointIO(TorchCheckpointIO):
    """``xm.save`` semantics: one sync, one batched transfer, and only the master ordinal writes.

    Files are ordinary ``torch.save`` files of CPU tensors: they load with plain ``torch.load``
    on a machine without torch_xla.

    Args:
        master_only: only the master ordinal writes; the others still sync, so every replica
            runs the same graph.
        global_master: with ``master_only``, the master is global ordinal 0 rather than the
            local ordinal 0 of each host.
    """

    def __init__(self, *, master_only: bool = True, global_master: bool = False, durable: bool = True) -> None:
        import_torch_xla()
        super().__init__(durable=durable)
        self.master_only = master_only
        self.global_master = global_master
        self._decided: Optional[bool] = None

    def should_write(self) -> bool:
        """Whether this process writes, as ``xm.save(master_only, global_master)`` decides it."""
        if self._decided is not None:
            return self._decided
        if not self.master_only:
            return True
        import torch_xla.core.xla_model as xm

        return bool(xm.is_master_ordinal(local=not self.global_master))

    def check_storage_options(self, path: PathLike, storage_options: Optional[Any]) -> None:
        # Declared here, beside the save that honours it, so that AsyncCheckpointIO refuses
        # bad storage_options at the call rather than in the background.
        super().check_storage_options(path, storage_options)

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], path: PathLike, storage_options: Optional[Any] = None
    ) -> None:
        self.check_storage_options(path, storage_options)  # on every ordinal, not just the writer
        cpu_checkpoint = checkpoint_to_cpu(checkpoint)  # every ordinal syncs, as in xm.save
        if self.should_write():
            super().save_checkpoint(cpu_checkpoint, path, storage_options)

    def __getstate__(self) -> Dict[str, Any]:
        # A writer process must not start its own XLA runtime to ask for its ordinal: the
        # decision is taken here, in the training process, when the IO is sent there.
        state = dict(self.__dict__)
        state["_decided"] = self.should_write()
        return state

    def __repr__(self) -> str:
        return f"XLACheckpointIO(master_only={self.master_only}, global_master={self.global_master})"


