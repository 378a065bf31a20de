"""The ``asyncckpt`` command line (also ``python -m asyncckpt``).

``asyncckpt verify PATH...``
    Read each checkpoint in full. With a checksum record (``<path>.sha256``, written by
    ``TorchCheckpointIO(checksum=True)``) its SHA-256 must match; without one, the CRC32 of
    every zip record is checked. Prints ``OK <path>: ...`` or ``FAIL <path>: ...`` per file and
    exits 0 when every file is good, 1 when any is damaged or missing.

``asyncckpt cleanup FOLDER...``
    Remove temp files that crashed writers left behind (those of processes still running are
    kept). Exits 0.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

EXIT_OK = 0
EXIT_DAMAGED = 1


def _verify(paths: List[str]) -> int:
    from .errors import IntegrityError
    from .integrity import verify_file

    status = EXIT_OK
    for path in paths:
        try:
            result = verify_file(path)
        except IntegrityError as err:
            print(f"FAIL {path}: {err}", file=sys.stderr)
            status = EXIT_DAMAGED
        except OSError as err:
            print(f"FAIL {path}: cannot read it: {err}", file=sys.stderr)
            status = EXIT_DAMAGED
        else:
            print(f"OK {path}: {result.describe()}")
    return status


def _cleanup(folders: List[str]) -> int:
    from .storage import cleanup_temp_files

    for folder in folders:
        removed = cleanup_temp_files(folder)
        print(f"{folder}: removed {len(removed)} stale temp file(s)")
        for path in removed:
            print(f"  {path}")
    return EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (also used by the console script)."""
    parser = argparse.ArgumentParser(prog="asyncckpt", description="Check and tidy asyncckpt checkpoint files.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="read checkpoints in full and check their integrity")
    verify.add_argument("paths", nargs="+", metavar="PATH")
    cleanup = commands.add_parser("cleanup", help="remove temp files left by crashed writers")
    cleanup.add_argument("folders", nargs="+", metavar="FOLDER")
    args = parser.parse_args(argv)
    if args.command == "verify":
        return _verify(args.paths)
    return _cleanup(args.folders)


if __name__ == "__main__":
    sys.exit(main())
