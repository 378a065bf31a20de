"""Lazy staging: the tensor copy runs while training goes on, and is proven untouched.

With ``staging="lazy"``, ``save_checkpoint`` pickles the non-tensor skeleton (the point in time
for everything that is not a tensor), copies the small tensors at once (see
:data:`EAGER_MAX_BYTES`), records the version counter (``tensor._version``) of every other
tensor, starts a background copy of those into the slot's buffers, and returns. The training
loop's next forward and backward run while the copy runs.

Guards, so the copy cannot be overwritten by the training loop:

- A global optimizer step pre-hook (``torch.optim.optimizer.register_optimizer_step_pre_hook``)
  waits for every lazy copy in progress, in every engine, before any ``optimizer.step()``. For
  torch's own optimizers, which evaluate a closure before they touch a parameter, the wait runs
  right after the closure instead, so a closure's forward and backward (a framework plugin's
  automatic optimization) still overlap the copy.
- Every call into the engine (save, flush, load, teardown, the exit drain, ``wait_staged()``)
  waits for the copy first.

Verification: once the copy is done, at the first guard point, the version counter of every
lazily copied tensor is compared with the one recorded at the call. If one changed, something
modified that tensor in place while it was (maybe) being copied: that save fails with
:class:`TensorModifiedError` naming the key path, and no file is written. The comparison runs
at a guard point, on the thread that reached it, not on the copying thread: PyTorch bumps a
version counter when an in-place operation *ends*, so a check right after the copy could miss
an operation that was still writing; an operation the guarding thread started has ended by the
time that thread reaches the guard.

What version counters cannot see (documented in docs/index.md): writes through ``tensor.data``,
through aliases that share memory without sharing the counter (``set_``, ``from_numpy``,
NumPy views, ctypes), and writes by native kernels that do not bump the counter (BatchNorm's running
statistics, the fused optimizers' ``_fused_adam_``/``_fused_sgd_``). The optimizer hook covers
the fused optimizers; BatchNorm statistics are copied at the call (the small-tensor rule, and
their keys for wider ones); the rest is the user's to avoid, or ``staging="eager"``.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any, Dict, FrozenSet, List, Optional, Set, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .._threads import start_raw_thread
from ..errors import TensorModifiedError
from . import copier
from .arena import byte_view
from .copier import ParallelCopier
from .devices import SideStreamCopy
from .eager import EagerStager
from .locations import is_device_location
from .protocol import StagedCheckpoint, StagingSlot, VersionOwner
from .skeleton import key_paths

#: Storages of at most this many bytes are copied at the call, not lazily. Forward passes mutate
#: small buffers in place (BatchNorm running statistics, ``num_batches_tracked``), and the
#: BatchNorm kernel does so without bumping their version counters, so a lazy copy could not
#: even detect it. Running statistics are one value per channel: 64 KiB holds 16,384 fp32
#: channels. Copying every tensor this small at the call costs little (they are a small
#: fraction of a checkpoint's bytes); wider statistics are copied at the call by their key
#: (:meth:`LazyStager._large_groups`).
EAGER_MAX_BYTES = 64 * 1024

STAGING_CHOICES = ("eager", "lazy")


# -- one lazy copy -----------------------------------------------------------------------------


class LazyCopy:
    """The deferred copy of one save: started at the call, finished and verified at a guard.

    ``finish()`` (any guard point, any thread, idempotent) waits for the copy and compares the
    version counters; ``wait_for_writer()`` (the writer, before it serializes) waits for
    ``finish()`` to have run and raises :class:`TensorModifiedError` if the check failed.
    """

    def __init__(
        self,
        path: str,
        skeleton: bytes,
        tensor_count: int,
        cpu_pairs: Tuple[List[torch.Tensor], List[torch.Tensor]],
        cuda_event: Any,
        watched: List[Tuple[int, torch.Tensor, int]],
    ) -> None:
        self.path = path
        self._skeleton = skeleton
        self._tensor_count = tensor_count
        self._cpu_dst, self._cpu_src = cpu_pairs
        self.cuda_event = cuda_event  # the side stream's event after the CUDA copies, or None
        self._watched = watched
        self._copied = threading.Event()
        # Set once the job is listed where guard points find it (or by the first guard point):
        # the copying thread starts before the job is listed and waits for it, so that an
        # exception a signal handler raises between the two steps leaves a parked thread that
        # never copies (the job unlisted), or a listed job whose finish() releases it; never a
        # copy nobody waits for, nor a listed job nobody copies.
        self._go = threading.Event()
        self._verified = threading.Event()
        # Re-entrant: a save from a signal handler (a framework plugin's SLURM requeue) may finish this
        # copy while the interrupted thread is inside finish(), waiting for it.
        self._lock = threading.RLock()
        self._copy_error: Optional[BaseException] = None
        self.error: Optional[BaseException] = None
        self._abandoned = False  # its call failed before listing it: the thread copies nothing
        self._pid = os.getpid()

    def start(self) -> None:
        if not self._cpu_dst:
            self._copied.set()
            return
        # threading.Thread.start() waits until the new thread runs, which on a loaded machine
        # costs milliseconds of the caller's time; this start returns at once. The thread
        # needs no join: finish() waits for ``_copied``, and the exit drain calls finish().
        try:
            start_raw_thread(self._run)
        except BaseException as err:  # no thread (resource limits): no guard may wait for it
            self._copy_error = err
            self._cpu_dst = self._cpu_src = []
            self._copied.set()
            raise

    def _run(self) -> None:
        self._go.wait()
        try:
            if not self._abandoned:
                copier.memmove_pairs(self._cpu_dst, self._cpu_src)
        except BaseException as err:  # noqa: BLE001 - reported through the save that needed it
            self._copy_error = err
        finally:
            self._cpu_dst = self._cpu_src = []
            self._copied.set()

    def go(self) -> None:
        """The job is listed: its thread may copy."""
        self._go.set()

    def abandon(self) -> None:
        """Its call failed before the job was listed (a signal handler's exception), and gave
        its slot back: end the parked thread without copying (that memory may be the next
        save's by now), and let no guard point finish the job. Nothing waits for it: its
        checkpoint never reached a writer. A copy a guard point already released has ended
        when this returns (``finish`` holds the lock while it waits), before the slot is free."""
        with self._lock:
            if not self._go.is_set():
                self._abandoned = True
                self._go.set()
            self._verified.set()
        _forget(self)

    @property
    def finished(self) -> bool:
        return self._verified.is_set()

    def finish(self, host_sync: bool = False) -> None:
        """Wait for the copy, then check the version counters (once). Never raises."""
        if os.getpid() != self._pid:
            return  # a forked child: the copying thread is the parent's, and so is this save
        with self._lock:
            if not self._verified.is_set():
                self.go()  # a job listed whose hand-over was interrupted: its thread copies now
                self._copied.wait()
            if not self._verified.is_set():  # not by a signal handler's finish() during the wait
                if self.cuda_event is not None:
                    # Kernels queued on the training stream from now on run after the copy; the
                    # host does not wait. Those queued since the call were seen by the counters.
                    torch.cuda.current_stream().wait_event(self.cuda_event)
                self.error = self._copy_error or self._check_versions()
                self._watched = []
                self._verified.set()
                _forget(self)
        if host_sync and self.cuda_event is not None:
            self.cuda_event.synchronize()

    def _check_versions(self) -> Optional[BaseException]:
        changed = [(i, before, t._version) for i, t, before in self._watched if t._version != before]
        if not changed:
            return None
        names = key_paths(self._skeleton, self._tensor_count, (i for i, _, _ in changed))
        index, before, after = changed[0]
        name = names.get(index, f"tensor #{index}")
        more = f" (and {len(changed) - 1} more tensor(s))" if len(changed) > 1 else ""
        return TensorModifiedError(
            f"checkpoint {self.path!r} was not written: {name}{more} was modified in place while "
            f"staging='lazy' copied it (version counter {before} -> {after}), so the copy may mix two "
            "states. Call io.wait_staged() before modifying checkpoint tensors outside an optimizer "
            "step, or use staging='eager'",
            self.path,
            key=name,
        )

    def wait_for_writer(self) -> None:
        """The writer's wait: until a guard has verified the copy; raises if it failed."""
        self._verified.wait()
        if self.cuda_event is not None:
            self.cuda_event.synchronize()
        if self.error is not None:
            raise self.error


# -- the global guard ------------------------------------------------------------------------

# Re-entrant: a SIGTERM handler may drain (finishing copies, which takes it) on a thread that
# holds it, in an optimizer step's guard.
_registry_lock = threading.RLock()
_in_progress: "weakref.WeakSet[LazyCopy]" = weakref.WeakSet()
_hook_handle: Any = None


def _remember(job: LazyCopy) -> None:
    global _hook_handle
    with _registry_lock:
        _in_progress.add(job)
        if _hook_handle is None:
            _hook_handle = register_optimizer_step_pre_hook(_before_optimizer_step)


def _forget(job: LazyCopy) -> None:
    with _registry_lock:
        _in_progress.discard(job)


def reset_after_fork() -> None:
    """A forked child starts with no lazy copy in progress."""
    # The copying threads did not survive the fork; the child must not wait for them in its
    # own optimizer steps (a DataLoader worker or an evaluation process that trains).
    global _registry_lock, _in_progress
    _registry_lock = threading.RLock()
    _in_progress = weakref.WeakSet()


def finish_all() -> None:
    """Wait for every lazy copy in progress, in every engine, and verify it."""
    with _registry_lock:
        jobs = list(_in_progress)
    for job in jobs:
        job.finish()


def _evaluates_closure_first(optimizer: Any) -> bool:
    """torch's own optimizers call the closure before they modify any parameter."""
    return type(optimizer).__module__.startswith("torch.optim.")


def _before_optimizer_step(optimizer: Any, args: tuple, kwargs: dict) -> Optional[Tuple[tuple, dict]]:
    """The global step pre-hook: no optimizer step starts while a lazy copy is in progress."""
    if not _in_progress:
        return None
    # args[0] is the optimizer itself (the hook sees the wrapped step's arguments).
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    if closure is None or not callable(closure) or not _evaluates_closure_first(optimizer):
        finish_all()
        return None

    def closure_then_finish(*a: Any, **k: Any) -> Any:
        try:
            return closure(*a, **k)
        finally:
            finish_all()

    if "closure" in kwargs:
        return args, {**kwargs, "closure": closure_then_finish}
    return (args[0], closure_then_finish, *args[2:]), kwargs


# -- staging ---------------------------------------------------------------------------------


class LazyStager:
    """Stages like :class:`asyncckpt._staging.eager.EagerStager`, leaving the large copies to a background job.

    Several threads may save at once, so several jobs may be unfinished at once: each is kept
    until a guard point has finished it, and :meth:`finish` (every guard point of the engine)
    finishes all of them. The writer waits for each save's job, so one left out would hold up
    every later write of the engine.
    """

    defers_copies = True

    def __init__(self, eager: EagerStager) -> None:
        self._eager = eager  # its copier, torch_save_rules, slot copy and side stream are shared
        self._side_stream = SideStreamCopy()  # a stream of its own, which training does not wait for
        # Insertion-ordered; by id, so that removal is one idempotent step. Re-entrant: a save
        # from a signal handler may run on a thread that holds it.
        self._unfinished: Dict[int, LazyCopy] = {}
        self._jobs_lock = threading.RLock()
        self._large: Dict[int, Tuple[Any, Set[int]]] = {}
        self._by_size: Dict[int, Tuple[Any, FrozenSet[int]]] = {}  # the size rule alone, per slot

    @property
    def copier(self) -> ParallelCopier:
        """The eager stager's copier: one pool of copy threads per engine."""
        return self._eager.copier

    @property
    def torch_save_rules(self) -> bool:
        """The eager stager's setting (the engine may set it on either)."""
        return self._eager.torch_save_rules

    @torch_save_rules.setter
    def torch_save_rules(self, value: bool) -> None:
        self._eager.torch_save_rules = value

    def unfinished(self) -> List[LazyCopy]:
        """The jobs started and not yet finished by a guard point, oldest first."""
        with self._jobs_lock:
            return list(self._unfinished.values())

    def finish(self, host_sync: bool = False) -> None:
        """Finish and verify every job this stager started that no guard has finished yet."""
        for job in self.unfinished():
            job.finish(host_sync)
            if job.finished:
                with self._jobs_lock:
                    self._unfinished.pop(id(job), None)

    def stage(
        self,
        checkpoint: Any,
        slot: StagingSlot,
        path: str,
        version_owner: Optional[VersionOwner] = None,
    ) -> StagedCheckpoint:
        """Copy the small tensors now, start the lazy copy of the rest, record version counters.

        ``version_owner`` (from the wrapped IO) names, for a staged tensor, another tensor whose
        version counter moves when it is modified (a DTensor for its local tensor); both are watched.
        """
        started = time.perf_counter()
        self.finish()
        # Every storage small (as last time): exactly the eager copy, at the eager cost.
        all_small = slot.layout is not None and not self._large_groups(slot, None, 0)
        skeleton, tensors, storages, tensor_bytes, copied = self._eager.split_and_prepare(
            checkpoint, slot, path, copy=all_small
        )
        if copied:
            return StagedCheckpoint.from_slot(skeleton, slot, tensor_bytes, started, None, self.torch_save_rules)
        large = self._large_groups(slot, skeleton, len(tensors))
        if not large:  # every storage is small: exactly the eager copy, at the eager cost
            with torch.no_grad():
                waiter = self._eager.copy_into_slot(slot, tensors, storages)
            return StagedCheckpoint.from_slot(skeleton, slot, tensor_bytes, started, waiter, self.torch_save_rules)
        eager_dst: List[torch.Tensor] = []
        eager_src: List[torch.Tensor] = []
        lazy_cpu: Tuple[List[torch.Tensor], List[torch.Tensor]] = ([], [])
        lazy_cuda: Tuple[List[torch.Tensor], List[torch.Tensor]] = ([], [])
        watched: List[Tuple[int, torch.Tensor, int]] = []
        for group, st in enumerate(storages):
            if not st.nbytes():
                continue
            if slot.whole_copy[group]:
                i = slot.members[group][0]
                dst, src = slot.views[i], tensors[i]
            else:
                dst, src = slot.byte_views[group], byte_view(st)
            members = slot.members[group]
            # Inference tensors and bare storages have no version counter to verify: copied now.
            if group not in large or any(
                not isinstance(tensors[i], torch.Tensor) or tensors[i].is_inference() for i in members
            ):
                eager_dst.append(dst)
                eager_src.append(src)
                continue
            target = lazy_cuda if st.device.type == "cuda" else lazy_cpu
            target[0].append(dst)
            # The memory the tensor has now: ``tensor.data = other`` later rebinds the tensor, not
            # this alias (which shares its memory and its version counter).
            target[1].append(src.detach() if src is tensors[members[0]] else src)
            watched.extend((i, tensors[i], tensors[i]._version) for i in members)
            if version_owner is not None:
                owners = ((i, version_owner(tensors[i])) for i in members)
                watched.extend((i, owner, owner._version) for i, owner in owners if owner is not None)
        with torch.no_grad():
            eager_waiter = None
            if eager_dst:
                if any(s.device.type == "cuda" for s in eager_src):
                    # on the eager stager's stream, which the training stream waits for
                    eager_waiter = self._eager.side_stream.start(
                        eager_dst, eager_src, training_stream_waits=True
                    ).synchronize
                else:
                    self.copier.copy(eager_dst, eager_src)
            cuda_event = None
            if lazy_cuda[0]:  # the training stream does not wait: the guard orders it (LazyCopy.finish)
                cuda_event = self._side_stream.start(*lazy_cuda, training_stream_waits=False)
        job = LazyCopy(path, skeleton, len(tensors), lazy_cpu, cuda_event, watched)
        job.start()  # its thread waits until the job is listed (see LazyCopy._go)
        try:
            if watched:
                _remember(job)
                with self._jobs_lock:
                    self._unfinished[id(job)] = job
        except BaseException:
            try:
                self._abandon_unlisted(job)
            finally:  # again if a signal handler's exception cut it short at its start
                self._abandon_unlisted(job)
            raise
        job.go()
        if not watched:
            job.finish()  # everything was copied at the call: nothing to verify

        def wait_for_copies() -> None:
            if eager_waiter is not None:
                eager_waiter()
            job.wait_for_writer()

        return StagedCheckpoint.from_slot(
            skeleton, slot, tensor_bytes, started, wait_for_copies, self.torch_save_rules
        )

    def _abandon_unlisted(self, job: LazyCopy) -> None:
        """End ``job``'s thread without a copy unless the job got listed, where guard points
        finish it (its call's clean-up then waits for the copy before the slot is given back)."""
        with self._jobs_lock:
            if id(job) in self._unfinished:
                return
        job.abandon()

    def _large_groups(self, slot: StagingSlot, skeleton: Optional[bytes], count: int) -> Set[int]:
        """The slot's storages copied lazily: above EAGER_MAX_BYTES, on CPU or CUDA, and not
        running statistics (cached per layout, once ``skeleton`` has named them).

        Running statistics (keys ending in ``running_mean``/``running_var``) are copied at the
        call whatever their size: a train-mode forward updates them in place without bumping
        their version counters, and a BatchNorm wider than the small-tensor rule (16,384 fp32
        channels) would put its post-call statistics into the file unnoticed. The key paths are
        read from the skeleton once per layout (the cold path); ``skeleton=None`` asks for the
        size rule alone, not cached.
        """
        cached = self._large.get(slot.index)
        if cached is not None and cached[0] is slot.layout:
            return cached[1]
        by_size = self._by_size.get(slot.index)
        if by_size is None or by_size[0] is not slot.layout:  # once per layout: a loop over every storage
            by_size = self._by_size[slot.index] = (slot.layout, frozenset(
                group
                for group, (device, nbytes) in enumerate(slot.layout[0])
                if nbytes > EAGER_MAX_BYTES and (device == "cpu" or is_device_location(device))
            ))
        large = set(by_size[1])
        if skeleton is None:
            return large
        if large:
            members = {i: group for group in large for i in slot.members[group]}
            for i, path in key_paths(skeleton, count, members).items():
                if path.endswith(_RUNNING_STATISTICS):
                    large.discard(members[i])
        self._large[slot.index] = (slot.layout, large)
        return large


#: Key endings of the buffers a train-mode forward changes without bumping version counters.
_RUNNING_STATISTICS = ("running_mean", "running_var")


def check_staging(value: Any, writer: str) -> str:
    """Validate ``staging=``; lazy copies need a writer that can wait on this process's copy."""
    if value not in STAGING_CHOICES:
        raise ValueError(f"unknown staging={value!r}; allowed values: {', '.join(repr(a) for a in STAGING_CHOICES)}")
    if value == "lazy" and writer != "thread":
        raise ValueError(
            "staging='lazy' works with writer='thread' only in this version: the writer process "
            "cannot wait for a copy still running in this process; use staging='eager' with "
            "writer='process', or writer='thread'"
        )
    return value
