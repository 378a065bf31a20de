"""The one place where a checkpoint path or URL is made fit to show.

A URL may carry credentials: user info (``ftp://user:password@host/x``, ``s3://KEY:SECRET@b/x``)
or a signed query (``?X-Amz-Signature=...&X-Amz-Credential=...``, an Azure SAS ``?sig=...``).
The writer needs them; nothing people read may show them. :func:`shown` is applied to every
path asyncckpt puts into an exception, a log line, :class:`~asyncckpt.SaveStats`, a ``repr``
or the command line's output; :func:`url_secrets` gives the same credentials as plain strings,
so text that quotes them outside a URL (a cause's message) is redacted too
(:func:`asyncckpt.remote.redact`).

This module imports nothing of asyncckpt's, so that every other module may use it.
"""

from __future__ import annotations

import os
import re
from typing import Any, List, Mapping
from urllib.parse import parse_qsl, unquote

REDACTED = "***"

# A URL inside any text: scheme, authority (up to '/', '?', '#'), path, query. It ends at
# whitespace or a quote, so a URL inside a repr or a sentence is found as a whole.
_URL_RE = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)"
    r"(?P<authority>[^/?#\s'\"]*)"
    r"(?P<path>[^?#\s'\"]*)"
    r"(?:\?(?P<query>[^#\s'\"]*))?"
)
_MIN_SECRET_LEN = 4


def _redact_match(match: "re.Match[str]") -> str:
    authority = match.group("authority")
    if "@" in authority:
        authority = REDACTED + authority[authority.rindex("@"):]
    text = match.group("scheme") + authority + match.group("path")
    query = match.group("query")
    if query is not None:
        parts = []
        for part in query.split("&"):
            name, eq, value = part.partition("=")
            parts.append(f"{name}={REDACTED}" if eq and value else part)
        text += "?" + "&".join(parts)
    return text


def shown(path: Any) -> Any:
    """``path`` as it may be shown: every URL in it without user info or query values.

    ``ftp://user:pw@host/x.ckpt`` is shown as ``ftp://***@host/x.ckpt`` and
    ``s3://b/x.ckpt?X-Amz-Signature=abc`` as ``s3://b/x.ckpt?X-Amz-Signature=***``. Local
    paths, and anything that is not a string or path, are returned as they are. Any text works
    (a message quoting several URLs), so an error's message is passed through it whole.
    """
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if isinstance(path, bytes) or not isinstance(path, str) or "://" not in path:
        return path
    return _URL_RE.sub(_redact_match, path)


def url_secrets(path: Any) -> List[str]:
    """The credentials ``path`` carries as plain strings (its user info, password and query
    values), for redacting text that quotes them without the rest of the URL."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or "://" not in path:
        return []
    found: List[str] = []
    for match in _URL_RE.finditer(path):
        authority = match.group("authority")
        if "@" in authority:
            userinfo = authority[: authority.rindex("@")]
            password = userinfo.partition(":")[2]
            found += [userinfo, password, unquote(userinfo), unquote(password)]  # a cause may quote them decoded
        query = match.group("query")
        if query:
            found.append(query)
            for _, value in parse_qsl(query, keep_blank_values=False):
                found.append(value)
            found.extend(part.partition("=")[2] for part in query.split("&"))
    return sorted({s for s in found if len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True)


def describe_options(storage_options: Any) -> str:
    """``storage_options`` as it may be shown: its keys, never a value (any may be a credential:
    ``secret``, a token nested in ``client_kwargs`` ...). Anything not a mapping shows its type."""
    if storage_options is None or (isinstance(storage_options, Mapping) and not storage_options):
        return "None" if storage_options is None else "{}"
    if not isinstance(storage_options, Mapping):
        return f"<{type(storage_options).__name__}>"
    return "{" + ", ".join(f"{k!r}: {REDACTED}" for k in sorted(storage_options, key=str)) + "}"
