"""Training benchmark: samples/s, step and compile time, peak memory and MFU of the DreamBooth train step,
beside diffusers' PyTorch training loop on the same workload when torch with CUDA is present.

    python tools/bench_train.py                                    # SD-1.5-shaped random weights, 512 px
    python tools/bench_train.py --configs cached throughput cached+remat --all_optimizers
    python tools/bench_train.py --model sdxl                       # SDXL-shaped, 1024 px: full (remat) and LoRA
    python tools/bench_train.py --model sdxl --dry_run             # their per-device memory, on any machine
    python tools/bench_train.py --tiny --steps 3 --warmup 1        # a quick CPU smoke run (--model sdxl too)

`--model sd15|sdxl`: the full-size model's shapes with random weights (SDXL: both text encoders, the pooled
embedding and `time_ids` condition the UNet), or with `--tiny` the tiny model of that family.

A configuration is `base` or '+'-joined features: `text_encoder` (trained too; SDXL's both), `remat`, `cached` (VAE
latents), `throughput` (`--throughput_batch` samples per device instead of `--batch` instance + as many class
rows), `loraR` (LoRA of rank R instead of full fine-tuning, e.g. `lora4`, `lora16+cached`), `xla` (our kernels
off: XLA attention and GroupNorm, against the `--attention`/`--fused_norm` of the other rows, default auto),
`subjectsK` (K independent subjects trained by one program, `train --subjects`: each subject's batch spans its
device group, `subject_steps_per_s` counts K per step; e.g. `lora16+cached+subjects8` against `lora16+cached`).
Weights fp32, compute bf16, a fresh state per row; with `--isolate` (default with a GPU/TPU) a process per row
too, as the allocator's peak is per process. The PyTorch reference is diffusers' scripts' step (train_dreambooth.py;
LoRA rows: train_dreambooth_lora[_sdxl].py's peft adapters), for every row but `xla`.

`--dry_run`: no weights and no timing: each row only compiles the trainer's step ahead of time from parameter
shapes (the trainer's memory preflight) and reports the compile time and the per-device memory XLA plans
(params, optimizer, frozen, temp, total) for the device it runs on; no GPU needed.
Prints a JSON line per row, then a table with targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = ("sd15", "sdxl")
FEATURES = ("text_encoder", "remat", "cached", "throughput", "xla")
# Dense bf16 peak TFLOP/s per chip, by substring of the lower-cased device kind (first match wins).
PEAK_TFLOPS = (("h100 pcie", 756), ("h100", 989), ("h200", 989), ("a100", 312), ("tpu v5 lite", 197),
               ("tpu v5e", 197), ("tpu v6 lite", 918), ("tpu v6e", 918), ("tpu v5", 459), ("tpu v4", 275))
# (TFLOP of one UNet forward per sample, at this many px): the model's native resolution and default.
UNET_FWD_TFLOP = {"sd15": (0.80, 512), "sdxl": (6.76, 1024)}
DEFAULT_CONFIGS = {"sd15": ["base", "text_encoder", "remat", "cached", "cached+xla", "throughput+cached+remat",
                            "lora16+cached", "lora16+cached+subjects8"],
                   "sdxl": ["cached+remat", "lora16+cached", "lora16+cached+remat"]}
TARGETS = {
    "sd15": ("targets (SD-1.5, 512 px, one H100): cached 1+1 >= 25 steps/s and >= 1.5x PyTorch; "
             "throughput >= 40% MFU; peak <= 21 GB without remat; lora16+cached+subjects8 >= 2.5x the subject-steps/s "
             "of lora16+cached"),
    "sdxl": ("targets (SDXL, 1024 px, one H100, cached 1+1): full fine-tune with remat >= 5 steps/s, LoRA r16 "
             ">= 8 steps/s, each >= 1.5x PyTorch; LoRA peak <= 24 GB"),
}


def model_configs(args) -> dict:
    """`tiny.random_pipeline`'s keywords for `--model`: its configs, tokenizers and scheduler. Full size from
    `make_config_pipeline.configs` (our presets), or with `--tiny` the tiny model of that family
    (`make_tiny_pipeline`'s)."""

    from make_config_pipeline import configs
    from make_tiny_pipeline import _variant_configs

    from dreambooth_jax.models import clip, unet, vae
    from dreambooth_jax.testing import tiny

    sdxl = args.model == "sdxl"
    tokenizers = {"tokenizer": tiny.make_tokenizer()}
    if sdxl:  # SDXL's second tokenizer pads with '!'
        tokenizers["tokenizer_2"] = tiny.make_tokenizer(pad_token="!")
    if args.tiny:
        text, unet_cfg, vae_cfg = _variant_configs("sdxl" if sdxl else "sd1", len(tokenizers["tokenizer"]))
        out = dict(text_cfg=text, unet_cfg=unet_cfg, vae_cfg=vae_cfg, scheduler_config=tiny.SD1_SCHEDULER)
        if sdxl:  # as make_tiny_pipeline's
            out["text_cfg_2"] = dataclasses.replace(text, num_hidden_layers=2)
        return {**out, **tokenizers}
    parts = configs(args.model)
    out = dict(text_cfg=clip.CLIPTextConfig.from_diffusers_config(parts["text_encoder"]),
               unet_cfg=unet.UNetConfig.from_diffusers_config(parts["unet"]),
               vae_cfg=vae.VAEConfig.from_diffusers_config(parts["vae"]), scheduler_config=parts["scheduler"])
    if sdxl:
        out["text_cfg_2"] = clip.CLIPTextConfig.from_diffusers_config(parts["text_encoder_2"])
    for tok in tokenizers.values():  # the tiny vocabulary, the real models' length (shapes come from configs)
        tok.model_max_length = 77
    return {**out, **tokenizers}


def features(name: str) -> dict:
    """{'text_encoder': bool, ..., 'lora': rank or 0} of a configuration name ('lora16' = LoRA rank 16)."""
    parts = set() if name == "base" else set(name.split("+"))
    numbered = {prefix: [int(p[len(prefix):]) for p in parts if p.startswith(prefix) and p[len(prefix):].isdigit()]
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
    """One micro-batch [1, 2 * rows, ...] on the host for the `text`/`vae` (SDXL: and `text_2`) configs: `rows`
    instance rows, then as many class rows (as `training.inputs.layout_batch` lays them out, the structure
    `preflight.batch_shapes` compiles the step for)."""
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
    if text_2 is not None:  # SDXL: the second tokenizer's ids; time_ids (original size, crop corner, target size)
        batch["input_ids_2"] = rng.integers(0, text_2.vocab_size, (n, length), dtype=np.int32)
        batch["time_ids"] = np.tile(np.float32([resolution, resolution, 0, 0, resolution, resolution]), (n, 1))
    batch["is_prior"] = np.arange(n) >= rows
    batch["example_id"] = np.arange(n, dtype=np.int32)
    return {k: v[None] for k, v in batch.items()}


def parallel_groups(feats: dict, chips: int) -> int:
    """Device groups of a `subjectsK` row (`parallel.subject_groups`); 1 otherwise. (K: pick one the groups split
    evenly, `parallel.subject_slots`, or padding slots are timed as subjects.)"""
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


def make_row(impl: str, name: str, optimizer: str, args, *, device: str, chips: int, rows: int, step_s, peak_bytes,
             memory: dict, loss, compile_s: float = 0.0, xla=None, mesh=None) -> dict:
    """One result row; `step_s` and `loss` None in a dry run. `memory`: per-device bytes by part (the preflight's
    params, optimizer, frozen, temp, total; PyTorch's optimizer). MFU from XLA's count (of the per-device program)
    and from the analytic UNet-only count, (3 + remat) x forward per sample ((2 + remat) with LoRA: the frozen
    weights take no weight gradients), scaled with the pixel count (attention grows a bit faster)."""
    feats = features(name)
    subjects = feats["subjects"] or 1  # each subject's batch: `rows` per device of its group
    samples = 2 * rows * chips // parallel_groups(feats, chips) * subjects
    peak = args.peak_tflops or next((tf for key, tf in PEAK_TFLOPS if key in device.lower()), None)
    tflop, native = UNET_FWD_TFLOP[args.model]
    fwd = None if args.tiny else tflop * (args.resolution / native) ** 2
    analytic = None if fwd is None else fwd * (2 + (not feats["lora"]) + feats["remat"]) * samples
    gib = lambda b: None if b is None else b / 2**30  # noqa: E731
    per_s = lambda n: None if step_s is None else n / step_s  # noqa: E731
    mfu = lambda tf, n: None if tf is None or peak is None or step_s is None else tf / step_s / (peak * n)  # noqa: E731
    return {"impl": impl, "config": name, "optimizer": optimizer, "model": args.model, "device": device,
            "devices": chips, "mesh": mesh, "batch_per_device": f"{rows}+{rows}", "samples_per_step": samples,
            "compile_s": compile_s, "step_s": step_s, "steps_per_s": per_s(1), "samples_per_s": per_s(samples),
            "subjects": subjects, "subject_steps_per_s": per_s(subjects),
            "peak_memory_gib": gib(peak_bytes), "params_gib": gib(memory.get("params")),
            "opt_state_gib": gib(memory.get("optimizer")), "frozen_gib": gib(memory.get("frozen")),
            "temp_gib": gib(memory.get("temp")), "xla_memory_gib": gib(memory.get("total")),
            "xla_tflop_per_step": xla, "analytic_tflop_per_step": analytic, "peak_tflops": peak,
            "mfu_xla": mfu(xla, 1), "mfu_analytic": mfu(analytic, chips), "loss": loss}


# --- dreambooth_jax ----------------------------------------------------------------------------------
def build_pipeline(args):
    """The random pipeline (fp32 weights, bf16 compute), its params on the host: each configuration places
    its own copy, so that donation and peak memory stay per configuration. A dry run's params are shapes."""
    import jax

    from dreambooth_jax.testing import tiny

    pipe = tiny.random_pipeline(**model_configs(args), dtype="bf16", param_dtype="fp32",
                                weights="none" if args.dry_run else "device")
    if not args.dry_run:
        pipe.params = jax.tree.map(np.array, pipe.params)  # copies: the device buffers go
    return pipe


def with_kernels(pipe, feats: dict, args):
    """The pipeline's modules with the row's kernels: `--attention`/`--fused_norm`, or XLA's ops for `xla` rows."""

    attention = "dot_product" if feats["xla"] else args.attention
    fused = "off" if feats["xla"] else args.fused_norm
    return dataclasses.replace(
        pipe, unet=pipe.unet.clone(attention_impl=attention, fused_norm=fused, remat=feats["remat"]),
        vae=pipe.vae.clone(attention_impl=attention, fused_norm=fused),
        text_encoder=pipe.text_encoder.clone(attention_impl=attention),
        text_encoder_2=pipe.text_encoder_2.clone(attention_impl=attention) if pipe.is_sdxl else None)


def train_config(pipe, feats: dict, optimizer: str, args):
    """The `TrainConfig` of a configuration: fp32 weights, bf16 compute, prior preservation, a constant lr."""
    from dreambooth_jax.training.config import TrainConfig

    return TrainConfig(
        pretrained_model_name_or_path="random", train_text_encoder=feats["text_encoder"],
        gradient_checkpointing=feats["remat"], cache_latents=feats["cached"], use_lora=bool(feats["lora"]),
        rank=feats["lora"] or 4, optimizer=optimizer, learning_rate=1.0 if optimizer == "prodigy" else 1e-6,
        mixed_precision="bf16", with_prior_preservation=True, train_batch_size=instance_rows(feats, args),
        resolution=args.resolution, tokenizer_max_length=pipe.text_encoder.config.max_position_embeddings,
        max_train_steps=1, fsdp=args.fsdp)


def bench_jax(pipe, name: str, optimizer: str, args) -> dict:
    """One configuration through the trainer's own path: preflight (AOT compile, per-device memory), then, unless
    a dry run, the state built sharded from the host weights and timed steps."""
    import jax

    from dreambooth_jax import parallel
    from dreambooth_jax.training import preflight
    from dreambooth_jax.training.trainer import step_spec

    feats, chips = features(name), jax.device_count()
    rows = instance_rows(feats, args)
    pipe = with_kernels(pipe, feats, args)
    cfg = train_config(pipe, feats, optimizer, args)
    slots = parallel.subject_slots(feats["subjects"], chips) if feats["subjects"] else 0
    subjects = [dataclasses.replace(cfg, seed=k) for k in range(slots)] or None
    global_rows = rows * chips // parallel_groups(feats, chips)  # (each subject's)
    t0 = time.perf_counter()
    plan = preflight.plan(cfg, pipe, step_spec(cfg, pipe), max_steps=1, global_batch=global_rows,
                          fsdp=cfg.fsdp if cfg.fsdp == "auto" else int(cfg.fsdp), subjects=subjects)
    compile_s = time.perf_counter() - t0
    step_s, loss, peak_bytes = (None, None, None) if args.dry_run else time_jax(plan, pipe, feats, global_rows, args)
    # None: XLA refused the program as larger than the device (the preflight's total is None too)
    cost = plan.compiled.cost_analysis() if plan.compiled is not None else None
    flops = [c.get("flops") for c in (cost if isinstance(cost, (list, tuple)) else [cost]) if c]
    row = make_row("dreambooth_jax", name, optimizer, args, device=jax.devices()[0].device_kind, chips=chips,
                   rows=rows, step_s=step_s, peak_bytes=peak_bytes, loss=loss, compile_s=compile_s,
                   xla=sum(flops) / 1e12 if flops and None not in flops else None,
                   # the preflight's (XLA's own estimate), per configuration even in one process
                   memory=plan.report["per_device_bytes"], mesh=plan.report["mesh"])
    jax.clear_caches()
    return row


def time_jax(plan, pipe, feats: dict, global_rows: int, args) -> tuple[float, float, int | None]:
    """(seconds per step, last loss, the device's peak bytes) of the planned step on the synthetic batch."""
    import jax

    state = plan.init_state(plan.place_params(pipe.params))
    text_2 = pipe.text_encoder_2.config if pipe.is_sdxl else None
    batch = synthetic_batch(pipe.text_encoder.config, pipe.vae.config, feats["cached"], global_rows, args.resolution,
                            text_2=text_2)
    rng = np.asarray(jax.random.PRNGKey(0))
    if feats["subjects"]:  # each subject (slot) its own batch and key (here: the same ones)
        slots = jax.tree.leaves(plan.abstract_state.params)[0].shape[0]  # the stacked state's leading axis
        batch, rng = {k: np.stack([v] * slots) for k, v in batch.items()}, np.stack([rng] * slots)
    batch = jax.device_put(batch, plan.batch_sharding)
    rng = jax.device_put(rng, jax.sharding.NamedSharding(plan.mesh, jax.sharding.PartitionSpec()))
    carry = {"state": state}
    del state  # donated by the first step

    def step():
        carry["state"], carry["metrics"] = plan.compiled(carry["state"], batch, rng)

    step_s = time_loop(step, lambda: jax.block_until_ready(carry), args.warmup, args.steps)
    stats = jax.local_devices()[0].memory_stats() or {}
    return step_s, float(np.mean(carry["metrics"]["loss"])), stats.get("peak_bytes_in_use")


# --- driver ------------------------------------------------------------------------------------------
def plan(args) -> list[tuple[str, str, str]]:
    """(impl, configuration, optimizer) of every row. PyTorch's first: in one process they must run before
    JAX takes most of the GPU's memory."""
    from dreambooth_jax.training.optimizers import OPTIMIZERS

    for name in args.configs:
        features(name)  # fail on a typo before any work
    optimizers = OPTIMIZERS if args.all_optimizers else (args.optimizer,)
    jobs = [("jax", c, o) for c in args.configs for o in optimizers]
    if not args.no_torch and not args.dry_run and importlib.util.find_spec("torch") is not None:
        import torch

        if args.torch_device != "cuda" or torch.cuda.is_available():
            # `xla` rows are ours only, and so are `subjectsK` rows (PyTorch trains one subject per process).
            jobs = [("torch", c, "adamw") for c in args.configs
                    if not features(c)["xla"] and not features(c)["subjects"]] + jobs
    return jobs


def run_isolated(job, argv) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--no-isolate", "--job", ":".join(job), "--json", path]
        rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode  # its stderr passes through
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    return [{"impl": job[0], "config": job[1], "optimizer": job[2], "error": f"subprocess exited {rc}"}]


def run_in_process(jobs, args) -> list[dict]:
    rows, pipe = [], None
    for impl, config, optimizer in jobs:
        try:
            if impl == "torch":
                import torch
                from bench_train_torch import bench_torch

                rows.append(bench_torch(config, args, args.torch_device))
                torch.cuda.empty_cache()  # hand the memory back before JAX allocates
            else:
                pipe = pipe or build_pipeline(args)
                rows.append(bench_jax(pipe, config, optimizer, args))
        except Exception as e:  # an OOM in one configuration should not lose the others
            traceback.print_exc()
            rows.append({"impl": impl, "config": config, "optimizer": optimizer, "error": f"{type(e).__name__}: {e}"})
        gc.collect()
    return rows


def checks(row: dict, rows: list[dict], args) -> str:
    """The targets that apply to `row` (ours), each ok / MISS (n/a off the model's target resolution, on the tiny
    model, or when unmeasured: no PyTorch row, a dry run)."""
    if row["impl"] != "dreambooth_jax":
        return ""
    feats = features(row["config"])
    one_plus_one = row["batch_per_device"] == "1+1" and not feats["throughput"]
    ref = next((r for r in rows if r["impl"] == "diffusers" and r["config"] == row["config"] and "error" not in r),
               None)
    at_least = lambda key, bound: None if row[key] is None else row[key] >= bound  # noqa: E731
    faster = ref and row["samples_per_s"] and row["samples_per_s"] >= 1.5 * ref["samples_per_s"]
    peak_gb = lambda gb: row["peak_memory_gib"] and row["peak_memory_gib"] * 2**30 <= gb * 1e9  # noqa: E731
    items = []
    if feats["subjects"] > 1:  # against the same configuration with one subject
        alone = "+".join(p for p in row["config"].split("+") if not p.startswith("subjects")) or "base"
        one = next((r for r in rows if r["impl"] == "dreambooth_jax" and r["config"] == alone and "error" not in r),
                   None)
        gain = one and row["subject_steps_per_s"] and one["subject_steps_per_s"] and (
            row["subject_steps_per_s"] / one["subject_steps_per_s"])
        if args.model == "sd15" and feats["lora"] == 16 and feats["subjects"] == 8 and row["devices"] == 1:
            items.append((">=2.5x K=1", gain and gain >= 2.5))
    elif args.model == "sd15":  # (the single-subject targets)
        if feats["cached"] and one_plus_one:
            items += [(">=25 steps/s", at_least("steps_per_s", 25)), (">=1.5x torch", faster)]
        if feats["throughput"]:  # the MFU is the analytic one; XLA's where that is unknown
            mfu = row["mfu_analytic"] or row["mfu_xla"]
            items.append((">=40% MFU", mfu and mfu >= 0.40))
        if one_plus_one and not feats["remat"]:
            items.append(("<=21 GB", peak_gb(21)))
    elif feats["cached"] and one_plus_one and not feats["text_encoder"]:  # SDXL: the UNet-only rows
        if feats["remat"] and not feats["lora"]:
            items += [(">=5 steps/s", at_least("steps_per_s", 5)), (">=1.5x torch", faster)]
        if feats["lora"] == 16:
            items += [(">=8 steps/s", at_least("steps_per_s", 8)), (">=1.5x torch", faster), ("<=24 GB", peak_gb(24))]
    applies = not args.tiny and args.resolution == UNET_FWD_TFLOP[args.model][1]
    return " ".join(f"{label} {'n/a' if not applies or ok is None else 'ok' if ok else 'MISS'}" for label, ok in items)


# (header, row key, format, scale) of the table's numeric columns; 'an.': the analytic UNet count; param, opt,
# frozen, temp: the preflight's per-device bytes (XLA's plan for the device it ran on), 'xla GiB' their total.
COLUMNS = (("compile s", "compile_s", ".1f", 1), ("step ms", "step_s", ".1f", 1e3),
           ("steps/s", "steps_per_s", ".2f", 1), ("subj st/s", "subject_steps_per_s", ".2f", 1),
           ("samples/s", "samples_per_s", ".2f", 1),
           ("peak GiB", "peak_memory_gib", ".2f", 1), ("param GiB", "params_gib", ".3g", 1),
           ("opt GiB", "opt_state_gib", ".3g", 1), ("froz. GiB", "frozen_gib", ".3g", 1),
           ("temp GiB", "temp_gib", ".3g", 1), ("xla GiB", "xla_memory_gib", ".2f", 1),
           ("TFLOP xla", "xla_tflop_per_step", ".3g", 1), ("TFLOP an.", "analytic_tflop_per_step", ".3g", 1),
           ("MFU% xla", "mfu_xla", ".1f", 100), ("MFU% an.", "mfu_analytic", ".1f", 100))


def print_table(rows: list[dict], args) -> None:
    w = max(len(r["config"]) for r in rows)
    print(f"\n{'config':<{w}} {'impl':<15} {'opt':<9} {'batch':>6} " + " ".join(f"{c[0]:>9}" for c in COLUMNS)
          + "  targets")
    for r in sorted(rows, key=lambda r: (r["config"], r["impl"], r["optimizer"])):
        head = f"{r['config']:<{w}} {r['impl']:<15} {r['optimizer']:<9}"
        if "error" in r:
            print(f"{head} error: {r['error'][:200]}")
            continue
        cells = ("n/a" if r[key] is None else format(r[key] * scale, spec) for _, key, spec, scale in COLUMNS)
        print(f"{head} {r['batch_per_device']:>6} " + " ".join(f"{c:>9}" for c in cells) + f"  {checks(r, rows, args)}")
    print(f"\n{TARGETS[args.model]}")
    if args.dry_run:
        print("dry run: nothing allocated or timed; memory as XLA plans it for the device it compiled for")
    if not args.isolate and any(r.get("device", "cpu") != "cpu" for r in rows):
        print("peak GiB: process-lifetime peaks (--isolate gives each configuration's own)")


def has_accelerator() -> bool:
    """Whether JAX will find a GPU/TPU plugin, judged without starting a backend (which would hold the device)."""
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return False
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return any(n.lower().replace("_", "-").startswith(("jax-cuda", "jax-rocm", "libtpu")) for n in names)


def use_cpu_dry_run_flags() -> None:
    """XLA flags for a dry run compiled by the CPU (set before JAX starts its backend), as tools/bench_memory.py's:
    the memory-minimising scheduler (the default one favours concurrency and keeps rematerialised activations
    alive, so remat would show no saving), and no LLVM optimisation (the program never runs; it compiles faster)."""
    flags = "--xla_backend_optimization_level=0 --xla_cpu_enable_concurrency_optimized_scheduler=false"
    os.environ["XLA_FLAGS"] = f"{flags} {os.environ.get('XLA_FLAGS', '')}".strip()  # the user's own win


def parse_args(argv):
    from dreambooth_jax.kernels.choose import ATTENTION_IMPLS, FUSED_NORM
    from dreambooth_jax.training.optimizers import OPTIMIZERS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="sd15", help="the model's shapes (random weights)")
    p.add_argument("--tiny", action="store_true", help="the tiny random model of --model's family (a CPU smoke run)")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (sd15), 1024 (sdxl), or 64 with --tiny")
    p.add_argument("--batch", type=int, default=1, help="instance rows per device; as many class rows join")
    p.add_argument("--throughput_batch", type=int, default=32, help="samples per device of `throughput`")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--configs", nargs="+", help="rows to run (default: " + "; ".join(
        f"{m}: {' '.join(c)}" for m, c in DEFAULT_CONFIGS.items()) + "; throughput without remat may not fit in 80 GB)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--all_optimizers", action="store_true", help="every configuration with every optimizer")
    p.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS)
    p.add_argument("--fused_norm", default="auto", choices=FUSED_NORM)
    p.add_argument("--fsdp", default="auto", help="as the trainer's --fsdp: 'auto' or a divisor of the device count")
    p.add_argument("--peak_tflops", type=float, default=None, help="per chip (default: by device kind)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one process per row (default: on with a GPU/TPU)")
    p.add_argument("--no_torch", action="store_true", help="skip diffusers' PyTorch loop")
    p.add_argument("--dry_run", action="store_true",
                   help="no weights, no timing: each row's compile time and per-device memory from the preflight")
    p.add_argument("--torch_device", default="cuda", help=argparse.SUPPRESS)  # e.g. cpu: a smoke check of the loop
    p.add_argument("--json", default=None, help="also write the rows to this file (a JSON list)")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # impl:config:optimizer, for --isolate
    args = p.parse_args(argv)
    args.resolution = args.resolution or (64 if args.tiny else UNET_FWD_TFLOP[args.model][1])
    args.configs = args.configs or DEFAULT_CONFIGS[args.model]
    args.isolate = has_accelerator() if args.isolate is None else args.isolate
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.dry_run and not has_accelerator():
        use_cpu_dry_run_flags()
    jobs = [tuple(args.job.split(":"))] if args.job else plan(args)
    if args.isolate and not args.job:
        rows = [row for job in jobs for row in run_isolated(job, argv)]
    else:
        rows = run_in_process(jobs, args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    if args.job:
        return
    for row in rows:
        print(json.dumps({**row, "resolution": args.resolution, "steps": args.steps, "dry_run": args.dry_run}))
    print_table(rows, args)
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
