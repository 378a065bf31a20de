"""The engine's keyword options: their validation, in one place, and ``options()`` (which a
framework plugin pickles to build an equal engine elsewhere)."""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional

from .._staging.copier import default_staging_threads
from .._staging.lazy import check_staging

WHEN_FULL_CHOICES = ("wait", "raise")
WRITER_CHOICES = ("thread", "process")


def choice(name: str, value: Any, allowed: tuple) -> Any:
    """``value`` if it is one of ``allowed``, else ``ValueError`` naming them."""
    if value not in allowed:
        raise ValueError(f"unknown {name}={value!r}; allowed values: {', '.join(repr(a) for a in allowed)}")
    return value


@dataclass(frozen=True)
class EngineOptions:
    """Validated engine options (see :class:`asyncckpt.AsyncCheckpointIO` for their meaning)."""

    max_pending: int
    when_full: str
    writer: str
    writer_nice: int
    staging_threads: int
    staging_threads_chosen: bool  # given by the caller (else the machine's share of cores)
    exit_timeout: float
    handle_sigterm: bool
    staging: str

    @classmethod
    def validate(
        cls,
        *,
        max_pending: Any,
        when_full: Any,
        writer: Any,
        writer_nice: Any,
        staging_threads: Optional[Any],
        exit_timeout: Any,
        handle_sigterm: Any,
        staging: Any,
    ) -> "EngineOptions":
        """Check every option, in the order the engine always checked them; ``ValueError`` names the bad one."""
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an integer >= 1, got {max_pending!r}")
        if (
            isinstance(exit_timeout, bool)
            or not isinstance(exit_timeout, numbers.Real)
            or math.isnan(exit_timeout)
            or exit_timeout < 0
        ):
            raise ValueError(
                f"exit_timeout must be a number of seconds >= 0 (float('inf') for no limit), got {exit_timeout!r}"
            )
        when_full = choice("when_full", when_full, WHEN_FULL_CHOICES)
        writer = choice("writer", writer, WRITER_CHOICES)
        if not isinstance(writer_nice, int) or not 0 <= writer_nice <= 19:
            raise ValueError(f"writer_nice must be an integer from 0 to 19, got {writer_nice!r}")
        if writer_nice and writer == "thread" and not sys.platform.startswith("linux"):
            raise ValueError(
                f"writer_nice={writer_nice} with writer='thread' needs Linux, where a thread has a "
                f"niceness of its own; on {sys.platform} use writer='process' or writer_nice=0"
            )
        chosen = staging_threads is not None
        if staging_threads is None:
            staging_threads = default_staging_threads()
        if isinstance(staging_threads, bool) or not isinstance(staging_threads, int) or staging_threads < 1:
            raise ValueError(f"staging_threads must be an integer >= 1, got {staging_threads!r}")
        staging = check_staging(staging, writer)
        return cls(
            max_pending=max_pending,
            when_full=when_full,
            writer=writer,
            writer_nice=writer_nice,
            staging_threads=staging_threads,
            staging_threads_chosen=chosen,
            exit_timeout=float(exit_timeout),
            handle_sigterm=handle_sigterm,
            staging=staging,
        )


def options_of(engine: Any) -> Dict[str, Any]:
    """The keyword options ``engine`` was built with (to build an equal one elsewhere)."""
    return dict(
        max_pending=engine.max_pending,
        when_full=engine.when_full,
        writer=engine.writer_kind,
        writer_nice=engine.writer_nice,
        staging_threads=engine.staging_threads,
        exit_timeout=engine.exit_timeout,
        handle_sigterm=engine.handle_sigterm,
        staging=engine.staging,
    )
