"""Device-to-host copies: the one CUDA side-stream copy, and the batched XLA-to-CPU transfer.

:class:`SideStreamCopy` is the CUDA device-to-pinned-host copy of both stagers (eager and lazy
staging differ only in whether the training stream waits for it).

torch_xla is imported only when an XLA tensor is seen (or ``XLACheckpointIO`` is built), so the
core never needs it. All device work (sync and transfer) runs on the caller's thread: torch_xla
races when a worker thread syncs lazy tensors while training syncs its own graph, so the writer
only ever sees CPU tensors. This module imports no storage code: ``asyncckpt.xla`` builds its
``XLACheckpointIO`` on top of it.
"""

from __future__ import annotations

from typing import Any, List

import torch

__all__ = ["INSTALL_HINT", "SideStreamCopy", "import_torch_xla", "move_xla_to_cpu", "transfer_to_cpu"]

INSTALL_HINT = (
    "torch_xla is not installed; XLACheckpointIO needs it. Install the torch_xla release that "
    "matches your torch, e.g. `pip install torch==2.9.0 torch-xla==2.9.0` (set PJRT_DEVICE=CPU "
    "to run on the CPU), or use asyncckpt.TorchCheckpointIO for CPU and CUDA training"
)


def import_torch_xla() -> Any:
    """The torch_xla module, or an ImportError that says how to install it."""
    try:
        import torch_xla
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return torch_xla


def transfer_to_cpu(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """Move XLA tensors to the CPU after one sync, in one batched transfer (no per-tensor trips).

    The sync materializes pending lazy computation once, as ``xm.save`` does, so the transfer
    runs no graph. The results are new contiguous CPU tensors, unaffected by later device
    updates.
    """
    torch_xla = import_torch_xla()
    if not tensors:
        return []
    # torch_xla's own (private) batched entry points, used here only: one sync, one transfer.
    torch_xla._XLAC._xla_sync_multi(tensors, devices=[], wait=True, sync_xla_data=False)
    return list(torch_xla._XLAC._xla_get_cpu_tensors(tensors))


def move_xla_to_cpu(tensors: List[Any]) -> bool:
    """Replace each XLA tensor among :func:`asyncckpt._staging.skeleton.split`'s tensors (its
    storages are never XLA) by its CPU copy, all in one batched transfer; returns whether there
    was any.

    ``is_xla`` rather than ``device.type``: building a device object per tensor cost 27 ms of
    the call for 20,000 tensors.
    """
    xla = [i for i, t in enumerate(tensors) if type(t) is torch.Tensor and t.is_xla]
    if not xla:
        return False
    for i, cpu_tensor in zip(xla, transfer_to_cpu([tensors[i] for i in xla]), strict=True):
        tensors[i] = cpu_tensor
    return True


class SideStreamCopy:
    """Device-to-pinned-host copies on a CUDA side stream of their own (one per stager).

    The side stream first waits for the current (training) stream, so pending kernels that
    produce the values finish before the copy reads them. With ``training_stream_waits`` the
    current stream then waits for the copy's event, so the next optimizer step (queued on it)
    cannot overwrite a source still being read (eager staging); without it, training runs on
    beside the copy, and lazy staging orders the two at its guard point instead. The caller's
    thread never blocks on the copy: whoever needs the host bytes synchronizes the returned
    event. ``non_blocking`` and ``record_stream`` apply to CUDA sources only; a CPU source is
    copied in order on the side stream.
    """

    def __init__(self) -> None:
        self._stream: Any = None  # made at the first copy: no CUDA context for CPU-only training

    def start(self, dst: List[torch.Tensor], src: List[torch.Tensor], *, training_stream_waits: bool) -> Any:
        """Queue the copies of ``src`` into ``dst``; returns the ``torch.cuda.Event`` recorded after them."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        stream = self._stream
        current = torch.cuda.current_stream()
        stream.wait_stream(current)  # values produced so far, then copy
        with torch.cuda.stream(stream):
            for d, s in zip(dst, src, strict=True):
                on_cuda = s.device.type == "cuda"
                d.copy_(s, non_blocking=on_cuda)
                if on_cuda:
                    s.record_stream(stream)
            event = torch.cuda.Event()
            event.record(stream)
        if training_stream_waits:
            current.wait_event(event)
        return event
