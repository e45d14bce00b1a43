"""Small file helpers shared by every layer: JSON read with clear errors, JSON written atomically."""

from __future__ import annotations

import json
import os

from dreambooth_jax.errors import MissingFileError, UsageError


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise MissingFileError(f"missing {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from e


def write_json(path: str, data: dict, *, sort_keys: bool = True) -> None:
    """Writes `data` atomically (a temporary file renamed into place)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=sort_keys)
        f.write("\n")
    os.replace(tmp, path)

