"""Expected failures: bad input, a bad configuration, a missing file, an option we do not support.

Every one of them is a `UsageError`, and the CLIs end on one with a single `error:` line (exit code 2); any
other exception is a bug and keeps its traceback. They also subclass the built-in error a caller would expect
(ValueError, FileNotFoundError, NotImplementedError, ...), so library users can catch either.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input or configuration; the message says what and, where it can, how to fix it."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file or folder the run needs (named by the user, or inside a model folder) is not there."""


class UnsupportedError(UsageError, NotImplementedError):
    """A valid configuration that we do not implement (e.g. a scheduler option)."""


class OutputError(UsageError, PermissionError):
    """An output location that cannot be created or written."""


class DivergedError(UsageError, FloatingPointError):
    """Training produced a non-finite loss (learning rate too high, or bad data)."""


class DownloadError(UsageError, ConnectionError):
    """A download failed (no network, or the source moved)."""
