"""Compatibility path; the code lives in asyncckpt._staging.arena."""

from ._staging.arena import ALIGN, HostArena, build_views, byte_view, plan_groups, storages_in

__all__ = ["ALIGN", "HostArena", "build_views", "byte_view", "plan_groups", "storages_in"]
