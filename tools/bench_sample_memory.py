"""Per-device memory of sampling full-size models, from ahead-of-time compilation alone
(`dreambooth_jax.diffusion.generation.sampling_memory`): nothing is allocated and no weight is read, so it
runs on a CPU machine with simulated devices, or for a TPU topology with libtpu installed.

    python tools/bench_sample_memory.py                             # Flux.1-dev, 1024 px, 1 and 8 devices
    python tools/bench_sample_memory.py --kind flux-schnell --devices 8 --fsdp 8 --batch 8 --steps 4
    python tools/bench_sample_memory.py --topology v5e:2x4 --fsdp 8  # the TPU compiler's own figures

Each device count runs in its own process (XLA's simulated CPU devices are fixed at start-up). Prints a JSON
line per row and a Markdown table. The params' bytes follow from the shardings (exact for any backend); the
temporaries are the named compiler's buffer assignment (XLA's CPU compiler computes some bf16 ops in fp32 and
keeps attention's score matrices, so it overestimates a GPU's or TPU's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

GIB = 2**30


def child(args) -> None:
    """One row, in this process (its devices set up by the parent)."""
    # late: the parent set XLA_FLAGS (the simulated devices) before JAX loads here
    import jax
    from make_config_pipeline import make_config_pipeline

    from dreambooth_jax import parallel
    from dreambooth_jax.diffusion.generation import sampling_memory
    from dreambooth_jax.pipeline import load_pipeline

    devices = jax.devices()
    if args.topology:
        from bench_memory import tpu_devices

        devices = tpu_devices(args.topology)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = load_pipeline(make_config_pipeline(tmp, args.kind), dtype=args.dtype, weights="none",
                             attention_impl=args.attention)
    mesh = parallel.train_mesh(args.fsdp, devices=devices)
    row = sampling_memory(pipe, args.batch, height=args.resolution, width=args.resolution,
                          num_inference_steps=args.steps, mesh=mesh)
    print(json.dumps({"kind": args.kind, "dtype": args.dtype, "steps": args.steps, **row}), flush=True)


def markdown(rows: list[dict]) -> str:
    lines = ["| model | px | batch | devices (mesh) | compiler | params / device | temporaries | total |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["per_device_bytes"]
        gib = lambda x: "n/a" if x is None else f"{x / GIB:.1f} GiB"  # noqa: E731
        mesh = ", ".join(f"{k} {v}" for k, v in r["mesh"].items())
        lines.append(f"| {r['kind']} {r['dtype']} | {r['height']} | {r['batch']} | {r['devices']} ({mesh}) "
                     f"| {r['compiler']} | {gib(b['params'])} | {gib(b['temp'])} | {gib(b['total'])} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="flux-dev", choices=("flux-dev", "flux-schnell", "sd15", "sd21", "sdxl"))
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1, help="images per compiled call")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (memory does not grow with them)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--attention", default="auto")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 8],
                   help="simulated CPU device counts, one process each (ignored with --topology)")
    p.add_argument("--fsdp", type=int, default=None,
                   help="devices per fsdp group (default: all devices of the row: the networks sharded)")
    p.add_argument("--topology", default=None, help="a TPU topology, e.g. v5e:2x4 (needs libtpu)")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    rows = []
    counts = [None] if args.topology else args.devices
    for n in counts:
        fsdp = args.fsdp or n or 1
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--kind", args.kind, "--resolution",
               str(args.resolution), "--batch", str(args.batch), "--steps", str(args.steps), "--dtype",
               args.dtype, "--attention", args.attention]
        if args.topology:
            cmd += ["--topology", args.topology, "--fsdp", str(args.fsdp or 1)]
        else:
            cmd += ["--fsdp", str(fsdp)]
        env = dict(os.environ)
        if n:
            env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"),
                                                      f"--xla_force_host_platform_device_count={n}"]))
            env.setdefault("JAX_PLATFORMS", "cpu")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            where = f"{n} devices" if n else args.topology
            raise SystemExit(f"error: the row on {where} failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    table = markdown(rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
