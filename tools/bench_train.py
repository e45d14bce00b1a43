"""Training benchmark: samples/s, step and compile time, peak memory and MFU of the DreamBooth train step,
beside diffusers' PyTorch training loop on the same workload when torch with CUDA is present.

    python tools/bench_train.py                                    # SD-1.5-shaped random weights, 512 px
    python tools/bench_train.py --configs cached throughput cached+remat --all_optimizers
    python tools/bench_train.py --model sdxl                       # SDXL-shaped, 1024 px: full (remat), LoRA
    python tools/bench_train.py --model sdxl --dry_run             # their per-device memory, on any machine
    python tools/bench_train.py --tiny --steps 3 --warmup 1        # a quick CPU smoke run (--model sdxl too)

`--model sd15|sdxl`: the full-size model's shapes with random weights (SDXL: both text encoders, the pooled
embedding and `time_ids` condition the UNet), or with `--tiny` the tiny model of that family.

A configuration is `base` or '+'-joined features: `text_encoder` (trained too; SDXL's both), `remat`, `cached`
(VAE latents), `throughput` (`--throughput_batch` samples per device instead of `--batch` instance + as many
class rows), `loraR` (LoRA of rank R instead of full fine-tuning, e.g. `lora4`, `lora16+cached`), `xla` (our
kernels off: XLA attention and GroupNorm, against the `--attention`/`--fused_norm` of the other rows, default
auto), `subjectsK` (K independent subjects trained by one program, `train --subjects`: each subject's batch
spans its device group, `subject_steps_per_s` counts K per step; e.g. `lora16+cached+subjects8` against
`lora16+cached`). Weights fp32, compute bf16, a fresh state per row; with `--isolate` (default with a GPU/TPU)
a process per row too, as the allocator's peak is per process. The PyTorch reference is diffusers' scripts'
step (train_dreambooth.py; LoRA rows: train_dreambooth_lora[_sdxl].py's peft adapters), for every row but
`xla`.

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
from bench_train_common import (
    MODELS,
    UNET_FWD_TFLOP,
    features,
    instance_rows,
    make_row,
    parallel_groups,
    random_bench_pipeline,
    synthetic_batch,
    time_loop,
)
from bench_train_torch import bench_torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_CONFIGS = {"sd15": ["base", "text_encoder", "remat", "cached", "cached+xla",
                            "throughput+cached+remat", "lora16+cached", "lora16+cached+subjects8"],
                   "sdxl": ["cached+remat", "lora16+cached", "lora16+cached+remat"]}
TARGETS = {
    "sd15": ("targets (SD-1.5, 512 px, one H100): cached 1+1 >= 25 steps/s and >= 1.5x PyTorch; "
             "throughput >= 40% MFU; peak <= 21 GB without remat; lora16+cached+subjects8 >= 2.5x the "
             "subject-steps/s of lora16+cached"),
    "sdxl": ("targets (SDXL, 1024 px, one H100, cached 1+1): full fine-tune with remat >= 5 steps/s, LoRA "
             "r16 >= 8 steps/s, each >= 1.5x PyTorch; LoRA peak <= 24 GB"),
}


# --- dreambooth_jax ----------------------------------------------------------------------------------
def build_pipeline(args):
    """The random pipeline (fp32 weights, bf16 compute), its params on the host: each configuration places
    its own copy, so that donation and peak memory stay per configuration. A dry run's params are shapes."""
    # late, as in every tool: `--help` answers at once and a backend starts only for the work
    import jax

    pipe = random_bench_pipeline(args, dtype="bf16", param_dtype="fp32",
                                 weights="none" if args.dry_run else "device")
    if not args.dry_run:
        pipe.params = jax.tree.map(np.array, pipe.params)  # copies: the device buffers go
    return pipe


def with_kernels(pipe, feats: dict, args):
    """The pipeline's modules with the row's kernels: `--attention`/`--fused_norm`, or XLA's ops for `xla`
    rows."""

    attention = "dot_product" if feats["xla"] else args.attention
    fused = "off" if feats["xla"] else args.fused_norm
    options = {"attention_impl": attention, "fused_norm": fused, "remat": feats["remat"]}
    return pipe.with_modules(**{name: module.clone(**{k: v for k, v in options.items() if hasattr(module, k)})
                                for name, module in pipe.modules.items()})


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
    """One configuration through the trainer's own path: preflight (AOT compile, per-device memory), then,
    unless a dry run, the state built sharded from the host weights and timed steps."""
    import jax

    from dreambooth_jax import parallel
    from dreambooth_jax.training import preflight
    from dreambooth_jax.training.specs import BatchSpec, StateSpec
    from dreambooth_jax.training.trainer import step_spec

    feats, chips = features(name), jax.device_count()
    rows = instance_rows(feats, args)
    pipe = with_kernels(pipe, feats, args)
    cfg = train_config(pipe, feats, optimizer, args)
    slots = parallel.subject_slots(feats["subjects"], chips) if feats["subjects"] else 0
    states = [StateSpec.of(dataclasses.replace(cfg, seed=k)) for k in range(slots)] or StateSpec.of(cfg)
    global_rows = rows * chips // parallel_groups(feats, chips)  # (each subject's)
    t0 = time.perf_counter()
    plan = preflight.plan(pipe, step_spec(cfg, pipe), states, BatchSpec.of(cfg), max_steps=1,
                          global_batch=global_rows, fsdp=cfg.fsdp if cfg.fsdp == "auto" else int(cfg.fsdp))
    compile_s = time.perf_counter() - t0
    step_s, loss, peak_bytes = ((None, None, None) if args.dry_run
                                else time_jax(plan, pipe, feats, global_rows, args))
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
    text_2 = pipe.modules["text_encoder_2"].config if "text_encoder_2" in pipe.modules else None
    batch = synthetic_batch(pipe.text_encoder.config, pipe.vae.config, feats["cached"], global_rows,
                            args.resolution, text_2=text_2)
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
def plan_jobs(args) -> list[tuple[str, str, str]]:
    """(impl, configuration, optimizer) of every row. PyTorch's first: in one process they must run before
    JAX takes most of the GPU's memory."""
    from dreambooth_jax.training.optimizers import OPTIMIZERS

    for name in args.configs:
        features(name)  # fail on a typo before any work
    optimizers = OPTIMIZERS if args.all_optimizers else (args.optimizer,)
    jobs = [("jax", c, o) for c in args.configs for o in optimizers]
    if not args.no_torch and not args.dry_run and importlib.util.find_spec("torch") is not None:
        import torch  # heavy and optional: the PyTorch reference rows only

        if args.torch_device != "cuda" or torch.cuda.is_available():
            # `xla` rows are ours only, and so are `subjectsK` rows (PyTorch trains one subject per process).
            jobs = [("torch", c, "adamw") for c in args.configs
                    if not features(c)["xla"] and not features(c)["subjects"]] + jobs
    return jobs


def run_isolated(job, argv) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--no-isolate", "--job", ":".join(job),
               "--json", path]
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
                import torch  # heavy and optional, as above

                rows.append(bench_torch(config, args, args.torch_device))
                torch.cuda.empty_cache()  # hand the memory back before JAX allocates
            else:
                pipe = pipe or build_pipeline(args)
                rows.append(bench_jax(pipe, config, optimizer, args))
        except Exception as e:  # an OOM in one configuration should not lose the others
            traceback.print_exc()
            rows.append({"impl": impl, "config": config, "optimizer": optimizer,
                         "error": f"{type(e).__name__}: {e}"})
        gc.collect()
    return rows


def checks(row: dict, rows: list[dict], args) -> str:
    """The targets that apply to `row` (ours), each ok / MISS (n/a off the model's target resolution, on the
    tiny model, or when unmeasured: no PyTorch row, a dry run)."""
    if row["impl"] != "dreambooth_jax":
        return ""
    feats = features(row["config"])
    one_plus_one = row["batch_per_device"] == "1+1" and not feats["throughput"]
    ref = next((r for r in rows
                if r["impl"] == "diffusers" and r["config"] == row["config"] and "error" not in r), None)
    at_least = lambda key, bound: None if row[key] is None else row[key] >= bound  # noqa: E731
    faster = ref and row["samples_per_s"] and row["samples_per_s"] >= 1.5 * ref["samples_per_s"]
    peak_gb = lambda gb: row["peak_memory_gib"] and row["peak_memory_gib"] * 2**30 <= gb * 1e9  # noqa: E731
    items = []
    if feats["subjects"] > 1:  # against the same configuration with one subject
        alone = "+".join(p for p in row["config"].split("+") if not p.startswith("subjects")) or "base"
        one = next((r for r in rows
                    if r["impl"] == "dreambooth_jax" and r["config"] == alone and "error" not in r), None)
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
            items += [(">=8 steps/s", at_least("steps_per_s", 8)), (">=1.5x torch", faster),
                      ("<=24 GB", peak_gb(24))]
    applies = not args.tiny and args.resolution == UNET_FWD_TFLOP[args.model][1]
    return " ".join(f"{label} {'n/a' if not applies or ok is None else 'ok' if ok else 'MISS'}"
                    for label, ok in items)


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
        print(f"{head} {r['batch_per_device']:>6} " + " ".join(f"{c:>9}" for c in cells)
              + f"  {checks(r, rows, args)}")
    print(f"\n{TARGETS[args.model]}")
    if args.dry_run:
        print("dry run: nothing allocated or timed; memory as XLA plans it for the device it compiled for")
    if not args.isolate and any(r.get("device", "cpu") != "cpu" for r in rows):
        print("peak GiB: process-lifetime peaks (--isolate gives each configuration's own)")


def has_accelerator() -> bool:
    """Whether JAX will find a GPU/TPU plugin, judged without starting a backend (which would hold the
    device)."""
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return False
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return any(n.lower().replace("_", "-").startswith(("jax-cuda", "jax-rocm", "libtpu")) for n in names)


def use_cpu_dry_run_flags() -> None:
    """XLA flags for a dry run compiled by the CPU (set before JAX starts its backend), as
    tools/bench_memory.py's: the memory-minimising scheduler (the default one favours concurrency and keeps
    rematerialised activations alive, so remat would show no saving), and no LLVM optimisation (the program
    never runs; it compiles faster)."""
    flags = "--xla_backend_optimization_level=0 --xla_cpu_enable_concurrency_optimized_scheduler=false"
    os.environ["XLA_FLAGS"] = f"{flags} {os.environ.get('XLA_FLAGS', '')}".strip()  # the user's own win


def parse_args(argv):
    from dreambooth_jax.kernels.choose import ATTENTION_IMPLS, FUSED_NORM
    from dreambooth_jax.training.optimizers import OPTIMIZERS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="sd15", help="the model's shapes (random weights)")
    p.add_argument("--tiny", action="store_true",
                   help="the tiny random model of --model's family (a CPU smoke run)")
    p.add_argument("--resolution", type=int, default=None,
                   help="default 512 (sd15), 1024 (sdxl), or 64 with --tiny")
    p.add_argument("--batch", type=int, default=1, help="instance rows per device; as many class rows join")
    p.add_argument("--throughput_batch", type=int, default=32, help="samples per device of `throughput`")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    defaults = "; ".join(f"{m}: {' '.join(c)}" for m, c in DEFAULT_CONFIGS.items())
    p.add_argument("--configs", nargs="+",
                   help=f"rows to run (default: {defaults}; throughput without remat may not fit in 80 GB)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--all_optimizers", action="store_true", help="every configuration with every optimizer")
    p.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS)
    p.add_argument("--fused_norm", default="auto", choices=FUSED_NORM)
    p.add_argument("--fsdp", default="auto",
                   help="as the trainer's --fsdp: 'auto' or a divisor of the device count")
    p.add_argument("--peak_tflops", type=float, default=None, help="per chip (default: by device kind)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one process per row (default: on with a GPU/TPU)")
    p.add_argument("--no_torch", action="store_true", help="skip diffusers' PyTorch loop")
    p.add_argument("--dry_run", action="store_true",
                   help="no weights, no timing: each row's compile time and per-device memory from the "
                        "preflight")
    # e.g. cpu: a smoke check of the loop
    p.add_argument("--torch_device", default="cuda", help=argparse.SUPPRESS)
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
    jobs = [tuple(args.job.split(":"))] if args.job else plan_jobs(args)
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
        print(json.dumps({**row, "resolution": args.resolution, "steps": args.steps,
                          "dry_run": args.dry_run}))
    print_table(rows, args)
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
