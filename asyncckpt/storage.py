"""Compatibility path; the code lives in :mod:`asyncckpt._storage.paths` (path kinds and keys)
and :mod:`asyncckpt._storage.local` (atomic, durable local files and temp-file cleanup)."""

from ._storage.local import (
    HOST_ID,
    TEMP_MARKER,
    atomic_write,
    cleanup_temp_files,
    find_temp_files,
    fsync_file,
    fsync_folder,
    is_temp_file,
    remove_path,
    sweep_stale_temp_files_once,
    temp_path_for,
)
from ._storage.paths import (
    LOCAL_URL_PREFIXES,
    absolute_path,
    check_target,
    is_url,
    local_path_of,
    path_key,
    resolved_entry,
)

__all__ = [
    "HOST_ID",
    "LOCAL_URL_PREFIXES",
    "TEMP_MARKER",
    "absolute_path",
    "atomic_write",
    "check_target",
    "cleanup_temp_files",
    "find_temp_files",
    "fsync_file",
    "fsync_folder",
    "is_temp_file",
    "is_url",
    "local_path_of",
    "path_key",
    "remove_path",
    "resolved_entry",
    "sweep_stale_temp_files_once",
    "temp_path_for",
]
