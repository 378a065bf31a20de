"""THE streaming SHA-256 of checkpoint bytes: over a readable file (:func:`sha256_stream`) or
alongside a write, as the bytes go by (:class:`Sha256Tee`). Both give ``hashlib``'s hex digest,
so a digest taken while uploading equals one taken by reading the object back.

And THE CRC32 (``crc32``, zlib's signature): zlib-ng's SIMD one where installed (about 20 GB/s
here, against the standard zlib's 4), used for the archive's CRC fields and to verify them."""

from __future__ import annotations

import hashlib
from typing import Any, BinaryIO

__all__ = ["CHUNK_BYTES", "Sha256Tee", "crc32", "sha256_stream"]

try:
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - depends on the install
    from zlib import crc32

#: Bytes read per chunk: large enough for object storage's ranged reads, small enough for memory.
CHUNK_BYTES = 8 * 1024 * 1024


def sha256_stream(f: BinaryIO, chunk: int = CHUNK_BYTES) -> str:
    """Hex SHA-256 of everything left to read in ``f``, read ``chunk`` bytes at a time."""
    digest = hashlib.sha256()
    while True:
        data = f.read(chunk)
        if not data:
            return digest.hexdigest()
        digest.update(data)


class Sha256Tee:
    """The running SHA-256 of bytes written elsewhere: ``update(view)`` for each write."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def update(self, view: Any) -> None:
        self._digest.update(view)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
