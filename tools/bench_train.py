"""Training benchmark: samples/s, step and compile time, peak memory and MFU of the DreamBooth train step,
beside diffusers' PyTorch training loop on the same workload when torch with CUDA is present.

    python tools/bench_train.py                                    # SD-1.5-shaped random weights, 512 px
    python tools/bench_train.py --configs cached throughput cached+remat --all_optimizers
    python tools/bench_train.py --tiny --steps 3 --warmup 1        # a quick CPU smoke run

A configuration is `base` or '+'-joined features: `text_encoder` (trained too), `remat`, `cached` (VAE
latents), `throughput` (`--throughput_batch` samples per device instead of `--batch` instance + as many class
rows), `loraR` (LoRA of rank R instead of full fine-tuning, e.g. `lora4`, `lora16+cached`), `xla` (our kernels
off: XLA attention and GroupNorm, against the `--attention`/`--fused_norm` of the other rows, default auto). Weights fp32, compute bf16, a fresh state per row; with `--isolate` (default with a GPU/TPU) a process
per row too, as the allocator's peak is per process. Prints a JSON line per row, then a table with targets.
"""

from __future__ import annotations

import argparse
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

FEATURES = ("text_encoder", "remat", "cached", "throughput", "xla")
# Dense bf16 peak TFLOP/s per chip, by substring of the lower-cased device kind (first match wins).
PEAK_TFLOPS = (("h100 pcie", 756), ("h100", 989), ("h200", 989), ("a100", 312), ("tpu v5 lite", 197),
               ("tpu v5e", 197), ("tpu v6 lite", 918), ("tpu v6e", 918), ("tpu v5", 459), ("tpu v4", 275))
SD15_UNET_FWD_TFLOP = 0.80  # one SD-1.5 UNet forward at 512 px, per sample
TARGETS = ("targets (SD-1.5, 512 px, one H100): cached 1+1 >= 25 steps/s and >= 1.5x PyTorch; "
           "throughput >= 40% MFU; peak <= 21 GB without remat")


def model_configs(tiny_model: bool):
    """(text encoder, UNet, VAE configs, tokenizer): the tiny model's, or SD 1.5's from our presets."""
    from dreambooth_jax.models import clip, unet, vae
    from dreambooth_jax.testing import tiny

    tokenizer = tiny.make_tokenizer()
    if tiny_model:
        return (*tiny.tiny_configs(len(tokenizer)), tokenizer)
    tokenizer.model_max_length = 77
    return clip.PRESETS["sd1"], unet.UNetConfig(cross_attention_dim=768), vae.SD_VAE, tokenizer


def features(name: str) -> dict:
    """{'text_encoder': bool, ..., 'lora': rank or 0} of a configuration name ('lora16' = LoRA rank 16)."""
    parts = set() if name == "base" else set(name.split("+"))
    ranks = [int(p[4:]) for p in parts if p.startswith("lora") and p[4:].isdigit()]
    if parts - set(FEATURES) - {f"lora{r}" for r in ranks} or len(ranks) > 1:
        raise SystemExit(f"error: unknown configuration {name!r}: 'base' or '+'-joined "
                         f"{', '.join(FEATURES)}, loraR (R = rank)")
    return {**{f: f in parts for f in FEATURES}, "lora": ranks[0] if ranks else 0}


def instance_rows(feats: dict, args) -> int:
    """Instance rows per device; as many class (prior-preservation) rows join them."""
    return max(1, args.throughput_batch // 2) if feats["throughput"] else args.batch


def synthetic_batch(text, vae, cached: bool, rows: int, resolution: int, seed: int = 0) -> dict:
    """One micro-batch [1, 2 * rows, ...] on the host for the `text`/`vae` configs: `rows` instance rows, then
    as many class rows (as `training.inputs.layout_batch` lays them out)."""
    rng = np.random.default_rng(seed)
    n = 2 * rows
    if cached:
        side = resolution // 2 ** (len(vae.block_out_channels) - 1)
        shape = (n, side, side, vae.latent_channels)
        batch = {"latent_mean": rng.normal(size=shape), "latent_logvar": rng.uniform(-8.0, -4.0, size=shape)}
    else:
        batch = {"images": rng.uniform(-1.0, 1.0, (n, resolution, resolution, vae.in_channels))}
    batch = {k: v.astype(np.float32) for k, v in batch.items()}
    batch["input_ids"] = rng.integers(0, text.vocab_size, (n, text.max_position_embeddings), dtype=np.int32)
    batch["is_prior"] = np.arange(n) >= rows
    batch["example_id"] = np.arange(n, dtype=np.int32)
    return {k: v[None] for k, v in batch.items()}


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


def make_row(impl: str, name: str, optimizer: str, args, *, device: str, chips: int, rows: int, step_s: float,
             peak_bytes, opt_bytes: int, loss: float, compile_s: float = 0.0, xla=None, xla_bytes=None,
             mesh=None) -> dict:
    """One result row. MFU from XLA's count (of the per-device program) and from the analytic UNet-only count,
    (3 + remat) x forward per sample, scaled with the pixel count (attention grows a bit faster)."""
    feats, samples = features(name), 2 * rows * chips
    peak = args.peak_tflops or next((tf for key, tf in PEAK_TFLOPS if key in device.lower()), None)
    fwd = None if args.tiny else SD15_UNET_FWD_TFLOP * (args.resolution / 512) ** 2
    analytic = None if fwd is None else fwd * (3 + feats["remat"]) * samples
    gib = lambda b: None if b is None else b / 2**30  # noqa: E731
    mfu = lambda tflop, n: None if tflop is None or peak is None else tflop / step_s / (peak * n)  # noqa: E731
    return {"impl": impl, "config": name, "optimizer": optimizer, "device": device, "devices": chips, "mesh": mesh,
            "batch_per_device": f"{rows}+{rows}", "samples_per_step": samples, "compile_s": compile_s,
            "step_s": step_s, "steps_per_s": 1 / step_s, "samples_per_s": samples / step_s,
            "peak_memory_gib": gib(peak_bytes), "xla_memory_gib": gib(xla_bytes), "opt_state_gib": gib(opt_bytes),
            "xla_tflop_per_step": xla, "analytic_tflop_per_step": analytic, "peak_tflops": peak,
            "mfu_xla": mfu(xla, 1), "mfu_analytic": mfu(analytic, chips), "loss": loss}


# --- dreambooth_jax ----------------------------------------------------------------------------------
def build_pipeline(args):
    """The random pipeline (fp32 weights, bf16 compute), its params on the host: each configuration places
    its own copy, so that donation and peak memory stay per configuration."""
    import jax

    from dreambooth_jax.testing import tiny

    pipe = tiny.random_pipeline(*model_configs(args.tiny), tiny.SD1_SCHEDULER, dtype="bf16", param_dtype="fp32")
    pipe.params = jax.tree.map(np.array, pipe.params)  # copies: the device buffers go
    return pipe


def with_kernels(pipe, feats: dict, args):
    """The pipeline's modules with the row's kernels: `--attention`/`--fused_norm`, or XLA's ops for `xla` rows."""
    import dataclasses

    attention = "dot_product" if feats["xla"] else args.attention
    fused = "off" if feats["xla"] else args.fused_norm
    return dataclasses.replace(
        pipe, unet=pipe.unet.clone(attention_impl=attention, fused_norm=fused, remat=feats["remat"]),
        vae=pipe.vae.clone(attention_impl=attention, fused_norm=fused),
        text_encoder=pipe.text_encoder.clone(attention_impl=attention))


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
    """One configuration through the trainer's own path: preflight (AOT compile, per-device memory), the
    state built sharded from the host weights, then timed steps."""
    import jax

    from dreambooth_jax.training import preflight
    from dreambooth_jax.training.trainer import step_spec

    feats, chips = features(name), jax.device_count()
    rows = instance_rows(feats, args)
    pipe = with_kernels(pipe, feats, args)
    cfg = train_config(pipe, feats, optimizer, args)
    t0 = time.perf_counter()
    plan = preflight.plan(cfg, pipe, step_spec(cfg, pipe), max_steps=1, global_batch=rows * chips,
                          fsdp=cfg.fsdp if cfg.fsdp == "auto" else int(cfg.fsdp))
    compile_s = time.perf_counter() - t0
    compiled, report = plan.compiled, plan.report
    state = plan.init_state(plan.place_params(pipe.params))
    batch = jax.device_put(synthetic_batch(pipe.text_encoder.config, pipe.vae.config, feats["cached"],
                                           rows * chips, args.resolution), plan.batch_sharding)
    rng = jax.device_put(jax.random.PRNGKey(0), jax.sharding.NamedSharding(plan.mesh, jax.sharding.PartitionSpec()))
    carry = {"state": state}
    del state  # donated by the first step

    def step():
        carry["state"], carry["metrics"] = compiled(carry["state"], batch, rng)

    step_s = time_loop(step, lambda: jax.block_until_ready(carry), args.warmup, args.steps)
    stats = jax.local_devices()[0].memory_stats() or {}
    cost = compiled.cost_analysis()
    flops = [c.get("flops") for c in (cost if isinstance(cost, (list, tuple)) else [cost]) if c]
    row = make_row("dreambooth_jax", name, optimizer, args, device=jax.devices()[0].device_kind, chips=chips,
                   rows=rows, step_s=step_s, peak_bytes=stats.get("peak_bytes_in_use"),
                   opt_bytes=report["per_device_bytes"]["optimizer"], loss=float(carry["metrics"]["loss"]),
                   compile_s=compile_s, xla=sum(flops) / 1e12 if flops and None not in flops else None,
                   # the preflight's total (XLA's own estimate), per configuration even in one process
                   xla_bytes=report["per_device_bytes"]["total"], mesh=report["mesh"])
    jax.clear_caches()
    return row


# --- diffusers / PyTorch -------------------------------------------------------------------------------
def torch_models(feats: dict, text_cfg, unet_cfg, vae_cfg, dev):
    """(unet, vae, text encoder, trained params) as diffusers' train_dreambooth.py sets them up under bf16
    mixed precision: trained modules fp32 (autocast computes in bf16), frozen ones bf16."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = diffusers.UNet2DConditionModel.from_config(unet_cfg.to_diffusers_config()).to(dev)
    vae = diffusers.AutoencoderKL.from_config(vae_cfg.to_diffusers_config()).to(dev, torch.bfloat16)
    text = CLIPTextModel(CLIPTextConfig(**text_cfg.to_diffusers_config(with_projection=False))).to(dev)
    vae.requires_grad_(False)
    text.requires_grad_(feats["text_encoder"])
    if not feats["text_encoder"]:
        text.to(torch.bfloat16)
    if feats["remat"]:
        unet.enable_gradient_checkpointing()
        if feats["text_encoder"]:  # renamed in transformers 5
            (getattr(text, "activation_checkpointing_enable", None) or text.gradient_checkpointing_enable)()
    return unet, vae, text, [p for m in (unet, text) for p in m.parameters() if p.requires_grad]


def bench_torch(name: str, args, device: str = "cuda") -> dict:
    """diffusers' train_dreambooth.py step on the same workload: AdamW, noise MSE of the instance half plus the
    class half, gradients clipped at norm 1."""
    import diffusers
    import torch
    import torch.nn.functional as F

    from dreambooth_jax.testing import tiny

    feats, dev = features(name), torch.device(device)
    rows = instance_rows(feats, args)
    text_cfg, unet_cfg, vae_cfg, _ = model_configs(args.tiny)
    unet, vae, text, params = torch_models(feats, text_cfg, unet_cfg, vae_cfg, dev)
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=1e-2)
    sched = diffusers.DDPMScheduler.from_config(tiny.SD1_SCHEDULER)
    host = synthetic_batch(text_cfg, vae_cfg, feats["cached"], rows, args.resolution)
    batch = {k: torch.from_numpy(v[0]).to(dev) for k, v in host.items()}
    nchw = {k: v.permute(0, 3, 1, 2).contiguous() for k, v in batch.items() if v.ndim == 4}
    losses = []

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            with torch.no_grad():
                if feats["cached"]:
                    mean, logvar = nchw["latent_mean"], nchw["latent_logvar"]
                    latents = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
                else:
                    latents = vae.encode(nchw["images"].to(torch.bfloat16)).latent_dist.sample()
                latents = latents.float() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), device=dev)
            with torch.set_grad_enabled(feats["text_encoder"]):
                context = text(batch["input_ids"].long())[0]
            pred = unet(sched.add_noise(latents, noise, t), t, context).sample.float()
        (pred_i, pred_p), (noise_i, noise_p) = pred.chunk(2), noise.chunk(2)
        loss = F.mse_loss(pred_i, noise_i) + F.mse_loss(pred_p, noise_p)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    cuda = dev.type == "cuda"
    step_s = time_loop(step, torch.cuda.synchronize if cuda else (lambda: None), args.warmup, args.steps)
    opt_bytes = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return make_row("diffusers", name, "adamw", args, device=torch.cuda.get_device_name() if cuda else "cpu",
                    chips=1, rows=rows, step_s=step_s, peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
                    opt_bytes=opt_bytes, loss=float(losses[-1]))


# --- driver ------------------------------------------------------------------------------------------
def plan(args) -> list[tuple[str, str, str]]:
    """(impl, configuration, optimizer) of every row. PyTorch's first: in one process they must run before
    JAX takes most of the GPU's memory."""
    from dreambooth_jax.training.optimizers import OPTIMIZERS

    for name in args.configs:
        features(name)  # fail on a typo before any work
    optimizers = OPTIMIZERS if args.all_optimizers else (args.optimizer,)
    jobs = [("jax", c, o) for c in args.configs for o in optimizers]
    if not args.no_torch and importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            # No PyTorch LoRA reference (that would need peft's training loop): LoRA rows are ours only.
            jobs = [("torch", c, "adamw") for c in args.configs
                    if not features(c)["lora"] and not features(c)["xla"]] + jobs
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

                rows.append(bench_torch(config, args))
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
    """The targets that apply to `row` (ours), each ok / MISS (n/a off SD-1.5 at 512 px, or when unmeasured)."""
    if row["impl"] != "dreambooth_jax":
        return ""
    feats = features(row["config"])
    one_plus_one = row["batch_per_device"] == "1+1" and not feats["throughput"]
    ref = next((r for r in rows if r["impl"] == "diffusers" and r["config"] == row["config"] and "error" not in r),
               None)
    items = []
    if feats["cached"] and one_plus_one:
        items += [(">=25 steps/s", row["steps_per_s"] >= 25),
                  (">=1.5x torch", ref and row["samples_per_s"] >= 1.5 * ref["samples_per_s"])]
    if feats["throughput"]:  # the MFU is the analytic one; XLA's where that is unknown
        mfu = row["mfu_analytic"] or row["mfu_xla"]
        items.append((">=40% MFU", mfu and mfu >= 0.40))
    if one_plus_one and not feats["remat"]:
        items.append(("<=21 GB", row["peak_memory_gib"] and row["peak_memory_gib"] * 2**30 <= 21e9))
    applies = not args.tiny and args.resolution == 512
    return " ".join(f"{label} {'n/a' if not applies or ok is None else 'ok' if ok else 'MISS'}" for label, ok in items)


# (header, row key, format, scale) of the table's numeric columns; 'an.': the analytic UNet count.
COLUMNS = (("compile s", "compile_s", ".1f", 1), ("step ms", "step_s", ".1f", 1e3),
           ("steps/s", "steps_per_s", ".2f", 1), ("samples/s", "samples_per_s", ".2f", 1),
           ("peak GiB", "peak_memory_gib", ".2f", 1), ("xla GiB", "xla_memory_gib", ".2f", 1),
           ("opt GiB", "opt_state_gib", ".3g", 1),
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
    print(f"\n{TARGETS}")
    if not args.isolate and any(r.get("device", "cpu") != "cpu" for r in rows):
        print("peak GiB: process-lifetime peaks (--isolate gives each configuration's own)")


def has_accelerator() -> bool:
    """Whether JAX will find a GPU/TPU plugin, judged without starting a backend (which would hold the device)."""
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return False
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return any(n.lower().replace("_", "-").startswith(("jax-cuda", "jax-rocm", "libtpu")) for n in names)


def parse_args(argv):
    from dreambooth_jax.kernels.choose import ATTENTION_IMPLS, FUSED_NORM
    from dreambooth_jax.training.optimizers import OPTIMIZERS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny random model (a CPU smoke run)")
    p.add_argument("--resolution", type=int, default=None, help="default 512, or 64 with --tiny")
    p.add_argument("--batch", type=int, default=1, help="instance rows per device; as many class rows join")
    p.add_argument("--throughput_batch", type=int, default=32, help="samples per device of `throughput`")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--configs", nargs="+", help="rows to run (throughput without remat may not fit in 80 GB)",
                   default=["base", "text_encoder", "remat", "cached", "cached+xla", "throughput+cached+remat"])
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--all_optimizers", action="store_true", help="every configuration with every optimizer")
    p.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS)
    p.add_argument("--fused_norm", default="auto", choices=FUSED_NORM)
    p.add_argument("--fsdp", default="auto", help="as the trainer's --fsdp: 'auto' or a divisor of the device count")
    p.add_argument("--peak_tflops", type=float, default=None, help="per chip (default: by device kind)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one process per row (default: on with a GPU/TPU)")
    p.add_argument("--no_torch", action="store_true", help="skip diffusers' PyTorch loop")
    p.add_argument("--json", default=None, help="also write the rows to this file (a JSON list)")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # impl:config:optimizer, for --isolate
    args = p.parse_args(argv)
    args.resolution = args.resolution or (64 if args.tiny else 512)
    args.isolate = has_accelerator() if args.isolate is None else args.isolate
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
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
        print(json.dumps({**row, "resolution": args.resolution, "steps": args.steps}))
    print_table(rows, args)
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
