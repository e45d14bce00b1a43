"""Writing generated images: PNGs with their generation settings in the metadata, and contact sheets."""

from __future__ import annotations

import json
import math
import os

import numpy as np
from PIL import Image, PngImagePlugin

METADATA_KEY = "dreambooth_jax"  # PNG text chunk holding the settings as JSON


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [H, W, 3] in [0, 1] -> uint8, rounded as diffusers' `numpy_to_pil`."""
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: str, metadata: dict) -> None:
    """Saves one image; `metadata` goes into text chunks (each key, and all of it as JSON)."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    info.add_text(METADATA_KEY, json.dumps(metadata))
    tmp = path + ".tmp"
    Image.fromarray(to_uint8(image)).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def read_png_metadata(path: str) -> dict:
    """The settings `save_png` stored (empty if the PNG has none)."""
    with Image.open(path) as im:
        raw = im.text.get(METADATA_KEY) if hasattr(im, "text") else None
    return json.loads(raw) if raw else {}


def contact_sheet(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """[N, H, W, 3] -> one [rows*H, columns*W, 3] grid (blank cells white)."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    sheet = np.ones((rows * h, columns * w, c), images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        sheet[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return sheet
