"""The staging side of ``reserve()``: which arena a save keeps (the adoption rule that keeps the
memory bound), and the page touching that can be stopped."""

from __future__ import annotations

import torch

from asyncckpt._staging import layout
from asyncckpt._staging.arena import HostArena, adoptable, headroom
from asyncckpt._staging.protocol import StagingSlot
from asyncckpt._staging.reserve import fill_slot_bytes, tensors_of

MB = 1024 * 1024


def lay_out(slot: StagingSlot, tensors: list) -> None:
    layout.prepare(slot, tensors, b"", "x.ckpt", torch_save_rules=True)


def test_a_save_adopts_a_reserved_arena_that_fits_within_the_headroom():
    slot = StagingSlot(0)
    fill_slot_bytes(slot, 4 * MB, pinned=False)
    reserved = slot.arena
    assert reserved.reserved and reserved.nbytes == 4 * MB + headroom(4 * MB)
    lay_out(slot, [torch.ones(MB), torch.ones(10)])  # 4 MiB + 64 bytes: fits
    assert slot.arena is reserved and slot.allocated_bytes == 0


def test_a_reserved_arena_far_too_big_or_too_small_is_replaced_by_an_exact_one():
    for reserved_bytes, tensor in ((64 * MB, torch.ones(MB)), (MB, torch.ones(2 * MB))):
        slot = StagingSlot(0)
        fill_slot_bytes(slot, reserved_bytes, pinned=False)
        lay_out(slot, [tensor])
        assert not slot.arena.reserved and slot.arena.nbytes == tensor.nbytes == slot.allocated_bytes


def test_an_arena_a_save_made_is_still_kept_only_at_its_exact_size():
    slot = StagingSlot(0)
    lay_out(slot, [torch.ones(MB)])
    first = slot.arena
    lay_out(slot, [torch.ones(MB - 1024)])  # smaller: a save's own arena is not adopted
    assert slot.arena is not first and slot.arena.nbytes == (MB - 1024) * 4


def test_the_rule_bounds_a_slot_by_twice_the_headroom():
    need = 256 * MB
    assert adoptable(need, need) and adoptable(need + 2 * headroom(need), need)
    assert not adoptable(need + 2 * headroom(need) + 1, need) and not adoptable(need - 1, need)


def test_a_state_reservation_plans_the_exact_layout_so_its_save_plans_nothing():
    slot = StagingSlot(0)
    tensors = [torch.ones(MB), torch.arange(10.0)]
    source = tensors_of({"a": tensors[0], "b": tensors[1]}, "reserve()")
    layout.prepare(slot, source[1], source[0], "reserve()", torch_save_rules=True, reserving=True)
    views = list(slot.views)
    skeleton, again = tensors_of({"a": tensors[0], "b": tensors[1]}, "x.ckpt")
    layout.prepare(slot, again, skeleton, "x.ckpt", torch_save_rules=True)
    assert slot.views == views and slot.arena.reserved and slot.allocated_bytes == 0


def test_fault_in_touches_every_page_and_stops_when_asked():
    arena = HostArena(3 * MB, "plain")
    assert arena.fault_in() and int(arena.tensor.sum()) == 0
    assert not HostArena(3 * MB, "shared").fault_in(stop=lambda: True)
