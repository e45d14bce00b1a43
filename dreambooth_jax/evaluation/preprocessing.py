"""transformers' PIL image processors (ViT/DINO, CLIP), reproduced bit for bit in NumPy + PIL."""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from dreambooth_jax.errors import UsageError

IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BILINEAR, BICUBIC = 2, 3  # PIL.Image.Resampling values, as in `preprocessor_config.json`


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """transformers' PIL image processor: resize -> [center crop] -> x / 255 -> (x - mean) / std.

    `shortest_edge=False` resizes to `size` x `size` (`ViTImageProcessor`); True resizes the shorter side
    to `size` keeping the aspect ratio, then center-crops `crop_size` (`CLIPImageProcessor`).
    """

    size: int = 224
    shortest_edge: bool = False
    crop_size: int | None = None
    resample: int = BILINEAR
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD

    @classmethod
    def from_processor_config(cls, d: dict) -> ImagePreprocessing:
        """Reads a `preprocessor_config.json` dict (square sizes only; resize/normalize must be on). Missing
        keys take the defaults of the processor class it names (`CLIPImageProcessor` or
        `ViTImageProcessor`)."""
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if not d.get(key, True):
                raise UsageError(f"{key}=False is not supported")
        kind = str(d.get("image_processor_type") or d.get("feature_extractor_type") or "")
        base = CLIP_PREPROCESSING if "CLIP" in kind else VIT_PROCESSOR_DEFAULTS
        size = d.get("size", base.size)
        if isinstance(size, dict) and "shortest_edge" in size:
            shortest, size = True, size["shortest_edge"]
        elif isinstance(size, dict):
            if size["height"] != size["width"]:
                raise UsageError(f"size={size} is not supported; expected a square")
            shortest, size = False, size["height"]
        else:  # an int (old `*FeatureExtractor` configs): a square for ViT, the shortest edge for CLIP, as
            shortest = base.shortest_edge  # each processor's `get_size_dict(default_to_square=...)` reads it
        center_crop = d.get("do_center_crop", base.crop_size is not None)
        crop = d.get("crop_size", base.crop_size) if center_crop else None
        if isinstance(crop, dict):
            if crop["height"] != crop["width"]:
                raise UsageError(f"crop_size={crop} is not supported; expected a square")
            crop = crop["height"]
        return cls(size=size, shortest_edge=shortest, crop_size=crop,
                   resample=int(d.get("resample", base.resample)), mean=tuple(d.get("image_mean", base.mean)),
                   std=tuple(d.get("image_std", base.std)))


# facebook/dino-vits16's preprocessor_config.json: 224 x 224 bilinear, ImageNet mean/std (not the 0.5/0.5 of
# `ViTImageProcessor`'s own defaults). openai/clip-vit-base-patch32's: `CLIPImageProcessor` defaults.
DINO_PREPROCESSING = ImagePreprocessing()
# `ViTImageProcessor()`
VIT_PROCESSOR_DEFAULTS = ImagePreprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CLIP_PREPROCESSING = ImagePreprocessing(shortest_edge=True, crop_size=224, resample=BICUBIC,
                                        mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)


def _resize_crop(image: np.ndarray, cfg: ImagePreprocessing) -> np.ndarray:
    pil = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    width, height = pil.size
    if cfg.shortest_edge:  # transformers' `get_resize_output_image_size(default_to_square=False)`
        short, long = min(width, height), max(width, height)
        new_short, new_long = cfg.size, int(cfg.size * long / short)
        height, width = (new_long, new_short) if width <= height else (new_short, new_long)
    else:
        height = width = cfg.size
    out = np.asarray(pil.resize((width, height), resample=cfg.resample))  # uint8 [h, w, 3], PIL rounds
    if cfg.crop_size:
        crop = cfg.crop_size
        if crop > min(height, width):
            raise UsageError(f"crop_size={crop} exceeds the resized image {height}x{width}")
        top, left = (height - crop) // 2, (width - crop) // 2
        out = out[top : top + crop, left : left + crop]
    return out


def preprocess(images, cfg: ImagePreprocessing) -> np.ndarray:
    """uint8 [H, W, 3] arrays (or PIL images), any sizes -> float32 [B, S, S, 3], as the HF processor."""
    out = []
    for image in images:
        x = _resize_crop(np.asarray(image), cfg).astype(np.float64) * (1 / 255)  # float64, as `rescale`
        x = x.astype(np.float32)
        out.append((x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32))
    return np.stack(out)


def preprocess_dino(images, size: int = 224) -> np.ndarray:
    """DINO's `ViTImageProcessor`: bilinear resize to `size` x `size`, ImageNet normalization."""
    return preprocess(images, dataclasses.replace(DINO_PREPROCESSING, size=size))


def preprocess_clip(images, size: int = 224) -> np.ndarray:
    """`CLIPImageProcessor`: bicubic resize of the shorter side to `size`, center crop, CLIP normalization."""
    return preprocess(images, dataclasses.replace(CLIP_PREPROCESSING, size=size, crop_size=size))
