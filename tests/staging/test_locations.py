"""A staged storage is written with its original device's location, as torch.save would.

The full path (CUDA tensors staged to host memory, files byte-identical to ``torch.save``'s and
loading onto the same devices) is in ``test_cuda.py`` and needs a GPU. Here, on the CPU: the
declaration a writer makes is what ``torch.save`` records, for the declared storages only, on
the declaring thread only, and only while it writes; and a layout naming a device location
declares it for its host storage.
"""

from __future__ import annotations

import io
import threading

import torch

from asyncckpt import TorchCheckpointIO
from asyncckpt._staging import layout
from asyncckpt._staging.locations import recorded_as
from asyncckpt._staging.protocol import StagedCheckpoint, StagingSlot


def _locations_in(data: bytes) -> dict:
    """Key -> the location string torch.load hands map_location, read without moving anything."""
    seen = []

    def record(storage, location):
        seen.append(location)
        return storage

    torch.load(io.BytesIO(data), map_location=record, weights_only=True)
    return seen


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_declared_storages_are_saved_with_their_device_location():
    a, b = torch.arange(4.0), torch.arange(3.0)
    with recorded_as({a.untyped_storage()._cdata: "cuda:1"}):
        data = _saved({"a": a, "b": b})
    assert sorted(_locations_in(data)) == ["cpu", "cuda:1"]
    # after the write, and for everything else, torch.save tags as always
    assert _locations_in(_saved({"a": a, "b": b})) == ["cpu", "cpu"]


def test_a_save_on_another_thread_is_not_affected():
    a = torch.arange(4.0)
    inside = threading.Event()
    leave = threading.Event()
    seen = {}

    def writer():
        with recorded_as({a.untyped_storage()._cdata: "cuda:0"}):
            inside.set()
            leave.wait(10)
            seen["writer"] = _locations_in(_saved({"a": a}))

    thread = threading.Thread(target=writer)
    thread.start()
    assert inside.wait(10)
    seen["user"] = _locations_in(_saved({"a": a}))  # the same storage, saved by the user meanwhile
    leave.set()
    thread.join()
    assert seen == {"writer": ["cuda:0"], "user": ["cpu"]}


def test_a_layout_naming_a_device_declares_it_for_its_host_storage(tmp_path):
    """``plan`` turns a layout's locations into the declaration the writers make; the file
    written under it records them (a shared arena: pinned memory needs CUDA)."""
    slot = StagingSlot(index=0, arena_kind="shared")
    per_tensor = ((0, torch.float32, (4,), (1,), 0, False), (1, torch.int64, (2,), (1,), 0, False))
    plan_layout = ((("cuda:1", 16), ("cpu", 16)), per_tensor)
    layout.plan(slot, plan_layout, [True, True])
    assert slot.group_locations == ("cuda:1", "cpu")
    staged = StagedCheckpoint.from_slot(b"", slot, 32, 0.0, original_locations=True)
    staged.tensors[0].copy_(torch.arange(4.0))
    staged.tensors[1].copy_(torch.tensor([5, 6]))
    with recorded_as(staged.locations):
        TorchCheckpointIO().save_checkpoint({"w": staged.tensors[0], "i": staged.tensors[1]}, tmp_path / "a.ckpt")
    data = (tmp_path / "a.ckpt").read_bytes()
    assert sorted(_locations_in(data)) == ["cpu", "cuda:1"]
    loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(4.0)) and torch.equal(loaded["i"], torch.tensor([5, 6]))


def test_cpu_layouts_declare_nothing(tmp_path):
    slot = StagingSlot(index=0)
    layout.plan(slot, ((("cpu", 16),), ((0, torch.float32, (4,), (1,), 0, False),)), [True])
    assert slot.locations == {} and slot.group_locations is None


def test_only_ios_that_write_with_torch_save_get_the_declaration():
    """DCP moves tensors to the CPU and records "cpu" itself; an IO not known to write with
    torch.save is handed host tensors, as before."""
    slot = StagingSlot(index=0, arena_kind="shared")
    layout.plan(slot, ((("cuda:0", 16),), ((0, torch.float32, (4,), (1,), 0, False),)), [True])
    staged = StagedCheckpoint.from_slot(b"", slot, 16, 0.0)
    assert staged.locations == {} and staged.group_locations is None


def test_another_tagger_at_our_priority_registers_and_runs_after_ours():
    """torch sorts (priority, tagger, ...) tuples; equal priorities compare the taggers."""
    from torch import serialization

    calls = []

    def tagger(storage):
        calls.append(1)
        return None

    serialization.register_package(1, tagger, lambda storage, location: None)
    try:
        a = torch.arange(2.0)
        with recorded_as({a.untyped_storage()._cdata: "cuda:0"}):
            assert _locations_in(_saved({"a": a})) == ["cuda:0"]
        assert not calls  # ours answered first
        assert _locations_in(_saved({"a": a})) == ["cpu"] and calls
    finally:
        serialization._package_registry[:] = [e for e in serialization._package_registry if e[1] is not tagger]
