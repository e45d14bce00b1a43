"""Folders that may live in a bucket: `gs://`, `s3://`, `az://` (through `etils.epath` and fsspec) or local.

The code that reads and writes files works on local folders. A remote folder gets a local twin under the
user's cache (`~/.cache/dreambooth_jax/folders/<scheme>/<bucket>/<path>`, or under $DREAMBOOTH_JAX_CACHE):

- inputs (a model, instance photos) are mirrored: `Folder(uri).pull()` downloads what the twin lacks (files of
  another size count as changed), so a second run reads from disk;
- outputs (exports, logs, validation images, class images) are written to the twin, then `push(...)` uploads
  them, files first and a marker file (e.g. `model_index.json`) last, so a reader never sees half an export;
- Orbax checkpoints go to the remote folder directly (`Folder.remote_path`): Orbax and TensorStore write to
  buckets natively, each process its own shards.

For a local folder `local` is the folder itself and `pull` / `push` do nothing.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import logging
import os

from dreambooth_jax.errors import MissingFileError, OutputError, UsageError
from dreambooth_jax.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

# URI scheme -> the fsspec package that serves it through etils.epath.
REMOTE_SCHEMES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}


def scheme(path) -> str | None:
    """'gs' of 'gs://bucket/x'; None for a local path."""
    head, sep, _ = str(path).partition("://")
    return head.lower() if sep and head.replace("+", "").isalnum() else None


def is_remote(path) -> bool:
    return scheme(path) is not None


def check_backend(path, flag: str) -> None:
    """Raises one clear error for a path no backend serves: an unknown scheme, or a known one whose fsspec
    package is not installed."""
    kind = scheme(path)
    if kind is None:
        return
    if kind not in REMOTE_SCHEMES:
        raise UsageError(f"{flag} {path}: unknown scheme {kind}://; use a local folder or "
                         f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    package = REMOTE_SCHEMES[kind]

    if importlib.util.find_spec(package) is None:
        raise UsageError(f"{flag} {path}: {kind}:// paths need the {package} package (pip install {package})")


def remote_path(uri: str):
    """The `etils.epath.Path` of a remote URI (the one place a URI becomes a path object)."""
    from etils import epath  # slow to import (fsspec and its backends): only bucket paths need it

    return epath.Path(uri)


def cache_root() -> str:
    return os.environ.get("DREAMBOOTH_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dreambooth_jax")


class Folder:
    """A folder given by the user, local or remote; see the module docstring."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/") or str(uri)
        self.remote = is_remote(self.uri)
        if self.remote:
            kind, _, rest = self.uri.partition("://")
            # Readable and unique: scheme/bucket/path; a hash guards against odd characters.
            safe = "".join(c if c.isalnum() or c in "-_./" else "_" for c in rest).strip("/")
            digest = hashlib.sha1(self.uri.encode()).hexdigest()[:8]
            self.local = os.path.join(cache_root(), "folders", kind, f"{safe}-{digest}")
        else:
            self.local = self.uri

    @property
    def remote_path(self):
        """Where libraries that write to buckets themselves (Orbax) go: the remote path, or the local
        folder."""
        return remote_path(self.uri) if self.remote else os.path.abspath(self.local)

    def join(self, *parts: str) -> str:
        return "/".join([self.uri, *parts]) if self.remote else os.path.join(self.uri, *parts)

    def exists(self) -> bool:
        return remote_path(self.uri).is_dir() if self.remote else os.path.isdir(self.uri)

    def count_images(self) -> int:
        """Image files (by extension) directly in the folder, listed without downloading them."""
        if not self.exists():
            return 0
        names = (p.name for p in remote_path(self.uri).iterdir()) if self.remote else os.listdir(self.uri)
        return sum(1 for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))

    def pull(self, patterns: tuple[str, ...] | None = None, *, required: bool = True) -> str:
        """Downloads the remote folder's files (matching `patterns`, relative paths, all when None) that the
        local twin lacks; returns the local folder."""
        if not self.remote:
            return self.local
        root = remote_path(self.uri)
        if not root.is_dir():
            if required:
                raise MissingFileError(f"{self.uri}: no such folder")
            os.makedirs(self.local, exist_ok=True)
            return self.local
        fetched = 0
        for directory, _, files in root.walk():
            for name in files:
                source = directory / name
                rel = str(source.relative_to(root))
                if patterns is not None and not any(fnmatch.fnmatch(rel, p) for p in patterns):
                    continue
                target = os.path.join(self.local, rel)
                if os.path.isfile(target) and os.path.getsize(target) == source.stat().length:
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                tmp = f"{target}.{os.getpid()}.part"
                with source.open("rb") as src, open(tmp, "wb") as dst:
                    while chunk := src.read(64 << 20):
                        dst.write(chunk)
                os.replace(tmp, target)
                fetched += 1
        if fetched:
            log.info("fetched %d files of %s into %s", fetched, self.uri, self.local)
        return self.local

    def push(self, *relpaths: str, last: str | None = None) -> None:
        """Uploads these files or folders (relative to the folder) from the local twin; `last` after all
        others (a marker that says the rest is complete)."""
        if not self.remote:
            return
        files = []
        for rel in relpaths:
            path = os.path.join(self.local, rel)
            if os.path.isdir(path):
                for directory, _, names in os.walk(path):
                    files += [os.path.relpath(os.path.join(directory, n), self.local) for n in sorted(names)]
            elif os.path.isfile(path):
                files.append(rel)
        if last is not None:
            files = [f for f in files if f != last] + [last]
        root = remote_path(self.uri)
        for rel in files:
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(os.path.join(self.local, rel), "rb") as src, target.open("wb") as dst:
                while chunk := src.read(64 << 20):
                    dst.write(chunk)

    def prepare_output(self, flag: str = "--output_dir") -> None:
        """Creates the folder (remote: checks it can be written, with a probe file) or fails with one clear
        error before anything else happens."""
        check_backend(self.uri, flag)
        try:
            os.makedirs(self.local, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{flag} {self.uri}: cannot create it ({e})") from e
        if not os.access(self.local, os.W_OK):
            raise OutputError(f"{flag} {self.uri} is not writable")
        if self.remote:
            probe = remote_path(self.uri) / f".write-probe-{os.getpid()}"
            try:
                remote_path(self.uri).mkdir(parents=True, exist_ok=True)
                probe.write_text("ok")
                probe.unlink()
            except Exception as e:  # the backends raise their own types (auth, permissions, no bucket)
                raise OutputError(f"{flag} {self.uri}: cannot write there ({type(e).__name__}: {e})") from e
