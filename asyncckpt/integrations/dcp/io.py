"""The collective DCP ``CheckpointIO``: the ranks' agreement on each save, DTensors as local
shards for staging, the save through DCP, and aborting a save this rank cannot take part in.

The user-facing description is in :mod:`asyncckpt.distributed`, the public path of everything
here; the commit itself (fresh shard names, ``.metadata``) is in :mod:`.commit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import os
import shutil
import threading
import uuid
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch.distributed.checkpoint.api import CheckpointException

from ..._storage.paths import local_path_of, resolved_entry
from ...checkpoint_io import CheckpointIO, PathLike
from ...errors import CheckpointLoadError, InvalidPathError
from ...redaction import describe_options
from .commit import METADATA_FILE, BeforeCommit, RanksOutOfStepError, make_storage_writer

_instances = itertools.count()


class ShardedSaveError(RuntimeError):
    """A sharded save failed on one or more ranks; raised on every rank (the cause is DCP's
    ``CheckpointException``, with each failing rank's exception and traceback)."""


@functools.cache
def _unpinned_planner() -> type:
    """DCP's default save planner, recording every tensor as not pinned.

    DCP writes each tensor's ``is_pinned()`` into ``.metadata``; the engine stages into pinned
    buffers where CUDA is present, so the file would say pinned where the training state was
    not, and a loader that allocates from the metadata on the GPU (FSDP1's
    ``load_sharded_optimizer_state_dict``, i.e. Lightning's ``FSDPStrategy`` resume) fails with
    "Only dense CPU tensors can be pinned". Pinning is a property of the staging memory, not of
    the checkpoint.
    """
    from torch.distributed.checkpoint import DefaultSavePlanner

    class UnpinnedSavePlanner(DefaultSavePlanner):
        def create_local_plan(self) -> Any:
            plan = super().create_local_plan()
            items = [_unpinned(item) for item in plan.items]
            if all(new is old for new, old in zip(items, plan.items, strict=True)):
                return plan
            fixed = dataclasses.replace(plan, items=items)
            if self.plan is plan:
                self.plan = fixed
            return fixed

    return UnpinnedSavePlanner


def _unpinned(item: Any) -> Any:
    data = item.tensor_data
    if data is None or not data.properties.pin_memory:
        return item
    properties = dataclasses.replace(data.properties, pin_memory=False)
    return dataclasses.replace(item, tensor_data=dataclasses.replace(data, properties=properties))


def _describe_failures(folder: str, err: Any) -> str:
    failures = getattr(err, "failures", {}) or {}
    parts = []
    for rank in sorted(failures):
        failure = failures[rank]
        exc = failure[0] if isinstance(failure, tuple) else failure
        parts.append(f"rank {rank}: {type(exc).__name__}: {exc}")
    detail = "; ".join(parts) or str(err)
    return f"the sharded save of {folder!r} failed ({detail}); nothing was committed, the previous checkpoint stands"


class LocalShard:
    """A DTensor's local tensor in a staged checkpoint; ``spec`` indexes the IO's table of
    (mesh, placements, global shape, stride), which never enters the pickled skeleton."""

    __slots__ = ("local", "spec")
    key_path_stands_for = "local"  # a lazy-staging error names the DTensor's key, not ``.local``

    def __init__(self, local: torch.Tensor, spec: int) -> None:
        self.local = local
        self.spec = spec

    def __reduce__(self) -> Tuple[Any, ...]:
        return (LocalShard, (self.local, self.spec))


def group_alive(group: Any) -> bool:
    """Whether ``group`` can still run collectives: torch.distributed is initialized and the
    group was not destroyed (``destroy_process_group()`` destroys every group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    try:
        dist.get_process_group_ranks(group)
    except (KeyError, ValueError, RuntimeError):
        return False
    return True


def _save_token(nonce: str, folder: str, count: int) -> str:
    """Equal on every rank for the same save (the run's shared nonce, the folder, the save's
    number in this IO's sequence), and unlike any save of another run into the same folder."""
    return hashlib.sha1(f"{nonce}\0{folder}\0{count}".encode()).hexdigest()[:10]


class DistributedCheckpointIO(CheckpointIO):
    """A collective ``CheckpointIO`` that writes DCP checkpoint folders.

    Every rank calls :meth:`save_checkpoint` with its own state dict, in the same order, as with
    ``dcp.save``. Wrap it in :class:`asyncckpt.AsyncCheckpointIO` to save in the background.

    Args:
        process_group: the group the save's collectives run on. Default: a gloo group of its own,
            created (collectively, on the default group) at the first save or
            :meth:`prepare_for_staging`, which every rank reaches at the same point.
        timeout: seconds a collective of the save may wait for the other ranks (a rank that died
            fails the save on the others after at most this long; usually at once, when its
            connections close).
        cache_plans: let DCP reuse the save plan while the state's layout does not change.
        thread_count: DCP writer threads per rank.
        sync_files: fsync every shard file before the commit (needed for the crash guarantee).
    """

    #: Whether every rank calls :meth:`remove_checkpoint` (then the engine agrees on each remove
    #: at the call, as on each save). Lightning's sharded IO removes from global rank 0 alone.
    remove_is_collective = True

    def __init__(
        self,
        *,
        process_group: Optional[Any] = None,
        timeout: float = 600.0,
        cache_plans: bool = True,
        thread_count: int = 1,
        sync_files: bool = True,
    ) -> None:
        self._pg = process_group
        self._own_group = process_group is None
        self.timeout = float(timeout)
        self.cache_plans = cache_plans
        self.thread_count = thread_count
        self.sync_files = sync_files
        self._plan_key = f"asyncckpt.DistributedCheckpointIO-{next(_instances)}"
        self._saves = 0  # this rank's collective saves so far, failed ones included
        self._calls = 0  # save calls agreed on with the other ranks (every rank counts every call)
        # Numbers of agreed saves not yet run by the writer (a stand-in that never went out
        # leaves its number here: this IO then keeps its groups, see _renew_destroyed_groups).
        self._agreed: Set[int] = set()
        self._running = threading.local()  # the writer thread's agreed call (running_agreed)
        self._call_pg: Optional[Any] = None  # the callers' agreement, never used by the writer thread
        self._nonce: Optional[str] = None  # the same on every rank, new in every run
        self._owners: Dict[int, Tuple[torch.Tensor, Any]] = {}  # id(local tensor) -> (it, its DTensor)
        self._specs: List[Tuple[Any, Tuple[Any, ...], torch.Size, Tuple[int, ...]]] = []
        self._spec_index: Dict[Any, int] = {}

    @property
    def plan_key(self) -> str:
        """The key DCP caches this IO's save plan under (``enable_plan_caching``)."""
        return self._plan_key

    # -- process group ------------------------------------------------------------------------

    @property
    def process_group(self) -> Optional[Any]:
        """The group the save's collectives run on (None before the first save, or without
        ``torch.distributed`` initialized: then this IO saves as a single process)."""
        return self._pg

    def _ensure_group(self) -> None:
        """The save's own group, and this run's nonce (collective, once: every rank reaches the
        first save, or ``prepare_for_staging``, at the same point)."""
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        if self._pg is None and distributed:
            self._pg = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout))
        if self._call_pg is None and distributed:
            # A second group: the callers agree on each save on their threads while the writers
            # run earlier saves' collectives on ``_pg``; one group used from two threads would
            # interleave the two. A group passed in may leave out ranks, which never reach this
            # line: its members alone create the second group (local synchronization).
            timeout = timedelta(seconds=self.timeout)
            if self._own_group:
                self._call_pg = dist.new_group(backend="gloo", timeout=timeout)
            else:
                self._call_pg = dist.new_group(
                    ranks=dist.get_process_group_ranks(self._pg), backend="gloo", timeout=timeout,
                    use_local_synchronization=True,
                )
        if self._nonce is None:
            nonce = [uuid.uuid4().hex]
            if distributed:
                dist.broadcast_object_list(nonce, src=dist.get_global_rank(self._pg, 0), group=self._pg)
            self._nonce = nonce[0]

    def _renew_destroyed_groups(self) -> None:
        """At a call (the training thread, where every rank is in step): forget this IO's own
        groups if ``destroy_process_group()`` destroyed them, so that :meth:`_ensure_group`
        makes new ones in the new run (a sweep of runs in one process, one IO). Not while a
        save agreed on the old groups is still to run: it fails on them, loudly, first."""
        if self._pg is None or self._agreed or group_alive(self._pg):
            return
        if not self._own_group:
            raise ValueError(
                "the process group given to DistributedCheckpointIO(process_group=...) was destroyed; "
                "make a new DistributedCheckpointIO with a live group (or none: it makes its own)"
            )
        self._pg = self._call_pg = None
        self._nonce = None

    def _is_coordinator(self) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return True
        return dist.get_rank(self._pg) == 0 if self._pg is not None else dist.get_rank() == 0

    # -- the engine's staging hook ------------------------------------------------------------

    def prepare_for_staging(self, checkpoint: Any) -> Any:
        """A copy of ``checkpoint``'s containers in which each DTensor is a :class:`LocalShard`.

        Called by :class:`asyncckpt.AsyncCheckpointIO` on the caller's thread before it stages:
        the local tensor is then staged like any plain tensor (no all-gather, no full tensor),
        and the mesh and placements stay out of the pickled skeleton. Creates the process group
        on first use, on this (the training) thread, where every rank reaches it in step.
        """
        self._renew_destroyed_groups()
        self._ensure_group()
        self._owners = {}
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch built without distributed
            return checkpoint
        with torch.no_grad():
            return self._to_local(checkpoint, DTensor)

    def version_owner(self, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        """The DTensor whose local tensor ``tensor`` is, as of the last :meth:`prepare_for_staging`.

        For ``staging="lazy"``: an in-place operation on a DTensor runs on its local tensor
        below autograd's version-counter bump, so the local tensor's ``_version`` does not move;
        the DTensor's does, and the lazy copy watches both.
        """
        entry = self._owners.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def _to_local(self, obj: Any, dtensor_cls: type) -> Any:
        if isinstance(obj, dtensor_cls):
            local = obj.to_local()
            key = (obj.device_mesh, tuple(obj.placements), tuple(obj.shape), tuple(obj.stride()))
            index = self._spec_index.get(key)
            if index is None:
                index = self._spec_index[key] = len(self._specs)
                self._specs.append((obj.device_mesh, tuple(obj.placements), obj.shape, tuple(obj.stride())))
            self._owners[id(local)] = (local, obj)
            return LocalShard(local, index)
        return _map_containers(obj, lambda value: self._to_local(value, dtensor_cls))

    def _from_local(self, obj: Any) -> Any:
        if isinstance(obj, LocalShard):
            from torch.distributed.tensor import DTensor

            mesh, placements, shape, stride = self._specs[obj.spec]
            return DTensor.from_local(obj.local, mesh, placements, run_check=False, shape=shape, stride=stride)
        return _map_containers(obj, self._from_local)

    # -- CheckpointIO ---------------------------------------------------------------------------

    def check_path(self, path: PathLike) -> None:
        """Refuse, on the caller's thread, a path that cannot become a checkpoint folder."""
        local_folder(path)

    def check_storage_options(self, path: PathLike, storage_options: Any) -> None:
        """Refuse ``storage_options`` at the call, as the save itself would."""
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} takes no storage_options (got {describe_options(storage_options)})"
            )

    def agree_to_save(
        self,
        path: PathLike,
        refusal: Optional[BaseException],
        reports_background_failure: bool,
        settle: Callable[[], Optional[BaseException]],
        kind: str = "save",
        agreement: Optional[Any] = None,
    ) -> Optional[BaseException]:
        """Collective, at every ``save_checkpoint`` (and, with ``kind="remove"``,
        ``remove_checkpoint``) call of the engine, on a thread of its own while the caller
        waits: whether every rank makes this operation. Returns None when all do, else the
        error this rank must raise at this call (nothing is queued on any rank then).

        ``refusal`` is what this rank's call raised before staging (a full queue, a bad
        argument, an earlier failure being reported); ``reports_background_failure`` says it is
        an earlier background failure. An operation that one rank refuses is refused on every
        rank: otherwise the others' save would pair, in the writers' collectives, with the
        refusing rank's next save, and commit shards of two steps into one folder (or their
        remove would wait in its collective for a rank that never enters it). The ranks must
        also call the same operation on the same folder; if they do not, it is refused on every
        rank. When the refusal reports a background failure, each rank first lets its earlier
        operations finish (``settle``, which returns this rank's own pending failure): the other
        ranks learn of the same failure at this call too, instead of one call later, when they
        would refuse in turn. Every call counts on every rank, so the ranks stay in step after a
        refusal.

        ``agreement`` (an :class:`asyncckpt._writers.base.Agreement`, from the engine) gets the
        call's number when every rank makes the operation: the engine queues the operation
        with it, and the writer runs it under that number (:meth:`running_agreed`).
        """
        import torch.distributed as dist

        folder = _comparable_folder(path)
        mine = (self._calls + 1, None if refusal is None else f"{type(refusal).__name__}: {refusal}",
                reports_background_failure, kind, folder)
        try:
            self._renew_destroyed_groups()
            self._ensure_group()
            if self._call_pg is not None:
                gathered: List[Any] = [None] * dist.get_world_size(self._call_pg)
                dist.all_gather_object(gathered, mine, group=self._call_pg)
            else:
                gathered = [mine]
        except Exception as err:  # noqa: BLE001 - a dead or absent rank: raised as this call's failure
            failed = RanksOutOfStepError(
                f"not making the {kind} of {folder!r}: the ranks could not agree on this {kind}_checkpoint "
                f"call ({type(err).__name__}: {err}). Another rank died, or did not reach the call within "
                f"timeout={self.timeout:g}s; nothing was queued on this rank, and the committed checkpoint "
                "stands. Every rank must make the same calls in the same order", folder,
            )
            failed.__cause__ = err
            if refusal is not None:  # this rank's own reason stays the error it raises
                refusal.add_note(str(failed))
                return refusal
            return failed
        numbers = sorted({entry[0] for entry in gathered})
        self._calls = numbers[-1]  # in step again from the next call on
        call = f"{kind}_checkpoint"
        if len(numbers) > 1:
            return RanksOutOfStepError(
                f"not making the {kind} of {folder!r}: the ranks reached this {call} call as different calls "
                f"(numbers {numbers}): a call ended on some ranks before the ranks agreed on it (an "
                f"interrupt?). No rank makes this {kind}; the next call is in step again", folder,
            )
        refused = [(rank, entry[1]) for rank, entry in enumerate(gathered) if entry[1] is not None]
        if not refused:
            calls = sorted({(entry[3], entry[4]) for entry in gathered})
            if len(calls) > 1:
                detail = "; ".join(f"rank {rank}: {entry[3]} {entry[4]!r}" for rank, entry in enumerate(gathered))
                return RanksOutOfStepError(
                    f"not making the {kind} of {folder!r}: the ranks called different operations at this "
                    f"call ({detail}). A sharded save or remove is collective: every rank must call the "
                    "same one on the same folder, in the same order. Nothing was queued on any rank; "
                    "the next call is in step again", folder,
                )
            if kind == "save":
                self._agreed.add(self._calls)
            if agreement is not None:
                agreement.number = self._calls  # the last step: from here this rank owes the call
            return None
        pending = settle() if any(entry[2] for entry in gathered) else None
        if refusal is not None:
            if pending is not None and pending is not refusal:
                refusal.add_note(f"also failed: {pending}")
            return refusal
        if pending is not None:
            return pending
        detail = "; ".join(f"rank {rank}: {text}" for rank, text in refused)
        return RanksOutOfStepError(
            f"not making the {kind} of {folder!r}: another rank refused this {call} call ({detail}). A "
            f"sharded {kind} is collective, so no rank makes it; the ranks stay in step, and the next "
            "call works on every rank once the cause is gone", folder,
        )

    @contextlib.contextmanager
    def running_agreed(self, number: int) -> Iterator[None]:
        """Run a save, abort or remove on this thread as the call the ranks agreed on as
        ``number`` (the engine's writer, around each collective operation it runs).

        The save's shard names and the coordinator's check carry that number: a save is never
        named after another call's agreement, so two ranks running different calls into one
        folder are refused instead of committed together."""
        self._running.number = number
        try:
            yield
        finally:
            self._running.number = None
            self._agreed.discard(number)

    def _next_number(self) -> int:
        """The save's number: the one agreed at its call (:meth:`running_agreed`), or (a save
        not made through the engine) the next of this IO's own count."""
        self._saves += 1
        agreed = getattr(self._running, "number", None)
        return agreed if agreed is not None else self._saves

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], path: PathLike, storage_options: Optional[Any] = None
    ) -> None:
        """Collective: write this rank's part of ``checkpoint`` into the DCP folder ``path``."""
        folder, state = self.begin_save(checkpoint, path, storage_options)
        self.save_state(state, folder, None)

    def begin_save(
        self, checkpoint: Dict[str, Any], path: PathLike, storage_options: Optional[Any]
    ) -> Tuple[str, Any]:
        """Start a sharded save: the checks and conversion every save begins with, returning
        (folder, state with DTensors) for :meth:`save_state`. When they fail, this rank takes its
        part in the save without data (the other ranks are in its collectives), then raises.

        For subclasses that change what is saved (Lightning's sharded IO): ``begin_save``, turn
        the state into the dict to write, then ``save_state``."""
        try:
            return self._checked_state(checkpoint, path, storage_options)
        except Exception as err:
            self.abort_save(path, err)
            raise

    def _checked_state(
        self, checkpoint: Dict[str, Any], path: PathLike, storage_options: Optional[Any]
    ) -> Tuple[str, Any]:
        """The checks and conversion every sharded save starts with: (folder, state with DTensors)."""
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} takes no storage_options (got {describe_options(storage_options)})"
            )
        folder = local_folder(path)
        self._ensure_group()
        with torch.no_grad():
            return folder, self._from_local(checkpoint)

    def save_state(
        self, state: Dict[str, Any], folder: str, before_commit: Optional[BeforeCommit],
        fail_with: Optional[BaseException] = None,
    ) -> None:
        """Collective: write ``state`` into ``folder`` with DCP and commit it (see
        :mod:`.commit`). ``before_commit`` runs on the coordinator just before the commit;
        ``fail_with`` takes part without data and fails the save on every rank."""
        import torch.distributed.checkpoint as dcp

        number = self._next_number()
        if self._pg is not None and not group_alive(self._pg):
            raise ShardedSaveError(
                f"the sharded save of {folder!r} was not written: its process group was destroyed "
                "(torch.distributed.destroy_process_group()) before its turn came; nothing was "
                "committed, the previous checkpoint stands. Call flush() or teardown() on the "
                "AsyncCheckpointIO before destroying the process group"
            )
        planner = _unpinned_planner()(enable_plan_caching=self.cache_plans and fail_with is None)
        if fail_with is None:
            planner._cached_plans_key = self._plan_key  # DCP's private planner field: per IO, not per planner class
        token = _save_token(self._nonce or "", folder, number)
        writer = self.storage_writer(folder, before_commit, token, fail_with)
        # Distributed exactly when the save has a group (made at a call while torch.distributed
        # was initialized): never a single-process save of one rank's shards into a shared folder.
        no_dist = self._pg is None
        try:
            dcp.save(state, storage_writer=writer, planner=planner, process_group=self._pg, no_dist=no_dist)
        except CheckpointException as err:
            # DCP raises the same exception on every rank, as a BaseException; an Exception lets
            # the engine report it as a failed save instead of a dying writer.
            raise ShardedSaveError(_describe_failures(folder, err)) from err

    def abort_save(self, path: PathLike, error: BaseException) -> None:
        """Take part in the collective save of ``path`` without data, failing it on every rank.

        The engine calls this when this rank cannot write its part (its lazy copy was modified,
        its staged checkpoint could not be rebuilt): the other ranks are inside the same save's
        collectives and would otherwise wait for this rank, and then pair their next save with
        this rank's next one. Nothing is written and no ``.metadata`` is committed.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or self._pg is None:
            self._next_number()
            return
        try:
            folder = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
            self.save_state({}, folder, None, fail_with=error)
        except ShardedSaveError:
            pass  # expected: the caller reports ``error`` on this rank

    def storage_writer(
        self, folder: str, before_commit: Optional[BeforeCommit], token: str = "",
        fail_with: Optional[BaseException] = None,
    ) -> Any:
        """The DCP ``StorageWriter`` for one save into ``folder``: an extension point.

        A subclass may wrap or replace what this returns (to add a fault, a delay, its own
        reporting) and call ``super().storage_writer(...)`` with the same arguments. Whatever it
        returns must keep the commit protocol of :func:`asyncckpt.integrations.dcp.commit.make_storage_writer`
        (fresh shard names carrying ``token``, ``before_commit`` just before the atomic
        ``.metadata`` replace, ``fail_with`` raised in ``prepare_local_plan``).
        """
        return make_storage_writer(
            folder, before_commit, token, fail_with, thread_count=self.thread_count, sync_files=self.sync_files
        )

    def load_checkpoint(
        self,
        path: PathLike,
        map_location: Optional[Any] = None,
        weights_only: Optional[bool] = None,
        state: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, Any]:
        """Read the DCP folder ``path``.

        With ``state`` (collective, on the default group): DCP's in-place load into ``state``'s
        tensors and DTensors, resharded to their current layout (any world size), returned.
        Without: the whole checkpoint as full tensors, like ``torch.load`` of an unsharded file;
        not collective, and every caller reads everything. ``map_location`` and ``weights_only``
        are accepted for the interface and not used: DCP loads into the given tensors' devices.
        """
        import torch.distributed.checkpoint as dcp

        folder = local_folder(path)
        if not os.path.isfile(os.path.join(folder, METADATA_FILE)):
            raise CheckpointLoadError(
                f"{folder!r} is not a complete checkpoint: it has no {METADATA_FILE} (a save that never "
                "committed, or not a torch.distributed.checkpoint folder)",
                folder,
            )
        if state is None:
            # DCP's private loader pieces: the one way to read a whole folder without a state to load into.
            from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
            from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

            full: Dict[str, Any] = {}
            _load_state_dict(
                full, storage_reader=dcp.FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(), no_dist=True
            )
            return full
        dcp.load(state, checkpoint_id=folder)
        return state

    def remove_checkpoint(self, path: PathLike) -> None:
        """Collective: every rank calls it; the coordinator removes the folder, and every rank
        returns once it is gone (a failure is raised on every rank).

        Queued behind this rank's earlier saves; those end only once every rank has written
        its shards (the commit gathers all write results), so no rank still writes into it.
        """
        import torch.distributed as dist

        folder = local_folder(path)
        failure: Optional[str] = None
        if self._is_coordinator():
            try:
                remove_folder(folder)
            except Exception as err:  # noqa: BLE001 - sent to every rank below
                failure = f"{type(err).__name__}: {err}"
        if self._pg is not None and dist.is_initialized():
            box = [failure]
            dist.broadcast_object_list(box, src=dist.get_global_rank(self._pg, 0), group=self._pg)
            failure = box[0]
        if failure is not None:
            raise OSError(f"removing checkpoint folder {folder!r} failed on the coordinator: {failure}")

    def __reduce__(self) -> Any:
        raise TypeError(
            "DistributedCheckpointIO cannot be sent to another process: its saves run collectives on a "
            "process group that only the ranks' own processes belong to, so it cannot run in "
            "writer='process'; use AsyncCheckpointIO(DistributedCheckpointIO(), writer='thread') (the default)"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cache_plans={self.cache_plans}, thread_count={self.thread_count})"


def _map_containers(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with ``fn`` applied to each item of its dicts, lists and tuples (new containers)."""
    if isinstance(obj, dict):
        new = obj.copy()  # keeps the dict's type (OrderedDict, defaultdict)
        for key, value in obj.items():
            new[key] = fn(value)
        return new
    if isinstance(obj, list):
        return [fn(value) for value in obj]
    if isinstance(obj, tuple):
        items = [fn(value) for value in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def remove_folder(folder: str) -> None:
    """Remove the checkpoint folder (or file, or link) ``folder``; renamed away first, so a
    removal cut short never looks like a checkpoint."""
    if not os.path.lexists(folder):
        return
    if os.path.islink(folder) or not os.path.isdir(folder):
        os.unlink(folder)
        return
    doomed = f"{folder}.removing-{uuid.uuid4().hex[:8]}"
    os.rename(folder, doomed)
    shutil.rmtree(doomed)


def _comparable_folder(path: Any) -> str:
    """``path`` as the ranks compare it at the agreement: the absolute folder where it is one."""
    if isinstance(path, (str, os.PathLike)):
        text = os.fspath(path)
        if isinstance(text, str):
            local = local_path_of(text)
            return os.path.abspath(local) if local else text  # as asked: hosts' links may differ
    return repr(path)


def local_folder(path: PathLike) -> str:
    """``path`` as the absolute local folder of a sharded checkpoint; refuses a URL, an
    existing file and a path that is no ``str``/``os.PathLike`` (:class:`InvalidPathError`)."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidPathError(f"checkpoint path must be a str or os.PathLike, not {type(path).__name__}")
    text = os.fspath(path)
    local = local_path_of(text)
    if not local:
        raise InvalidPathError(
            f"DistributedCheckpointIO writes to local or shared filesystems only, not {text!r}; "
            "mount the storage, or copy the folder to object storage after the save",
            text,
        )
    if os.path.isfile(local):
        raise InvalidPathError(
            f"checkpoint path {text!r} is an existing file; a sharded checkpoint is a folder: "
            "remove the file or choose another name",
            text,
        )
    return resolved_entry(local)


# The public classes keep the public module's name (tracebacks, docs, pickles of the skeleton).
DistributedCheckpointIO.__module__ = "asyncckpt.distributed"
LocalShard.__module__ = "asyncckpt.distributed"
ShardedSaveError.__module__ = "asyncckpt.distributed"
