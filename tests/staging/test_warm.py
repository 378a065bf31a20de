"""A warm save reuses what its slot's last save learned; any change of structure is still seen.

Each test saves the same structure three times (the slot records it on the second save and
reuses it on the third), then changes the checkpoint in one way and saves again. The file must
be what ``torch.save`` writes for the checkpoint at the call: the same bytes, and on loading, the
same values, dtypes, shapes, strides, offsets, bits and storage sharing. Through both writers
and both staging modes (lazy with and without tensors large enough to be copied lazily).
"""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from typing import Any, Callable, Dict, List

import pytest
import torch
from torch import nn

from asyncckpt import AsyncCheckpointIO
from asyncckpt._staging import warm
from conftest import load

MODES = {
    "thread-eager": dict(writer="thread", staging="eager", large=True),
    "process-eager": dict(writer="process", staging="eager", large=True),
    "thread-lazy": dict(writer="thread", staging="lazy", large=True),
    "thread-lazy-small": dict(writer="thread", staging="lazy", large=False),
}


class State:
    """The live tensors a training loop keeps between saves."""

    def __init__(self, large: bool) -> None:
        gen = torch.Generator().manual_seed(0)
        self.model = nn.Linear(16, 8)
        self.square = nn.Parameter(torch.randn(16, 16, generator=gen))
        self.big = torch.randn(512, generator=gen)  # two views of it are saved: shared storage
        self.z = torch.randn(64, dtype=torch.complex64, generator=gen)
        self.zz = torch.randn(64, dtype=torch.complex64, generator=gen)  # saved as its imaginary part
        self.a = torch.randn(32, generator=gen)
        self.b = torch.randn(32, generator=gen)
        self.tied = torch.randn(32, generator=gen)  # saved twice, as two tensors over one storage
        self.buf = torch.randn(16, 16, generator=gen)  # the same object in every checkpoint
        self.step = torch.tensor(3.0)
        self.large = torch.randn(40_000, generator=gen) if large else None  # > EAGER_MAX_BYTES

    def checkpoint(self, step: int) -> Dict[str, Any]:
        """Built anew at every save, as a training loop does (``state_dict()``: new tensors)."""
        ckpt: Dict[str, Any] = {
            "epoch": 1,
            "global_step": step,
            "state_dict": self.model.state_dict(),
            "square": self.square.detach(),
            "half": self.big[:256],
            "other_half": self.big.view(2, 256)[1],
            "z": self.z,
            "z_imag": self.zz.imag,
            "a": self.a,
            "b": self.b,
            "tied1": self.tied[:],
            "tied2": self.tied[:],
            "buf": self.buf,
            "step": self.step,
            "hparams": {"lr": 0.1, "betas": [0.9, 0.999], "name": "adam"},
        }
        if self.large is not None:
            ckpt["large"] = self.large
        return ckpt


def _tie(c: Dict[str, Any], s: State) -> None:
    c["b"] = s.a[:]  # the same dtype, shape, stride, offset and storage size as before: only sharing differs


def _untie(c: Dict[str, Any], s: State) -> None:
    c["tied2"] = s.tied.clone()


def _same_object_twice(c: Dict[str, Any], s: State) -> None:
    c["b"] = c["a"]


def _set_attribute(c: Dict[str, Any], s: State) -> None:
    c["state_dict"]["bias"].note = "an attribute makes torch.save pickle the tensor by value"


def _resize_storage(c: Dict[str, Any], s: State) -> None:
    s.big.untyped_storage().resize_(4096)  # same storage object, more bytes: all of it is saved


def _restride_in_place(c: Dict[str, Any], s: State) -> None:
    s.buf.t_()  # the same tensor object: a new stride, nothing else


def _reshape_in_place(c: Dict[str, Any], s: State) -> None:
    s.buf.resize_(8, 32)


def _nested_value(c: Dict[str, Any], s: State) -> None:
    c["hparams"]["betas"][1] = 0.95


def _add_key(c: Dict[str, Any], s: State) -> None:
    c["extra"] = torch.arange(7)


def _remove_key(c: Dict[str, Any], s: State) -> None:
    del c["a"]


def _set(key: str, make: Callable[[State], Any]) -> Callable[[Dict[str, Any], State], None]:
    def change(c: Dict[str, Any], s: State) -> None:
        c[key] = make(s)

    return change


CHANGES: Dict[str, Callable[[Dict[str, Any], State], None]] = {
    "nothing but the step": lambda c, s: None,
    "a non-tensor value deep inside": _nested_value,
    "a key added": _add_key,
    "a key removed": _remove_key,
    "a dtype (same memory)": _set("a", lambda s: s.a.view(torch.int32)),
    "a shape (same memory)": _set("half", lambda s: s.big[:128]),
    "a shape and stride (same memory)": _set("half", lambda s: s.big[:256].view(16, 16)),
    "a stride (same shape, same memory)": _set("square", lambda s: s.square.detach().t()),
    "an offset (same shape, same memory)": _set("half", lambda s: s.big[256:]),
    "a tensor replaced by a copy": _set("a", lambda s: s.a.clone()),
    "two tensors now one storage": _tie,
    "two tensors now one object": _same_object_twice,
    "two views now two storages": _untie,
    "the negative bit": _set("z_imag", lambda s: s.zz.conj().imag),
    "the conjugate bit": _set("z", lambda s: s.z.conj()),
    "requires_grad": _set("a", lambda s: s.a.detach().requires_grad_()),
    "an attribute set on a tensor": _set_attribute,
    "a storage resized in place": _resize_storage,
    "a stride changed in place": _restride_in_place,
    "a shape changed in place": _reshape_in_place,
    "a plain tensor now a parameter": _set("a", lambda s: nn.Parameter(s.a)),
}


@pytest.fixture(params=["guards", "reads"])
def checks(request, monkeypatch) -> str:
    """Both ways a warm save checks the structure: torch's C tensor guards where this torch has
    them, and every attribute read and compared."""
    if request.param == "guards":
        if warm.GUARDS_CLASS is None:
            pytest.skip("this torch has no tensor guards that work as warm.py expects")
    else:
        monkeypatch.setattr(warm, "GUARDS_CLASS", None)
    return request.param


def _checked_as(cache: Any, checks: str) -> None:
    assert isinstance(cache, warm.WarmCache)
    assert (cache.guards is not None) == (checks == "guards")


@pytest.fixture(scope="module")
def engines():
    made: Dict[str, AsyncCheckpointIO] = {}
    yield made
    for io in made.values():
        io.teardown()


def _engine(engines: Dict[str, AsyncCheckpointIO], mode: str) -> AsyncCheckpointIO:
    if mode not in engines:
        options = MODES[mode]
        engines[mode] = AsyncCheckpointIO(writer=options["writer"], staging=options["staging"], max_pending=1)
    return engines[mode]


def _only_slot(io: AsyncCheckpointIO) -> Any:
    slots = io.slot_pool.free_slots()
    assert len(slots) == 1
    return slots[0]


def _tensors(obj: Any, out: List[torch.Tensor]) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            _tensors(value, out)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _tensors(value, out)
    return out


def _plain(obj: Any) -> Any:
    """The loaded checkpoint with each tensor as everything torch.save keeps of it."""
    if isinstance(obj, torch.Tensor):
        return (
            type(obj), obj.dtype, tuple(obj.shape), obj.stride(), obj.storage_offset(), obj.requires_grad,
            obj.is_neg(), obj.is_conj(), obj.untyped_storage().nbytes(), dict(vars(obj)),
            obj.resolve_conj().resolve_neg().tolist(),
        )
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _sharing(obj: Any) -> List[int]:
    """Per tensor, the index of the first tensor on the same storage."""
    ids = [t.untyped_storage()._cdata for t in _tensors(obj, [])]
    return [ids.index(i) for i in ids]


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("mode", list(MODES))
def test_a_changed_structure_is_saved_as_torch_save_writes_it(tmp_path, engines, mode, change, checks):
    io = _engine(engines, mode)
    state = State(MODES[mode]["large"])
    for step in range(3):
        io.save_checkpoint(state.checkpoint(step), os.path.join(tmp_path, f"warm{step}.ckpt"))
        io.flush()
    # The structure repeated: the slot holds what it learned, and the next save checks against it.
    slot = _only_slot(io)
    _checked_as(slot.warm, checks)
    ckpt = state.checkpoint(10)
    CHANGES[change](ckpt, state)
    expected_path = os.path.join(tmp_path, "expected.ckpt")
    with open(expected_path, "wb") as f:  # to a stream, as the writer does: records named "archive/..."
        torch.save(ckpt, f)
    path = os.path.join(tmp_path, "saved.ckpt")
    io.save_checkpoint(ckpt, path)
    io.flush()
    expected, saved = load(expected_path), load(path)
    assert _plain(saved) == _plain(expected)
    assert _sharing(saved) == _sharing(expected)
    with open(path, "rb") as f, open(expected_path, "rb") as g:
        assert f.read() == g.read(), "not the bytes torch.save writes"
    # And the save after it, with the same (changed) structure, is right too.
    io.save_checkpoint(ckpt, path)
    io.flush()
    assert _plain(load(path)) == _plain(expected)


@pytest.mark.parametrize("mode", ["thread-eager", "process-eager"])
def test_one_tensor_object_twice_where_every_tensor_had_a_storage_of_its_own(tmp_path, engines, mode, checks):
    """Where every tensor was on a storage of its own (the common case), the warm pass skips its
    own check for a tensor object met twice: the storage check rules it out (both meetings share
    a storage). The file must still be torch.save's: the object once, referenced twice."""
    io = _engine(engines, mode)
    weights = {k: torch.randn(8) for k in "abcd"}  # alike: only the storage check tells them apart
    for step in range(3):
        io.save_checkpoint({"step": step, **weights}, os.path.join(tmp_path, f"warm{step}.ckpt"))
        io.flush()
    slot = _only_slot(io)
    _checked_as(slot.warm, checks)
    assert slot.warm.one_group_each
    ckpt = {"step": 3, **weights, "c": weights["a"]}  # as many tensors as before, "a" twice
    expected_path = os.path.join(tmp_path, "expected.ckpt")
    with open(expected_path, "wb") as f:
        torch.save(ckpt, f)
    path = os.path.join(tmp_path, "saved.ckpt")
    io.save_checkpoint(ckpt, path)
    io.flush()
    saved = load(path)
    assert saved["c"] is saved["a"]
    with open(path, "rb") as f, open(expected_path, "rb") as g:
        assert f.read() == g.read(), "not the bytes torch.save writes"


@pytest.mark.parametrize("mode", list(MODES))
def test_a_warm_save_reuses_the_slot_and_holds_no_tensor_of_the_user(tmp_path, engines, mode, checks):
    io = _engine(engines, mode)
    state = State(MODES[mode]["large"])
    for step in range(3):
        io.save_checkpoint(state.checkpoint(step), os.path.join(tmp_path, "x.ckpt"))
        io.flush()
    slot = _only_slot(io)
    cache, layout = slot.warm, slot.layout
    _checked_as(cache, checks)
    for step in range(3, 6):
        io.save_checkpoint(state.checkpoint(step), os.path.join(tmp_path, "x.ckpt"))
        io.flush()
        assert slot.warm is cache and slot.layout is layout  # reused, not rebuilt
        assert load(os.path.join(tmp_path, "x.ckpt"))["global_step"] == step
    # Only integers, dtypes and sizes are kept: no reference keeps a user's memory alive.
    user = {t.untyped_storage()._cdata for t in _tensors(state.checkpoint(0), [])}
    kept = [v for values in vars(cache).values() if isinstance(values, list) for v in values]
    assert not [v for v in kept if isinstance(v, torch.Tensor) and v.untyped_storage()._cdata in user]
    assert not [v for v in kept if isinstance(v, torch.UntypedStorage)]


def test_a_structure_that_changes_at_every_save_stops_being_recorded(tmp_path):
    io = AsyncCheckpointIO(writer="thread", max_pending=1)
    try:
        w = torch.randn(8)
        clones = []  # kept alive, so that no clone's storage takes the place of an earlier one
        for step in range(2 * warm.MAX_MISSES + 4):
            clones.append(w.clone())
            io.save_checkpoint({"w": clones[-1], "step": step}, os.path.join(tmp_path, "x.ckpt"))
            io.flush()
        slot = _only_slot(io)
        assert slot.warm is None and slot.warm_misses == warm.MAX_MISSES
        assert load(os.path.join(tmp_path, "x.ckpt"))["step"] == 2 * warm.MAX_MISSES + 3
    finally:
        io.teardown()


@pytest.mark.parametrize("mode", list(MODES))
def test_tensors_that_require_grad_are_reused_too(tmp_path, engines, mode, checks):
    io = _engine(engines, mode)
    state = State(MODES[mode]["large"])
    leaf = torch.randn(16, requires_grad=True)  # a plain tensor that requires grad: staged as one
    for step in range(3):
        io.save_checkpoint({**state.checkpoint(step), "leaf": leaf}, os.path.join(tmp_path, "x.ckpt"))
        io.flush()
    slot = _only_slot(io)
    cache = slot.warm
    _checked_as(cache, checks)
    for step in range(3, 5):
        with torch.no_grad():
            leaf.add_(1.0)
        io.save_checkpoint({**state.checkpoint(step), "leaf": leaf}, os.path.join(tmp_path, "x.ckpt"))
        io.flush()
        assert slot.warm is cache, "the warm save missed"
        saved = load(os.path.join(tmp_path, "x.ckpt"))
        assert saved["leaf"].requires_grad and torch.equal(saved["leaf"], leaf.detach())


def test_the_guards_keep_no_tensor_of_the_user_alive():
    if warm.GUARDS_CLASS is None:
        pytest.skip("this torch has no tensor guards that work as warm.py expects")
    base = torch.randn(64)
    views = [base[:32].view(4, 8), base[32:]]
    guards = warm.tensor_guards(views, [v.size() for v in views], [v.stride() for v in views])
    assert guards is not None
    assert guards.check(base[:32].view(4, 8), base[32:]) is True
    assert guards.check(base[:32].view(8, 4), base[32:]) is False
    alive = weakref.ref(base)
    watched = [weakref.ref(v) for v in views]
    del base, views
    gc.collect()
    assert alive() is None and all(w() is None for w in watched)


class _PassesEverything:
    """A stand-in for a torch whose ``TensorGuards`` has another meaning (fault injection: no
    torch release we can install has one)."""

    def __init__(self, *tensors: Any, **options: Any) -> None:
        pass

    def check(self, *tensors: Any) -> bool:
        return True


def test_a_check_that_does_not_see_changes_is_not_used(monkeypatch):
    assert warm._works(_PassesEverything) is False
    monkeypatch.setattr(warm, "GUARDS_CLASS", None)
    assert warm.tensor_guards([torch.randn(3)], [(3,)], [(1,)]) is None


def test_a_warm_save_of_many_small_tensors_splits_its_copy_and_saves_every_value(tmp_path, checks):
    """Thousands of small tensors: the copy is shared between the helper thread and the caller
    (guards) or left to the helper (reads); every value reaches the file, at every save."""
    io = AsyncCheckpointIO(writer="thread", staging="eager", max_pending=1)
    try:
        params = [torch.full((4,), float(i)) for i in range(2000)]
        path = os.path.join(tmp_path, "many.ckpt")
        for step in range(5):
            for i, p in enumerate(params):
                p.fill_(float(i * 10 + step))
            io.save_checkpoint({"step": step, "params": {str(i): p.view(2, 2) for i, p in enumerate(params)}}, path)
            for p in params:  # after the call: the file must hold the values at the call
                p.fill_(-1.0)
            io.flush()
            saved = load(path)
            assert saved["step"] == step
            assert [int(saved["params"][str(i)][0, 0]) for i in range(2000)] == [i * 10 + step for i in range(2000)]
        _checked_as(_only_slot(io).warm, checks)
    finally:
        io.teardown()


def _lean_cases() -> Dict[str, Any]:
    w = torch.randn(6)
    p = nn.Parameter(torch.randn(3))
    return {
        "plain": {"a": w, "b": torch.randn(2, 2), "n": 3, "s": "x"},
        "one tensor object twice": {"a": w, "b": w, "c": [w, torch.randn(1)]},
        "two views of one storage": {"a": w[:3], "b": w[3:]},
        "a parameter, and its tensor": {"p": p, "d": p.detach()},
        "nested containers": {"l": [(w, {"k": w[:2]}), torch.randn(3)], "t": (1, 2.0, None)},
    }


@pytest.mark.parametrize("case", list(_lean_cases()))
def test_the_lean_pass_gives_what_the_full_pass_gives(case):
    from asyncckpt._staging.skeleton import split, split_lean

    checkpoint = _lean_cases()[case]
    skeleton, tensors = split(checkpoint, "x.ckpt")
    lean = split_lean(checkpoint)
    assert lean is not None
    assert lean[0] == skeleton
    # The same tensors (a parameter's is a fresh ``detach()`` in each pass: the same view).
    def seen(t: torch.Tensor) -> Any:
        return type(t), t.untyped_storage()._cdata, t.shape, t.stride(), t.storage_offset()

    assert [seen(t) for t in lean[1]] == [seen(t) for t in tensors]
    assert len({id(t) for t in lean[1]}) == len(lean[1])


@pytest.mark.parametrize("storage", ["untyped", "typed"])
def test_the_lean_pass_leaves_bare_storages_to_the_full_pass(storage):
    from asyncckpt._staging.skeleton import split_lean

    w = torch.randn(4)
    bare = w.untyped_storage() if storage == "untyped" else torch.TypedStorage(4)
    assert split_lean({"w": w, "storage": bare}) is None
    assert split_lean({"w": w, "nested": [{"storage": bare}]}) is None


def test_an_interrupt_right_after_the_helper_starts_waits_for_its_copy(tmp_path, monkeypatch):
    """A Ctrl-C that lands just after the helper thread started copying into the slot must not
    leave that copy running: the slot goes back to the pool, and the next save would stage into
    it while the stale copy still writes. Fault injection: the interrupt is raised from the
    GIL hand-over (``HelperCopy.hand_over``) and the helper's copy is slowed, since a real
    signal cannot be aimed at that instant."""
    from asyncckpt._staging import copier as copier_module

    if warm.GUARDS_CLASS is None:
        pytest.skip("the copy starts before the checks only with the guards")
    io = AsyncCheckpointIO(writer="thread", staging="eager", max_pending=1)
    try:
        params = [torch.full((4,), float(i)) for i in range(64)]
        path = os.path.join(tmp_path, "x.ckpt")
        for step in range(3):
            io.save_checkpoint({"p": [p.view(2, 2) for p in params], "step": step}, path)
            io.flush()
        assert _only_slot(io).warm is not None and _only_slot(io).warm.runs
        copy_done = threading.Event()
        real_copy = copier_module.copy_runs

        def slow_copy(runs: Any, tensors: Any) -> None:
            time.sleep(0.3)
            real_copy(runs, tensors)
            copy_done.set()

        def interrupt(self: Any) -> None:
            self.started.wait()
            raise KeyboardInterrupt

        monkeypatch.setattr(copier_module, "copy_runs", slow_copy)
        monkeypatch.setattr(copier_module.HelperCopy, "hand_over", interrupt)
        with pytest.raises(KeyboardInterrupt):
            io.save_checkpoint({"p": [p.view(2, 2) for p in params], "step": 3}, path)
        assert copy_done.is_set(), "the call returned while the helper still copied into the slot"
        monkeypatch.undo()
        for p in params:
            p.fill_(-7.0)
        io.save_checkpoint({"p": [p.view(2, 2) for p in params], "step": 4}, path)
        io.flush()
        saved = load(path)
        assert saved["step"] == 4 and all(torch.equal(t, torch.full((2, 2), -7.0)) for t in saved["p"])
    finally:
        io.teardown()


def _packed_state() -> Dict[str, Any]:
    """Small whole tensors of many packing classes: dtypes cat copies by its serial kernel
    (floating) and by its general one (integers, complex, bool is not packed), 0-d scalars,
    rows of several lengths, and bit patterns a value copy could change (a NaN payload, -0.0)."""
    gen = torch.Generator().manual_seed(1)
    payload = torch.tensor([0x7FC12345], dtype=torch.int32).view(torch.float32)  # a NaN with a payload
    state: Dict[str, Any] = {
        "f32": [torch.randn(n, 8, generator=gen) for n in (1, 3, 2, 5)],
        "f32_nan": torch.cat([payload, torch.tensor([-0.0, 1.0])]),
        "f32_rows": [torch.randn(16, generator=gen) for _ in range(6)],
        "f16": [torch.randn(4, 4, generator=gen).half() for _ in range(3)],
        "bf16": [torch.randn(7, generator=gen).bfloat16() for _ in range(3)],
        "f64": [torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(3)],
        "i64": [torch.arange(n) for n in (5, 1, 9)],
        "i8": [torch.arange(-4, 4, dtype=torch.int8) for _ in range(2)],
        "c64": [torch.randn(4, generator=gen, dtype=torch.complex64) for _ in range(2)],
        "bool": [torch.tensor([True, False, True]) for _ in range(2)],
        "steps": [torch.tensor(float(i)) for i in range(5)],
        "int_steps": [torch.tensor(i) for i in range(3)],
    }
    return state


def _trade_rows(state: Dict[str, Any]) -> Dict[str, Any]:
    """Two tensors of one packed run trade a row: the run's total is unchanged, so one cat into it
    succeeds; only the check of each shape tells."""
    changed = dict(state)
    a, b = state["f32"][0], state["f32"][1]  # 1 and 3 rows
    changed["f32"] = [torch.cat([a, b[:1]]), b[1:], *state["f32"][2:]]
    return changed


PACKED_CHANGES = [
    "none", "trade rows", "scalar now a vector", "a run member shared", "a run member transposed",
    "a run member seen as another dtype", "a run member requires grad",
]


@pytest.mark.parametrize("change", PACKED_CHANGES)
@pytest.mark.parametrize("mode", ["thread-eager", "process-eager", "thread-lazy-small"])
def test_packed_runs_are_torch_save_bytes_and_see_every_change(tmp_path, engines, mode, change, checks):
    io = _engine(engines, mode)
    state = _packed_state()
    path = os.path.join(tmp_path, "x.ckpt")
    for step in range(3):
        io.save_checkpoint({"step": step, **state}, path)
        io.flush()
    slot = _only_slot(io)
    _checked_as(slot.warm, checks)
    assert len(slot.warm.runs) >= 8, "the small tensors were not packed into runs"
    ckpt: Dict[str, Any] = {"step": 3, **state}
    if change == "trade rows":
        ckpt = {"step": 3, **_trade_rows(state)}
    elif change == "scalar now a vector":
        ckpt["steps"] = [*state["steps"][:2], state["steps"][2].view(1), *state["steps"][3:]]
    elif change == "a run member shared":
        ckpt["f64"] = [state["f64"][0], state["f64"][0][:], state["f64"][2]]
    elif change == "a run member transposed":  # the same storage, shape and dtype: a cat takes it
        ckpt["f16"] = [state["f16"][0], state["f16"][1].t(), state["f16"][2]]
    elif change == "a run member seen as another dtype":  # a cat into the run would convert it
        ckpt["f32_rows"] = [*state["f32_rows"][:2], state["f32_rows"][2].view(torch.int32), *state["f32_rows"][3:]]
    elif change == "a run member requires grad":
        ckpt["f64"] = [state["f64"][0], state["f64"][1].detach().requires_grad_(), state["f64"][2]]
    expected_path = os.path.join(tmp_path, "expected.ckpt")
    with open(expected_path, "wb") as f:
        torch.save(ckpt, f)
    io.save_checkpoint(ckpt, path)
    if change == "none":
        assert slot.warm is not None, "an unchanged structure missed the warm path"
    for tensors in state.values():  # after the call: the file must hold the values at the call
        for t in tensors if isinstance(tensors, list) else [tensors]:
            t.zero_()
    io.flush()
    with open(path, "rb") as f, open(expected_path, "rb") as g:
        assert f.read() == g.read(), "not the bytes torch.save writes"
    assert _sharing(load(path)) == _sharing(load(expected_path))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "where", ["cold-submit", "cold-wait", "cold-before-submit", "warm-submit", "warm-wait", "warm-before-submit"]
)
def test_a_save_interrupted_while_a_helper_thread_copies_returns_only_once_that_copy_ended(
    tmp_path, monkeypatch, where
):
    """Staging shares the copy with helper threads (packed runs on a warm save, byte ranges of
    a large one); a Ctrl-C as a share is handed to a helper, or as the caller starts to wait
    for it, must not end the call before the helper's copy did (or leave a share to start
    later): the engine gives the call's slot back as the exception leaves it, and the next save
    stages into that memory. Before, the share handed over as the interrupt came was not
    waited for, and an interrupt as the wait started skipped it. (Fault injection: the
    KeyboardInterrupt is raised where Ctrl-C's handler can run, as ``submit`` starts or returns
    or as the wait starts, and the helper's copy is slowed by 0.3 s.) A share never handed over
    must not be waited for either: the first version of this fix waited for ever (found by
    the signal-point sweep)."""
    from asyncckpt import _threads
    from asyncckpt._staging import copier

    ended: List[float] = []

    def slowed(original: Callable[..., None]) -> Callable[..., None]:
        def copy(*args: Any) -> None:
            if threading.current_thread() is not threading.main_thread():  # a helper's share
                time.sleep(0.3)
                original(*args)
                ended.append(time.monotonic())
            else:
                original(*args)

        return copy

    state = {
        "small": [torch.full((1000,), float(i)) for i in range(64)],  # packed runs when warm
        "big": torch.ones(3 * 1024 * 1024),  # 12 MiB: shared out in byte ranges
    }
    engine = AsyncCheckpointIO(max_pending=1, staging_threads=2, handle_sigterm=False)
    try:
        if where.startswith("warm"):
            for _ in range(2):
                engine.save_checkpoint(state, tmp_path / "warm.ckpt")
                engine.flush()
        monkeypatch.setattr(copier, "memmove_pairs", slowed(copier.memmove_pairs))
        monkeypatch.setattr(copier, "copy_runs", slowed(copier.copy_runs))
        armed = [True]
        if where.endswith("submit"):
            submit = _threads.ThreadPool.submit

            def submit_then_interrupted(self: Any, *args: Any, **kwargs: Any) -> Any:
                # before-submit: as ``submit`` starts, the share not handed over (it must
                # not be waited for: nothing would ever run it)
                if where.endswith("before-submit") and (armed.pop() if armed else False):
                    raise KeyboardInterrupt
                future = submit(self, *args, **kwargs)
                if armed.pop() if armed else False:
                    raise KeyboardInterrupt
                return future

            monkeypatch.setattr(_threads.ThreadPool, "submit", submit_then_interrupted)
        else:
            wait_all = copier._wait_all

            def interrupted_as_the_wait_starts(futures: Any) -> None:
                if armed.pop() if armed else False:
                    raise KeyboardInterrupt
                wait_all(futures)

            monkeypatch.setattr(copier, "_wait_all", interrupted_as_the_wait_starts)
        with pytest.raises(KeyboardInterrupt):
            engine.save_checkpoint(state, tmp_path / "interrupted.ckpt")
        returned = time.monotonic()
        assert not armed, "the interrupt was not injected: no helper thread took a share"
        time.sleep(0.6)  # a share still running (or queued) would end by now
        # (a share not started when the call failed never runs: nothing to wait for)
        assert all(t <= returned for t in ended), "the call returned while a helper still copied into its slot"
        monkeypatch.undo()
        state["big"].fill_(2.0)
        engine.save_checkpoint(state, tmp_path / "next.ckpt")
        engine.flush()
        saved = load(tmp_path / "next.ckpt")
        assert torch.equal(saved["big"], state["big"]) and all(
            torch.equal(a, b) for a, b in zip(saved["small"], state["small"], strict=True)
        )
    finally:
        engine.teardown()
