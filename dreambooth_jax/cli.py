"""Running a command-line entry point: expected failures end with one clear line, not a traceback."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

# What bad input, missing files, failed runs and configurations we do not support (NotImplementedError, e.g. a
# scheduler option) raise; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (FileNotFoundError, PermissionError, NotADirectoryError, ValueError, FloatingPointError, OSError,
                   NotImplementedError)


def run(main: Callable[[], None]) -> None:
    """Calls `main()`; an expected error prints `error: ...` and exits 2 (DREAMBOOTH_JAX_TRACEBACK=1 re-raises)."""
    try:
        main()
    except EXPECTED_ERRORS as e:
        if os.environ.get("DREAMBOOTH_JAX_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def setup_logging() -> None:
    """INFO logs on stderr with times; the chatter of absl (Orbax, TFDS) and JAX's backend probing hidden."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("absl", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
