"""One rank of a multi-process test of ``asyncckpt.DistributedCheckpointIO`` (see test_distributed.py).

Run as ``python _dist_child.py SCENARIO OUT [ARG]`` with ``RANK``, ``WORLD_SIZE`` and
``MASTER_PORT`` set; a real gloo process group on 127.0.0.1, a real FSDP2 model and optimizer.
Each rank writes ``OUT/result-RANK.json``; rank 0 writes the expected full state of each save
to ``OUT/expected-NAME.pt`` (full tensors, gathered on the training group).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Dict

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import asyncckpt
from _subproc import idle
from asyncckpt.distributed import DistributedCheckpointIO
from conftest import same

DESTROY_AS_IMPORTED = dist.destroy_process_group  # before asyncckpt's first sharded save

SCENARIO, OUT = sys.argv[1], sys.argv[2]
ARG = sys.argv[3] if len(sys.argv) > 3 else None
RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
result: Dict[str, Any] = {"rank": RANK}


def write_result() -> None:
    path = os.path.join(OUT, f"result-{RANK}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


# Lazy staging copies storages of up to 64 KiB at the call; the lazy scenario needs local shards
# larger than that to copy anything lazily.
WIDTH = 4096 if SCENARIO == "lazy" else 32


def build(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, 8))
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def train_step(model: Any, opt: Any) -> None:
    torch.manual_seed(1000 + RANK)
    model(torch.randn(4, 16)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


def state_of(model: Any, opt: Any, step: int) -> Dict[str, Any]:
    msd, osd = get_state_dict(model, opt)
    # a replicated plain tensor and plain objects ride along with the shards
    return {"model": msd, "optim": osd, "step": step, "extra": {"marker": torch.arange(5) + step, "name": "run"}}


def full(obj: Any) -> Any:
    """Full tensors (collective over the training group, same order on every rank)."""
    if isinstance(obj, DTensor):
        return obj.full_tensor().clone()
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: full(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [full(v) for v in obj]
    return obj


def record_expected(name: str, state: Dict[str, Any]) -> None:
    value = full(state)
    if RANK == 0:
        torch.save(value, os.path.join(OUT, f"expected-{name}.pt"))


def load_and_compare(io: Any, path: str, name: str, expected_in: str = OUT) -> bool:
    """Load ``path`` into a freshly built (differently initialized) model at this world size."""
    model, opt = build(seed=99)
    train_step(model, opt)  # optimizer state exists, so it has somewhere to load into
    state = state_of(model, opt, -1)
    io.load_checkpoint(path, state=state)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    now = full(state_of(model, opt, state["step"]))
    now["extra"] = full(state["extra"])
    return same(now, torch.load(os.path.join(expected_in, f"expected-{name}.pt")))


def load_full_and_compare(path: str, name: str) -> bool:
    """Load ``path`` whole in this process alone (no collectives) and compare."""
    loaded = DistributedCheckpointIO().load_checkpoint(path)
    return same(loaded, torch.load(os.path.join(OUT, f"expected-{name}.pt")))


def local_bytes(state: Any) -> int:
    """Bytes of this rank's local storages (DTensor local shards and plain tensors)."""
    seen: Dict[int, int] = {}

    def visit(obj: Any) -> None:
        if isinstance(obj, DTensor):
            obj = obj.to_local()
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    visit(state)
    return sum(seen.values())


class SlowWriteIO(DistributedCheckpointIO):
    """Fault injection: a sleep stands in for a slow disk (this rank's shard writes start late);
    the write after it is DCP's real one."""

    delay = 0.0

    def storage_writer(self, folder: str, before_commit: Any, *args: Any) -> Any:
        writer = super().storage_writer(folder, before_commit, *args)
        write_data = writer.write_data

        def slow_write_data(plan: Any, planner: Any) -> Any:
            if self.delay:
                open(os.path.join(OUT, f"in-save-{RANK}"), "w").close()
                time.sleep(self.delay)
            return write_data(plan, planner)

        writer.write_data = slow_write_data
        return writer


def saved_once_then_slow(model: Any, opt: Any, ck: str, delay: float) -> Any:
    """An engine on :class:`SlowWriteIO` that committed save "one" into ``ck`` and then made save
    "two", whose shard writes on this rank start ``delay`` s late."""
    io_impl = SlowWriteIO()
    io = asyncckpt.AsyncCheckpointIO(io_impl, exit_timeout=60)
    s1 = state_of(model, opt, 1)
    io.save_checkpoint(s1, ck)
    record_expected("one", s1)
    io.flush()
    train_step(model, opt)
    io_impl.delay = delay
    s2 = state_of(model, opt, 2)
    io.save_checkpoint(s2, ck)
    record_expected("two", s2)
    return io


class NoCallAgreementIO(DistributedCheckpointIO):
    """Without the agreement at the call (the engine makes none), to test what stands behind it."""

    agree_to_save = None
    remove_is_collective = False


def failing_rank(model: Any, opt: Any, ck: str) -> None:
    """The last rank's shard write fails for real (file size limit); every rank must raise."""
    io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO())
    s1 = state_of(model, opt, 11)
    io.save_checkpoint(s1, ck)
    record_expected("failing-one", s1)
    io.flush()
    train_step(model, opt)
    last = RANK == WORLD - 1
    if last:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, limits[1]))
    io.save_checkpoint(state_of(model, opt, 12), ck)
    errors = []
    for _ in range(2):  # raised once
        try:
            io.flush()
        except asyncckpt.CheckpointSaveError as err:
            errors.append(f"{err} <- {err.__cause__!r}")
    if last:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    result["errors"] = errors
    result["metadata_still_first"] = load_and_compare(io, ck, "failing-one")
    s3 = state_of(model, opt, 13)  # the next save works again
    io.save_checkpoint(s3, ck)
    record_expected("failing-three", s3)
    io.flush()
    result["after_recovery_equal"] = load_and_compare(io, ck, "failing-three")
    result["stray"] = [n for n in os.listdir(ck) if n.endswith(".tmp")]
    io.teardown()


def out_of_step(model: Any, opt: Any, ck: str) -> None:
    """One save call raises on one rank only; every rank must raise at that call, no folder may
    ever hold shards of two steps, and the next save must work on every rank."""

    def attempt(io: Any, state: Any, folder: str, **options: Any) -> Any:
        try:
            io.save_checkpoint(state, folder, **options)
            return None
        except Exception as err:  # noqa: BLE001 - reported to the test
            return f"{type(err).__name__}: {err}"

    def finish_case(name: str, io: Any, folder: str, errors: list) -> None:
        s_after = state_of(model, opt, 30)  # the ranks save in step again
        errors.append(attempt(io, s_after, folder))
        record_expected(f"{name}-after", s_after)
        try:
            io.flush(timeout=60)
            errors.append(None)
        except Exception as err:  # noqa: BLE001
            errors.append(f"{type(err).__name__}: {err}")
        result[f"{name}_errors"] = errors
        result[f"{name}_after_equal"] = load_full_and_compare(folder, f"{name}-after")
        io.teardown()

    # 1. QueueFullError on rank 1 only: rank 1's only slot is busy (rank 0's shard write starts
    # late, so rank 1's first save cannot end), while rank 0 waits for its slot.
    folder = os.path.join(ck, "full")
    impl = SlowWriteIO(timeout=60)
    impl.delay = 2.0 if RANK == 0 else 0.0
    io = asyncckpt.AsyncCheckpointIO(impl, max_pending=1, when_full="raise" if RANK == 1 else "wait")
    s1 = state_of(model, opt, 21)
    io.save_checkpoint(s1, folder)
    record_expected("full-one", s1)
    train_step(model, opt)
    errors = [attempt(io, state_of(model, opt, 22), folder)]
    impl.delay = 0.0
    train_step(model, opt)
    finish_case("full", io, folder, errors)

    # 2. A bad input refused at the call on rank 1 only (storage_options this IO does not take).
    folder = os.path.join(ck, "bad")
    io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(timeout=60))
    s1 = state_of(model, opt, 23)
    io.save_checkpoint(s1, folder)
    train_step(model, opt)
    options = {"storage_options": {"anon": True}} if RANK == 1 else {}
    errors = [attempt(io, state_of(model, opt, 24), folder, **options)]
    train_step(model, opt)
    finish_case("bad", io, folder, errors)

    # 3. A background write fails on every rank, and the next call learns it on rank 0 only:
    # rank 1's shard write starts late, rank 0's fails at once (file size limit); rank 0 waits
    # for the failure, rank 1 calls again before it is known there.
    folder = os.path.join(ck, "late")
    impl = SlowWriteIO(timeout=60)
    io = asyncckpt.AsyncCheckpointIO(impl, max_pending=2)
    s1 = state_of(model, opt, 25)
    io.save_checkpoint(s1, folder)
    io.flush()
    train_step(model, opt)
    if RANK == 0:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, limits[1]))
    impl.delay = 2.0 if RANK == 1 else 0.0
    io.save_checkpoint(state_of(model, opt, 26), folder)
    if RANK == 0:
        io.wait_for_path(folder, timeout=60)
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    train_step(model, opt)
    errors = [attempt(io, state_of(model, opt, 27), folder)]
    impl.delay = 0.0
    train_step(model, opt)
    finish_case("late", io, folder, errors)


def attempt(fn: Any, *args: Any, **options: Any) -> Any:
    """``fn(*args, **options)``: None, or what it raised as "Type: message" (for the result)."""
    try:
        fn(*args, **options)
        return None
    except Exception as err:  # noqa: BLE001 - reported to the test
        return f"{type(err).__name__}: {err}"


def collective_calls(model: Any, opt: Any, ck: str) -> None:
    """Removes and saves that one rank refuses or calls differently, and saves from asyncio: every
    rank must raise at that call (no rank waits in a collective the others never enter), the
    committed checkpoint must stay, and the next call must work on every rank. Each IO has a
    10 s collective timeout, so a rank left alone in a collective fails the case, not the run."""
    import asyncio

    def committed(folder: str) -> Any:
        try:
            return DistributedCheckpointIO().load_checkpoint(folder)["step"]
        except Exception as err:  # noqa: BLE001
            return f"{type(err).__name__}: {err}"

    def case(name: str, io: Any, calls: Any) -> None:
        folder = os.path.join(ck, name)
        io.save_checkpoint(state_of(model, opt, 40), os.path.join(folder, "a"))
        io.flush(timeout=60)
        s_next = state_of(model, opt, 41)  # built before the calls: building it is collective too
        errors = [calls(folder)]
        errors.append(attempt(io.flush, timeout=60))
        errors.append(attempt(io.save_checkpoint, s_next, os.path.join(folder, "next")))  # in step again
        errors.append(attempt(io.flush, timeout=60))
        result[f"{name}_errors"] = errors
        result[f"{name}_committed"] = [committed(os.path.join(folder, n)) for n in ("a", "next")]
        result[f"{name}_files"] = sorted(os.listdir(folder))
        io.teardown()

    # 1. A remove refused at the call on rank 1 only (a path that is no path).
    io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(timeout=10))
    case("remove_refused", io, lambda folder: attempt(
        io.remove_checkpoint, 12345 if RANK == 1 else os.path.join(folder, "a")))

    # 2. Rank 0 removes while rank 1 saves, at the same call.
    io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(timeout=10))
    s_other = state_of(model, opt, 42)
    case("remove_vs_save", io, lambda folder: attempt(io.remove_checkpoint, os.path.join(folder, "a"))
         if RANK == 0 else attempt(io.save_checkpoint, s_other, os.path.join(folder, "b")))

    # 3. The ranks save into different folders at the same call.
    io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(timeout=10))
    case("two_folders", io, lambda folder: attempt(io.save_checkpoint, s_other, os.path.join(folder, f"r{RANK}")))

    # 4. A save from asyncio refused at the call on rank 1 only.
    io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(timeout=10))

    async def asave(folder: str) -> Any:
        options = {"storage_options": {"anon": True}} if RANK == 1 else {}
        try:
            await io.asave_checkpoint(s_other, os.path.join(folder, "a"), **options)
        except Exception as err:  # noqa: BLE001
            return f"{type(err).__name__}: {err}"
        return None

    case("asave_refused", io, lambda folder: asyncio.run(asave(folder)))

    # 5. A background save fails on every rank (rank 0's write, file size limit); rank 0 learns
    # it from a flush of its own, rank 1 not yet; then every rank removes the old checkpoint.
    io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(timeout=10))

    def fail_then_remove(folder: str) -> Any:
        if RANK == 0:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            limits = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, limits[1]))
        io.save_checkpoint(s_other, os.path.join(folder, "b"))
        if RANK == 0:
            result["fail_flush"] = attempt(io.flush, timeout=60)
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        else:
            io.wait_for_path(os.path.join(folder, "b"), timeout=60)  # failed, not yet raised here
        return attempt(io.remove_checkpoint, os.path.join(folder, "a"))

    case("remove_after_failure", io, fail_then_remove)

    # 7. A save refused on rank 1 only, by an IO on a process group the caller passed in.
    io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(process_group=dist.new_group(backend="gloo"), timeout=10))
    case("given_group", io, lambda folder: attempt(
        io.save_checkpoint, s_other, os.path.join(folder, "a"), **({"storage_options": {}} if RANK == 1 else {})))

    # 6. An asyncio save cancelled on rank 1 while it waits for a staging slot (rank 1 has one
    # slot, busy with a slow save; rank 0 has two), while rank 0's save of the same folder is
    # already in the agreement; then the next save of that folder on both. The cancelled call
    # must be refused on every rank, not paired with rank 1's next save (which committed a
    # folder of rank 0's step-b shards and rank 1's step-c shards).
    folder = os.path.join(ck, "cancelled")
    impl = SlowWriteIO(timeout=20)
    io = asyncckpt.AsyncCheckpointIO(impl, max_pending=2 if RANK == 0 else 1)
    with torch.no_grad():  # new DTensors (local ops): three distinct states
        states = {n: {"model": {k: v + n for k, v in state_of(model, opt, 0)["model"].items()}, "step": n}
                  for n in (60, 61, 62)}
    record_expected("cancelled-c", states[62])

    async def cancelled_then_next() -> list:
        errors: list = []
        impl.delay = 2.0 if RANK == 0 else 0.0  # rank 0's write starts late: rank 1's slot stays busy
        await io.asave_checkpoint(states[60], os.path.join(folder, "slow"))
        await asyncio.sleep(0.3)
        impl.delay = 0.0
        for n, limit in ((61, 0.5 if RANK == 1 else 60), (62, 60)):
            try:
                await asyncio.wait_for(io.asave_checkpoint(states[n], os.path.join(folder, "a")), limit)
                errors.append(None)
            except (Exception, asyncio.CancelledError) as err:  # noqa: BLE001
                errors.append(f"{type(err).__name__}: {err}")
        return errors

    errors = asyncio.run(cancelled_then_next())
    errors.append(attempt(io.flush, timeout=60))
    result["cancelled_errors"] = errors
    result["cancelled_a_is_c"] = load_full_and_compare(os.path.join(folder, "a"), "cancelled-c")
    io.teardown()

    interrupted_after_agreement(model, opt, ck, states)


class InterruptWhenPickled:
    """An object in rank 0's state that sends this process a real SIGINT as staging pickles it:
    the KeyboardInterrupt lands in the middle of the call, after the ranks agreed on the save."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)
        return (InterruptWhenPickled, ())


def interrupted_after_agreement(model: Any, opt: Any, ck: str, states: Dict[int, Any]) -> None:
    """Rank 0's call is interrupted (Ctrl-C) after every rank agreed to it; rank 1's goes through.
    Rank 1's writer then runs that call's collective, so rank 0's must take part (failing the
    save on both); and rank 0's next save of the same folder must not pair with rank 1's
    interrupted one: that committed a folder of rank 0's next shards and rank 1's old ones."""
    record_expected("interrupt-b", states[61])
    record_expected("interrupt-60", states[60])
    # Python's own SIGINT handler: a shell starting a background job (a CI runner) may have set
    # SIGINT to ignored for every process it starts, and Python then installs none.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def interrupted(name: str, call: Any) -> None:
        folder = os.path.join(ck, name)
        io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(timeout=20))
        io.save_checkpoint(states[60], os.path.join(folder, "a"))
        io.flush(timeout=60)
        started = time.monotonic()
        try:
            call(io, folder)
            outcome = None
        except BaseException as err:  # noqa: BLE001 - reported to the test
            outcome = type(err).__name__
        errors = [outcome]
        errors.append(attempt(io.flush, timeout=60))  # the interrupted save's failure, if any, raised here
        result[f"{name}_gone"] = not os.path.exists(os.path.join(folder, "a"))
        errors.append(attempt(io.save_checkpoint, states[61], os.path.join(folder, "a")))
        errors.append(attempt(io.flush, timeout=60))
        result[f"{name}_errors"] = errors
        result[f"{name}_seconds"] = time.monotonic() - started
        io.teardown()

    # 8. A real SIGINT as rank 0 stages; then both save the same folder again.
    def save_with_trap(io: Any, folder: str) -> None:
        state = dict(states[62], trap=InterruptWhenPickled()) if RANK == 0 else states[62]
        io.save_checkpoint(state, os.path.join(folder, "a"))

    interrupted("interrupt_staging", save_with_trap)
    result["interrupt_staging_is_b"] = load_full_and_compare(os.path.join(ck, "interrupt_staging", "a"), "interrupt-b")

    # 9 and 10. Fault injection (a signal cannot be aimed at one instruction): rank 0's call
    # interrupted just as the agreement returns, for a save and for a remove.
    def interrupt_as_agreed(io: Any) -> None:
        inner = io.checkpoint_io
        agree = inner.agree_to_save

        def agree_then_interrupt(*args: Any, **options: Any) -> Any:
            del inner.agree_to_save  # once
            agree(*args, **options)
            raise KeyboardInterrupt

        if RANK == 0:
            inner.agree_to_save = agree_then_interrupt

    def save_as_agreed(io: Any, folder: str) -> None:
        interrupt_as_agreed(io)
        io.save_checkpoint(states[62], os.path.join(folder, "a"))

    interrupted("interrupt_agreed", save_as_agreed)
    result["interrupt_agreed_is_b"] = load_full_and_compare(os.path.join(ck, "interrupt_agreed", "a"), "interrupt-b")

    def remove_as_agreed(io: Any, folder: str) -> None:
        interrupt_as_agreed(io)
        io.remove_checkpoint(os.path.join(folder, "a"))

    interrupted("interrupt_remove", remove_as_agreed)
    result["interrupt_remove_is_b"] = load_full_and_compare(os.path.join(ck, "interrupt_remove", "a"), "interrupt-b")

    # 11. A real SIGINT while rank 0 waits at the agreement for rank 1, which comes 2 s late: the
    # agreement still decides (rank 1 then makes the save), and rank 0 learns of it before it
    # gives up its part (it used to be cut short between the ranks' exchange and its record).
    def save_while_waiting(io: Any, folder: str) -> None:
        if RANK == 0:
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        else:
            time.sleep(2.0)
        io.save_checkpoint(states[62], os.path.join(folder, "a"))

    interrupted("interrupt_waiting", save_while_waiting)
    result["interrupt_waiting_is_b"] = load_full_and_compare(os.path.join(ck, "interrupt_waiting", "a"), "interrupt-b")

    # 12. As 9, and rank 0's stand-in never goes out either (fault injection: the one step the
    # engine cannot guard, an interrupt inside its own clean-up). Rank 0's next save then meets
    # rank 1's interrupted one in the writers' collective: it must be refused (the saves carry
    # different calls' numbers), never committed as one checkpoint of two steps' shards.
    folder = os.path.join(ck, "no_stand_in")
    io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(timeout=5))
    io.save_checkpoint(states[60], os.path.join(folder, "a"))
    io.flush(timeout=60)
    if RANK == 0:
        io.stand_in_for = lambda *args: None
    errors = []
    try:
        save_as_agreed(io, folder)
        errors.append(None)
    except BaseException as err:  # noqa: BLE001 - reported to the test
        errors.append(type(err).__name__)
    errors.append(attempt(io.save_checkpoint, states[61], os.path.join(folder, "a")))
    errors.append(attempt(io.flush, timeout=60))
    result["no_stand_in_errors"] = errors
    result["no_stand_in_is_60"] = load_full_and_compare(os.path.join(folder, "a"), "interrupt-60")
    io.teardown()


def main() -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
        rank=RANK,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    ck = os.path.join(OUT, "ck")
    model, opt = build()
    train_step(model, opt)

    if SCENARIO == "save":
        if ARG is not None:  # a checkpoint written at another world size
            result["foreign_load_equal"] = load_and_compare(
                DistributedCheckpointIO(), ARG, "two", os.path.dirname(os.path.dirname(ARG))
            )
        io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(), max_pending=2)
        s1 = state_of(model, opt, 1)
        io.save_checkpoint(s1, os.path.join(ck, "one"))
        record_expected("one", s1)
        train_step(model, opt)  # in place: must not reach "one"
        s2 = state_of(model, opt, 2)
        io.save_checkpoint(s2, os.path.join(ck, "two"))
        record_expected("two", s2)
        with torch.no_grad():  # in place, right after the call returned
            for p in model.parameters():
                p.add_(1000.0)
        s2["extra"]["marker"].add_(1000)
        # order per folder: save, remove, save again (survives); save, remove (gone)
        io.save_checkpoint(state_of(model, opt, 3), os.path.join(ck, "three"))
        io.remove_checkpoint(os.path.join(ck, "three"))
        s3 = state_of(model, opt, 3)
        io.save_checkpoint(s3, os.path.join(ck, "three"))
        record_expected("three", s3)
        io.save_checkpoint(s3, os.path.join(ck, "gone"))
        io.remove_checkpoint(os.path.join(ck, "gone"))
        io.flush()
        result["gone_exists"] = os.path.exists(os.path.join(ck, "gone"))
        from torch.distributed.checkpoint.planner import SavePlanner

        result["plan_cached"] = io.checkpoint_io.plan_key in SavePlanner._cached_save_plan
        result["local_bytes"] = local_bytes(s3)
        result["full_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        result["staging_bytes"] = sum(buffer.nbytes for buffer in io.staging_buffers())
        result["max_pending"] = io.max_pending
        result["tensor_bytes"] = [s.tensor_bytes for s in io.stats]
        result["files_two"] = sorted(os.listdir(os.path.join(ck, "two")))
        for name in ("one", "two", "three"):
            result[f"load_{name}_equal"] = load_and_compare(io, os.path.join(ck, name), name)
        io.teardown()
        failing_rank(model, opt, os.path.join(ck, "failing"))

    elif SCENARIO == "out_of_step":
        out_of_step(model, opt, ck)

    elif SCENARIO == "collective_calls":
        collective_calls(model, opt, ck)

    elif SCENARIO == "dead_rank_at_call":
        # The last rank dies between two saves; the others' next calls cannot be agreed on. Each
        # must raise an asyncckpt error naming the folder, at once (the connection closed), with
        # nothing queued; the committed checkpoint stays.
        import asyncio

        io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(timeout=60))
        s1 = state_of(model, opt, 1)
        io.save_checkpoint(s1, ck)
        record_expected("one", s1)
        io.flush()
        s2 = state_of(model, opt, 2)
        if RANK == WORLD - 1:
            os._exit(0)
        time.sleep(1)

        async def asave() -> None:
            await io.asave_checkpoint(s2, ck)

        errors = []
        calls = (lambda: io.save_checkpoint(s2, ck), lambda: io.remove_checkpoint(ck), lambda: asyncio.run(asave()))
        for call in calls:
            try:
                call()
                errors.append(None)
            except asyncckpt.AsyncCheckpointError as err:
                errors.append(f"{type(err).__name__}: {err}")
            except Exception as err:  # noqa: BLE001 - not an asyncckpt error: reported as such
                errors.append(f"not an asyncckpt error: {type(err).__name__}: {err}")
        result["errors"] = errors
        result["pending"] = io.pending
        result["metadata_still_first"] = load_full_and_compare(ck, "one")
        write_result()
        os._exit(0)  # the training group lost a member; nothing left to tear down cleanly

    elif SCENARIO == "lazy":
        io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(), max_pending=2, staging="lazy")
        s1 = state_of(model, opt, 1)
        io.save_checkpoint(s1, os.path.join(ck, "one"))
        record_expected("one", s1)
        train_step(model, opt)  # the optimizer step waits for the lazy copy, then changes the shards
        s2 = state_of(model, opt, 2)
        io.save_checkpoint(s2, os.path.join(ck, "two"))
        record_expected("two", s2)
        if RANK == 0:  # outside every guard, on one rank only: "two" must fail on both
            with torch.no_grad():
                for value in s2["model"].values():
                    value.add_(1000.0)
        try:
            io.flush(timeout=60)
            result["two_error"] = None
        except asyncckpt.AsyncCheckpointError as err:
            result["two_error"] = f"{type(err).__name__}: {err}"
        result["two_committed"] = os.path.exists(os.path.join(ck, "two", ".metadata"))
        s3 = state_of(model, opt, 3)  # the ranks are still in step: the next save works
        io.save_checkpoint(s3, os.path.join(ck, "three"))
        record_expected("three", s3)
        io.flush(timeout=60)
        for name in ("one", "three"):
            result[f"load_{name}_equal"] = load_and_compare(io, os.path.join(ck, name), name)
        io.teardown()
        # Out of step: one extra save on each rank, at different places. Each collective then
        # pairs two different saves; the coordinator refuses to commit either. (The agreement at
        # the call refuses saves into different folders before anything is staged; it is left out
        # here, so that the coordinator's own check, the second line, is what is tested.)
        io = asyncckpt.AsyncCheckpointIO(NoCallAgreementIO(timeout=60))
        s4 = state_of(model, opt, 4)
        names = {0: ["x", "y"], 1: ["y", "z"]}[RANK]
        for name in names:
            io.save_checkpoint(s4, os.path.join(ck, name))
        errors = []
        for _ in names:
            try:
                io.flush(timeout=120)
            except asyncckpt.AsyncCheckpointError as err:
                errors.append(f"{type(err).__name__}: {err}")
        result["out_of_step_errors"] = errors
        result["out_of_step_committed"] = [
            n for n in ("x", "y", "z") if os.path.exists(os.path.join(ck, n, ".metadata"))
        ]
        io.teardown()

    elif SCENARIO == "sharded_tensor":
        # FSDP1's SHARDED_STATE_DICT (Lightning's FSDPStrategy(state_dict_type="sharded")) holds
        # ShardedTensors, not DTensors: each rank's row block of a (64 * WORLD, 1024) weight
        from torch.distributed._shard.sharded_tensor import empty as sharded_empty
        from torch.distributed._shard.sharding_spec import ChunkShardingSpec

        spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(WORLD)])
        for staging in ("eager", "lazy"):
            weight = sharded_empty(spec, 64 * WORLD, 1024)  # 256 KiB a rank: lazy copies it lazily
            (shard,) = weight.local_shards()
            shard.tensor.copy_(torch.arange(64 * 1024, dtype=torch.float32).reshape(64, 1024) + 1e6 * RANK)
            expected = shard.tensor.clone()
            io = asyncckpt.AsyncCheckpointIO(DistributedCheckpointIO(), staging=staging)
            path = os.path.join(ck, staging)
            io.save_checkpoint({"model": {"w": weight, "b": torch.full((3,), 7.0)}, "step": 5}, path)
            shard.tensor.add_(1000.0)  # right after the call, outside every guard
            try:
                io.flush(timeout=60)
                result[f"{staging}_error"] = None
            except asyncckpt.AsyncCheckpointError as err:
                result[f"{staging}_error"] = f"{type(err).__name__}: {err}"
            io.teardown()
            result[f"{staging}_committed"] = os.path.exists(os.path.join(path, ".metadata"))
            torch.save(expected, os.path.join(OUT, f"expected-{staging}-{RANK}.pt"))

    elif SCENARIO == "destroyed_group":
        # A training script's usual last lines: a final save, then destroy_process_group() and
        # the end of the script, with no flush or teardown; the write is still in progress.
        io = saved_once_then_slow(model, opt, ck, 1.0)
        if ARG == "by_name":  # the function as imported before the first save: no drain first
            train_step(model, opt)
            s3 = state_of(model, opt, 3)
            io.save_checkpoint(s3, ck)  # queued behind "two": starts after the group is gone
            write_result()
            DESTROY_AS_IMPORTED()
            return
        write_result()
        dist.destroy_process_group()
        return

    elif SCENARIO in ("sigkill", "sigterm"):
        io = saved_once_then_slow(model, opt, ck, 3.0 if SCENARIO == "sigterm" else 120.0 if RANK == 1 else 0.0)
        open(os.path.join(OUT, f"returned-{RANK}"), "w").close()
        if SCENARIO == "sigterm":
            idle(120)  # the test sends SIGTERM; the handler writes the pending save, then exits
            return
        if RANK == 1:
            time.sleep(120)  # the test SIGKILLs this rank while its write sleeps
            return
        try:
            io.flush(timeout=60)
            result["error"] = None
        except asyncckpt.AsyncCheckpointError as err:
            result["error"] = f"{type(err).__name__}: {err}"
        result["saves_reported"] = len(io.stats)
        result["metadata_still_first"] = load_full_and_compare(ck, "one")
        write_result()
        os._exit(0)  # the training group lost a member; nothing left to tear down cleanly

    write_result()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
