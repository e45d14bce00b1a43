"""Running a command-line entry point: expected failures end with one clear line, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

# What bad input, missing files and failed runs raise; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (FileNotFoundError, PermissionError, NotADirectoryError, ValueError, FloatingPointError, OSError)


def run(main: Callable[[], None]) -> None:
    """Calls `main()`; an expected error prints `error: ...` and exits 2 (DREAMBOOTH_JAX_TRACEBACK=1 re-raises)."""
    try:
        main()
    except EXPECTED_ERRORS as e:
        if os.environ.get("DREAMBOOTH_JAX_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
