"""Compatibility path; the code lives in :mod:`asyncckpt._storage.integrity` (checksum records
and full-read verification)."""

from ._storage.integrity import (
    CHUNK_BYTES,
    MAX_ACCEPTED,
    RECORD_SUFFIX,
    VerifyResult,
    check_zip,
    digests_to_commit,
    format_record,
    parse_record,
    read_record,
    record_path,
    sha256_file,
    verify_file,
    write_record,
)

__all__ = [
    "CHUNK_BYTES",
    "MAX_ACCEPTED",
    "RECORD_SUFFIX",
    "VerifyResult",
    "check_zip",
    "digests_to_commit",
    "format_record",
    "parse_record",
    "read_record",
    "record_path",
    "sha256_file",
    "verify_file",
    "write_record",
]
