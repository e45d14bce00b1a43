"""Image files in and out: decoding any image a user may have (EXIF orientation, alpha, 16-bit, CMYK) to RGB,
resizing as diffusers' DreamBooth transform does, listing image folders; writing PNGs with their generation
settings in the metadata, and contact sheets."""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import struct

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from dreambooth_jax.errors import MissingFileError, UsageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Everything Pillow raises on a file that is not a decodable image.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)


class ImageError(UsageError):
    """A file that cannot be read as an image; the message names the file."""


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        # 16-bit greyscale (PNG): scale 0..65535 onto 0..255; convert("L") would clip everything above 255.
        grey = np.asarray(im).astype(np.float64).clip(0, 65535) / 257.0
        return Image.fromarray(np.round(grey).astype(np.uint8)).convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:  # also P, L or RGB with a tRNS chunk
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, P, CMYK, YCbCr, 1, ...; embedded ICC profiles are ignored, as in diffusers


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(w, h) with the shorter side at `resolution`, rounded down as torchvision's `Resize(int)`."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def _open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return _to_rgb(ImageOps.exif_transpose(im))
    except _DECODE_ERRORS as e:
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def read_image(path: str) -> np.ndarray:
    """An image file at its own size as uint8 RGB [H, W, 3] (EXIF orientation, alpha and modes handled as
    in `load_image`). Raises ImageError naming the file when it is not a readable image."""
    return np.asarray(_open_rgb(path), dtype=np.uint8)


def load_image(path: str, resolution: int, *, warn: bool = True) -> np.ndarray:
    """Decodes an image file to uint8 RGB [H, W, 3] with its shorter side resized to `resolution`.

    The resize is PIL bilinear with antialiasing, which is exactly what diffusers' DreamBooth transform
    (`transforms.Resize(size, interpolation=BILINEAR)` on a PIL image) computes; the longer side is rounded
    down as torchvision does. EXIF orientation is applied first. Alpha (RGBA, LA, P or L with transparency)
    is composited on white, 16-bit greyscale ('I;16', 'I') is scaled to 8 bits, CMYK and palette images are
    converted by Pillow. An image smaller than `resolution` is upscaled, with a logged warning if `warn`.

    Raises:
      ImageError: the file is not a readable image (the message names it).
    """
    im = _open_rgb(path)
    if warn:
        warn_if_small(path, *im.size, resolution)
    size = resized_size(*im.size, resolution)
    if size != im.size:
        im = im.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def probe_size(path: str) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied), from the header, after checking the file
    structure without decoding pixels."""
    try:
        with Image.open(path) as im:
            im.verify()  # PNG: all chunk CRCs; other formats: little beyond the header
        with Image.open(path) as im:  # verify() leaves the image unusable
            width, height = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that swap width and height
                width, height = height, width
    except _DECODE_ERRORS as e:
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    return width, height


def warn_if_small(path: str, width: int, height: int, resolution: int) -> None:
    if min(width, height) < resolution:
        log.warning("%s: %dx%d is smaller than resolution %d; upscaling it", path, width, height, resolution)


def image_files(folder: str) -> list[str]:
    names = sorted(
        n
        for n in os.listdir(folder)
        if not n.startswith(".")  # hidden files, and macOS `._x.jpg` resource forks that are not images
        and n.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(folder, n))
    )
    return [os.path.join(folder, n) for n in names]


def list_images(folder: str) -> list[str]:
    """Sorted paths of the image files directly in `folder` (extension matched case-insensitively).

    Raises:
      FileNotFoundError: `folder` does not exist or is not a directory.
      ValueError: it holds no file with one of IMAGE_EXTENSIONS.
    """
    if not os.path.isdir(folder):
        raise MissingFileError(f"image folder {folder!r} does not exist or is not a directory")
    paths = image_files(folder)
    if not paths:
        raise UsageError(
            f"image folder {folder!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return paths


def count_images(folder: str) -> int:
    """How many readable image files `folder` holds (0 if it does not exist), e.g. to decide how many class
    images are still to be generated."""
    if not os.path.isdir(folder):
        return 0
    count = 0
    for path in image_files(folder):
        try:
            probe_size(path)
            count += 1
        except ImageError:
            pass
    return count


def center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of the centred `size` x `size` crop of an image, rounded as torchvision's `CenterCrop`."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


# ------------------------------------------------------------------------------------------------- writing
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


def next_index(output_dir: str) -> int:
    """1 + the highest image number already in `output_dir` (0 if none)."""
    numbers = [int(m.group(1)) for f in glob.glob(os.path.join(output_dir, "*.png"))
               if (m := re.match(r"(\d+)-seed", os.path.basename(f)))]
    return max(numbers, default=-1) + 1


def write_images(output_dir: str, prompts, images, *, seed: int, settings: dict, columns: int | None = None):
    """Saves generated images as `NNNNN-seedS.png` (numbered after those already there; image k has seed
    `seed + k`) with their prompt and `settings` in the PNG metadata and a `prompts.jsonl` line each, plus a
    contact sheet `grid-FIRST-LAST.png`. Returns (first number, last number, grid path)."""
    first = next_index(output_dir)
    with open(os.path.join(output_dir, "prompts.jsonl"), "a", encoding="utf-8") as log_file:
        for k, (prompt, image) in enumerate(zip(prompts, images)):
            meta = {"prompt": prompt, "seed": seed + k, **settings, "height": int(image.shape[0]),
                    "width": int(image.shape[1])}
            name = f"{first + k:05d}-seed{seed + k}.png"
            save_png(image, os.path.join(output_dir, name), meta)
            log_file.write(json.dumps({"file": name, **meta}) + "\n")
    last = first + len(images) - 1
    grid = os.path.join(output_dir, f"grid-{first:05d}-{last:05d}.png")
    save_png(contact_sheet(images, columns=columns), grid, {"images": f"{first:05d}..{last:05d}"})
    return first, last, grid
