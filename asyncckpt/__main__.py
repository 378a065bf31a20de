"""The ``asyncckpt`` command line (also ``python -m asyncckpt``).

``asyncckpt verify PATH...``
    Read each checkpoint in full. With a checksum record (``<path>.sha256``, written by
    ``TorchCheckpointIO(checksum=True)``) its SHA-256 must match; without one, the CRC32 of
    every zip record is checked. Prints ``OK <path>: ...`` or ``FAIL <path>: ...`` per file and
    exits 0 when every file is good, 1 when any is damaged or missing.

``asyncckpt cleanup FOLDER...``
    Remove temp files that crashed writers left behind (those of processes still running are
    kept). For an ``s3://bucket/prefix`` URL, abort the multipart uploads under it that started
    more than ``--older-than-hours`` ago (default 24): the parts a killed writer left. Exits 0, or 1
    when a URL cannot be listed (``FAIL <url>: ...``; the others are still cleaned up).

``PATH`` and ``FOLDER`` may be fsspec URLs; credentials and endpoints come from the environment
(e.g. ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``), never the command line.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ._storage.backend import backend_for
from ._storage.integrity import verify_file
from ._storage.secrets import redact, secret_values
from .errors import IntegrityError
from .redaction import shown

EXIT_OK = 0
EXIT_DAMAGED = 1


def _verify(paths: List[str]) -> int:
    status = EXIT_OK
    for path in paths:
        secrets = secret_values(None, path)
        try:
            result = verify_file(path)
        except IntegrityError as err:
            print(redact(f"FAIL {path}: {err}", secrets), file=sys.stderr)
            status = EXIT_DAMAGED
        except Exception as err:  # noqa: BLE001 - any failure to read is reported per path, redacted
            print(redact(f"FAIL {path}: cannot read it: {type(err).__name__}: {err}", secrets), file=sys.stderr)
            status = EXIT_DAMAGED
        else:
            print(f"OK {shown(path)}: {result.describe()}")
    return status


def _cleanup(folders: List[str], older_than_hours: float = 24.0) -> int:
    status = EXIT_OK
    for folder in folders:
        backend = None
        try:
            backend = backend_for(folder)
            found = backend.cleanup(older_than_hours * 3600)
        except Exception as err:
            if backend is not None and backend.is_local:
                raise  # a local folder's errors surface as they are
            # reported per URL, redacted; the others go on
            message = f"FAIL {folder}: cannot clean it up: {type(err).__name__}: {err}"
            print(redact(message, secret_values(None, folder)), file=sys.stderr)
            status = EXIT_DAMAGED
            continue
        if backend.is_local:
            print(f"{folder}: removed {len(found)} stale temp file(s)")
            for path in found:
                print(f"  {path}")
        else:
            print(f"{shown(folder)}: aborted {len(found)} unfinished upload(s) older than {older_than_hours:g} h")
            for url in found:
                print(f"  {shown(url)}")
    return status


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (also used by the console script)."""
    parser = argparse.ArgumentParser(prog="asyncckpt", description="Check and tidy asyncckpt checkpoint files.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="read checkpoints in full and check their integrity")
    verify.add_argument("paths", nargs="+", metavar="PATH")
    cleanup = commands.add_parser("cleanup", help="remove temp files left by crashed writers")
    cleanup.add_argument("folders", nargs="+", metavar="FOLDER")
    cleanup.add_argument("--older-than-hours", type=float, default=24.0,
                         help="s3:// only: abort unfinished uploads started at least this long ago (default 24)")
    args = parser.parse_args(argv)
    if args.command == "verify":
        return _verify(args.paths)
    return _cleanup(args.folders, args.older_than_hours)


if __name__ == "__main__":
    sys.exit(main())
