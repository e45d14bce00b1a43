"""Kernel benchmark: our GroupNorm and auto attention against XLA on every shape of SD 1.5, SD 2.1 and SDXL.

Our Pallas GroupNorm(+SiLU) and the attention `--attention auto` picks, against XLA, on every GroupNorm and
attention shape of SD 1.5 (512 px), SD 2.1 (768 px) and SDXL (1024 px).

    python tools/bench_kernels.py                       # on a GPU or TPU: all three models, bf16
    python tools/bench_kernels.py --models sd15 --repeats 50
    python tools/bench_kernels.py --list                # any machine: the shapes, their counts, auto's pick
    python tools/bench_kernels.py --compile_for v5e:1x1  # with libtpu: compile each kernel for a TPU

The shapes are recorded from the real networks (UNet at a training batch of 2 = 1 instance + 1 class image,
VAE encode and decode of one image) traced from their configs, so no weight is needed. For each distinct
shape: the time of the forward and of forward + backward, kernel vs XLA (median of `--repeats`), the achieved
memory bandwidth (norm: the bytes our kernels move, x read twice and y written forward, x and dy read twice
and dx written backward; XLA's column divides the same bytes by its time, so the ratio is the speedup) or
TFLOP/s (attention: 4 B N T S H forward, 3x that forward + backward), and the percentage of the chip's peak.
Pallas only interprets on CPU, so timings need a GPU or TPU; there `--list` still works, and `--compile_for`
compiles every kernel call (forward + backward, each distinct shape) ahead of time for a Cloud TPU topology
with libtpu's compiler (`pip install 'jax[tpu]'`), which checks that Mosaic accepts them.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import time

import numpy as np
from bench_train_common import PEAK_TFLOPS
from make_config_pipeline import configs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

RESOLUTION = {"sd15": 512, "sd21": 768, "sdxl": 1024}
# HBM bandwidth in GB/s per chip, by substring of the lower-cased device kind (first match wins).
PEAK_GBPS = (("h100 pcie", 2000), ("h100", 3350), ("h200", 4800), ("a100", 2039), ("tpu v5 lite", 819),
             ("tpu v5e", 819), ("tpu v6 lite", 1640), ("tpu v6e", 1640), ("tpu v5", 2765), ("tpu v4", 1228))


def record_shapes(kind: str):
    """({(x shape, groups, eps, activation): count}, {(B, T, S, heads, head_dim): count}) of `kind`'s UNet and
    VAE at its native resolution, traced from the configs."""
    # late, as in every tool: `--help` answers at once and a backend starts only for the work
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from dreambooth_jax.models import unet, vae
    from dreambooth_jax.models.attention import Attention
    from dreambooth_jax.models.blocks import GroupNorm

    norms, attentions = collections.Counter(), collections.Counter()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, GroupNorm):
            norms[(tuple(args[0].shape), module.num_groups, module.epsilon, module.activation)] += 1
        elif context.method_name == "__call__" and isinstance(module, Attention):
            x = args[0]
            context_len = x.shape[1] if len(args) < 2 or args[1] is None else args[1].shape[1]
            if x.ndim == 3:  # the VAE mid-block's subclass calls the base class with [B, HW, C]
                attentions[(x.shape[0], x.shape[1], context_len, module.heads, module.dim_head)] += 1
        return next_fun(*args, **kwargs)

    cfg = configs(kind)
    unet_cfg = unet.UNetConfig.from_diffusers_config(cfg["unet"])
    vae_cfg = vae.VAEConfig.from_diffusers_config(cfg["vae"])
    latent = RESOLUTION[kind] // 8
    args, kwargs = unet.dummy_inputs(unet_cfg, batch=2, seq_len=77)
    args = (jnp.zeros((2, latent, latent, unet_cfg.in_channels)), *args[1:])
    kwargs = {k: jnp.zeros((2, *v.shape[1:])) for k, v in kwargs.items()}
    rng = jax.random.PRNGKey(0)
    images = jnp.zeros((1, RESOLUTION[kind], RESOLUTION[kind], 3))
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda: unet.UNet2DConditionModel(unet_cfg).init(rng, *args, **kwargs))
        jax.eval_shape(lambda: vae.AutoencoderKL(vae_cfg).init(rng, images, rng))
    return norms, attentions


def _peak(table, kind: str):
    kind = kind.lower()
    return next((v for k, v in table if k in kind), None)


def _time(fn, args, repeats: int) -> float:
    """Median seconds of `fn(*args)` (compiled and warmed up first)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _fwd_and_fwd_bwd(f, args):
    """Jitted forward, and forward + backward (the vjp of every argument with a random cotangent)."""
    import jax

    fwd = jax.jit(f)
    out = jax.eval_shape(f, *args)
    dy = jax.random.normal(jax.random.PRNGKey(1), out.shape).astype(out.dtype)

    @jax.jit
    def fwd_bwd(*a):
        y, vjp = jax.vjp(f, *a)
        return y, vjp(dy)

    return fwd, fwd_bwd


def bench_norm(shape, groups, eps, activation, dtype, repeats, device_kind) -> dict:
    import jax

    from dreambooth_jax.kernels.norm import group_norm, group_norm_reference

    k = jax.random.split(jax.random.PRNGKey(0), 3)
    c = shape[-1]
    args = (jax.random.normal(k[0], shape).astype(dtype), jax.random.normal(k[1], (c,)),
            jax.random.normal(k[2], (c,)))
    kw = dict(num_groups=groups, eps=eps, activation=activation)
    n_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    row = {"op": "group_norm" + ("+silu" if activation else ""), "shape": list(shape)}
    peak = _peak(PEAK_GBPS, device_kind)
    for impl, f in (("kernel", functools.partial(group_norm, **kw)),
                    ("xla", functools.partial(group_norm_reference, **kw))):
        fwd, fwd_bwd = _fwd_and_fwd_bwd(f, args)
        for mode, fn, traffic in (("fwd", fwd, 3 * n_bytes), ("fwd_bwd", fwd_bwd, 8 * n_bytes)):
            s = _time(fn, args, repeats)
            row[f"{impl}_{mode}_ms"] = 1e3 * s
            row[f"{impl}_{mode}_gbps"] = traffic / s / 1e9
            row[f"{impl}_{mode}_pct_peak"] = None if peak is None else 100 * traffic / s / 1e9 / peak
    for mode in ("fwd", "fwd_bwd"):
        row[f"{mode}_speedup"] = row[f"xla_{mode}_ms"] / row[f"kernel_{mode}_ms"]
    return row


def bench_attention(b, t, s, heads, head_dim, dtype, repeats, device_kind,
                    implementation: str = "auto") -> dict:
    import jax

    from dreambooth_jax.kernels import choose
    from dreambooth_jax.models.attention import dot_product_attention

    k = jax.random.split(jax.random.PRNGKey(0), 3)
    args = tuple(jax.random.normal(key, (b, n, heads, head_dim)).astype(dtype)
                 for key, n in zip(k, (t, s, s)))
    auto = choose.attention(implementation, q_len=t, kv_len=s, head_dim=head_dim, dtype=dtype, masked=False)
    flop = 4 * b * heads * t * s * head_dim
    row = {"op": "attention", "shape": [b, t, s, heads, head_dim], "auto": auto}
    peak = _peak(PEAK_TFLOPS, device_kind)
    impls = [("kernel", auto), ("xla", "dot_product")] if auto != "dot_product" else [("xla", "dot_product")]
    for impl, name in impls:
        fwd, fwd_bwd = _fwd_and_fwd_bwd(functools.partial(dot_product_attention, implementation=name), args)
        for mode, fn, work in (("fwd", fwd, flop), ("fwd_bwd", fwd_bwd, 3 * flop)):
            sec = _time(fn, args, repeats)
            row[f"{impl}_{mode}_ms"] = 1e3 * sec
            row[f"{impl}_{mode}_tflops"] = work / sec / 1e12
            row[f"{impl}_{mode}_pct_peak"] = None if peak is None else 100 * work / sec / 1e12 / peak
    for mode in ("fwd", "fwd_bwd"):
        row[f"{mode}_speedup"] = (row[f"xla_{mode}_ms"] / row[f"kernel_{mode}_ms"] if "kernel_fwd_ms" in row
                                  else 1.0)
    return row


def list_shapes(models) -> None:
    import jax.numpy as jnp

    from dreambooth_jax.kernels import choose

    for kind in models:
        norms, attentions = record_shapes(kind)
        print(f"\n{kind} at {RESOLUTION[kind]} px: {sum(norms.values())} GroupNorm calls "
              f"({len(norms)} shapes), {sum(attentions.values())} attention calls ({len(attentions)} shapes)")
        for (shape, groups, _, act), n in sorted(norms.items(), key=lambda kv: -np.prod(kv[0][0])):
            print(f"  group_norm{'+silu' if act else '     '} {str(shape):<22} groups {groups:<3} x{n}")
        for (b, t, s, h, d), n in sorted(attentions.items(), key=lambda kv: -kv[0][1]):
            picks = [choose.attention("auto", q_len=t, kv_len=s, head_dim=d, dtype=jnp.bfloat16, masked=False,
                                      backend=backend, gpu_capability=capability)
                     for backend, capability in (("gpu", 9.0), ("gpu", 8.0), ("tpu", None))]
            print(f"  attention B={b} T={t:<6} S={s:<6} heads={h:<2} head_dim={d:<4} x{n:<3} auto: "
                  f"H100 {picks[0]}, A100 {picks[1]}, TPU {picks[2]}")


def compile_for(topology: str, models, dtype) -> None:
    """Compiles the forward + backward of each distinct kernel call for one chip of `topology` (libtpu)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    from dreambooth_jax.kernels import choose
    from dreambooth_jax.kernels.attention import splash_attention
    from dreambooth_jax.kernels.norm import group_norm

    device = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                          chips_per_host_bounds=[1, 1, 1]).devices[0]
    spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dt, sharding=SingleDeviceSharding(device))
    failures = 0
    for kind in models:
        norms, attentions = record_shapes(kind)
        calls = [(f"group_norm{'+silu' if act else ''} {shape}",
                  functools.partial(group_norm, num_groups=groups, eps=eps, activation=act, interpret=False),
                  (spec(shape), spec(shape[-1:], jnp.float32), spec(shape[-1:], jnp.float32)))
                 for shape, groups, eps, act in norms]
        calls += [(f"splash B={b} T={t} S={s} heads={h} head_dim={d}",
                   functools.partial(splash_attention, interpret=False),
                   (spec((b, t, h, d)), spec((b, s, h, d)), spec((b, s, h, d))))
                  for b, t, s, h, d in attentions
                  if choose.attention("auto", q_len=t, kv_len=s, head_dim=d, dtype=dtype, masked=False,
                                      backend="tpu") == "pallas"]
        for name, fn, args in calls:
            loss = lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32))  # noqa: E731
            t0 = time.perf_counter()
            try:
                with choose.target_backend("tpu"):
                    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower().compile()
                print(f"{kind} {name}: compiled for {device.device_kind} in {time.perf_counter() - t0:.1f} s")
            except Exception as e:  # report every shape, then fail
                failures += 1
                print(f"{kind} {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    if failures:
        raise SystemExit(f"error: {failures} kernel calls did not compile for {topology}")


def print_kernel_table(rows) -> None:
    print(f"\n{'model':<5} {'op':<15} {'shape':<26} {'auto':<11} {'x':>3} {'fwd ms':>15} {'fwd+bwd ms':>17} "
          f"{'speedup':>13} {'kernel % peak':>14}")
    for r in rows:
        cells = [f"{r.get('kernel_' + m + '_ms', float('nan')):7.3f}/{r['xla_' + m + '_ms']:<7.3f}"
                 for m in ("fwd", "fwd_bwd")]
        pct = r.get("kernel_fwd_bwd_pct_peak")
        print(f"{r['model']:<5} {r['op']:<15} {str(r['shape']):<26} {r.get('auto', 'kernel'):<11} "
              f"{r['count']:>3} {cells[0]:>15} {cells[1]:>17} "
              f"{r['fwd_speedup']:5.2f}/{r['fwd_bwd_speedup']:<5.2f}  "
              f"{'n/a' if pct is None else format(pct, '.0f') + '%':>12}")
    print("\nms columns: kernel/XLA; speedup: XLA time / kernel time, forward / forward+backward; % of peak: "
          "HBM bandwidth (norm) or bf16 TFLOP/s (attention), forward+backward.\nTargets: GroupNorm+SiLU >= "
          "1.5x XLA forward+backward and >= 70% of peak bandwidth on SD 1.5's largest activations.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(RESOLUTION), choices=list(RESOLUTION))
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--attention", default="auto", choices=("auto", "cudnn", "pallas"),
                   help="the attention compared with XLA: auto's pick per shape, or one kernel on every "
                        "shape (to check where auto's thresholds lie)")
    p.add_argument("--list", action="store_true", help="only list the shapes and what --attention auto picks")
    p.add_argument("--compile_for", default=None, metavar="TOPOLOGY",
                   help="only compile every kernel call for one chip of this Cloud TPU topology (e.g. "
                        "v5e:1x1)")
    p.add_argument("--json", default=None, help="also write the rows to this file (a JSON list)")
    args = p.parse_args(argv)
    if args.list:
        list_shapes(args.models)
        return

    import jax
    import jax.numpy as jnp

    if args.compile_for:
        compile_for(args.compile_for, args.models, jnp.bfloat16 if args.dtype == "bf16" else jnp.float32)
        return

    if jax.default_backend() == "cpu":
        raise SystemExit("error: timing the kernels needs a GPU or TPU (Pallas only interprets on CPU); "
                         "--list shows the shapes and choices on any machine")
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    device_kind = jax.devices()[0].device_kind
    rows = []
    for kind in args.models:
        norms, attentions = record_shapes(kind)
        for (shape, groups, eps, act), n in sorted(norms.items(), key=lambda kv: -np.prod(kv[0][0])):
            row = bench_norm(shape, groups, eps, act, dtype, args.repeats, device_kind)
            rows.append({"model": kind, "count": n, **row})
            print(json.dumps({**rows[-1], "device": device_kind}), flush=True)
        for (b, t, s, h, d), n in sorted(attentions.items(), key=lambda kv: -kv[0][1]):
            row = bench_attention(b, t, s, h, d, dtype, args.repeats, device_kind, args.attention)
            rows.append({"model": kind, "count": n, **row})
            print(json.dumps({**rows[-1], "device": device_kind}), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    print(f"\ndevice: {device_kind}, dtype {args.dtype}, median of {args.repeats}")
    print_kernel_table(rows)


if __name__ == "__main__":
    main()
