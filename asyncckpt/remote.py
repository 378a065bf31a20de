"""Compatibility path; the code lives in :mod:`asyncckpt._storage.secrets` (redaction of
credentials), :mod:`asyncckpt._storage.retry` (``RetryPolicy`` and the retry loop),
:mod:`asyncckpt._storage.fsspec` (filesystems) and :mod:`asyncckpt._storage.s3` (the streaming
upload). ``RetryPolicy`` keeps this module as its pickled path."""

from ._storage.fsspec import invalidate, is_s3, url_to_fs
from ._storage.retry import RetryPolicy, call_with_retries, error_code, is_transient, remote_error
from ._storage.s3 import (
    MAX_PARTS,
    MIN_PART_BYTES,
    S3Upload,
    abort_stale_uploads,
    pending_aborts,
    retry_pending_aborts,
    s3_call,
)
from ._storage.secrets import SECRET_ENV_VARS, RedactedError, redact, safe_cause, secret_values

__all__ = [
    "MAX_PARTS",
    "MIN_PART_BYTES",
    "SECRET_ENV_VARS",
    "RedactedError",
    "RetryPolicy",
    "S3Upload",
    "abort_stale_uploads",
    "call_with_retries",
    "error_code",
    "invalidate",
    "is_s3",
    "is_transient",
    "pending_aborts",
    "redact",
    "remote_error",
    "retry_pending_aborts",
    "s3_call",
    "safe_cause",
    "secret_values",
    "url_to_fs",
]
