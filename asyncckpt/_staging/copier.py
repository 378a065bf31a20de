"""The host-to-host copy of staging, shared across threads while the training thread waits.

:func:`memmove_pairs` is the one raw byte copy: the copier's helper threads and the lazy
stager's background copy both call it through this module, so a test that slows it down
patches one name.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .._threads import ThreadPool

_PARALLEL_MIN_BYTES = 8 * 1024 * 1024


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _memmovable(d: torch.Tensor, s: torch.Tensor) -> bool:
    return d.is_cpu and s.is_cpu and d.is_contiguous() and s.is_contiguous() and d.dtype == s.dtype


def memmove_pairs(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    """Raw byte copies; ctypes releases the GIL for the call, and no torch thread pool is used."""
    for d, s in zip(dst, src, strict=True):
        nbytes = d.numel() * d.element_size()
        if nbytes:
            ctypes.memmove(d.data_ptr(), s.data_ptr(), nbytes)


class PackedRun(NamedTuple):
    """Tensors copied into one run of the arena by one call: ``take(tensors)`` picks them, in
    order, from a save's staged tensors; ``dst`` is the run, their storages back to back
    (see :func:`asyncckpt._staging.arena.plan_groups`); ``stacked``: 0-d tensors, which
    ``torch.cat`` refuses and ``torch.stack`` takes."""

    take: Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]
    dst: torch.Tensor
    stacked: bool


def copy_runs(runs: Sequence[PackedRun], tensors: Sequence[torch.Tensor]) -> None:
    """Copy each run's tensors into it: one ``torch.cat`` (or ``torch.stack``) per run, which
    copies tensor after tensor with a memcpy each, where ``torch._foreach_copy_`` builds a
    copy of its own per tensor (about 0.8 us each, several times the memcpy of 1 KB)."""
    with torch.no_grad():
        for take, dst, stacked in runs:
            if stacked:
                torch.stack(take(tensors), out=dst)
            else:
                torch.cat(take(tensors), out=dst)


class HelperCopy(NamedTuple):
    """A copy :meth:`ParallelCopier.start` runs on a helper thread."""

    future: Future
    started: threading.Event

    def hand_over(self) -> None:
        """Let the helper take the GIL now, until its copy releases it: the caller's next steps
        are long C calls, which would keep the helper waiting for the interpreter's switch
        interval (5 ms) before its copy could start. Returns once the helper runs; the caller
        gets the GIL back when the helper's copy releases it."""
        self.started.wait()

    def make_way(self) -> None:
        """Let the helper take the GIL if it waits for it, between two of its copies (each
        returns into Python): a sleep of about 70 us. A bare release (``time.sleep(0)``) is
        taken back before the waiting thread has woken, which then waits out the interpreter's
        switch interval (5 ms) while this thread's C loops run."""
        if not self.future.done():
            time.sleep(1e-6)

    def wait(self) -> None:
        """Wait for the copy, whatever interrupts the wait; raises its error."""
        _wait_all([self.future])


def _claimed(done: Future, fn: Callable[..., None], *args: object) -> None:
    """Run ``fn`` on a helper thread for ``done``, unless ``done`` was cancelled first (by
    :func:`settle`: the caller failed before the helper started)."""
    if not done.set_running_or_notify_cancel():
        return
    try:
        fn(*args)
    except BaseException as err:  # noqa: BLE001 - the caller's to raise
        done.set_exception(err)
    else:
        done.set_result(None)


def _wait_through(futures: Sequence[Future]) -> Optional[BaseException]:
    """Wait until every one of ``futures`` is done, whatever interrupts the wait; returns the
    first exception that interrupted it (a signal handler's), or None."""
    interrupted: Optional[BaseException] = None
    while True:
        try:
            wait(futures)
            return interrupted
        except BaseException as err:  # noqa: BLE001 - the caller's to raise, once the copies are done
            interrupted = interrupted or err


def settle(futures: Sequence[Future]) -> None:
    """A caller failing (an exception a signal handler raised included) before its helpers'
    shares are done: a share not started yet never starts, one running is waited for, whatever
    interrupts the wait. The caller's slot may be given back once this returns: no helper
    writes into it afterwards. Raises nothing (the caller's own exception is the one to raise)."""
    # cancel() is true for a share no helper has claimed (queued, or never handed over): it
    # never runs, and no one ever marks it done, so it is not waited for
    _wait_through([future for future in futures if not future.cancel()])


def _wait_all(futures: List[Future]) -> None:
    """Wait for every helper's share, whatever interrupts the wait, then raise.

    A ``KeyboardInterrupt`` (or another signal handler's exception) while the caller waits
    must not end the wait early: the engine would free the slot while a helper still copies
    into it, and the next save (a checkpoint on interrupt, say) could stage into the same
    memory at the same time.
    """
    interrupted = _wait_through(futures)
    for future in futures:
        future.result()  # a copy's own error
    if interrupted is not None:
        raise interrupted


@dataclass
class _Share:
    """One thread's part of a copy: whole pairs by index, and byte ranges ``(index, start, end)``."""

    whole: List[int] = field(default_factory=list)
    cuts: List[Tuple[int, int, int]] = field(default_factory=list)

    def pairs(self, dst: List[torch.Tensor], src: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        d = [dst[i] for i in self.whole]
        s = [src[i] for i in self.whole]
        for i, start, end in self.cuts:
            d.append(_flat_bytes(dst[i])[start:end])
            s.append(_flat_bytes(src[i])[start:end])
        return d, s


@dataclass(frozen=True)
class CopyPlan:
    """How :meth:`ParallelCopier.copy` splits a list of pairs; no shares: one ``_foreach_copy_``."""

    threads: int
    pairs: int
    shares: Tuple[_Share, ...]


class ParallelCopier:
    """Host-to-host copies split across ``threads`` threads (the caller's included).

    The training thread waits for staging anyway, so its idle cores can share the memcpy:
    on the 2-core reference machine two threads copy 256 MB in about half the time of one.
    ``torch`` copies release the GIL, so plain threads run them in parallel. Copies are split
    by bytes; a tensor larger than a thread's share is cut into byte ranges.
    """

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self._pool: Optional[ThreadPool] = None
        self._lock = threading.Lock()  # ``close`` may run on another thread (a teardown) mid-copy

    def copy(self, dst: List[torch.Tensor], src: List[torch.Tensor], plan: Optional["CopyPlan"] = None) -> "CopyPlan":
        """Copy ``src`` into ``dst`` pairwise; returns the plan used.

        A caller that copies pairs of the same layout again (a staging slot whose layout
        repeats) passes the returned plan back: deciding which pairs to share out and where to
        cut them is per-tensor Python work, about 90 ms for 20,000 tensors (the copy of their
        256 MB takes about as long). The plan is redone when the thread count changed.
        """
        if plan is None or plan.threads != self.threads or plan.pairs != len(dst):
            plan = self.plan(dst, src)
        if not plan.shares:
            if dst:
                torch._foreach_copy_(dst, src)
            return plan
        with self._lock:
            if self._pool is None:
                # sized by the plan: ``threads`` may have been changed by another thread since
                self._pool = ThreadPool(len(plan.shares) - 1, thread_name_prefix="asyncckpt-stage")
            pool = self._pool
        # Only contiguous CPU pairs are shared out, and the helper threads copy them with a
        # plain memmove: a torch copy on a new thread would start an OpenMP team of its own,
        # which measurably slowed a 2-intra-op-thread training loop for seconds afterwards.
        # Each share's future is listed before a helper may run it: an exception a signal
        # handler raises at any point finds every share that may still write into ``dst``.
        futures: List[Future] = []
        try:
            for share in plan.shares[1:]:
                d, s = share.pairs(dst, src)
                if not d:
                    continue
                done: Future = Future()
                futures.append(done)
                try:
                    pool.submit(_claimed, done, memmove_pairs, d, s)
                except RuntimeError:  # closed by a concurrent teardown: copy this share here
                    _claimed(done, memmove_pairs, d, s)
            main_dst, main_src = plan.shares[0].pairs(dst, src)
            if main_dst:
                torch._foreach_copy_(main_dst, main_src)
            _wait_all(futures)
        except BaseException:
            try:
                settle(futures)
            finally:  # again if a signal handler's exception cut it short at its start
                settle(futures)
            raise
        return plan

    def start(
        self, runs: Sequence["PackedRun"], tensors: Sequence[torch.Tensor], into: List["HelperCopy"]
    ) -> Optional["HelperCopy"]:
        """Start :func:`copy_runs` of ``runs`` on a helper thread, so that the caller's thread
        can do other work meanwhile (the copy releases the GIL); None when this copier has one
        thread, or is closed (the caller then copies itself). The caller then calls
        :meth:`HelperCopy.hand_over`, and :meth:`HelperCopy.wait`; failing, :func:`settle` of
        the futures of ``into``, where the helper is listed before it may run (an exception a
        signal handler raises as this returns finds it there).

        Each pair of a run is a memcpy below torch's parallel grain: no OpenMP team starts on
        the helper thread (see :meth:`copy`).
        """
        if self.threads < 2 or not runs:
            return None
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPool(self.threads - 1, thread_name_prefix="asyncckpt-stage")
            pool = self._pool
        started = threading.Event()

        def job() -> None:
            started.set()
            copy_runs(runs, tensors)

        helper = HelperCopy(Future(), started)
        into.append(helper)
        try:
            pool.submit(_claimed, helper.future, job)
        except RuntimeError:  # closed by a concurrent teardown
            helper.future.cancel()
            return None
        return helper

    def plan(self, dst: List[torch.Tensor], src: List[torch.Tensor]) -> "CopyPlan":
        """Which pairs each thread copies, and the byte ranges of the tensors cut between them.

        It depends only on the pairs' devices, dtypes, sizes and contiguity, which a staging
        slot's layout fixes: a plan stays valid for every copy of the same layout.
        """
        threads = self.threads  # read once: another thread may change it meanwhile
        total = sum(d.numel() * d.element_size() for d in dst)
        if threads == 1 or total < _PARALLEL_MIN_BYTES:
            return CopyPlan(threads, len(dst), ())
        plain: List[int] = []
        rest: List[int] = []
        for i, (d, s) in enumerate(zip(dst, src, strict=True)):
            (plain if _memmovable(d, s) else rest).append(i)
        plain_bytes = sum(dst[i].numel() * dst[i].element_size() for i in plain)
        shares = split_shares([(i, dst[i].numel() * dst[i].element_size()) for i in plain], plain_bytes, threads)
        shares[0].whole.extend(rest)
        return CopyPlan(threads, len(dst), tuple(shares))

    def close(self) -> None:
        """Let the helper threads end; a copy still running finishes its shares first."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)


def split_shares(sizes: List[Tuple[int, int]], total: int, threads: int) -> List["_Share"]:
    """``threads`` shares of about equal bytes of the pairs ``(index, nbytes)``; a pair
    larger than the room left in a share is cut at the boundary, as raw bytes."""
    share = -(-total // threads)
    shares = [_Share() for _ in range(threads)]
    index, room = 0, share
    for i, nbytes in sizes:
        if nbytes <= room or index == threads - 1:
            shares[index].whole.append(i)
            room -= nbytes
        else:
            start = 0
            while start < nbytes:
                end = nbytes if index == threads - 1 else min(nbytes, start + max(room, 0))
                if end > start:
                    shares[index].cuts.append((i, start, end))
                    room -= end - start
                    start = end
                if start < nbytes:
                    index, room = index + 1, share
            continue
        if room <= 0 and index < threads - 1:
            index, room = index + 1, share
    return shares


def default_staging_threads(local_ranks: Optional[int] = None) -> int:
    """Cores the training thread leaves idle while it waits for staging, up to 4.

    Several ranks on one machine (``LOCAL_WORLD_SIZE``, set by ``torchrun``; some framework
    launchers do not set it) share its cores: unless each rank is pinned to cores of its own (its
    affinity is then already its share), a rank counts ``cores // LOCAL_WORLD_SIZE``. Ranks
    copying with every core at once only slow one another, and the slowest holds the next
    collective (measured: 2 ranks on 2 cores blocked 105-115 ms with 2 threads each, 57-64 ms with one).
    ``local_ranks`` overrides ``LOCAL_WORLD_SIZE`` (a framework plugin passes its strategy's).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if local_ranks is None:
        try:
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError:
            local_ranks = 1
    if local_ranks > 1 and cores >= (os.cpu_count() or cores):  # not pinned to a share
        cores //= local_ranks
    return max(1, min(4, cores))
