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


class Retry:
    """THE retry loop for requests to object storage: ``call(fn)`` (and ``await acall(make_coro)``)
    runs ``fn`` until it returns, tried per ``policy``; :meth:`decide` classifies each failure.

    * ``transient(err)`` says whether a retry may succeed (default :func:`is_transient`); the
      last failure, or one that is not transient, becomes a :class:`RemoteStorageError` naming
      ``what`` and ``url`` (from a redacted cause).
    * Errors of the ``passthrough`` types that are not transient are raised as they are (a
      damaged file on load says so itself), unless their text holds a secret.
    * ``recover(err, attempt)`` returning True ends the loop as a success (``call`` returns
      None): e.g. a completion whose reply was lost but which went through.
    * Each retry logs ``asyncckpt: <log_what> <url> failed (try n of m), retrying in ...``
      (``log_what`` defaults to ``what``); ``warn=False`` retries silently.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        what: str,
        url: str,
        secrets: Iterable[str],
        *,
        passthrough: Tuple[type, ...] = (),
        transient: Callable[[BaseException], bool] = is_transient,
        recover: Optional[Callable[[BaseException, int], bool]] = None,
        log_what: Optional[str] = None,
        warn: bool = True,
    ) -> None:
        self.policy = policy
        self.what = what
        self.url = url
        self.secrets = list(secrets)
        self.passthrough = passthrough
        self.transient = transient
        self.recover = recover
        self.log_what = what if log_what is None else log_what
        self.warn = warn

    def decide(self, err: BaseException, attempt: int) -> Optional[float]:
        """The delay before try ``attempt + 1`` after ``err`` ended try ``attempt``; None when
        ``recover`` accepted the failure as success. Raises when there is no next try."""
        if self.recover is not None and self.recover(err, attempt):
            return None
        transient = self.transient(err)
        if isinstance(err, self.passthrough) and not transient:
            if any(secret in chain_text(err) for secret in self.secrets):
                raise remote_error(self.what, self.url, err, attempt, self.secrets) from safe_cause(err, self.secrets)
            raise err
        if not transient or attempt >= self.policy.attempts:
            raise remote_error(self.what, self.url, err, attempt, self.secrets) from safe_cause(err, self.secrets)
        delay = self.policy.delay(attempt)
        if self.warn:
            log.warning(
                "asyncckpt: %s %s failed (try %d of %d), retrying in %.2fs: %s",
                self.log_what, shown(self.url), attempt, self.policy.attempts, delay,
                redact(f"{type(err).__name__}: {err}", self.secrets),
            )
        return delay

    def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, retried; sleeps between tries."""
        attempt = 1
        while True:
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - classified by decide
                delay = self.decide(err, attempt)
                if delay is None:
                    return None
            time.sleep(delay)
            attempt += 1

    async def acall(self, make_coro: Callable[[], Any]) -> Any:
        """``await make_coro()``, retried; awaits ``asyncio.sleep`` between tries."""
        attempt = 1
        while True:
            try:
                return await make_coro()
            except Exception as err:  # noqa: BLE001 - classified by decide
                delay = self.decide(err, attempt)
                if delay is None:
                    return None
            await asyncio.sleep(delay)
            attempt += 1


def call_with_retries(
    what: str,
    url: str,
    fn: Callable[[], Any],
    policy: RetryPolicy,
    secrets: Iterable[str],
    passthrough: Tuple[type, ...] = (),
) -> Any:
    """``fn()``, tried per ``policy``; the last failure becomes a :class:`RemoteStorageError`.

    Errors of the ``passthrough`` types (and ``FileNotFoundError``) that are not transient are
    raised as they are (e.g. a damaged file on load says so itself).
    """
    return Retry(policy, what, url, secrets, passthrough=(FileNotFoundError, *passthrough)).call(fn)


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
