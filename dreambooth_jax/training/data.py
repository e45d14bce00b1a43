"""DreamBooth training data: instance (and prior-preservation class) images, prompts and augmentation.

Every batch is a pure function of (seed, step, batch_size): no iterator state, so a resumed run continues
exactly and each host of a multi-host run can compute just its own rows. Preprocessing follows diffusers'
`train_dreambooth.py`: resize the shorter side with PIL bilinear (what torchvision's `Resize` does on PIL
images), center or random crop, optional horizontal flip, scale to [-1, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence

import numpy as np

from dreambooth_jax.errors import UsageError
from dreambooth_jax.images import (
    ImageError,
    center_crop_offsets,
    list_images,
    load_image,
    probe_size,
    resized_size,
    warn_if_small,
)

log = logging.getLogger(__name__)

# Extra entropy words that keep the permutation streams apart from the (seed, step, row) augmentation
# streams (SeedSequence zero-pads short entropy, so length alone would not separate them).
_INSTANCE_PERM_TAG = 0x5045524D
_CLASS_PERM_TAG = 0x434C4153


@dataclasses.dataclass(frozen=True)
class Concept:
    """One subject: its instance images and prompt, and (for prior preservation) its class images."""

    instance_data_dir: str
    instance_prompt: str
    class_data_dir: str | None = None
    class_prompt: str | None = None


def caption_for(image_path: str, default_prompt: str) -> str:
    """The text of a `.txt` file beside the image with the same stem, or `default_prompt` if there is none
    (or it is blank)."""
    txt = os.path.splitext(image_path)[0] + ".txt"
    if os.path.isfile(txt):
        with open(txt, encoding="utf-8-sig") as f:  # -sig: drop a BOM written by Windows editors
            caption = f.read().strip()
        if caption:
            return caption
    return default_prompt


def _to_float(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1], as ToTensor() then Normalize([0.5], [0.5])."""
    return image.astype(np.float32) / 127.5 - 1.0


class DreamBoothData:
    """The DreamBooth training set of one or more concepts; see `batch` for the order of examples.

    Folders are scanned at construction, so a bad file fails early, naming it; with `skip_bad_images` it
    is skipped with a warning instead and listed in `skipped`. Instance images are decoded eagerly (there
    are few); class images are only header-checked here, then decoded on first use and kept in an LRU cache
    of `cache_size` resized, uncropped images (a truncated JPEG is therefore only caught when decoded).
    Class folders are read only with `with_prior_preservation`.

    Attributes:
      instance_paths, class_paths: the images by index (the indices of `batch_plan` and `fixed_view`);
        a class folder shared by two concepts appears once per concept.
      num_instance_images, num_class_images: their counts over all concepts.
      skipped: paths of the bad files skipped.
    """

    def __init__(
        self,
        concepts: Sequence[Concept],
        *,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        with_prior_preservation: bool = False,
        skip_bad_images: bool = False,
        seed: int = 0,
        cache_size: int = 2048,
    ):
        if not concepts:
            raise UsageError("no concepts given")
        if resolution < 1 or seed < 0:
            raise UsageError(f"need resolution >= 1 and seed >= 0, got {resolution}, {seed}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.skip_bad_images = skip_bad_images
        self.skipped: list[str] = []

        self.instance_paths: list[str] = []
        self._instance_images: list[np.ndarray] = []  # uint8 [h, w, 3], shorter side = resolution
        self._original_sizes = {"instance": [], "class": []}  # (h, w) as stored, EXIF rotation applied
        self._instance_prompts: list[str] = []
        instance_concept = []
        for c, concept in enumerate(concepts):
            found = 0
            for path in list_images(concept.instance_data_dir):
                try:
                    width, height = probe_size(path)
                    image = load_image(path, resolution)
                except ImageError as e:
                    self._skip(path, e)
                    continue
                self._original_sizes["instance"].append((height, width))
                self.instance_paths.append(path)
                self._instance_images.append(image)
                self._instance_prompts.append(caption_for(path, concept.instance_prompt))
                instance_concept.append(c)
                found += 1
            if not found:
                raise UsageError(f"no readable instance images in {concept.instance_data_dir!r}")
        self._instance_concept = np.asarray(instance_concept)
        self._instance_counts = np.bincount(self._instance_concept, minlength=len(concepts))

        self._concepts = tuple(concepts)
        self.with_prior_preservation = False
        self.class_paths: list[str] = []
        self._class_sizes: list[tuple[int, int]] = []  # resized (w, h), known without decoding
        self._class_prompts: list[str] = []
        self._class_by_concept: list[np.ndarray] = []  # per concept: its indices into class_paths
        self.num_instance_images = len(self.instance_paths)
        self.num_class_images = 0
        if with_prior_preservation:
            self.add_class_images()

        # Keyed by path, so a class folder shared by concepts is decoded once.
        self._class_image = functools.lru_cache(maxsize=cache_size)(
            functools.partial(load_image, resolution=resolution, warn=False)
        )
        self._instance_epoch = functools.lru_cache(maxsize=4)(self._instance_epoch_uncached)
        self._class_perm = functools.lru_cache(maxsize=4 * len(concepts))(self._class_perm_uncached)

    def _skip(self, path: str, error: ImageError) -> None:
        if not self.skip_bad_images:
            raise error
        log.warning("skipping %s", error)
        self.skipped.append(path)

    def add_class_images(self) -> None:
        """Scans the concepts' class folders and turns prior preservation on: from now on every batch pairs
        each instance row with a class row. Called by the constructor with `with_prior_preservation`, or
        later, once missing class images have been generated (instance images are read first, so bad ones fail
        early)."""
        if self.with_prior_preservation:
            raise ValueError("class images were already added")
        for concept in self._concepts:
            self._scan_class_folder(concept)
        self.num_class_images = len(self.class_paths)
        self.with_prior_preservation = True

    def _scan_class_folder(self, concept: Concept) -> None:
        if concept.class_data_dir is None or concept.class_prompt is None:
            raise UsageError(f"prior preservation needs class_data_dir and class_prompt for {concept}")
        indices = []
        for path in list_images(concept.class_data_dir):
            try:
                width, height = probe_size(path)
            except ImageError as e:
                self._skip(path, e)
                continue
            warn_if_small(path, width, height, self.resolution)
            indices.append(len(self.class_paths))
            self.class_paths.append(path)
            self._class_sizes.append(resized_size(width, height, self.resolution))
            self._original_sizes["class"].append((height, width))
            self._class_prompts.append(concept.class_prompt)
        if not indices:
            raise UsageError(f"no readable class images in {concept.class_data_dir!r}")
        self._class_by_concept.append(np.asarray(indices))

    def prompts(self) -> list[str]:
        """Every distinct prompt a batch can hold (instance captions, then class prompts), in first-seen
        order."""
        return list(dict.fromkeys(self._instance_prompts + self._class_prompts))

    def _instance_epoch_uncached(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's permutation of all instance images, and for each position how many earlier positions of
        the epoch hold an image of the same concept (which picks the paired class image)."""
        perm = np.random.default_rng((self.seed, epoch, _INSTANCE_PERM_TAG)).permutation(
            self.num_instance_images
        )
        concept = self._instance_concept[perm]
        rank = np.empty_like(perm)
        for c in range(len(self._instance_counts)):
            rank[concept == c] = np.arange(self._instance_counts[c])
        return perm, rank

    def _class_perm_uncached(self, concept: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, epoch, _CLASS_PERM_TAG, concept))
        return self._class_by_concept[concept][rng.permutation(len(self._class_by_concept[concept]))]

    def _augment(self, rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int, bool]:
        """(top, left, flip) for an image of resized `size` (w, h). The draws are made whatever the settings,
        so a row's random stream does not depend on them."""
        width, height = size
        top, left = (
            int(rng.integers(height - self.resolution + 1)),
            int(rng.integers(width - self.resolution + 1)),
        )
        flip = bool(rng.random() < 0.5) and self.random_flip
        if self.center_crop:
            top, left = center_crop_offsets(height, width, self.resolution)
        return top, left, flip

    def batch_plan(self, step: int, batch_size: int, *, start: int = 0, stop: int | None = None) -> dict:
        """Which images rows [start:stop) of step `step`'s batch use, and how they are cropped and flipped,
        without decoding anything.

        Returns {"instance_indices": int64 [n], "instance_crops": int64 [n, 2] (top, left), "instance_flips":
        bool [n], "instance_prompts": list[str]}, and the same "class_*" keys with prior preservation. With
        `center_crop` and latents cached from `fixed_view(kind, index, flip)` this is all a trainer needs.
        """
        stop = batch_size if stop is None else stop
        if step < 0 or batch_size < 1 or not 0 <= start <= stop <= batch_size:
            raise ValueError(f"bad step/rows: step={step}, batch_size={batch_size}, rows [{start}:{stop})")
        kinds = ("instance", "class") if self.with_prior_preservation else ("instance",)
        rows = {kind: [] for kind in kinds}  # (index, top, left, flip) per row
        for row in range(start, stop):
            epoch, pos = divmod(step * batch_size + row, self.num_instance_images)
            perm, rank = self._instance_epoch(epoch)
            index = int(perm[pos])
            rng = np.random.default_rng((self.seed, step, row))
            rows["instance"].append((index, *self._augment(rng, self._instance_images[index].shape[1::-1])))
            if self.with_prior_preservation:
                # The k-th draw of a concept's instance images is paired with the k-th draw of its class
                # images.
                c = int(self._instance_concept[index])
                k = epoch * int(self._instance_counts[c]) + int(rank[pos])
                class_epoch, class_pos = divmod(k, len(self._class_by_concept[c]))
                class_index = int(self._class_perm(c, class_epoch)[class_pos])
                rows["class"].append((class_index, *self._augment(rng, self._class_sizes[class_index])))
        plan = {}
        for kind in kinds:
            table = np.asarray(rows[kind], np.int64).reshape(-1, 4)
            prompts = self._instance_prompts if kind == "instance" else self._class_prompts
            plan[f"{kind}_indices"] = table[:, 0]
            plan[f"{kind}_crops"] = table[:, 1:3]
            plan[f"{kind}_flips"] = table[:, 3].astype(bool)
            plan[f"{kind}_prompts"] = [prompts[i] for i in table[:, 0]]
        return plan

    def batch(self, step: int, batch_size: int, *, start: int = 0, stop: int | None = None) -> dict:
        """The global batch of training step `step`, or only its rows [start:stop) (equal to the same rows of
        the full batch, so each host can build its own slice).

        Examples are drawn epoch by epoch through a permutation of all instance images of all concepts, seeded
        by (seed, epoch): global example g = step * batch_size + row is position g % N of epoch g // N. With
        prior preservation each row also gets a class image of the same concept, drawn likewise through a
        per-concept permutation. Crop offsets and flips come from np.random.default_rng((seed, step, row)).

        Returns:
          {"instance_images": float32 [n, R, R, 3] in [-1, 1], "instance_prompts": list[str]} and the other
          `batch_plan` keys ("instance_indices", "instance_crops", "instance_flips"), plus the same "class_*"
          keys with prior preservation.
        """
        out = self.batch_plan(step, batch_size, start=start, stop=stop)
        kinds = ("instance", "class") if self.with_prior_preservation else ("instance",)
        for kind in kinds:
            views = [
                self.view(kind, int(i), (int(top), int(left)), bool(flip))
                for i, (top, left), flip in zip(
                    out[f"{kind}_indices"], out[f"{kind}_crops"], out[f"{kind}_flips"]
                )
            ]
            empty = np.zeros((0, self.resolution, self.resolution, 3), np.float32)
            out[f"{kind}_images"] = np.stack(views) if views else empty
        return out

    def _uint8(self, kind: str, index: int) -> np.ndarray:
        if kind == "instance":
            return self._instance_images[index]
        if kind == "class":
            return self._class_image(self.class_paths[index])
        raise ValueError(f"kind must be 'instance' or 'class', got {kind!r}")

    def view(self, kind: str, index: int, crop: tuple[int, int], flip: bool) -> np.ndarray:
        """Image `index` of `kind` cropped at (top, left) to the resolution, optionally flipped: float32 [R,
        R, 3]."""
        top, left = crop
        image = self._uint8(kind, index)[top : top + self.resolution, left : left + self.resolution]
        if image.shape[:2] != (self.resolution, self.resolution):  # class crops come from header sizes
            raise ImageError(f"{self.class_paths[index]}: decoded size differs from its header")
        return _to_float(image[:, ::-1] if flip else image)

    def _resized_size(self, kind: str, index: int) -> tuple[int, int]:
        """(w, h) of image `index` of `kind` after the resize, known without decoding class images."""
        if kind == "instance":
            return self._instance_images[index].shape[1::-1]
        if kind == "class":
            return self._class_sizes[index]
        raise ValueError(f"kind must be 'instance' or 'class', got {kind!r}")

    def centered_crop(self, kind: str, index: int) -> tuple[int, int]:
        """(top, left) of the centred crop of image `index` of `kind`."""
        width, height = self._resized_size(kind, index)
        return center_crop_offsets(height, width, self.resolution)

    def fixed_view(self, kind: str, index: int, flip: bool = False) -> np.ndarray:
        """Image `index` of `kind` ('instance' or 'class') center-cropped, optionally flipped: float32
        [R, R, 3] in [-1, 1], e.g. for caching latents."""
        return self.view(kind, index, self.centered_crop(kind, index), flip)

    def geometry(self, kind: str, index: int, crop: tuple[int, int], flip: bool) -> np.ndarray:
        """Where one view comes from: float32 [6] = (original height, original width, crop top, crop left, R,
        R) in pixels; SDXL's size and crop conditioning, as diffusers' `train_dreambooth_lora_sdxl.py`
        computes it.

        The original size is the image file's own (each class image its own; diffusers reuses the instance
        image's). diffusers flips before cropping, so its crop corner is in the flipped image's frame: we crop
        first, so a flipped view's left edge is mirrored, `W - left - R` for a resized width W (as kohya
        does).
        """
        top, left = crop
        if flip:
            left = self._resized_size(kind, index)[0] - left - self.resolution
        return np.array([*self._original_sizes[kind][index], top, left, self.resolution, self.resolution],
                        np.float32)
