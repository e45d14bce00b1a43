"""What the training benchmarks share (`bench_train.py` and its PyTorch reference, `bench_train_torch.py`):
the workload (the model's configs, a configuration's features, a synthetic batch), the timing loop and the
result row."""

from __future__ import annotations

import dataclasses
import time

import make_config_pipeline
import numpy as np

MODELS = ("sd15", "sdxl")
FEATURES = ("text_encoder", "remat", "cached", "throughput", "xla")
# Dense bf16 peak TFLOP/s per chip, by substring of the lower-cased device kind (first match wins).
PEAK_TFLOPS = (("h100 pcie", 756), ("h100", 989), ("h200", 989), ("a100", 312), ("tpu v5 lite", 197),
               ("tpu v5e", 197), ("tpu v6 lite", 918), ("tpu v6e", 918), ("tpu v5", 459), ("tpu v4", 275))
# (TFLOP of one UNet forward per sample, at this many px): the model's native resolution and default.
UNET_FWD_TFLOP = {"sd15": (0.80, 512), "sdxl": (6.76, 1024)}


def model_configs(args) -> dict:
    """`tiny.random_pipeline`'s keywords for `--model`: its configs, tokenizers and scheduler. Full size from
    `make_config_pipeline.configs` (our presets), or with `--tiny` the tiny model of that family
    (`make_tiny_pipeline`'s)."""

    # late, as in every tool: `--help` answers at once and a backend starts only for the work
    from make_tiny_pipeline import variant_configs

    from dreambooth_jax.models import clip, unet, vae
    from dreambooth_jax.testing import tiny

    sdxl = args.model == "sdxl"
    tokenizers = {"tokenizer": tiny.make_tokenizer()}
    if sdxl:  # SDXL's second tokenizer pads with '!'
        tokenizers["tokenizer_2"] = tiny.make_tokenizer(pad_token="!")
    if args.tiny:
        text, unet_cfg, vae_cfg = variant_configs("sdxl" if sdxl else "sd1", len(tokenizers["tokenizer"]))
        out = dict(text_cfg=text, unet_cfg=unet_cfg, vae_cfg=vae_cfg, scheduler_config=tiny.SD1_SCHEDULER)
        if sdxl:  # as make_tiny_pipeline's
            out["text_cfg_2"] = dataclasses.replace(text, num_hidden_layers=2)
        return {**out, **tokenizers}
    parts = make_config_pipeline.configs(args.model)
    out = dict(text_cfg=clip.CLIPTextConfig.from_diffusers_config(parts["text_encoder"]),
               unet_cfg=unet.UNetConfig.from_diffusers_config(parts["unet"]),
               vae_cfg=vae.VAEConfig.from_diffusers_config(parts["vae"]), scheduler_config=parts["scheduler"])
    if sdxl:
        out["text_cfg_2"] = clip.CLIPTextConfig.from_diffusers_config(parts["text_encoder_2"])
    for tok in tokenizers.values():  # the tiny vocabulary, the real models' length (shapes come from configs)
        tok.model_max_length = 77
    return {**out, **tokenizers}


def random_bench_pipeline(args, **options):
    """The random pipeline of `model_configs(args)` (`tiny.random_pipeline` with `options`)."""
    from dreambooth_jax import families
    from dreambooth_jax.testing import tiny

    models = model_configs(args)
    family = families.SDXL if "text_cfg_2" in models else families.SD
    configs = {"text_encoder": models["text_cfg"], "unet": models["unet_cfg"], "vae": models["vae_cfg"]}
    if "text_cfg_2" in models:
        configs["text_encoder_2"] = models["text_cfg_2"]
    tokenizers = {name: models[name] for name in family.tokenizers}
    return tiny.random_pipeline(family, configs, tokenizers, models["scheduler_config"], **options)


def features(name: str) -> dict:
    """{'text_encoder': bool, ..., 'lora': rank or 0} of a configuration name ('lora16' = LoRA rank 16)."""
    parts = set() if name == "base" else set(name.split("+"))
    numbered = {prefix: [int(p[len(prefix):]) for p in parts
                         if p.startswith(prefix) and p[len(prefix):].isdigit()]
                for prefix in ("lora", "subjects")}
    known = set(FEATURES) | {f"{prefix}{n}" for prefix, ns in numbered.items() for n in ns}
    if parts - known or any(len(ns) > 1 for ns in numbered.values()) or 0 in numbered["subjects"]:
        raise SystemExit(f"error: unknown configuration {name!r}: 'base' or '+'-joined "
                         f"{', '.join(FEATURES)}, loraR (R = rank), subjectsK (K >= 1 subjects)")
    return {**{f: f in parts for f in FEATURES}, "lora": numbered["lora"][0] if numbered["lora"] else 0,
            "subjects": numbered["subjects"][0] if numbered["subjects"] else 0}


def instance_rows(feats: dict, args) -> int:
    """Instance rows per device; as many class (prior-preservation) rows join them."""
    return max(1, args.throughput_batch // 2) if feats["throughput"] else args.batch


def synthetic_batch(text, vae, cached: bool, rows: int, resolution: int, seed: int = 0, text_2=None) -> dict:
    """One micro-batch [1, 2 * rows, ...] on the host for the `text`/`vae` (SDXL: and `text_2`) configs:
    `rows` instance rows, then as many class rows (as `training.inputs.layout_batch` lays them out, the
    structure `preflight.batch_shapes` compiles the step for)."""
    rng = np.random.default_rng(seed)
    n = 2 * rows
    if cached:
        side = resolution // 2 ** (len(vae.block_out_channels) - 1)
        shape = (n, side, side, vae.latent_channels)
        batch = {"latent_mean": rng.normal(size=shape), "latent_logvar": rng.uniform(-8.0, -4.0, size=shape)}
    else:
        batch = {"images": rng.uniform(-1.0, 1.0, (n, resolution, resolution, vae.in_channels))}
    batch = {k: v.astype(np.float32) for k, v in batch.items()}
    length = text.max_position_embeddings  # `train_config`'s --tokenizer_max_length, for both tokenizers
    batch["input_ids"] = rng.integers(0, text.vocab_size, (n, length), dtype=np.int32)
    # SDXL: the second tokenizer's ids; time_ids (original size, crop corner, target size)
    if text_2 is not None:
        batch["input_ids_2"] = rng.integers(0, text_2.vocab_size, (n, length), dtype=np.int32)
        batch["time_ids"] = np.tile(np.float32([resolution, resolution, 0, 0, resolution, resolution]),
                                    (n, 1))
    batch["is_prior"] = np.arange(n) >= rows
    batch["example_id"] = np.arange(n, dtype=np.int32)
    return {k: v[None] for k, v in batch.items()}


def parallel_groups(feats: dict, chips: int) -> int:
    """Device groups of a `subjectsK` row (`parallel.subject_groups`); 1 otherwise. (K: pick one the groups
    split evenly, `parallel.subject_slots`, or padding slots are timed as subjects.)"""
    from dreambooth_jax import parallel

    return parallel.subject_groups(feats["subjects"], chips) if feats["subjects"] else 1


def time_loop(step, sync, warmup: int, steps: int) -> float:
    """Seconds per step after `warmup` steps; synced only at the ends, so that dispatch overlaps execution
    as in the train loop."""
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def make_row(impl: str, name: str, optimizer: str, args, *, device: str, chips: int, rows: int, step_s,
             peak_bytes, memory: dict, loss, compile_s: float = 0.0, xla=None, mesh=None) -> dict:
    """One result row; `step_s` and `loss` None in a dry run. `memory`: per-device bytes by part (the
    preflight's params, optimizer, frozen, temp, total; PyTorch's optimizer). MFU from XLA's count (of the
    per-device program) and from the analytic UNet-only count, (3 + remat) x forward per sample ((2 + remat)
    with LoRA: the frozen weights take no weight gradients), scaled with the pixel count (attention grows a
    bit faster)."""
    feats = features(name)
    subjects = feats["subjects"] or 1  # each subject's batch: `rows` per device of its group
    samples = 2 * rows * chips // parallel_groups(feats, chips) * subjects
    peak = args.peak_tflops or next((tf for key, tf in PEAK_TFLOPS if key in device.lower()), None)
    tflop, native = UNET_FWD_TFLOP[args.model]
    fwd = None if args.tiny else tflop * (args.resolution / native) ** 2
    analytic = None if fwd is None else fwd * (2 + (not feats["lora"]) + feats["remat"]) * samples
    gib = lambda b: None if b is None else b / 2**30  # noqa: E731
    per_s = lambda n: None if step_s is None else n / step_s  # noqa: E731
    mfu = lambda tf, n: (None if tf is None or peak is None or step_s is None  # noqa: E731
                         else tf / step_s / (peak * n))
    return {"impl": impl, "config": name, "optimizer": optimizer, "model": args.model, "device": device,
            "devices": chips, "mesh": mesh, "batch_per_device": f"{rows}+{rows}", "samples_per_step": samples,
            "compile_s": compile_s, "step_s": step_s, "steps_per_s": per_s(1),
            "samples_per_s": per_s(samples), "subjects": subjects, "subject_steps_per_s": per_s(subjects),
            "peak_memory_gib": gib(peak_bytes), "params_gib": gib(memory.get("params")),
            "opt_state_gib": gib(memory.get("optimizer")), "frozen_gib": gib(memory.get("frozen")),
            "temp_gib": gib(memory.get("temp")), "xla_memory_gib": gib(memory.get("total")),
            "xla_tflop_per_step": xla, "analytic_tflop_per_step": analytic, "peak_tflops": peak,
            "mfu_xla": mfu(xla, 1), "mfu_analytic": mfu(analytic, chips), "loss": loss}
