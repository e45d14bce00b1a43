"""Build tiny random Stable Diffusion pipelines in the diffusers layout, offline, with PyTorch.

These are the reference fixtures of the test suite and the model of the offline demo: an SD-1-style, an
SD-2-style (v-prediction, linear projections, upcast attention, per-block head dims) and an SDXL-style
(two text encoders, `text_time` added conditions, several transformer layers per block) pipeline, each a
few hundred kB, saved with diffusers' own `save_pretrained`. The Hugging Face Hub is not needed: the CLIP
BPE tokenizer is written here from a small word list.

Usage: python tools/make_tiny_pipeline.py OUT_DIR [--kind sd1|sd2|sdxl|all] [--seed 0]
Needs torch, diffusers and transformers (the project's `test` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

KINDS = ("sd1", "sd2", "sdxl")
TOKENIZER_MAX_LENGTH = 16

# Words the tiny tokenizer knows as whole tokens; anything else falls back to byte-level pieces.
_WORDS = (
    "a photo of sks dog cat in the on with beach snow forest red blue painting style person car "
    "backpack toy cube sunglasses wearing jumping floating sleeping berlin city wooden floor purple "
    "shiny high quality low blurry ugly bad picture image"
).split()


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
            pair = f"{symbols[0]} {symbols[1]}"
            merged = symbols[0] + symbols[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in vocab:
                vocab.append(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    vocab_path = os.path.join(out_dir, "vocab.json")
    merges_path = os.path.join(out_dir, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def make_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = write_tokenizer_files(tmp)
        # `vocab=`/`merges=` (not `vocab_file=`): transformers 5 ignores the old keyword names.
        tok = CLIPTokenizer(vocab=vocab_path, merges=merges_path, pad_token=pad_token)
    tok.model_max_length = TOKENIZER_MAX_LENGTH
    return tok


def _text_config(vocab_size: int, *, hidden_act: str, projection_dim: int = 32, layers: int = 3):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _vae(torch_dtype=None):
    from diffusers import AutoencoderKL

    # Four blocks so that the latent is 1/8 of the image, as in real Stable Diffusion.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    )


def _unet(kind: str):
    from diffusers import UNet2DConditionModel

    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8)
    if kind == "sd1":
        return UNet2DConditionModel(
            **common,
            block_out_channels=(16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
        )
    if kind == "sd2":
        return UNet2DConditionModel(
            **common,
            block_out_channels=(16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4, 8),
            use_linear_projection=True,
            upcast_attention=True,
        )
    if kind == "sdxl":
        return UNet2DConditionModel(
            **common,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=(2, 4, 8),
            transformer_layers_per_block=(1, 1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        )
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def _scheduler(kind: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if kind == "sd1":
        return PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False)
    if kind == "sd2":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction")
    return EulerDiscreteScheduler(**common, timestep_spacing="leading")


def build_pipeline(kind: str, seed: int = 0):
    """Returns a tiny random diffusers pipeline (PyTorch) of the given kind."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    vocab_size = len(tokenizer)
    text_encoder = CLIPTextModel(_text_config(vocab_size, hidden_act="quick_gelu" if kind == "sd1" else "gelu"))
    unet = _unet(kind)
    vae = _vae()
    scheduler = _scheduler(kind)
    for model in (text_encoder, unet, vae):
        model.eval()
    if kind == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        tokenizer_2 = make_tokenizer(pad_token="!")
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, hidden_act="gelu", layers=2))
        text_encoder_2.eval()
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
        )
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_pipeline(out_dir: str, kind: str = "sd1", seed: int = 0) -> str:
    """Builds and saves a tiny pipeline of `kind` to `out_dir` (safetensors). Returns `out_dir`."""
    pipe = build_pipeline(kind, seed)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write (one sub-folder per kind with --kind all)")
    parser.add_argument("--kind", default="sd1", choices=(*KINDS, "all"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    for kind in kinds:
        out = os.path.join(args.out_dir, kind) if args.kind == "all" else args.out_dir
        make_tiny_pipeline(out, kind, args.seed)
        print(f"wrote tiny {kind} pipeline to {out}")


if __name__ == "__main__":
    main()
