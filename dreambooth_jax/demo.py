"""The offline demo: make a tiny random Stable Diffusion pipeline (if absent), run its three networks, save
it in the diffusers layout, load that back and check that nothing changed.

    python -m dreambooth_jax.demo [--model PATH_OR_HUB_ID] [--output_dir demo_output]

Runs on a CPU in well under a minute, with no network and no torch.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def _forward(pipe, prompt: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Text encoder -> UNet (one denoising prediction) -> VAE decode, jitted; returns each output."""
    import jax
    import jax.numpy as jnp

    tok = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="np")
    size = pipe.unet.config.sample_size or 64

    @jax.jit
    def run(params, ids, rng):
        text = pipe.text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state
        latents = jax.random.normal(rng, (1, size, size, pipe.unet.config.in_channels))
        noise_pred = pipe.unet.apply({"params": params["unet"]}, latents, jnp.array([500]), text)
        image = pipe.vae.apply({"params": params["vae"]}, noise_pred, method=pipe.vae.decode)
        return {"text_embeddings": text, "noise_pred": noise_pred, "image": image}

    return jax.tree.map(np.asarray, run(pipe.params, tok["input_ids"], jax.random.PRNGKey(seed)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="pipeline folder or Hub id (default: OUTPUT_DIR/tiny-sd1, made if absent)")
    parser.add_argument("--output_dir", default="demo_output", help="where the tiny and re-saved pipelines go")
    parser.add_argument("--prompt", default="a photo of sks dog")
    args = parser.parse_args(argv)

    import jax

    from dreambooth_jax.pipeline import load_pipeline, save_pipeline

    if args.model is None:
        args.model = os.path.join(args.output_dir, "tiny-sd1")
        if not os.path.isfile(os.path.join(args.model, "model_index.json")):
            from dreambooth_jax.tiny import make_tiny_pipeline

            make_tiny_pipeline(args.model)
            print(f"[0/4] made a tiny random SD-1-style pipeline in {args.model}")
    t0 = time.perf_counter()
    pipe = load_pipeline(args.model)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(pipe.params))
    print(f"[1/4] loaded {args.model} ({n_params:,} parameters) in {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    before = _forward(pipe, args.prompt)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in before.items())
    print(f"[2/4] ran text encoder -> UNet -> VAE decoder in {time.perf_counter() - t0:.1f}s: {shapes}")

    out = os.path.join(args.output_dir, "pipeline")
    save_pipeline(pipe, out)
    print(f"[3/4] saved the pipeline in the diffusers layout to {out}")

    reloaded = load_pipeline(out)
    after = _forward(reloaded, args.prompt)
    same = all(np.array_equal(before[k], after[k]) for k in before)
    pairs = zip(jax.tree.leaves(pipe.params), jax.tree.leaves(reloaded.params))
    bit_exact = all(np.array_equal(a, b) for a, b in pairs)
    print(f"[4/4] reloaded it: weights bit-exact: {bit_exact}; outputs identical: {same}")
    if not (same and bit_exact):
        raise SystemExit("round trip changed the model")
    print(f"done. Load {out} with diffusers.StableDiffusionPipeline.from_pretrained({out!r}) too.")


if __name__ == "__main__":
    main()
