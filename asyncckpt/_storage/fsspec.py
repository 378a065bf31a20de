"""fsspec filesystems: opening one for a URL (errors redacted), telling S3 apart, and dropping
stale cached listings."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

from ..errors import RemoteStorageError
from .secrets import redact, safe_cause, secret_values


def url_to_fs(url: str, storage_options: Optional[Mapping[str, Any]]) -> Tuple[Any, str]:
    """The fsspec filesystem and the path inside it for ``url``; errors are redacted."""
    import fsspec

    secrets = secret_values(storage_options, url)
    try:
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except Exception as err:
        raise RemoteStorageError(
            redact(f"cannot open the filesystem of {url!r}: {type(err).__name__}: {err}", secrets), url
        ) from safe_cause(err, secrets)


def is_s3(fs: Any) -> bool:
    """Whether ``fs`` is an ``s3fs`` filesystem, written to with :class:`S3Upload`."""
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocol and hasattr(fs, "_call_s3") and hasattr(fs, "split_path")



def invalidate(fs: Any, fs_path: str) -> None:
    """Forget cached listings around ``fs_path`` (fsspec caches folder listings per filesystem)."""
    invalidate_cache = getattr(fs, "invalidate_cache", None)
    if invalidate_cache is not None:
        try:
            invalidate_cache(fs_path)
        except Exception:  # noqa: BLE001 - a stale cache only costs a fresh listing
            pass
