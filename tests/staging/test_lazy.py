"""Lazy staging (``staging="lazy"``): the file holds the checkpoint at the call, or the save fails
loudly naming the tensor; never anything else.

Real torch optimizers, real files. Where a test needs the background copy to still be running
while the training loop goes on, the copy is held on a ``threading.Event`` (fault injection: a
copy slower than the next step cannot be produced on demand on a shared machine).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import threading
import time
from typing import Any, Dict, Iterator, List

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from asyncckpt import AsyncCheckpointIO, CheckpointSaveError
from asyncckpt import lazy as lazy_mod
from asyncckpt._staging import copier
from asyncckpt.lazy import EAGER_MAX_BYTES, TensorModifiedError, key_paths

WIDTH = 192  # 192x192 fp32 = 144 KiB: above EAGER_MAX_BYTES, so copied lazily


def _model(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: List[nn.Module] = [nn.Linear(WIDTH, WIDTH)]
    if bn:
        layers.append(nn.BatchNorm1d(WIDTH))
    layers += [nn.Tanh(), nn.Linear(WIDTH, WIDTH)]
    return nn.Sequential(*layers)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int = 1) -> None:
    x = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def _checkpoint(model: nn.Module, opt: torch.optim.Optimizer, step: int = 0) -> Dict[str, Any]:
    return {"step": step, "state_dict": model.state_dict(), "optimizer": opt.state_dict()}


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"values differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture
def io() -> Iterator[AsyncCheckpointIO]:
    engine = AsyncCheckpointIO(staging="lazy", handle_sigterm=False)
    yield engine
    try:
        engine.teardown()
    except CheckpointSaveError:
        pass


@pytest.fixture
def held_copy(monkeypatch):
    """Fault injection: the background copy starts only once the test sets the event."""
    release = threading.Event()
    started = threading.Event()
    original = copier.memmove_pairs

    def held(dst, src):
        started.set()
        assert release.wait(30), "the test never released the held copy"
        original(dst, src)

    monkeypatch.setattr(copier, "memmove_pairs", held)
    yield release
    release.set()


def _optimizers() -> List[Any]:
    cases = []
    for name in ("SGD", "Adam", "AdamW"):
        for impl in ("foreach", "fused", "for-loop"):
            cases.append(pytest.param(name, impl, id=f"{name}-{impl}"))
    return cases


def _make_optimizer(name: str, impl: str, params: Any) -> torch.optim.Optimizer:
    kwargs: Dict[str, Any] = {"lr": 0.05}
    if name == "SGD":
        kwargs["momentum"] = 0.9
    if impl == "foreach":
        kwargs["foreach"] = True
    elif impl == "fused":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = False
    try:
        return getattr(torch.optim, name)(params, **kwargs)
    except (RuntimeError, ValueError, TypeError) as err:  # fused not available for this build/device
        pytest.skip(f"{name}({impl}) not available here: {err}")


# -- point in time under the guards -------------------------------------------------------------


@pytest.mark.parametrize("name,impl", _optimizers())
def test_optimizer_steps_right_after_the_call_never_reach_the_file(io, tmp_path, name, impl):
    model = _model(bn=True)
    opt = _make_optimizer(name, impl, model.parameters())
    _train_step(model, opt)
    state = _checkpoint(model, opt, step=1)
    expected = copy.deepcopy(state)
    io.save_checkpoint(state, tmp_path / "a.ckpt")
    for seed in range(2, 5):  # forward (BatchNorm statistics change), backward, step: at once
        _train_step(model, opt, seed)
    io.flush()
    _assert_same(torch.load(tmp_path / "a.ckpt", weights_only=False), expected)
    # and the training did move on: the file is not just the live state
    assert not torch.equal(model[0].weight, expected["state_dict"]["0.weight"])


@pytest.mark.parametrize("name,impl", _optimizers())
def test_optimizer_step_waits_for_a_copy_still_running(io, tmp_path, held_copy, name, impl):
    model = _model()
    opt = _make_optimizer(name, impl, model.parameters())
    _train_step(model, opt)
    expected = copy.deepcopy(_checkpoint(model, opt))
    io.save_checkpoint(_checkpoint(model, opt), tmp_path / "a.ckpt")
    x = torch.randn(8, WIDTH)
    opt.zero_grad()
    model(x).square().mean().backward()  # forward and backward run while the copy is held
    stepped = threading.Event()
    worker = threading.Thread(target=lambda: (opt.step(), stepped.set()))
    worker.start()
    time.sleep(0.2)
    assert not stepped.is_set(), "optimizer.step() ran while the lazy copy was still in progress"
    assert torch.equal(model[0].weight, expected["state_dict"]["0.weight"])
    held_copy.set()
    worker.join(30)
    assert stepped.is_set()
    io.flush()
    _assert_same(torch.load(tmp_path / "a.ckpt", weights_only=False), expected)


def test_a_closure_still_overlaps_the_copy_with_torch_optimizers(io, tmp_path, held_copy):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_step(model, opt)
    expected = copy.deepcopy(_checkpoint(model, opt))
    io.save_checkpoint(_checkpoint(model, opt), tmp_path / "a.ckpt")
    closure_done = threading.Event()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(torch.randn(8, WIDTH)).square().mean()
        loss.backward()
        closure_done.set()
        return loss

    worker = threading.Thread(target=opt.step, args=(closure,))
    worker.start()
    assert closure_done.wait(10), "the closure (forward + backward) should run while the copy runs"
    time.sleep(0.1)
    assert torch.equal(model[0].weight, expected["state_dict"]["0.weight"]), "the update ran before the copy ended"
    held_copy.set()
    worker.join(30)
    io.flush()
    _assert_same(torch.load(tmp_path / "a.ckpt", weights_only=False), expected)


def test_an_unknown_optimizer_waits_before_its_closure(io, tmp_path, held_copy):
    class PerturbFirst(torch.optim.Optimizer):
        """Modifies the parameters before it evaluates the closure (as SAM does)."""

        def __init__(self, params: Any) -> None:
            super().__init__(params, {})

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(1.0)
            with torch.enable_grad():
                return closure()

    model = _model()
    opt = PerturbFirst(model.parameters())
    expected = copy.deepcopy(model.state_dict())
    io.save_checkpoint({"state_dict": model.state_dict()}, tmp_path / "a.ckpt")
    worker = threading.Thread(target=opt.step, args=(lambda: model(torch.randn(2, WIDTH)).sum(),))
    worker.start()
    time.sleep(0.2)
    assert torch.equal(model[0].weight, expected["0.weight"]), "a custom optimizer stepped before the copy ended"
    held_copy.set()
    worker.join(30)
    io.flush()
    _assert_same(torch.load(tmp_path / "a.ckpt")["state_dict"], expected)


def test_every_engine_with_a_copy_in_progress_is_waited_for(tmp_path, held_copy):
    engines = [AsyncCheckpointIO(staging="lazy", handle_sigterm=False) for _ in range(2)]
    try:
        models = [_model(), _model()]
        expected = [copy.deepcopy(m.state_dict()) for m in models]
        for engine, model, name in zip(engines, models, "ab", strict=True):
            engine.save_checkpoint({"state_dict": model.state_dict()}, tmp_path / f"{name}.ckpt")
        opt = torch.optim.SGD([p for m in models for p in m.parameters()], lr=0.1)
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        worker = threading.Thread(target=opt.step)
        worker.start()
        time.sleep(0.2)
        assert all(torch.equal(m[0].weight, e["0.weight"]) for m, e in zip(models, expected, strict=True))
        held_copy.set()
        worker.join(30)
        for engine, name, exp in zip(engines, "ab", expected, strict=True):
            engine.flush()
            _assert_same(torch.load(tmp_path / f"{name}.ckpt")["state_dict"], exp)
    finally:
        for engine in engines:
            engine.teardown()


def test_wait_staged_makes_any_modification_safe(io, tmp_path, held_copy):
    model = _model()
    expected = copy.deepcopy(model.state_dict())
    io.save_checkpoint({"state_dict": model.state_dict()}, tmp_path / "a.ckpt")
    threading.Timer(0.1, held_copy.set).start()
    io.wait_staged()
    with torch.no_grad():
        model[0].weight.mul_(2)
        model[0].weight.data.add_(1)  # even the modification version counters cannot see
    io.flush()
    _assert_same(torch.load(tmp_path / "a.ckpt")["state_dict"], expected)


def test_a_tensor_rebound_to_other_memory_after_the_call_is_copied_from_its_memory_at_the_call(
    io, tmp_path, held_copy
):
    """Found by attack: ``tensor.data = other`` (an EMA swap, a weight-tying helper) rebinds a
    tensor to other memory without touching its old memory or its version counter. The lazy
    copy read the tensor as it was when it ran, so the file silently held the new values; it
    now copies the memory the tensor had at the call, which nothing changed."""
    big = torch.arange(float(WIDTH * WIDTH)).view(WIDTH, WIDTH)  # over EAGER_MAX_BYTES: copied lazily
    assert big.numel() * 4 > EAGER_MAX_BYTES
    state = {"big": big}
    io.save_checkpoint({"warm": torch.zeros(1)}, tmp_path / "warm.ckpt")  # the next save is not the first
    io.save_checkpoint(state, tmp_path / "a.ckpt")
    big.data = torch.full((WIDTH, WIDTH), -1.0)  # before the held copy runs
    held_copy.set()
    io.flush()
    assert torch.equal(torch.load(tmp_path / "a.ckpt")["big"], torch.arange(float(WIDTH * WIDTH)).view(WIDTH, WIDTH))


def test_small_buffers_mutated_by_a_forward_are_copied_at_the_call(io, tmp_path, held_copy):
    model = _model(bn=True)
    expected = copy.deepcopy(model.state_dict())
    io.save_checkpoint({"state_dict": model.state_dict()}, tmp_path / "a.ckpt")
    model(torch.randn(8, WIDTH))  # train-mode forward: running statistics change in place
    assert not torch.equal(model[1].running_mean, expected["1.running_mean"])
    held_copy.set()
    io.flush()
    _assert_same(torch.load(tmp_path / "a.ckpt")["state_dict"], expected)


@pytest.mark.parametrize("wrap", ["state_dict", "module"])
def test_running_statistics_of_a_batchnorm_wider_than_the_small_tensor_rule_are_copied_at_the_call(
    io, tmp_path, held_copy, wrap
):
    """Found by attack: a ``BatchNorm1d(32768)`` has 128 KiB of running statistics, over
    ``EAGER_MAX_BYTES``, so they were copied lazily; a train-mode forward right after the call
    updates them without bumping their version counters, and the new values reached the file
    unnoticed. Tensors whose key ends in ``running_mean``/``running_var`` are copied at the call."""
    wide = 32768
    bn = nn.BatchNorm1d(wide)
    bn(torch.randn(4, wide))
    assert bn.running_mean.numel() * 4 > EAGER_MAX_BYTES
    state = {"state_dict": bn.state_dict()} if wrap == "state_dict" else {"model": bn}
    io.save_checkpoint({"warm": torch.zeros(1)}, tmp_path / "warm.ckpt")
    expected = {k: v.clone() for k, v in bn.state_dict().items()}
    io.save_checkpoint(state, tmp_path / "a.ckpt")
    bn(torch.randn(4, wide))  # train-mode forward: the statistics change in place, unseen by versions
    held_copy.set()
    io.flush()
    out = torch.load(tmp_path / "a.ckpt", weights_only=False)
    saved = out["state_dict"] if wrap == "state_dict" else out["model"].state_dict()
    assert torch.equal(saved["running_mean"], expected["running_mean"])
    assert torch.equal(saved["running_var"], expected["running_var"])


def test_batchnorm_statistics_are_invisible_to_version_counters():
    """Why the small-tensor rule exists: if torch ever bumps these, the rule can be revisited."""
    bn = nn.BatchNorm1d(WIDTH)
    before = bn.running_mean._version
    bn(torch.randn(4, WIDTH))
    assert bn.running_mean._version == before
    assert bn.running_mean.numel() * 4 <= EAGER_MAX_BYTES


def test_tensors_without_version_counters_are_copied_at_the_call(io, tmp_path):
    with torch.inference_mode():
        frozen = torch.randn(WIDTH, WIDTH)
    expected = frozen.clone()
    io.save_checkpoint({"frozen": frozen}, tmp_path / "a.ckpt")
    with torch.inference_mode():
        frozen.add_(1)
    io.flush()
    assert torch.equal(torch.load(tmp_path / "a.ckpt")["frozen"], expected)


# -- loud when a guard is bypassed ---------------------------------------------------------------


def test_a_modification_outside_the_guards_fails_that_save_naming_the_tensor(io, tmp_path):
    model = _model()
    old = {"old": torch.ones(3)}
    io.save_checkpoint(old, tmp_path / "a.ckpt")
    io.flush()
    io.save_checkpoint({"epoch": 3, "state_dict": model.state_dict()}, tmp_path / "a.ckpt")
    with torch.no_grad():
        model[2].weight.mul_(2)
    with pytest.raises(TensorModifiedError) as info:
        io.flush()
    message = str(info.value)
    assert info.value.key == "state_dict.2.weight"
    assert "state_dict.2.weight" in message and "a.ckpt" in message
    assert "wait_staged()" in message and "staging='eager'" in message
    assert isinstance(info.value, CheckpointSaveError)
    _assert_same(torch.load(tmp_path / "a.ckpt"), old)  # the earlier file was not replaced
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]  # no temp file either
    io.flush()  # raised once
    io.save_checkpoint({"state_dict": model.state_dict()}, tmp_path / "b.ckpt")
    io.flush()  # and the engine goes on
    assert os.path.exists(tmp_path / "b.ckpt")


def test_the_key_path_names_optimizer_state_too(io, tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    _train_step(model, opt)
    io.save_checkpoint({"optimizer_states": [opt.state_dict()]}, tmp_path / "a.ckpt")
    with torch.no_grad():
        opt.state[model[0].weight]["exp_avg"].zero_()
    with pytest.raises(TensorModifiedError, match=r"optimizer_states\[0\]\.state\.0\.exp_avg"):
        io.flush()
    assert not os.path.exists(tmp_path / "a.ckpt")


class Holder:
    def __init__(self) -> None:
        self.inner = {"w": torch.zeros(2)}


def test_key_paths_of_nested_containers_and_objects():
    from asyncckpt._staging.skeleton import split

    obj = {"a": [torch.zeros(1), (torch.zeros(1), {"b": torch.zeros(1)})], "h": Holder()}
    skeleton, tensors = split(obj, "x")
    assert key_paths(skeleton, len(tensors), range(len(tensors))) == {
        0: "a[0]",
        1: "a[1][0]",
        2: "a[1][1].b",
        3: "h.inner.w",
    }


def test_staging_option_is_checked_and_kept():
    with pytest.raises(ValueError, match="staging"):
        AsyncCheckpointIO(staging="later", handle_sigterm=False)
    with pytest.raises(ValueError, match="writer='thread'"):
        AsyncCheckpointIO(staging="lazy", writer="process", handle_sigterm=False)
    engine = AsyncCheckpointIO(staging="lazy", handle_sigterm=False)
    assert engine.options()["staging"] == "lazy"
    assert AsyncCheckpointIO(**engine.options()).staging == "lazy"


def test_teardown_waits_for_the_copy_before_freeing_its_buffers(tmp_path, held_copy):
    engine = AsyncCheckpointIO(staging="lazy", handle_sigterm=False)
    model = _model()
    expected = copy.deepcopy(model.state_dict())
    engine.save_checkpoint({"state_dict": model.state_dict()}, tmp_path / "a.ckpt")
    threading.Timer(0.2, held_copy.set).start()
    engine.teardown()
    _assert_same(torch.load(tmp_path / "a.ckpt")["state_dict"], expected)


def test_load_right_after_a_lazy_save(io, tmp_path):
    model = _model()
    expected = copy.deepcopy(model.state_dict())
    io.save_checkpoint({"state_dict": model.state_dict()}, tmp_path / "a.ckpt")
    _assert_same(io.load_checkpoint(tmp_path / "a.ckpt")["state_dict"], expected)


def test_views_and_shared_storage_under_lazy_staging(io, tmp_path):
    base = torch.randn(4 * WIDTH * WIDTH)
    state = {"base": base, "view": base[10:].view(-1, 2)[:, 1], "t": base.view(4, -1).t()}
    expected = copy.deepcopy(state)
    io.save_checkpoint(state, tmp_path / "a.ckpt")
    io.flush()
    got = torch.load(tmp_path / "a.ckpt")
    _assert_same(got, expected)
    assert got["view"].untyped_storage().data_ptr() == got["base"].untyped_storage().data_ptr()
    assert got["t"].stride() == expected["t"].stride()


def test_data_writes_inside_an_optimizer_step_are_covered_by_the_hook(io, tmp_path, held_copy):
    """``p.data`` writes bypass version counters; inside ``step()`` the hook still covers them."""

    class OldStyleSGD(torch.optim.Optimizer):
        def __init__(self, params: Any) -> None:
            super().__init__(params, {"lr": 0.1})

        def step(self, closure: Any = None) -> None:
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.add_(p.grad.data, alpha=-group["lr"])

    model = _model()
    opt = OldStyleSGD(model.parameters())
    _train_step(model, opt)
    expected = copy.deepcopy(model.state_dict())
    io.save_checkpoint({"state_dict": model.state_dict()}, tmp_path / "a.ckpt")
    threading.Timer(0.1, held_copy.set).start()
    _train_step(model, opt, seed=2)
    io.flush()
    _assert_same(torch.load(tmp_path / "a.ckpt")["state_dict"], expected)


# -- random moments --------------------------------------------------------------------------------

_ACTIONS = st.one_of(
    st.tuples(st.just("sleep"), st.integers(0, 2000)),
    st.tuples(st.just("step")),
    st.tuples(st.just("forward")),
    st.tuples(st.just("wait_staged")),
    st.tuples(st.just("mutate"), st.sampled_from(["0.weight", "3.weight", "1.running_var"]), st.booleans()),
)


class _Rig:
    """One engine, model and optimizer shared by every example (building them costs more than a save)."""

    def __init__(self, folder: str) -> None:
        from asyncckpt import TorchCheckpointIO

        self.folder = folder
        self.io = AsyncCheckpointIO(TorchCheckpointIO(durable=False), staging="lazy", handle_sigterm=False)
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.Tanh(), nn.Linear(512, 512))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.live = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        self.x = torch.randn(4, 512)
        self.count = 0

    def step(self) -> None:
        self.opt.zero_grad()
        self.model(self.x).square().mean().backward()
        self.opt.step()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    rig = _Rig(str(tmp_path_factory.mktemp("lazy-random")))
    rig.step()
    yield rig
    rig.io.teardown()


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(_ACTIONS, min_size=1, max_size=5))
def test_mutations_at_random_moments_are_exact_or_loud(rig, actions):
    rig.count += 1
    path = os.path.join(rig.folder, f"{rig.count}.ckpt")
    state = {"state_dict": rig.model.state_dict(), "optimizer": rig.opt.state_dict()}
    expected = copy.deepcopy(state)
    rig.io.save_checkpoint(state, path)
    guarded = False  # past a guard point: the copy is done and checked
    unguarded: List[str] = []  # lazily copied tensors modified before any guard point
    for action in actions:
        kind = action[0]
        if kind == "sleep":
            time.sleep(action[1] / 1e6)
        elif kind == "step":
            rig.step()
            guarded = True
        elif kind == "forward":
            with torch.no_grad():
                rig.model(rig.x)  # BatchNorm statistics change in place, unseen by version counters
        elif kind == "wait_staged":
            rig.io.wait_staged()
            guarded = True
        else:
            _, name, whole = action
            target = rig.live[name] if whole else rig.live[name][0]  # a view shares the counter
            with torch.no_grad():
                target.mul_(1.5)
            big = rig.live[name].numel() * rig.live[name].element_size() > EAGER_MAX_BYTES
            if big and not guarded:
                unguarded.append(f"state_dict.{name}")
    event("loud" if unguarded else "exact")
    if unguarded:
        with pytest.raises(TensorModifiedError) as info:
            rig.io.flush()
        assert info.value.key in unguarded
        assert not os.path.exists(path)
    else:
        rig.io.flush()
        _assert_same(torch.load(path, weights_only=False), expected)
        os.unlink(path)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_wait_for_the_parents_copy(io, tmp_path, held_copy):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    io.save_checkpoint({"state_dict": model.state_dict()}, tmp_path / "a.ckpt")
    pid = os.fork()
    if pid == 0:  # the child steps its own copy of the model: the parent's copy is not its to wait for
        code = 1
        try:
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            opt.step()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in optimizer.step() on the parent's lazy copy")
    assert os.waitstatus_to_exitcode(status) == 0
    held_copy.set()
    io.flush()


# -- exit and SIGTERM: the drain is a guard point ----------------------------------------------

_EXIT_SCRIPT = """
import os, sys, time, signal
import torch
from asyncckpt import AsyncCheckpointIO
from _slow_disk import SlowDiskIO  # fault injection: a slow disk, so saves are pending
from _subproc import idle  # sleeps in slices, so the signal's handler runs at once
io = AsyncCheckpointIO(SlowDiskIO(0.3), max_pending=2, staging="lazy")
for i in range(2):
    io.save_checkpoint({"i": i, "w": torch.full((100_000,), float(i))}, os.path.join(sys.argv[1], f"{i}.ckpt"))
print("ready", flush=True)
if sys.argv[2] == "sleep":
    idle(120)
"""


@pytest.mark.parametrize("how", ["exit", "sigterm"])
def test_lazy_saves_pending_at_exit_or_sigterm_are_verified_and_written(tmp_path, how):
    import signal

    from _subproc import finish, start_python

    script = tmp_path / "script.py"
    script.write_text(_EXIT_SCRIPT)
    proc = start_python(script, tmp_path, "sleep" if how == "sigterm" else "exit")
    assert proc.stdout.readline().strip() == "ready"
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    _, err = finish(proc, 120)
    assert proc.returncode == (-signal.SIGTERM if how == "sigterm" else 0), err
    for i in range(2):
        got = torch.load(tmp_path / f"{i}.ckpt", weights_only=True)
        assert got["i"] == i and torch.equal(got["w"], torch.full((100_000,), float(i)))
    assert "pending" in err


def test_async_api_under_lazy_staging(tmp_path):
    import anyio

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_step(model, opt)
    expected = copy.deepcopy(model.state_dict())

    async def main() -> None:
        async with AsyncCheckpointIO(staging="lazy", handle_sigterm=False) as engine:
            await engine.asave_checkpoint({"state_dict": model.state_dict()}, tmp_path / "a.ckpt")
            _train_step(model, opt, seed=3)  # the step hook waits for the copy
            await engine.aflush()
            loaded = await engine.aload_checkpoint(tmp_path / "a.ckpt")
            _assert_same(loaded["state_dict"], expected)
            await engine.asave_checkpoint({"state_dict": model.state_dict()}, tmp_path / "b.ckpt")
            with torch.no_grad():
                model[0].weight.add_(1)
            with pytest.raises(TensorModifiedError):
                await engine.aflush()

    anyio.run(main)
    assert not os.path.exists(tmp_path / "b.ckpt")


# -- parameters: watched through the counter that in-place changes bump ------------------------


def _parameter_checkpoint(model: nn.Module, form: str) -> Dict[str, Any]:
    if form == "module":
        return {"epoch": 1, "model": model}
    if form == "keep_vars":
        return {"epoch": 1, "state_dict": model.state_dict(keep_vars=True)}
    return {"epoch": 1, "params": list(model.parameters())}


_PARAMETER_KEYS = {"module": "model.2.weight", "keep_vars": "state_dict.2.weight", "params": "params[2]"}


def _change_in_place(model: nn.Module, how: str) -> None:
    """Ways a training loop changes a parameter outside an optimizer step."""
    weight = model[2].weight
    if how == "no_grad_zero":
        with torch.no_grad():
            weight.zero_()
    elif how == "ema":
        with torch.no_grad():
            weight.mul_(0.5).add_(torch.ones_like(weight), alpha=0.5)
    elif how == "clip":
        with torch.no_grad():
            weight.clamp_(-1e-4, 1e-4)
    else:  # load_state_dict copies into the parameters in place
        model[2].load_state_dict({k: torch.zeros_like(v) for k, v in model[2].state_dict().items()})


@pytest.mark.parametrize("how", ["no_grad_zero", "ema", "clip", "load_state_dict"])
@pytest.mark.parametrize("form", ["module", "keep_vars", "params"])
def test_a_parameter_changed_in_place_after_a_lazy_save_fails_that_save(io, tmp_path, held_copy, form, how):
    """A checkpoint holding the parameters themselves (a whole module, ``keep_vars=True``) is
    watched like one holding ``state_dict()``'s tensors: the change is caught, never written."""
    model = _model()
    io.save_checkpoint(_parameter_checkpoint(model, form), tmp_path / "a.ckpt")
    _change_in_place(model, how)
    held_copy.set()  # the copy runs after the change: without the check, the file would hold it
    with pytest.raises(TensorModifiedError) as info:
        io.flush()
    assert info.value.key == _PARAMETER_KEYS[form]
    assert _PARAMETER_KEYS[form] in str(info.value)
    assert not os.path.exists(tmp_path / "a.ckpt")
    assert os.listdir(tmp_path) == []  # no temp file either


@pytest.mark.parametrize("form", ["module", "keep_vars", "params"])
@pytest.mark.parametrize("staging", ["eager", "lazy"])
def test_parameters_saved_then_changed_in_place_are_exact_or_loud(tmp_path, writer, staging, form):
    """Both writers, both staging modes: a file with parameters holds them as at the call, as
    parameters (``torch.save``'s form), or (lazy only) the save fails loudly; never the change."""
    if staging == "lazy" and writer == "process":
        pytest.skip("staging='lazy' works with writer='thread' only")
    model = _model()
    expected = copy.deepcopy(_parameter_checkpoint(model, form))
    engine = AsyncCheckpointIO(writer=writer, staging=staging, handle_sigterm=False)
    try:
        engine.save_checkpoint(_parameter_checkpoint(model, form), tmp_path / "a.ckpt")
        _change_in_place(model, "no_grad_zero")
        try:
            engine.flush()
        except TensorModifiedError:
            assert staging == "lazy"
            assert not os.path.exists(tmp_path / "a.ckpt")
            return
    finally:
        engine.teardown()
    got = torch.load(tmp_path / "a.ckpt", weights_only=False)
    if form == "module":
        _assert_same(got["model"].state_dict(), expected["model"].state_dict())
        assert all(type(p) is nn.Parameter for p in got["model"].parameters())
    else:
        _assert_same(got, expected)
        values = got["state_dict"].values() if form == "keep_vars" else got["params"]
        assert all(type(p) is nn.Parameter and p.requires_grad for p in values)


def test_key_paths_name_the_parameters_of_a_module():
    from asyncckpt._staging.skeleton import split

    model = _model()
    skeleton, tensors = split({"model": model, "keep": model.state_dict(keep_vars=True)}, "x")
    names = set(key_paths(skeleton, len(tensors), range(len(tensors))).values())
    assert {"model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"} <= names


# -- several threads saving lazily at once ------------------------------------------------------

_THREADS = 4


@contextlib.contextmanager
def _switching_often() -> Iterator[None]:
    """Switch threads every 10 us, so concurrent saves interleave inside staging."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _save_at_once(engine: AsyncCheckpointIO, jobs: List[Any]) -> None:
    """Each of ``jobs`` (checkpoint, path) saved from its own thread, all released together."""
    barrier = threading.Barrier(len(jobs))
    errors: List[BaseException] = []

    def save(checkpoint: Any, path: Any) -> None:
        try:
            barrier.wait()
            engine.save_checkpoint(checkpoint, path)
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            errors.append(err)

    threads = [threading.Thread(target=save, args=job) for job in jobs]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a save_checkpoint call hung"
    assert not errors, errors


def _rounds_of_lazy_saves_from_threads_at_once(tmp_path, rounds: int, max_pending: int) -> None:
    """``rounds`` times: ``_THREADS`` threads save lazily at once, then ``flush`` (no optimizer
    step runs: the engine alone must finish every copy); every file holds its own state."""
    for attempt in range(rounds):
        engine = AsyncCheckpointIO(staging="lazy", max_pending=max_pending, handle_sigterm=False)
        states = [{"i": i, "w": torch.full((WIDTH, WIDTH), float(attempt * 10 + i))} for i in range(_THREADS)]
        paths = [tmp_path / f"{attempt}-{i}.ckpt" for i in range(_THREADS)]
        try:
            with _switching_often():
                _save_at_once(engine, list(zip(states, paths, strict=True)))
            engine.flush(timeout=30)
        finally:
            lazy_mod.finish_all()  # a copy or save left waiting: let it go, so teardown returns
            engine.teardown()
        for state, path in zip(states, paths, strict=True):
            _assert_same(torch.load(path, weights_only=True), state, str(path))


def test_lazy_saves_from_several_threads_at_once_are_all_finished_and_written(tmp_path):
    _rounds_of_lazy_saves_from_threads_at_once(tmp_path, rounds=15, max_pending=_THREADS)


_THREADS_EXIT_SCRIPT = """
import os, sys, threading
import torch
from asyncckpt import AsyncCheckpointIO
sys.setswitchinterval(1e-5)
engines = []
for round in range(5):
    io = AsyncCheckpointIO(max_pending=2, staging="lazy", exit_timeout=20)
    engines.append(io)
    barrier = threading.Barrier(2)
    def save(i, io=io, round=round, barrier=barrier):
        barrier.wait()
        w = torch.full((100_000,), float(round * 10 + i))
        io.save_checkpoint({"i": i, "w": w}, os.path.join(sys.argv[1], f"{round}-{i}.ckpt"))
    threads = [threading.Thread(target=save, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
print("ready", flush=True)
"""


def test_lazy_saves_from_two_threads_pending_at_exit_are_all_written(tmp_path):

    from _subproc import run_python

    script = tmp_path / "script.py"
    script.write_text(_THREADS_EXIT_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    proc = run_python(script, out, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ready"
    assert "not all written" not in proc.stderr, proc.stderr
    for round_ in range(5):
        for i in range(2):
            got = torch.load(out / f"{round_}-{i}.ckpt", weights_only=True)
            assert got["i"] == i and torch.equal(got["w"], torch.full((100_000,), float(round_ * 10 + i)))


@pytest.mark.parametrize("max_pending", [1, 2])
def test_lazy_saves_from_more_threads_than_slots_never_wait_for_each_other_forever(tmp_path, max_pending):
    """A save waiting for a slot held by another thread's unverified copy finishes that copy
    itself: the writer frees the slot only once a guard has verified it."""
    _rounds_of_lazy_saves_from_threads_at_once(tmp_path, rounds=10, max_pending=max_pending)

def test_teardown_on_one_thread_finishes_a_lazy_save_another_thread_made_while_it_waited(tmp_path, gated_io):
    """A teardown waiting for a write while another thread saves lazily: the writer it stops
    waits for that save's copy to be verified, and no later guard point may come (the other
    thread's training ended). Teardown is a guard point for every save its writer holds."""
    engine = AsyncCheckpointIO(gated_io, staging="lazy", max_pending=2, handle_sigterm=False)
    gated_io.gate.clear()
    engine.save_checkpoint({"w": torch.full((WIDTH, WIDTH), 1.0)}, tmp_path / "first.ckpt")
    engine.wait_staged()
    assert gated_io.started.wait(30)  # the writer is inside the first write, held
    errors: List[BaseException] = []

    def teardown() -> None:
        try:
            engine.teardown()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    closer = threading.Thread(target=teardown, daemon=True)
    closer.start()
    time.sleep(0.3)  # teardown is waiting for the first write (were it slower, this would not fail)
    second = {"w": torch.full((WIDTH, WIDTH), 2.0)}
    engine.save_checkpoint(second, tmp_path / "second.ckpt")  # lazily, while teardown waits
    gated_io.gate.set()
    closer.join(20)
    hung = closer.is_alive()
    if hung:
        engine.wait_staged()  # unblock the writer so that the thread ends
        closer.join(20)
    assert not hung, "teardown hung: its writer waited for a lazy copy that no guard point finished"
    assert not errors, errors
    engine.flush()
    _assert_same(torch.load(tmp_path / "second.ckpt", weights_only=True), second)
    engine.teardown()


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_a_save_interrupted_before_its_lazy_copy_was_listed_copies_nothing_into_the_given_back_slot(
    tmp_path, gated_io, monkeypatch
):
    """Ctrl-C just as a lazy save registers its copy with the optimizer-step guard, before its
    engine lists it: the call gives its slot back, and its copying thread must end without
    copying. Left parked, it held the slot's memory for ever, and the next guard point (an
    optimizer step) released it to copy that call's tensors into the slot, by then the next
    save's: the next file held the interrupted call's tensors. (Fault injection: the
    KeyboardInterrupt is raised as the registration returns, where Ctrl-C's handler can run.)"""
    from asyncckpt._staging import lazy as lazy_impl

    engine = AsyncCheckpointIO(gated_io, staging="lazy", max_pending=1, handle_sigterm=False)
    try:
        engine.save_checkpoint({"w": torch.full((WIDTH, WIDTH), 1.0)}, tmp_path / "warm.ckpt")
        engine.flush()
        threads_before = _os_threads()
        remember = lazy_impl._remember

        def interrupted_as_it_returns(job: Any) -> None:
            remember(job)
            monkeypatch.setattr(lazy_impl, "_remember", remember)  # once
            raise KeyboardInterrupt

        monkeypatch.setattr(lazy_impl, "_remember", interrupted_as_it_returns)
        interrupted = torch.full((WIDTH, WIDTH), 3.0)
        with pytest.raises(KeyboardInterrupt):
            engine.save_checkpoint({"w": interrupted}, tmp_path / "interrupted.ckpt")
        engine.flush()
        deadline = time.monotonic() + 10
        while _os_threads() > threads_before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _os_threads() <= threads_before, "the interrupted save's copying thread is still parked"
        interrupted.fill_(9.0)  # training goes on
        gated_io.gate.clear()  # the next save is held in its write, after its copy was verified
        engine.save_checkpoint({"w": torch.full((WIDTH, WIDTH), 2.0)}, tmp_path / "next.ckpt")
        lazy_mod.finish_all()  # what an optimizer step's guard runs
        gated_io.gate.set()
        engine.flush()
        saved = torch.load(tmp_path / "next.ckpt", weights_only=True)["w"]
        assert torch.equal(saved, torch.full((WIDTH, WIDTH), 2.0)), f"the next file holds {saved.unique().tolist()}"
        assert not (tmp_path / "interrupted.ckpt").exists()
    finally:
        gated_io.gate.set()
        engine.teardown()
