"""Running a command-line entry point: expected failures end with one clear line, not a traceback."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from dreambooth_jax.errors import UsageError


def run_main(main: Callable[[], None]) -> None:
    """Calls `main()`; an expected failure (`UsageError`) prints `error: ...` and exits 2
    (DREAMBOOTH_JAX_TRACEBACK=1 re-raises it)."""
    try:
        main()
    except UsageError as e:  # bad input or configuration; anything else is a bug and keeps its traceback
        if os.environ.get("DREAMBOOTH_JAX_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def setup_logging() -> None:
    """INFO logs on stderr with times; the chatter of absl (Orbax, TFDS) and JAX's backend probing hidden.
    `force`: a library imported earlier (absl, through Orbax) may have installed a root handler already, which
    would turn this call into a no-op and leave the level at WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    for noisy in ("absl", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
