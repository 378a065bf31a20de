"""The async face of :class:`~asyncckpt.AsyncCheckpointIO`, for code that runs on an event loop.

``await io.asave_checkpoint(...)``, ``aload_checkpoint``, ``aremove_checkpoint``,
``acopy_checkpoint``, ``areserve``, ``aflush`` and ``async with io:`` drive the same engine as the blocking
methods (same slots, same FIFO writer, same order and error contract), built on anyio so they run
under asyncio and trio alike. anyio is imported inside the methods: the core imports without it
(``pip install asyncckpt[async]``).

Two rules shape this module:

* **Staging runs on the loop thread.** The copy into the slot's host buffers is synchronous and
  has no ``await`` inside it, so no other task on the loop can run, let alone mutate the tensors,
  while it copies. The file therefore holds the checkpoint exactly as it was when
  ``asave_checkpoint`` returned, relative to every task on the loop. The price is that the loop
  stalls for the copy (the copy floor, ~50 ms for 250 MB here); it never stalls for the write.
* **Waiting never blocks the loop.** Waiting for a free slot, for a path's pending operations or
  for a flush runs in a worker thread that sleeps on the engine's condition variable; the task
  awaits it. On cancellation the task returns at once and the thread notices within
  :data:`.condition.WAIT_SLICE` seconds (or at the next engine event) and exits, holding nothing.

The face uses only the engine's public methods, its slot pool (:mod:`.slots`: the one admission
rule, awaited here) and its operation table (:mod:`.ops`: the one wait for a path or a flush).

Files are read and copied with anyio's file API (thread-offloaded, like aiofiles, but also
working under trio, where aiofiles does not).
"""

from __future__ import annotations

import io
import logging
import os
import time
from typing import Any, Dict, List

import torch

from .._storage.integrity import (
    COMMIT_LOCK,
    commit_with_record,
    digests_to_commit,
    explain_unreadable,
    put_local_record,
    read_record,
    record_path,
    sha256_file,
)
from .._storage.local import AtomicFile
from .._storage.paths import absolute_path, local_path_of, resolved_entry
from .._storage.torch_io import load_on_cpu
from .._writers.base import Agreement
from ..checkpoint_io import PathLike, load_options
from ..errors import FlushTimeoutError, IntegrityError, InvalidPathError
from .ops import SaveHandle
from .slots import SlotHold
from .wrapped import WrappedIO, path_key_of, read_keys_of

log = logging.getLogger("asyncckpt")


_COPY_CHUNK = 8 << 20


class AsyncFace:
    """Async methods of :class:`~asyncckpt.AsyncCheckpointIO`; see the module docstring.

    Mixed into the engine class; it reads no private attribute of the engine: it admits through
    ``slot_pool``, waits through ``op_table``, and stages with ``stage_and_submit``.
    """

    # -- public API -----------------------------------------------------------------------

    async def asave_checkpoint(
        self, checkpoint: Dict[str, Any], path: PathLike, storage_options: Any | None = None
    ) -> SaveHandle:
        """Await a free slot, stage ``checkpoint`` on the loop thread, queue its write, return
        its :class:`~asyncckpt._engine.ops.SaveHandle` (as ``save_checkpoint`` does).

        Point in time: the file holds the checkpoint as it was when this returned; neither this
        task nor any other task on the loop can change what is written, since there is no
        ``await`` between the start of staging and the return. The loop is blocked for the copy
        into host memory only; waiting for a slot is awaited.

        Cancellation: cancelled before it holds a slot, it raises and nothing is queued; once
        it holds a slot it finishes staging, queues the save and returns normally (the
        cancellation then lands at the caller's next checkpoint).
        """
        from anyio import lowlevel

        await lowlevel.checkpoint()  # cancel and schedule point while nothing is held yet
        agree = getattr(self.wrapped_io(), "agree_to_save", None)
        if agree is not None:
            return await self._asave_agreed(agree, checkpoint, path, storage_options)
        key, target = WrappedIO(self.wrapped_io()).check_save(path, storage_options)
        self.op_table.guard_point()
        self.raise_pending_errors()
        started = time.perf_counter()
        hold = SlotHold()
        try:
            await self.slot_pool.aacquire(key, hold=hold)
            # From here to the return there is no await: the slot is either queued with the save
            # or given back, and no other task runs between the copy and the caller's next line.
            waited = time.perf_counter() - started
            # the loop is blocked from here to the return: staging only, measured as blocking time
            return self.stage_and_submit(checkpoint, target, key, storage_options, hold, time.perf_counter(), waited)
        except BaseException:
            try:
                self.slot_pool.release_hold(hold)  # unless its operation took it over (then empty)
            finally:  # again if a signal handler's exception cut it short at its start (it acts once)
                self.slot_pool.release_hold(hold)
            raise

    async def _asave_agreed(self, agree: Any, checkpoint: Any, path: PathLike, storage_options: Any) -> SaveHandle:
        """``asave_checkpoint`` for a collective IO: as ``save_checkpoint``, the ranks agree at
        the call whether they all make the save (a save refused on one rank is refused on
        every rank); the agreement waits for the other ranks in a thread, not on the loop, and
        staging follows it with no ``await`` in between.

        A cancellation takes part in the agreement too: cancelled while it waits for a slot, this
        rank refuses the save (so the other ranks, already in the agreement, refuse it instead of
        pairing it with this rank's next save); cancelled during the agreement, it waits for the
        outcome, then makes the save if every rank agreed and returns, else raises.
        """
        started = time.perf_counter()
        hold = SlotHold()  # the slot, from the instant it is taken until the save's operation takes it
        agreement = Agreement()  # the call's number once every rank agreed, and whether it is queued
        try:
            return await self._asave_agreed_holding(agree, checkpoint, path, storage_options, hold, started, agreement)
        except BaseException as err:
            try:
                self.abandon_agreed_save(agreement, path, err, hold)
            finally:  # again if a signal handler's exception cut it short at its start (it acts once)
                self.abandon_agreed_save(agreement, path, err, hold)
            raise

    async def _asave_agreed_holding(
        self, agree: Any, checkpoint: Any, path: PathLike, storage_options: Any, hold: SlotHold, started: float,
        agreement: Agreement,
    ) -> SaveHandle:
        """:meth:`_asave_agreed`, taking the slot into ``hold`` (given back by the caller on
        failure) and the agreement into ``agreement`` (its stand-in queued by the caller)."""
        import anyio

        cancelled: BaseException | None = None
        key, target, checkpoint, refusal, background = self.before_agreement(checkpoint, path, storage_options)
        if refusal is None:
            try:
                await self.slot_pool.aacquire(key, hold=hold)
            except anyio.get_cancelled_exc_class() as err:
                refusal = cancelled = err
            except Exception as err:  # noqa: BLE001 - refused on every rank below, then raised here
                refusal, background = err, self.reports_background_failure(err)
        waited = time.perf_counter() - started
        self.start_agreement(agree, agreement, path, refusal, background)
        try:
            if cancelled is None:  # waited for off the loop
                await anyio.to_thread.run_sync(agreement.decided.wait, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class() as err:
            cancelled = err
        # The other ranks are in this agreement: its outcome decides, cancelled or not (an
        # interrupt meanwhile: the caller's clean-up waits for it, then stands in if owed).
        agreement.decided.wait()
        if cancelled is not None and agreement.error is not None:
            self.slot_pool.release_hold(hold)
            raise cancelled
        # Agreed: every rank makes this save, so this one does too (a cancellation that came
        # during the agreement lands at the caller's next checkpoint, as after a held slot).
        return self.after_agreement(checkpoint, target, key, storage_options, hold, started, waited, agreement)

    async def aload_checkpoint(
        self,
        path: PathLike,
        map_location: Any | None = None,
        weights_only: bool | None = None,
        verify: bool = False,
    ) -> Dict[str, Any]:
        """Await every queued operation on ``path``, then load it without blocking the loop.

        With :class:`TorchCheckpointIO` and a local path, the bytes are read with async file
        I/O and ``torch.load`` runs in a worker thread on them; any other wrapped IO's own
        ``load_checkpoint`` runs in a worker thread, and so does a load with ``verify=True``
        (the wrapped IO checks the whole file first, as ``load_checkpoint`` does).
        """
        import anyio

        path = absolute_path(os.fspath(path))  # the working folder at the call, whatever chdir comes
        keys = read_keys_of(path)
        for key in keys:
            await self.op_table.await_path(key)
        self.raise_pending_errors()
        kwargs = load_options(map_location, weights_only, verify)
        wrapped = self.wrapped_io()
        local = local_path_of(path)
        if verify or local is None or not WrappedIO(wrapped).loads_like_torch_checkpoint_io:
            return await anyio.to_thread.run_sync(
                lambda: wrapped.load_checkpoint(path, **kwargs), abandon_on_cancel=True
            )
        data = await _read_checkpoint_bytes(local, path)
        kwargs.setdefault("map_location", load_on_cpu)  # TorchCheckpointIO's default

        def load() -> Dict[str, Any]:
            try:
                return torch.load(io.BytesIO(data), **kwargs)
            except Exception as err:
                explain_unreadable(err, local)  # as TorchCheckpointIO.load_checkpoint does
                raise

        return await anyio.to_thread.run_sync(load, abandon_on_cancel=True)

    async def aremove_checkpoint(self, path: PathLike) -> None:
        """Queue the removal of ``path`` after every earlier operation on it; never waits.

        ``await aflush()`` when the file must be gone before going on.
        """
        from anyio import lowlevel

        await lowlevel.checkpoint()
        if WrappedIO(self.wrapped_io()).remove_is_collective_flag:
            import anyio

            # collective: the ranks agree at the call; that wait is not the loop's
            await anyio.to_thread.run_sync(self.remove_checkpoint, path)
            return
        self.remove_checkpoint(path)

    async def areserve(self, state_or_nbytes: Any, *, pinned: bool | None = None) -> List[Any]:
        """:meth:`reserve`, awaited: returns the reserved slots' ``StagingBuffer`` read-outs once
        the memory is ready, or raises why it could not be made (the first save then allocates
        in its call, as without a reservation).

        The memory is made on the reservation's own thread; the loop only waits, in a worker
        thread. A state's containers must not change until this returns (its tensors may change
        in place). Cancelling the await leaves the reservation running, as with a
        :class:`Reservation` nobody waits for; ``teardown()`` stops it.
        """
        import anyio

        reservation = self.reserve(state_or_nbytes, pinned=pinned)
        return await anyio.to_thread.run_sync(reservation.result, abandon_on_cancel=True)

    async def aflush(self, timeout: float | None = None) -> None:
        """Await every operation submitted before this call, then raise background failures.

        Cancelling it (or its ``timeout``, which raises :class:`FlushTimeoutError`) stops the
        waiting only: the writes go on, and a later ``aflush`` or ``flush`` waits for them.
        """
        import anyio

        ops = self.op_table.pending()
        with anyio.move_on_after(timeout) as scope:
            await self.op_table.await_done(ops)
        if scope.cancelled_caught:
            left = sum(1 for op in ops if not op.done())
            raise FlushTimeoutError(f"flush timed out after {timeout}s with {left} operation(s) pending", None)
        self.raise_pending_errors()

    async def acopy_checkpoint(self, src: PathLike, dst: PathLike) -> None:
        """Copy the finished checkpoint ``src`` to the local path ``dst``, atomically and durably.

        Waits for every operation on ``src`` and ``dst`` submitted before this call, then
        copies with async file I/O into a temp file beside ``dst``, fsyncs it, renames it over
        ``dst`` and fsyncs the folder. ``dst`` holds its old file or the complete copy, never a
        partial one. The copy is not a queued operation: saves or removes on ``src`` or ``dst``
        submitted while it runs are not ordered against it.

        Checksum records (``TorchCheckpointIO(checksum=True)``) stay consistent: where ``src`` or
        ``dst`` has one, ``dst`` gets a record of the copied bytes, committed as a save commits
        it (see :mod:`asyncckpt.integrity`), so ``dst`` matches its record at every instant. A
        ``src`` that does not match its own record raises :class:`asyncckpt.IntegrityError` and
        ``dst`` is left as it was.
        """
        import anyio

        # resolved now: a relative path means the working folder at the call, whatever chdir comes
        src, dst = absolute_path(os.fspath(src)), absolute_path(os.fspath(dst))
        src_keys, dst_key = read_keys_of(src), path_key_of(dst)
        src_local, dst_local = local_path_of(src), local_path_of(dst)
        if src_local is None or dst_local is None:
            raise InvalidPathError(
                f"acopy_checkpoint copies local files; got {os.fspath(src)!r} -> {os.fspath(dst)!r}", os.fspath(dst)
            )
        WrappedIO(self.wrapped_io()).check_path(dst)
        for key in (*src_keys, dst_key):
            await self.op_table.await_path(key)
        self.raise_pending_errors()
        if os.path.isdir(src_local):
            raise InvalidPathError(
                f"checkpoint path {os.fspath(src)!r} is a folder, not a checkpoint file", src_keys[0]
            )
        target = resolved_entry(dst_local)
        atomic = AtomicFile(target)
        await anyio.to_thread.run_sync(atomic.__enter__)  # makes the folder, sweeps crashed runs' temp files
        try:
            try:
                source = await anyio.open_file(src_local, "rb")
            except FileNotFoundError:
                raise FileNotFoundError(f"checkpoint file not found: {os.fspath(src)}") from None
            async with source, await anyio.open_file(atomic.tmp, "wb") as sink:
                while chunk := await source.read(_COPY_CHUNK):
                    await sink.write(chunk)
                await sink.flush()
            await anyio.to_thread.run_sync(atomic.sync)
            # One worker-thread call (not cancellable half-way): record, rename, fsync, prune.
            await anyio.to_thread.run_sync(_commit_copy, src_local, atomic)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(atomic.discard)
            raise

    async def __aenter__(self) -> "AsyncFace":
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Flush and tear down, shielded from cancellation: leaving the block means written.

        The wait runs in a worker thread, so the loop keeps running other tasks meanwhile.
        """
        import anyio

        with anyio.CancelScope(shield=True):
            await self.op_table.await_done(self.op_table.pending())
            try:
                await anyio.to_thread.run_sync(self.teardown)
            except Exception as err:
                if exc is None:
                    raise
                # The body's own exception stays the one raised; the checkpoint failure is
                # logged and added to it as a note, so neither is lost.
                log.error("asyncckpt: while leaving 'async with' after %r: %s", exc, err, exc_info=err)
                exc.add_note(f"asyncckpt: on leaving 'async with': {type(err).__name__}: {err}")


async def _read_checkpoint_bytes(local: str, shown: str) -> bytes:
    import anyio

    if await anyio.Path(local).is_dir():
        raise InvalidPathError(f"checkpoint path {shown!r} is a folder, not a checkpoint file", shown)
    try:
        async with await anyio.open_file(local, "rb") as f:
            return await f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file not found: {shown}") from None


def _commit_copy(src: str, atomic: AtomicFile) -> None:
    """Move the complete copy ``atomic.tmp`` over ``atomic.target`` durably, keeping checksum
    records consistent (the record protocol, :func:`commit_with_record`).

    Under :data:`COMMIT_LOCK`: two copies to one ``dst`` (not ordered by the engine) must not
    interleave, or the record of one could be left beside the other's file.
    """
    target = atomic.target
    # hashed before the lock where a record is already known to be needed: the lock stays short
    new = sha256_file(atomic.tmp) if os.path.exists(record_path(src)) or os.path.exists(record_path(target)) else None

    def digests_before() -> List[str]:
        """With the copy complete and ``target`` not yet replaced: check the copy against
        ``src``'s checksum record; the digests ``target``'s record lists during the rename (the
        copy's, then those the file still at ``target`` matches), or [] where neither file has a
        record (then none is written).

        The record is committed before the rename, as a save commits it: a crash before the
        rename leaves the old file, after it the copy, and the record lists both. A stale record
        (the old file's alone) would make the good copy fail verification.
        """
        nonlocal new
        src_accepted = read_record(src)
        if src_accepted is None and not os.path.exists(record_path(target)):
            return []
        if new is None:  # a record appeared since the look before the lock
            new = sha256_file(atomic.tmp)
        if src_accepted is not None and new not in src_accepted:
            raise IntegrityError(
                f"checkpoint {src!r} does not match its checksum record {record_path(src)!r}: sha256 {new} is not "
                f"among the {len(src_accepted)} accepted (damaged, or replaced while it was copied); nothing was "
                f"copied to {target!r}. Check it with 'asyncckpt verify', or copy a good checkpoint",
                src,
            )
        return digests_to_commit(target, new)

    with COMMIT_LOCK:
        commit_with_record(
            atomic.commit, digests_before, lambda digests: put_local_record(target, digests), shown_target=target
        )
