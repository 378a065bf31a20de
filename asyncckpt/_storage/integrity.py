"""Checksum records and full-read verification of checkpoint files.

Two independent checks, used by ``asyncckpt verify`` and ``load_checkpoint(..., verify=True)``:

* **Checksum record** (opt-in: ``TorchCheckpointIO(checksum=True)``). A sidecar ``<path>.sha256``
  in ``sha256sum`` format (``<hex>  <name>``, one line per accepted digest). It stays consistent
  with the checkpoint across a crash at any instant: before the new file is renamed over the
  target, the record is committed listing the new digest *and* the one of the file still there;
  after the rename it is rewritten to list only the new digest. So the file at the target always
  matches a line of its record. In the steady state the record has one line, and
  ``sha256sum -c last.ckpt.sha256`` (run in its folder) checks it too.

* **Full read** (always, also for files without a record). ``torch.save`` writes a zip archive
  whose entries are stored uncompressed, each with a CRC32 in the zip directory. ``torch.load``
  does not check those CRCs (a flipped bit in tensor data loads silently), so this module reads
  every entry and checks its CRC32, its local header and its length. A truncated file has lost
  the zip directory at its end and is reported as such. Not covered without a record: bit flips
  in bytes that carry no data (zip padding, timestamps); they do not change what loads.

Both work on fsspec URLs too (``s3://bucket/run/last.ckpt``, its record ``<url>.sha256``): the
object is streamed for the digest, and read with ranged requests for the zip check.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import zipfile
from dataclasses import dataclass
from typing import IO, Any, Callable, List, Mapping, Optional, Tuple, Type, TypeVar

from ..errors import IntegrityError
from ..redaction import shown
from .backend import RECORD_SUFFIX, Backend, backend_for
from .hashing import CHUNK_BYTES, crc32, sha256_stream
from .local import AtomicFile
from .paths import is_url
from .retry import RetryPolicy, call_with_retries

log = logging.getLogger("asyncckpt.torch_io")  # its prune warning was the IO's: same logger
R = TypeVar("R")

MAX_ACCEPTED = 4
_LINE_RE = re.compile(r"^(?P<digest>[0-9a-f]{64}) [ *](?P<name>.+)$")
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_LOCAL_SIGNATURE = b"PK\x03\x04"


@dataclass
class VerifyResult:
    """What :func:`verify_file` checked; it raises :class:`IntegrityError` instead of failing."""

    path: str
    size: int
    method: str  # "sha256" (matched its record) or "crc32" (every zip entry read and checked)
    records: int = 0
    digest: Optional[str] = None
    unchecked_records: int = 0

    def describe(self) -> str:
        """One line for humans, e.g. for the CLI's ``OK`` line."""
        if self.method == "sha256":
            record = os.path.basename(record_path(self.path))
            return f"sha256 {self.digest[:16]}... matches {record} ({self.size} bytes)"
        text = f"{self.records} zip records read in full, CRC32 of each checked ({self.size} bytes, no checksum record)"
        if self.unchecked_records:
            text += f"; {self.unchecked_records} record(s) were written without a CRC32 and only read"
        return text


def record_path(path: str) -> str:
    """The checksum record (sidecar) of checkpoint ``path``."""
    return os.fspath(path) + RECORD_SUFFIX


def sha256_file(path: str) -> str:
    """Hex SHA-256 of the file at ``path``, read in 8 MB chunks."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def read_record(path: str) -> Optional[List[str]]:
    """The digests accepted for ``path`` by its record, newest first; ``None`` when there is none."""
    try:
        with open(record_path(path), encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    return parse_record(text)


def parse_record(text: str) -> List[str]:
    """The digests a record's text lists, newest first."""
    digests = []
    for line in text.splitlines():
        match = _LINE_RE.match(line.strip())
        if match and match.group("digest") not in digests:
            digests.append(match.group("digest"))
    return digests


def format_record(path: str, digests: List[str]) -> bytes:
    """The record's bytes: ``sha256sum`` lines, one per accepted digest."""
    name = os.path.basename(os.fspath(path))
    return "".join(f"{d}  {name}\n" for d in digests[:MAX_ACCEPTED]).encode("utf-8")


def write_record(path: str, digests: List[str], *, durable: bool = True) -> None:
    """Commit the record of local checkpoint ``path`` listing ``digests``, atomically (temp file,
    fsync, rename), so a crash leaves the old record or the new one, never a partial one."""
    data = format_record(path, digests)
    with AtomicFile(record_path(path), durable=durable) as atomic:
        with atomic.open() as f:
            f.write(data)
        atomic.commit()


def put_local_record(path: str, digests: List[str], *, durable: bool = True) -> None:
    """Commit the record of local ``path`` listing ``digests``; with none, remove a stale record
    (one an earlier ``checksum=True`` save left)."""
    if digests:
        write_record(path, digests, durable=durable)
    elif os.path.exists(record_path(path)):
        os.unlink(record_path(path))


#: Held by callers whose commits to one target are not ordered by the engine (two copies to one
#: ``dst``): their records and renames must not interleave, or the record of one could be left
#: beside the other's file.
COMMIT_LOCK = threading.Lock()


def commit_with_record(
    commit: Callable[[Callable[..., None]], R],
    digests_before: Callable[[], List[str]],
    put_record: Callable[[List[str]], None],
    *,
    shown_target: str,
    prune_errors: Tuple[Type[BaseException], ...] = (OSError,),
) -> R:
    """Replace a file and keep its checksum record consistent at every instant (THE record protocol).

    ``commit(before)`` makes the new file appear (:meth:`AtomicFile.commit`, an S3 completion ...),
    calling ``before(...)`` once the new file is complete and the old one still in place. There,
    ``digests_before()`` gives the digests the record must list during the switch (the new one
    first, then those the old file matches; ``[]``: keep no record) and ``put_record`` commits
    them (``[]`` removes a stale record). After the switch the record is pruned to the new digest
    alone; a failure of the types ``prune_errors`` only logs a warning (the record still lists
    the new digest, so it stays valid). Returns what ``commit`` returns.
    """
    digests: List[str] = []

    def before(*_: Any) -> None:
        digests[:] = digests_before()
        put_record(digests)

    result = commit(before)
    if len(digests) > 1:
        try:
            put_record(digests[:1])
        except prune_errors as err:
            log.warning("asyncckpt: could not prune the checksum record of %s: %s", shown_target, err)
    return result


def digests_to_commit(path: str, new: str) -> List[str]:
    """The digests a record must list while ``new`` replaces the file at local ``path``: ``new``
    first, then those the file still there matches (its record's, or its own digest when it
    has no record), so the file at ``path`` matches the record before and after the rename."""
    accepted = read_record(path)
    if accepted is None:
        accepted = [sha256_file(path)] if os.path.isfile(path) else []
    return [new] + [d for d in accepted if d != new]


def verify_file(path: str, storage_options: Optional[Mapping[str, Any]] = None) -> VerifyResult:
    """Check the checkpoint at ``path`` completely; raise :class:`IntegrityError` if it is damaged.

    With a checksum record, the file's SHA-256 must be one the record lists. Without one, every
    zip entry is read and its CRC32 checked (what ``torch.load`` skips). ``path`` may be an
    fsspec URL; ``storage_options`` then open its filesystem, and each try is retried on
    transient errors; any other failure than a damaged file is a redacted
    :class:`~asyncckpt.errors.RemoteStorageError` (the client's own message may quote the URL).
    """
    path = os.fspath(path)
    backend = backend_for(path, storage_options)
    if backend.is_local:
        return _verify_once(backend, backend.local_path, backend.local_path)
    return call_with_retries(
        "verifying checkpoint", path, lambda: _verify_once(backend, path, shown(path)), RetryPolicy(),
        backend.secrets, passthrough=(IntegrityError,),
    )


def _verify_once(backend: Backend, name: str, result_name: str) -> VerifyResult:
    """One full read of the checkpoint ``backend`` stores; errors name ``name``."""
    if not backend.exists():
        raise IntegrityError(f"checkpoint {name!r} does not exist", name)
    if backend.isdir():
        raise IntegrityError(f"checkpoint {name!r} is a folder, not a checkpoint file", name)
    size = backend.size()
    record = backend.read_record_text()
    if record is None:
        return _check_zip(result_name, size, backend.open_read)
    accepted = parse_record(record)
    digest = backend.sha256()
    if digest in accepted:
        return VerifyResult(result_name, size, "sha256", digest=digest)
    try:
        _check_zip(result_name, size, backend.open_read)
        why = "its contents changed since it was written (the zip structure still reads)"
    except IntegrityError as err:
        why = str(err)
    raise IntegrityError(
        f"checkpoint {name!r} does not match its checksum record {record_path(name)!r}: "
        f"sha256 {digest} is not among the {len(accepted)} accepted; {why}",
        name,
    )


#: How a file of the format ``torch.save`` wrote before torch 1.6 begins (a pickled magic number).
_LEGACY_TORCH_HEAD = b"\x80\x02\x8a\x0a"


def explain_unreadable(err: BaseException, local: str) -> None:
    """Add to ``err`` (``torch.load``'s failure) what is wrong with the file itself, where
    something is: empty, not a zip archive, cut short. torch says ``EOFError``, ``KeyError: 101``
    or a miniz error for those; the exception keeps its type. (A damaged record inside is
    ``python -m asyncckpt verify``'s to find: that reads the whole file.)"""
    try:
        with open(local, "rb") as f:
            if f.read(len(_LEGACY_TORCH_HEAD)) == _LEGACY_TORCH_HEAD:
                return  # the old format, which torch.load reads: its error is about something else
        # The head and the directory only: a 100 GB file that fails for another reason (a
        # weights_only refusal) must not be read in full before its error is raised.
        archive, zip_source = _open_archive(local, os.path.getsize(local), lambda: open(local, "rb"))
        archive.close()
        zip_source.close()
    except IntegrityError as why:
        err.add_note(f"asyncckpt: {why}")
    except Exception:  # noqa: BLE001 - the explanation is optional; torch's error is raised as it is
        pass


def check_zip(path: str) -> VerifyResult:
    """Read every entry of the torch zip file at ``path``, checking headers, lengths and CRC32."""
    return _check_zip(path, os.path.getsize(path), lambda: open(path, "rb"))


def _open_archive(path: str, size: int, opener: Callable[[], IO[bytes]]) -> Tuple[zipfile.ZipFile, IO[bytes]]:
    """The zip archive at ``path`` and the file under it, opened: reads only its head and its
    directory. :class:`IntegrityError` for an empty file, one that is no zip archive, and one
    whose directory is missing (cut short) or unreadable."""
    with opener() as f:
        head = f.read(4)
    if size == 0:
        raise IntegrityError(f"checkpoint {path!r} is empty (0 bytes)", path)
    zip_source = opener()
    try:
        return zipfile.ZipFile(zip_source), zip_source
    except Exception as err:  # noqa: BLE001 - damaged headers raise BadZipFile, ValueError, EOFError...
        zip_source.close()
        if head == _LOCAL_SIGNATURE:
            raise IntegrityError(
                f"checkpoint {path!r} is truncated or damaged: the zip directory at its end is missing or "
                f"unreadable ({err}); the file was cut short (a partial write or copy) at {size} bytes",
                path,
            ) from err
        raise IntegrityError(
            f"checkpoint {path!r} is not a zip-format torch checkpoint (torch.save writes zip files since "
            "torch 1.6), so it cannot be checked without a checksum record",
            path,
        ) from err


def _check_zip(path: str, size: int, opener: Callable[[], IO[bytes]]) -> VerifyResult:
    archive, zip_source = _open_archive(path, size, opener)
    unchecked = 0
    with zip_source, archive, opener() as f:
        infos = archive.infolist()
        if not any(info.filename.endswith("data.pkl") for info in infos):
            raise IntegrityError(
                f"checkpoint {path!r} is a zip file without a data.pkl record: not a torch checkpoint", path
            )
        for info in infos:
            if info.external_attr & 0x10 or info.filename.endswith("/"):  # MS-DOS directory bit
                raise IntegrityError(
                    f"checkpoint {path!r} is corrupted: record {info.filename!r} is marked as a folder in the "
                    "zip directory (torch would read it as empty)",
                    path,
                )
            if info.compress_type != zipfile.ZIP_STORED:  # torch stores; another writer may not
                try:
                    with archive.open(info) as entry:  # zipfile checks the CRC32 as it reads
                        while entry.read(CHUNK_BYTES):
                            pass
                except Exception as err:  # noqa: BLE001 - any failure to read the record is damage
                    raise IntegrityError(
                        f"checkpoint {path!r} is corrupted: record {info.filename!r}: {err}", path
                    ) from err
                continue
            crc = _stored_entry_crc(f, info, path, size)
            if info.CRC == 0 and info.file_size > 0:
                unchecked += 1  # written with torch's compute_crc32 turned off
            elif crc != info.CRC:
                raise IntegrityError(
                    f"checkpoint {path!r} is corrupted: record {info.filename!r} ({info.file_size} bytes) fails "
                    f"its CRC32 check (stored {info.CRC:08x}, read {crc:08x}); its bytes changed after writing",
                    path,
                )
    with opener() as f:
        _check_with_torch_reader(path, f if is_url(path) else path, infos)
    return VerifyResult(path, size, "crc32", records=len(infos), unchecked_records=unchecked)


def _check_with_torch_reader(path: str, source: Any, infos: List[zipfile.ZipInfo]) -> None:
    """Open the file with torch's own zip reader (miniz), which is stricter than ``zipfile``
    about some directory fields, and locate every record the way ``torch.load`` does."""
    import torch

    try:
        reader = torch._C.PyTorchFileReader(source)
        names = reader.get_all_records()
        for name in names:
            reader.get_record_offset(name)
        reader.get_record("data.pkl")
    except Exception as err:  # noqa: BLE001 - torch.load would fail the same way
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise IntegrityError(f"checkpoint {path!r} is corrupted: torch cannot read it: {first}", path) from err
    if len(names) != len(infos):
        raise IntegrityError(
            f"checkpoint {path!r} is corrupted: torch finds {len(names)} records, the zip directory {len(infos)}",
            path,
        )


def _stored_entry_crc(f, info: zipfile.ZipInfo, path: str, size: int) -> int:
    if not 0 <= info.header_offset < size or not 0 <= info.file_size <= size:
        raise IntegrityError(
            f"checkpoint {path!r} is corrupted: the zip directory entry of record {info.filename!r} "
            f"points outside the file (offset {info.header_offset}, {info.file_size} bytes, file {size} bytes)",
            path,
        )
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
        raise IntegrityError(
            f"checkpoint {path!r} is corrupted: the local header of record {info.filename!r} "
            f"at offset {info.header_offset} is damaged",
            path,
        )
    name_len, extra_len = _LOCAL_HEADER.unpack(header)[-2:]
    name = f.read(name_len)
    if name.decode("utf-8", "replace") != info.filename:
        raise IntegrityError(
            f"checkpoint {path!r} is corrupted: record {info.filename!r} has the name {name!r} in its local header",
            path,
        )
    f.seek(extra_len, os.SEEK_CUR)
    remaining = info.file_size
    crc = 0
    while remaining:
        chunk = f.read(min(CHUNK_BYTES, remaining))
        if not chunk:
            raise IntegrityError(
                f"checkpoint {path!r} is truncated: record {info.filename!r} ends past the end of the file "
                f"({size} bytes)",
                path,
            )
        crc = crc32(chunk, crc)
        remaining -= len(chunk)
    return crc
