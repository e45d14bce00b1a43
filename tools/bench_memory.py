"""Per-device training memory of full-size models from ahead-of-time compilation alone: the trainer's own
`--dry_run` preflight, for each model x {full fine-tune, LoRA} x {replicated, fsdp} x device count x {remat
off, on}. Nothing is allocated and no weight is read, so it runs on a CPU machine with simulated devices.

    python tools/bench_memory.py                                  # SD 1.5 and SD 2.1, 1/8/64 devices
    python tools/bench_memory.py --models sd15 --devices 8 --markdown table.md
    python tools/bench_memory.py --models sd15 --modes full --remat on --sharding fsdp --devices 2 4 8 \
      --devices_per_subject 2                                     # K = devices / 2 subjects (--subjects)

Each device count runs in its own process (XLA's simulated CPU devices are fixed at start-up). Prints a JSON
line per row and a Markdown table. The numbers are XLA's CPU compiler's: the persistent state (params,
optimizer, EMA, frozen) is exact for any backend; the temporaries are the CPU compiler's buffer assignment
(with its memory-minimising scheduler), which computes some bf16 ops in fp32, so they estimate a TPU's or
GPU's (run `--dry_run` on the machine itself for its own compiler's figure, or `--topologies` with libtpu
installed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from make_config_pipeline import make_config_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

RESOLUTION = {"sd15": 512, "sd21": 768, "sdxl": 1024}
GIB = 2**30


def row_configs(args) -> list[dict]:
    rows = []
    for model in args.models:
        for mode in args.modes:
            for remat in args.remat:
                rows.append({"model": model, "mode": mode, "remat": remat == "on"})
    return rows


def preflight_row(model_dir: str, instance_dir: str, row: dict, fsdp: int, args, devices,
                  subjects: int = 0) -> dict:
    """One preflight through the trainer's `--dry_run` (in this process); `subjects` > 0: that many subjects
    trained together (`--subjects`), `fsdp` then within each subject's device group."""
    # late: each child sets XLA_FLAGS (its simulated devices) before JAX loads
    from dreambooth_jax.training import trainer
    from dreambooth_jax.training.config import TrainConfig

    subjects_file = None
    if subjects:
        subjects_file = os.path.join(instance_dir, f"subjects-{subjects}.json")
        with open(subjects_file, "w", encoding="utf-8") as f:
            json.dump([{"name": f"s{k}", "instance_data_dir": instance_dir, "seed": k}
                       for k in range(subjects)], f)

    lora = row["mode"].startswith("lora")
    cfg = TrainConfig(
        pretrained_model_name_or_path=model_dir, instance_prompt="a photo of sks dog",
        with_prior_preservation=True, class_data_dir=os.path.join(instance_dir, "class"),
        class_prompt="a dog", resolution=args.resolution or RESOLUTION[row["model"]],
        train_batch_size=args.batch, mixed_precision="bf16", gradient_checkpointing=row["remat"],
        optimizer=args.optimizer, use_ema=args.ema and not lora, use_lora=lora,
        rank=int(row["mode"][4:]) if lora else 4, attention=args.attention, fsdp=str(fsdp), dry_run=True,
        max_train_steps=1, output_dir=instance_dir, compilation_cache_dir="none", subjects=subjects_file,
        instance_data_dir=None if subjects else instance_dir)
    return trainer.dry_run(cfg, devices)


def child(args) -> None:
    """Runs every row on this process's devices; one JSON line each on stdout."""
    import jax

    devices = tpu_devices(args.topology) if args.topology else jax.devices()
    n = len(devices)
    with tempfile.TemporaryDirectory() as tmp:
        models = {m: make_config_pipeline(os.path.join(tmp, m), m) for m in args.models}
        instance_dir = os.path.join(tmp, "instance")
        os.makedirs(instance_dir)
        subjects = n // args.devices_per_subject if args.devices_per_subject else 0
        group = args.devices_per_subject or n  # the devices one subject's state spans
        for row in row_configs(args):
            fsdps = {1} if "replicated" in args.sharding else set()
            fsdps |= {group} if "fsdp" in args.sharding else set()
            for fsdp in sorted(fsdps):
                try:
                    report = preflight_row(models[row["model"]], instance_dir, row, fsdp, args, devices,
                                           subjects)
                    out = {**row, "devices": n, "fsdp": fsdp, "device_kind": devices[0].device_kind, **report}
                except Exception as e:  # one failing row should not lose the others
                    out = {**row, "devices": n, "fsdp": fsdp, "error": f"{type(e).__name__}: {e}"}
                print(json.dumps(out), flush=True)


def tpu_devices(topology: str):
    """The compile-only devices of a Cloud TPU slice, e.g. 'v5e:2x4' (8 chips), 'v5e:8x8' (64), 'v6e:1x1' (one
    chip), 'v4:2x2x2' (8 chips, one device per chip): libtpu compiles for them on any machine, and its
    compiler does the buffer assignment and memory check of the real chips. Needs `pip install 'jax[tpu]'`
    (libtpu)."""
    from jax.experimental import topologies

    name, _, shape = topology.partition(":")
    dims = [int(d) for d in shape.split("x")]
    kwargs = {"chip_config_name": "megacore"} if name == "v4" else {}
    if int(np.prod(dims)) < 4:  # a host holds 2x2 chips by default: smaller slices name their own bounds
        kwargs["chips_per_host_bounds"] = (dims + [1, 1, 1])[:3]
    return topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices


def markdown(rows: list[dict], args) -> str:
    lines = ["| model | training | remat | devices | subjects | mesh (subject x data x fsdp) | params | "
             "optimizer | EMA | frozen | temp | total (GiB per device) | fits |", "|" + "---|" * 13]
    order = lambda r: (r["model"], r["mode"], r["remat"], r["devices"], r["fsdp"])  # noqa: E731
    for r in sorted(rows, key=order):
        head = (f"| {r['model']} | {r['mode']} | {'on' if r['remat'] else 'off'} | {r['devices']} "
                f"{r.get('device_kind', '')} | {r.get('subjects', 1)} | ")
        if "error" in r:
            lines.append(head + f"error: {r['error'][:80]} |" + " |" * 7)
            continue
        b = r["per_device_bytes"]
        cell = lambda v: "n/a" if v is None else f"{v / GIB:.2f}"  # noqa: E731
        mesh = r["mesh"]
        lines.append(head + f"{mesh.get('subject', 1)} x {mesh['data']} x {mesh['fsdp']} | " + " | ".join(
            cell(b[k]) for k in ("params", "optimizer", "ema", "frozen", "temp", "total"))
            + f" | {'n/a' if r['fits'] is None else 'yes' if r['fits'] else 'no'} |")
    opt = f"{args.optimizer}{' + EMA (full fine-tune)' if args.ema else ''}"
    lines.append(f"\n{opt}, bf16 compute, fp32 master weights, batch {args.batch}+{args.batch} per device, "
                 "prior preservation, native resolution (SD 1.5: 512, SD 2.1: 768, SDXL: 1024).")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["sd15", "sd21"], choices=sorted(RESOLUTION))
    p.add_argument("--modes", nargs="+", default=["full", "lora16"], help="'full' or 'loraR' (rank R)")
    p.add_argument("--sharding", nargs="+", default=["replicated", "fsdp"], choices=("replicated", "fsdp"))
    p.add_argument("--devices", nargs="+", type=int, default=[1, 8, 64], help="simulated CPU device counts")
    p.add_argument("--topologies", nargs="+", default=None,
                   help="Cloud TPU slices instead of CPU devices, compiled by libtpu's own compiler (needs "
                        "`pip install 'jax[tpu]'`), e.g. v5e:1x1 v5e:2x4 v5e:8x8 v4:2x2x2 v6e:2x4")
    p.add_argument("--topology", default=None, help=argparse.SUPPRESS)  # the child's one
    p.add_argument("--remat", nargs="+", default=["off", "on"], choices=("off", "on"))
    p.add_argument("--devices_per_subject", type=int, default=None,
                   help="train devices / N subjects together (--subjects), N devices each; 'fsdp' rows shard "
                        "each subject's state over its N (default: one subject)")
    p.add_argument("--resolution", type=int, default=None, help="default: each model's native one")
    p.add_argument("--batch", type=int, default=1, help="instance rows per device (as many class rows join)")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="EMA with full fine-tuning")
    p.add_argument("--attention", default="dot_product")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--json", default=None, help="also write the rows to this file (a JSON list)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        return child(args)
    rows = []
    targets = ([("--topology", t) for t in args.topologies] if args.topologies
               else [("--devices", n) for n in args.devices])
    for flag, target in targets:
        # -O0: codegen is not needed for the memory analysis (buffer assignment happens before it), only its
        # time. XLA CPU's default scheduler favours concurrency over memory: it keeps rematerialised
        # activations alive (gradient checkpointing saves nothing in its analysis); the memory-minimising one
        # schedules as accelerators do.
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0 "
               "--xla_cpu_enable_concurrency_optimized_scheduler=false" + (
            f" --xla_force_host_platform_device_count={target}" if flag == "--devices" else "")}
        if flag == "--topology":  # libtpu's start-up otherwise warns that it cannot find a TPU
            env.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
            env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        child_argv = [*argv, "--child"] + (["--topology", target] if flag == "--topology" else [])
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *child_argv], env=env,
                              stdout=subprocess.PIPE, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
                print(line, flush=True)
        if proc.returncode:
            print(f"error: the process for {flag} {target} exited with {proc.returncode}", file=sys.stderr)
    table = markdown(rows, args)
    print("\n" + table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
