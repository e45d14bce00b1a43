"""A tiny random Stable-Diffusion-1-style pipeline made without torch or network: the demo's model.

Random init of our own Flax modules from tiny configs, a small CLIP BPE tokenizer written from a word list,
an SD-1.5-like PNDM scheduler config; written with `save_pipeline`, so diffusers loads it too.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from transformers import CLIPTokenizer, T5Tokenizer

from dreambooth_jax.evaluation import preprocessing
from dreambooth_jax.families import SD, components
from dreambooth_jax.fileio import write_json
from dreambooth_jax.models import clip, unet, vae, vision
from dreambooth_jax.pipeline import Pipeline, parse_dtype, save_pipeline
from dreambooth_jax.weights import convert, safetensors_io

TOKENIZER_MAX_LENGTH = 16

# Words the tiny tokenizer knows as whole tokens; anything else falls back to byte-level pieces.
_WORDS = (
    "a photo of sks dog cat in the on with beach snow forest red blue painting style person car "
    "backpack toy cube sunglasses wearing jumping floating sleeping berlin city wooden floor purple "
    "shiny high quality low blurry ugly bad picture image"
).split()

SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "prediction_type": "epsilon", "timestep_spacing": "leading", "trained_betas": None,
}


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of GPT-2 / CLIP BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tokenizer_files(out_dir: str) -> tuple[str, str]:
    """Writes a small CLIP `vocab.json` + `merges.txt`: every byte symbol, then one merge chain per word."""
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair, merged = f"{symbols[0]} {symbols[1]}", symbols[0] + symbols[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in vocab:
                vocab.append(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    vocab_path, merges_path = os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def make_tokenizer(pad_token: str = "<|endoftext|>"):
    """A `transformers.CLIPTokenizer` over the tiny vocabulary (max length 16)."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = write_tokenizer_files(tmp)
        # `vocab=`/`merges=`: transformers 5 silently ignores the old `vocab_file=` keyword names.
        tok = CLIPTokenizer(vocab=vocab_path, merges=merges_path, pad_token=pad_token)
    tok.model_max_length = TOKENIZER_MAX_LENGTH
    return tok


def make_t5_tokenizer(max_length: int = 32):
    """A `transformers.T5Tokenizer` (SentencePiece unigram, as T5's) over the tiny vocabulary: the words, then
    single letters for anything else; ids 0-2 are T5's <pad>, </s>, <unk>."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(dict.fromkeys(_WORDS))]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = max_length
    return tok


def tiny_configs(vocab_size: int):
    """(text encoder, UNet, VAE) configs of the tiny SD-1-style model (latents are 1/8 of the image)."""
    text = clip.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=TOKENIZER_MAX_LENGTH, hidden_act="quick_gelu",
        projection_dim=32, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    unet_cfg = unet.UNetConfig(
        sample_size=8, block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4,
    )
    vae_cfg = vae.VAEConfig(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=64, scaling_factor=0.18215,
    )
    return text, unet_cfg, vae_cfg


def random_pipeline(family, configs: dict, tokenizers: dict, scheduler_config: dict, *, seed: int = 0,
                    dtype="fp32", param_dtype=None, weights: str = "device"):
    """A `Pipeline` of `family` (e.g. `families.SD`) of freshly initialised modules (benchmarks, the tiny demo
    model).

    Args:
      configs: {component folder: its config dataclass} for every component of the family, in the order their
        init keys are drawn (split from `seed`).
      tokenizers: {tokenizer folder: tokenizer} for every tokenizer of the family.
      weights: 'device' (initialised) or 'none' (the params are `jax.ShapeDtypeStruct`s: nothing is allocated,
        as `load_pipeline(..., weights="none")`, for memory preflights of full-size models).
    """
    if weights not in ("device", "none"):
        raise ValueError(f"weights={weights!r}: 'device' or 'none'")
    if set(configs) != set(family.components) or set(tokenizers) != set(family.tokenizers):
        raise ValueError(f"a {family.name} pipeline needs configs of {sorted(family.components)} and "
                         f"tokenizers {sorted(family.tokenizers)}; got {sorted(configs)} and "
                         f"{sorted(tokenizers)}")
    dtype = parse_dtype(dtype)
    kw = dict(dtype=dtype, param_dtype=parse_dtype(param_dtype) or dtype)
    models = {name: components.module_for(family.components[name], cfg, **kw)
              for name, cfg in configs.items()}
    text_len = configs[family.text_encoders[0]].max_position_embeddings

    def init_fn(name):
        kind, cfg, model = family.components[name], configs[name], models[name]
        if kind == "unet":
            args, kwargs = unet.dummy_inputs(cfg, seq_len=text_len)
            return lambda rng: model.init(rng, *args, **kwargs)
        if kind == "vae":
            size = 2 ** (len(cfg.block_out_channels) - 1)
            return lambda rng: model.init(rng, jnp.zeros((1, size, size, cfg.in_channels)), rng)
        return lambda rng: model.init(rng, jnp.zeros((1, cfg.max_position_embeddings), jnp.int32))

    rngs = dict(zip(models, jax.random.split(jax.random.PRNGKey(seed), len(models))))
    # Jitted init: one compile is much faster than running every op eagerly.
    init = jax.eval_shape if weights == "none" else lambda f, rng: jax.jit(f)(rng)
    params = {name: init(init_fn(name), rngs[name])["params"] for name in models}
    modules = {name: models[name] for name in family.components}  # in the family's order
    return Pipeline(family=family, modules=modules, tokenizers={n: tokenizers[n] for n in family.tokenizers},
                    scheduler_config=dict(scheduler_config), params={n: params[n] for n in family.components},
                    source="random")


def sd_configs(text_cfg, unet_cfg, vae_cfg) -> dict:
    """`random_pipeline`'s configs of an SD 1.x/2.x pipeline, in the init-key order of the demo's model."""
    return {"text_encoder": text_cfg, "unet": unet_cfg, "vae": vae_cfg}


def make_tiny_pipeline(out_dir: str, seed: int = 0) -> str:
    """Builds the tiny random SD-1-style pipeline and saves it to `out_dir` (diffusers layout)."""
    tokenizer = make_tokenizer()
    pipe = random_pipeline(SD, sd_configs(*tiny_configs(len(tokenizer))), {"tokenizer": tokenizer},
                           SD1_SCHEDULER, seed=seed)
    return save_pipeline(pipe, out_dir)


def _write_model(folder: str, config: dict, state: dict, preprocessor: dict | None = None) -> str:
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), config)
    if preprocessor:
        write_json(os.path.join(folder, "preprocessor_config.json"), preprocessor)
    safetensors_io.save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


def make_tiny_encoders(out_dir: str, seed: int = 0) -> tuple[str, str]:
    """Tiny random evaluation encoders in transformers' layout, without torch: a DINO-like `ViTModel`
    (`out_dir/dino`) and a `CLIPModel` with the tiny tokenizer (`out_dir/clip`), at 32 px. For offline
    smoke runs and tests of the metrics pipeline; the scores they give mean nothing."""
    dino_rng, vision_rng, text_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
    image = jnp.zeros((1, 32, 32, 3))
    vit_cfg = vision.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, image_size=32, patch_size=8, layer_norm_eps=1e-6)
    vit_params = jax.jit(vision.ViTModel(vit_cfg).init)(dino_rng, image)["params"]
    vit_state = {re.sub(r"^encoder\.layer_(\d+)\.", r"encoder.layer.\1.", k): v
                 for k, v in convert.params_to_state_dict(vit_params).items()}
    dino_dir = _write_model(os.path.join(out_dir, "dino"), vit_cfg.to_diffusers_config(), vit_state, {
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": preprocessing.BILINEAR, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(preprocessing.IMAGENET_DEFAULT_MEAN),
        "image_std": list(preprocessing.IMAGENET_DEFAULT_STD)})

    clip_dir = os.path.join(out_dir, "clip")
    write_tokenizer_files(clip_dir)
    vocab = len(make_tokenizer())
    text_cfg = clip.CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH, projection_dim=24, bos_token_id=vocab - 2,
        eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    vision_cfg = vision.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=32, patch_size=8,
                                         projection_dim=24)
    vision_init = jax.jit(vision.CLIPVisionModelWithProjection(vision_cfg).init)
    vision_params = vision_init(vision_rng, image)["params"]
    ids = jnp.zeros((1, TOKENIZER_MAX_LENGTH), jnp.int32)
    text_params = jax.jit(clip.CLIPTextModelWithProjection(text_cfg).init)(text_rng, ids)["params"]
    state = {}
    for params, prefix, projection in ((vision_params, "vision_model.", "visual_projection."),
                                       (text_params, "text_model.", "text_projection.")):
        for key, value in convert.params_to_state_dict(params).items():
            state[key if key.startswith(projection) else prefix + key] = value
    state["logit_scale"] = np.asarray(np.log(1 / 0.07), np.float32)  # CLIPModel's; unused by the metrics
    text_d = {k: v for k, v in text_cfg.to_diffusers_config(with_projection=False).items()
              if k not in ("architectures", "_class_name")}
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 24,
              "text_config": {**text_d, "model_type": "clip_text_model"},
              "vision_config": vision_cfg.to_diffusers_config()}
    _write_model(clip_dir, config, state, {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "resample": preprocessing.BICUBIC, "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(preprocessing.OPENAI_CLIP_MEAN), "image_std": list(preprocessing.OPENAI_CLIP_STD)})
    with open(os.path.join(clip_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": TOKENIZER_MAX_LENGTH,
                   "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>"}, f)
    return dino_dir, clip_dir


def make_tiny_dataset(folder: str, subjects: dict[str, str] | None = None, *, images_per_subject: int = 3,
                      size: int = 48, seed: int = 0) -> str:
    """A tiny copy of the DreamBooth dataset in its published layout (`<subject>/NN.jpg` and
    `prompts_and_classes.txt`), for offline tests and smoke runs: subject -> class (default a live 'dog' and
    an object 'teapot'), a few small JPEGs each, and the first two prompts of each published list."""
    subjects = subjects or {"dog": "dog", "teapot": "teapot"}
    rng = np.random.default_rng(seed)
    for name in subjects:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        base = rng.integers(0, 256, 3)
        for i in range(images_per_subject):
            pixels = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, name, f"{i:02d}.jpg"), quality=95)
    fmt = "'{}'.format(unique_token, class_token),"
    lines = ["Classes", "", "subject_name,class", *(f"{s},{c}" for s, c in subjects.items()), "", "Prompts",
             "", "Object Prompts", "", "prompt_list = [", fmt.format("a {0} {1} in the jungle"),
             fmt.format("a red {0} {1}")[:-1], "]", "", "Live Subject Prompts", "", "prompt_list = [",
             fmt.format("a {0} {1} in the snow"), fmt.format("a {0} {1} wearing a red hat")[:-1], "]", ""]
    with open(os.path.join(folder, "prompts_and_classes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return folder
