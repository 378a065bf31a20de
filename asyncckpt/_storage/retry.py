"""Retrying requests to object storage: which errors are transient, how long to wait, and the
error people see when the tries run out."""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Tuple

from ..errors import RemoteStorageError
from ..redaction import shown
from .secrets import chain_text, redact, safe_cause

log = logging.getLogger("asyncckpt.remote")  # the name users configure; kept from before the move


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how patiently, a request to object storage is tried.

    Each request (one part, the completion, a remove ...) is tried at most ``attempts`` times;
    before try ``n`` (from 2) it waits ``min(max_backoff, backoff * 2**(n-2))`` seconds, scaled
    by a random factor in [0.5, 1] so that many ranks do not retry in step. Only transient
    errors are retried: lost connections, timeouts, HTTP 5xx, throttling.
    """

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be an integer >= 1, got {self.attempts!r}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("RetryPolicy.backoff and max_backoff must be >= 0 seconds")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


# Pickles (the Lightning plugin's state holds a TorchCheckpointIO and its policy) name this path.
RetryPolicy.__module__ = "asyncckpt.remote"


_THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
}


def _client_error_info(err: BaseException) -> Tuple[Optional[str], Optional[int]]:
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return None, None
    code = (response.get("Error") or {}).get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return (str(code) if code is not None else None), status


def _chain(err: BaseException) -> List[BaseException]:
    out, seen = [], set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def error_code(err: BaseException) -> Optional[str]:
    """The S3 error code (``NoSuchUpload``, ``SlowDown`` ...) anywhere in ``err``'s chain."""
    for e in _chain(err):
        code, _ = _client_error_info(e)
        if code:
            return code
    return None


def is_transient(err: BaseException) -> bool:
    """Whether retrying the request may succeed: connection lost, timeout, HTTP 5xx, throttling."""
    for e in _chain(err):
        code, status = _client_error_info(e)
        if code is not None or status is not None:
            return (status is not None and (status >= 500 or status == 429)) or code in _THROTTLE_CODES
        if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return True
        module = type(e).__module__ or ""
        name = type(e).__name__
        if module.startswith("botocore") and ("Connection" in name or "Timeout" in name or "Endpoint" in name):
            return True
        if module.startswith("aiohttp") and ("Connect" in name or "Disconnected" in name or "Payload" in name):
            return True
        if name in ("IncompleteRead", "ResponseParserError", "ProtocolError"):
            return True
        if isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE, errno.ETIMEDOUT):
            return True
    return False


def call_with_retries(
    what: str,
    url: str,
    fn: Callable[[], Any],
    policy: RetryPolicy,
    secrets: Iterable[str],
    passthrough: Tuple[type, ...] = (),
) -> Any:
    """``fn()``, tried per ``policy``; the last failure becomes a :class:`RemoteStorageError`.

    Errors of the ``passthrough`` types that are not transient are raised as they are (e.g. a
    damaged file on load says so itself).
    """
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below
            transient = is_transient(err)
            if isinstance(err, (FileNotFoundError, *passthrough)) and not transient:
                if any(secret in chain_text(err) for secret in secrets):
                    raise remote_error(what, url, err, attempt, secrets) from safe_cause(err, secrets)
                raise
            if not transient or attempt >= policy.attempts:
                raise remote_error(what, url, err, attempt, secrets) from safe_cause(err, secrets)
            delay = policy.delay(attempt)
            log.warning(
                "asyncckpt: %s %s failed (try %d of %d), retrying in %.2fs: %s",
                what, shown(url), attempt, policy.attempts, delay, redact(f"{type(err).__name__}: {err}", secrets),
            )
            time.sleep(delay)
            attempt += 1


def remote_error(what: str, url: str, err: BaseException, attempts: int, secrets: Iterable[str]) -> RemoteStorageError:
    """The error people see: what failed, on which URL, after how many tries, and what to do."""
    secrets = list(secrets)
    if isinstance(err, RemoteStorageError):
        return err
    cause = f"{type(err).__name__}: {err}"
    for e in _chain(err):
        code, status = _client_error_info(e)
        if code or status:
            cause += f" (S3 error {code}, HTTP {status})"
            break
    cause = redact(cause, secrets)
    if is_transient(err):
        advice = (
            f"gave up after {attempts} tries (transient errors: connection, HTTP 5xx or throttling); "
            "check that the storage endpoint is reachable, or raise TorchCheckpointIO(retry=RetryPolicy(...))"
        )
    elif isinstance(err, PermissionError) or (error_code(err) or "") in ("AccessDenied", "InvalidAccessKeyId",
                                                                          "SignatureDoesNotMatch", "ExpiredToken"):
        advice = "the credentials were refused; check the keys given in storage_options or the environment"
    else:
        advice = "not retried (not a transient error)"
    message = f"{what} {url!r} failed: {cause}; {advice}"
    return RemoteStorageError(redact(message, secrets), url)
