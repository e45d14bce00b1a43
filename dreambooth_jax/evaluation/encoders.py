"""The metrics' encoders: DINO ViT and CLIP loaded from transformers folders (no torch), as batched, jitted,
data-parallel functions returning L2-normalized embeddings."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from transformers import CLIPTokenizer

from dreambooth_jax import fileio, parallel
from dreambooth_jax.diffusion.conditioning import tokenize_with_mask
from dreambooth_jax.evaluation import preprocessing
from dreambooth_jax.evaluation.metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL
from dreambooth_jax.models import clip, vision
from dreambooth_jax.weights import convert, discovery, hub

log = logging.getLogger(__name__)

# transformers-5 in-memory names (`layers.N.attention.q_proj`, `mlp.fc1`) -> the checkpoint names we mirror.
_VIT_RENAMES = (
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    (r"\.attention\.([qkv])_proj\.",
     lambda m: f".attention.attention.{dict(q='query', k='key', v='value')[m[1]]}."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
    (r"^encoder\.layer\.(\d+)\.", r"encoder.layer_\1."),  # `layer` is no `convert.LIST_ATTRIBUTES` entry
)


def vit_params_from_state_dict(state, config: vision.ViTConfig, *, dtype=None,
                               source: str = "checkpoint") -> dict:
    """A transformers `ViTModel` state dict (keys with or without `vit.`) -> our param tree."""
    state = convert.normalize_state_dict(state, strip_prefix="vit.")
    renamed = convert.rename_keys(state, _VIT_RENAMES)
    return convert.state_dict_to_params(renamed, vision.vit_abstract_params(config), dtype=dtype,
                                        source=source, ignore=(r"^pooler\.", r"^embeddings\.mask_token$"))


def load_vit(folder: str, *, dtype=None) -> tuple[vision.ViTModel, dict]:
    """(module, params) of a transformers `ViTModel` folder (`config.json`, `model.safetensors`), no torch."""
    config = vision.ViTConfig.from_diffusers_config(fileio.read_json(os.path.join(folder, "config.json")))
    state, source = discovery.load_state_dict(discovery.find_weight_files(folder, "model"))
    params = vit_params_from_state_dict(state, config, dtype=dtype, source=source)
    return vision.ViTModel(config), params


def clip_tower_config(d: dict, tower: str) -> dict:
    """A `CLIPModel` config's `text_config` / `vision_config`, with the overrides of the legacy
    `*_config_dict` key applied on top (as transformers' `CLIPConfig` does: old openai/* configs have
    them)."""
    return {**(d.get(f"{tower}_config") or {}), **(d.get(f"{tower}_config_dict") or {})}


def load_clip_model(folder: str, *, dtype=None):
    """The two towers of a transformers `CLIPModel` folder (`config.json`, `model.safetensors`), no torch.

    Returns:
      (vision module, vision params, text module, text params); the text module is our
      `clip.CLIPTextModelWithProjection`, whose `text_embeds` pair with the vision `image_embeds`.
    """
    d = fileio.read_json(os.path.join(folder, "config.json"))
    proj = d.get("projection_dim", 512)  # the model's, which overrides the towers' own
    vision_d = clip_tower_config(d, "vision")
    vision_cfg = dataclasses.replace(vision.CLIPVisionConfig.from_diffusers_config(vision_d),
                                     projection_dim=proj)
    text_d = {k: v for k, v in clip_tower_config(d, "text").items() if k != "model_type"}
    text_cfg = dataclasses.replace(clip.CLIPTextConfig.from_diffusers_config(text_d), projection_dim=proj)
    state, path = discovery.load_state_dict(discovery.find_weight_files(folder, "model"))
    towers = {}
    for tower, prefix, projection in (("vision", "vision_model.", "visual_projection."),
                                      ("text", "text_model.", "text_projection.")):
        part = {k: v for k, v in state.items() if k.startswith((prefix, projection))}
        towers[tower] = convert.normalize_state_dict(part, strip_prefix=prefix)
    vision_params = convert.state_dict_to_params(
        towers["vision"], vision.clip_vision_abstract_params(vision_cfg), dtype=dtype, source=path,
        ignore=(r"\.position_ids$",))
    text_params = convert.state_dict_to_params(
        towers["text"], clip.abstract_params(text_cfg, with_projection=True), dtype=dtype, source=path,
        ignore=clip.IGNORED_KEYS)
    return (vision.CLIPVisionModelWithProjection(vision_cfg), vision_params,
            clip.CLIPTextModelWithProjection(text_cfg), text_params)


def _preprocessing(folder: str,
                   default: preprocessing.ImagePreprocessing) -> preprocessing.ImagePreprocessing:
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        log.info("%s has no preprocessor_config.json; using the default preprocessing", folder)
        return default
    return preprocessing.ImagePreprocessing.from_processor_config(fileio.read_json(path))


def _l2_normalize(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Encoders:
    """The DINO ViT and the CLIP model, loaded from Hub ids or local folders, as batched jitted functions.

    Every method returns float32 L2-normalized embeddings on the host, one row per input.
    """

    def __init__(self, dino_model: str = DEFAULT_DINO_MODEL, clip_model: str = DEFAULT_CLIP_MODEL, *,
                 batch_size: int | None = None, mesh=None, dtype=jnp.float32):
        self.mesh = mesh or parallel.data_mesh()
        n = self.mesh.devices.size
        self.batch_size = parallel.pad_to_multiple(batch_size or 16 * n, n)
        dino_dir = hub.resolve(dino_model, what="model")
        clip_dir = hub.resolve(clip_model, what="model")
        self.dino_preprocessing = _preprocessing(dino_dir, preprocessing.DINO_PREPROCESSING)
        self.clip_preprocessing = _preprocessing(clip_dir, preprocessing.CLIP_PREPROCESSING)
        dino, dino_params = load_vit(dino_dir, dtype=dtype)
        clip_vision, vision_params, clip_text, text_params = load_clip_model(clip_dir, dtype=dtype)
        self.tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
        # A folder without tokenizer_config.json leaves model_max_length at 1e30: use the model's length.
        self.tokenizer.model_max_length = min(self.tokenizer.model_max_length,
                                              clip_text.config.max_position_embeddings)
        self.models = {"dino": dino_model, "clip": clip_model}

        # Kept on the host, placed on the devices at the first use (and freed by `release`), so that a caller
        # can load the encoders early, to fail fast, without holding device memory meanwhile.
        host = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
        self._host_params = {"dino": host(dino_params), "clip_image": host(vision_params),
                             "clip_text": host(text_params)}
        self._params = None
        self._fns = {
            "dino": jax.jit(lambda p, x: _l2_normalize(dino.apply({"params": p}, x.astype(dtype)).cls)),
            "clip_image": jax.jit(lambda p, x: _l2_normalize(clip_vision.apply({"params": p}, x.astype(dtype))
                                                             .image_embeds)),
            "clip_text": jax.jit(
                lambda p, ids: _l2_normalize(clip_text.apply({"params": p}, ids).text_embeds)),
        }

    def release(self) -> None:
        """Frees the device copies of the weights (they are placed again at the next use)."""
        self._params = None

    def _run(self, name: str, inputs: np.ndarray) -> np.ndarray:
        if self._params is None:
            self._params = parallel.put_replicated(self._host_params, self.mesh)
        out = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            pad = self.batch_size - len(chunk)  # a fixed shape: one compile per encoder
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
            result = self._fns[name](self._params[name], parallel.put_batch(padded, self.mesh))
            out.append(parallel.fetch(result)[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def dino(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 [H, W, 3] images (any sizes) -> [N, D] DINO embeddings."""
        return self._run("dino", preprocessing.preprocess(images, self.dino_preprocessing))

    def clip_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self._run("clip_image", preprocessing.preprocess(images, self.clip_preprocessing))

    def clip_texts(self, prompts: Sequence[str]) -> np.ndarray:
        return self._run("clip_text", tokenize_with_mask(self.tokenizer, prompts)[0])

    def embed(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return {"dino": self.dino(images), "clip": self.clip_images(images)}
