"""Keeping credentials out of every text asyncckpt writes: which strings are secret, and how
an error chain that mentions one is replaced by a redacted stand-in."""

from __future__ import annotations

import os
from typing import Any, Iterable, List, Mapping, Optional

from ..redaction import REDACTED, shown, url_secrets

#: Credential environment variables whose values never appear in asyncckpt's text.
SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET",
)
_SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "sas", "signature", "connection")
_MIN_SECRET_LEN = 4


def secret_values(storage_options: Optional[Mapping[str, Any]] = None, url: Optional[str] = None) -> List[str]:
    """The secret strings to keep out of text: values of secret-looking option keys (nested
    too, e.g. ``client_kwargs``), of the credential environment variables, and the
    credentials ``url`` carries (user info, query values)."""
    found: List[str] = []

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, secret or any(word in str(k).lower() for word in _SECRET_WORDS))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, secret)
        elif secret and isinstance(value, (str, bytes)):
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            if len(text) >= _MIN_SECRET_LEN:
                found.append(text)

    walk(storage_options or {}, False)
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= _MIN_SECRET_LEN:
            found.append(value)
    found.extend(url_secrets(url))
    return sorted(set(found), key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***``, and every URL in it :func:`shown`."""
    text = shown(text)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class RedactedError(Exception):
    """Stands in for an exception whose text held a secret; carries the redacted text."""


def chain_text(err: BaseException) -> str:
    parts = []
    seen = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}: {current}")
        parts.extend(getattr(current, "__notes__", []) or [])
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def safe_cause(err: BaseException, secrets: Iterable[str]) -> BaseException:
    """``err`` itself when neither it nor its causes mention a secret (or a URL's credentials),
    else a redacted stand-in."""
    secrets = list(secrets)
    text = chain_text(err)
    if shown(text) == text and not any(s in text for s in secrets):
        return err
    return RedactedError(redact(text, secrets))
