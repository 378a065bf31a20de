"""torch_xla support: ``XLACheckpointIO`` and the batched XLA-to-CPU transfer used by staging.

torch_xla is imported only when an XLA tensor is seen or ``XLACheckpointIO`` is built, so the
core never needs it. All device work (sync and transfer) runs on the caller's thread: torch_xla
races when a worker thread syncs lazy tensors while training syncs its own graph, so the writer
only ever sees CPU tensors.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from .checkpoint_io import PathLike
from .torch_io import TorchCheckpointIO

_INSTALL_HINT = (
    "torch_xla is not installed; XLACheckpointIO needs it. Install the torch_xla release that "
    "matches your torch, e.g. `pip install torch==2.9.0 torch-xla==2.9.0` (set PJRT_DEVICE=CPU "
    "to run on the CPU), or use asyncckpt.TorchCheckpointIO for CPU and CUDA training"
)


def _torch_xla() -> Any:
    try:
        import torch_xla
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return torch_xla


def transfer_to_cpu(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """Move XLA tensors to the CPU after one sync, in one batched transfer (no per-tensor trips).

    The sync materializes pending lazy computation once, as ``xm.save`` does, so the transfer
    runs no graph. The results are new contiguous CPU tensors, unaffected by later device
    updates.
    """
    torch_xla = _torch_xla()
    if not tensors:
        return []
    torch_xla._XLAC._xla_sync_multi(tensors, devices=[], wait=True, sync_xla_data=False)
    return list(torch_xla._XLAC._xla_get_cpu_tensors(tensors))


def checkpoint_to_cpu(checkpoint: Any) -> Any:
    """A copy of ``checkpoint`` with every XLA tensor moved to the CPU in one batched transfer.

    Structure is kept exactly (OrderedDict and its ``_metadata``, tuples, namedtuples,
    Parameters), unlike torch_xla's own converter, because it reuses staging's pickling pass.
    """
    from ._pickling import move_xla_to_cpu, restore, split

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
        _torch_xla()
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


