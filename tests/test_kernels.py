"""Pallas kernels against their pure-JAX references (interpret mode on CPU), the per-call kernel choice, and
the whole UNet / VAE with the kernels on against off."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags_with

from dreambooth_jax.errors import UsageError
from dreambooth_jax.kernels import choose
from dreambooth_jax.kernels.attention import attention_reference, splash_attention
from dreambooth_jax.kernels.norm import group_norm, group_norm_reference
from dreambooth_jax.models import unet as unet_lib
from dreambooth_jax.pipeline import load_pipeline

# Error budgets. The kernels and the references compute the same float32 formulas and differ in the order of
# their reductions (blocked partial sums combined with Chan's formula against one XLA reduce). Each reduction
# of n <= 3e5 terms carries a relative error of ~log2(n) * 6e-8 ~ 1e-6 on either side; outputs and gradients
# are compared relative to their largest magnitude with 1e-5 (headroom for other machines' summation orders).
FP32_REL = 1e-5


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _value_and_grads(fn, args, cotangent):
    out, vjp = jax.jit(lambda *a: jax.vjp(fn, *a))(*args)
    return (out, *vjp(cotangent))


# --- GroupNorm
# ----------------------------------------------------------------------------------------------------- Every
# channel count of SD 1.x/2.x/XL's UNet and VAE, 32 groups; odd H x W (several row blocks with an overhanging
# last one where H x W is large), batch 1 and 3, with and without SiLU.
_NORM_CASES = [  # (batch, H, W, C, activation)
    (3, 5, 7, 128, "silu"), (1, 70, 70, 128, "silu"), (1, 9, 11, 256, None), (3, 13, 3, 320, "silu"),
    (1, 31, 33, 512, "silu"), (1, 7, 9, 640, None), (3, 3, 5, 960, "silu"), (1, 17, 19, 1280, "silu"),
    (1, 5, 3, 1920, "silu"), (1, 23, 29, 2560, None),
]


def _norm_inputs(b, h, w, c, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    # a mean far from 0 tests the variance's cancellation
    x = 2.0 * jax.random.normal(k[0], (b, h, w, c)) + 3.0
    scale, bias = 1.0 + 0.5 * jax.random.normal(k[1], (c,)), jax.random.normal(k[2], (c,))
    return x, scale, bias, jax.random.normal(k[3], x.shape)


@pytest.mark.parametrize("b,h,w,c,activation", _NORM_CASES)
def test_group_norm_kernel_equals_reference_fp32(b, h, w, c, activation):
    x, scale, bias, dy = _norm_inputs(b, h, w, c)
    kw = dict(num_groups=32, eps=1e-5, activation=activation)
    got = _value_and_grads(lambda *a: group_norm(*a, **kw, interpret=True), (x, scale, bias), dy)
    want = _value_and_grads(lambda *a: group_norm_reference(*a, **kw), (x, scale, bias), dy)
    for name, g, r in zip(("y", "dx", "dscale", "dbias"), got, want):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert _rel_err(g, r) < FP32_REL, name


@pytest.mark.parametrize("b,h,w,c,activation", [(3, 13, 3, 320, "silu"), (1, 31, 33, 512, None),
                                                (1, 17, 19, 1280, "silu")])
def test_group_norm_kernel_bf16_is_as_close_as_the_bf16_reference(b, h, w, c, activation):
    """bf16 in and out: the kernel's error against float32 maths is at most the bf16 reference's own (both
    round the output and dx to bf16 once; statistics are float32 in both), with a margin of 2x for rounding
    ties."""
    x, scale, bias, dy = _norm_inputs(b, h, w, c)
    x16, dy16 = x.astype(jnp.bfloat16), dy.astype(jnp.bfloat16)
    kw = dict(num_groups=32, eps=1e-6, activation=activation)
    exact = _value_and_grads(lambda *a: group_norm_reference(*a, **kw),
                             (x16.astype(jnp.float32), scale, bias), dy16.astype(jnp.float32))
    got = _value_and_grads(lambda *a: group_norm(*a, **kw, interpret=True), (x16, scale, bias), dy16)
    ref = _value_and_grads(lambda *a: group_norm_reference(*a, **kw), (x16, scale, bias), dy16)
    assert got[0].dtype == got[1].dtype == jnp.bfloat16
    for name, g, r, e in zip(("y", "dx", "dscale", "dbias"), got, ref, exact):
        budget = max(_rel_err(r, e), 2.0 ** -9)  # at least half a bf16 ulp: the reference may round exactly
        assert _rel_err(g, e) <= 2 * budget, name


def test_group_norm_rejects_bad_arguments():
    x = jnp.zeros((1, 4, 4, 48))
    with pytest.raises(ValueError, match="divisible"):
        group_norm(x, jnp.ones(48), jnp.zeros(48), num_groups=32, eps=1e-5)
    with pytest.raises(ValueError, match="activation"):
        group_norm(x, jnp.ones(48), jnp.zeros(48), num_groups=16, eps=1e-5, activation="gelu")


def test_group_norm_lowers_for_tpu_and_gpu():
    """The kernels lower for TPU (Mosaic) and GPU (Triton) from this CPU machine: block shapes, masks and the
    ops used are accepted by both lowerings (running them needs the chips)."""
    x = jax.ShapeDtypeStruct((2, 37, 29, 320), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((320,), jnp.float32)

    def loss(x, s, b):
        return jnp.sum(group_norm(x, s, b, num_groups=32, eps=1e-5, activation="silu", interpret=False)
                       .astype(jnp.float32))

    for platform, backend in (("tpu", "tpu"), ("cuda", "gpu")):
        with choose.target_backend(backend):
            text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, s, s).lower(
                lowering_platforms=(platform,)).as_text()
        assert ("tpu_custom_call" if platform == "tpu" else "xla.gpu.triton") in text, platform


# --- attention
# -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,t,s,n,h", [(1, 64, 77, 2, 40), (3, 130, 130, 1, 64), (2, 33, 9, 2, 160)])
def test_splash_attention_equals_reference(b, t, s, n, h):
    """Head widths 40/64/160, 77 text keys and lengths that are not multiples of 128 exercise the padding."""
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    q, key, v = (jax.random.normal(k[i], shape) for i, shape in enumerate([(b, t, n, h), (b, s, n, h),
                                                                           (b, s, n, h)]))
    dy = jax.random.normal(k[3], (b, t, n, h))
    got = _value_and_grads(lambda *a: splash_attention(*a, interpret=True), (q, key, v), dy)
    want = _value_and_grads(attention_reference, (q, key, v), dy)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == r.shape and _rel_err(g, r) < FP32_REL, name


@pytest.mark.parametrize("backend,capability,q_len,head_dim,dtype,masked,expected", [
    ("gpu", 9.0, 4096, 40, jnp.bfloat16, False, "cudnn"),      # SD 1.5 level 0 on H100
    ("gpu", 9.0, 1024, 160, jnp.bfloat16, False, "cudnn"),     # head_dim 160: Hopper takes up to 256
    ("gpu", 8.0, 1024, 160, jnp.bfloat16, False, "dot_product"),  # ... an A100 only up to 128
    ("gpu", 8.0, 4096, 64, jnp.float16, False, "cudnn"),
    ("gpu", 9.0, 4096, 64, jnp.float32, False, "dot_product"),  # cuDNN flash is fp16/bf16 only
    ("gpu", 9.0, 4096, 36, jnp.bfloat16, False, "dot_product"),  # not a multiple of 8
    ("gpu", 9.0, 4096, 512, jnp.bfloat16, False, "dot_product"),  # the VAE's one 512-wide head
    ("gpu", 9.0, 77, 64, jnp.bfloat16, True, "dot_product"),    # CLIP's causal mask
    ("tpu", None, 4096, 40, jnp.bfloat16, False, "pallas"),     # long: splash, head_dim padded to 128
    ("tpu", None, 16384, 512, jnp.bfloat16, False, "pallas"),   # the SDXL VAE mid-block at 1024 px
    ("tpu", None, 1024, 80, jnp.bfloat16, False, "dot_product"),  # short: XLA
    ("tpu", None, 4096, 64, jnp.bfloat16, True, "dot_product"),
    ("cpu", None, 4096, 40, jnp.float32, False, "dot_product"),
])
def test_auto_attention_choice(backend, capability, q_len, head_dim, dtype, masked, expected):
    got = choose.attention("auto", q_len=q_len, kv_len=77, head_dim=head_dim, dtype=dtype, masked=masked,
                           backend=backend, gpu_capability=capability)
    assert got == expected


def test_forced_attention_and_fused_norm_settings():
    assert choose.attention("cudnn", q_len=10, kv_len=10, head_dim=8, dtype=jnp.float32, masked=False,
                            backend="cpu") == "cudnn"
    assert choose.attention("pallas", q_len=10, kv_len=10, head_dim=8, dtype=jnp.float32, masked=True,
                            # splash takes no mask: the text encoder stays on XLA
                            backend="tpu") == "dot_product"
    with pytest.raises(UsageError, match="flash"):
        choose.attention("flash", q_len=1, kv_len=1, head_dim=8, dtype=jnp.float32, masked=False)
    assert [choose.fused_norm("auto", b) for b in ("cpu", "gpu", "tpu")] == [False, True, True]
    assert choose.fused_norm("on", "cpu") and not choose.fused_norm("off", "tpu")
    with pytest.raises(UsageError, match="fused_norm"):
        choose.fused_norm("yes")
    # Compiling ahead of time for TPU from this CPU machine decides as a TPU would (the preflight does this).
    with choose.target_backend("tpu"):
        assert choose.backend() == "tpu" and choose.fused_norm("auto")
        assert choose.attention("auto", q_len=4096, kv_len=77, head_dim=40, dtype=jnp.bfloat16,
                                masked=False) == "pallas"
    assert choose.backend() == jax.default_backend()


# --- whole networks
# ------------------------------------------------------------------------------------------------
def test_unet_and_vae_with_kernels_on_equal_off(tiny_pipelines, kind="sd1"):
    """The tiny UNet (forward and parameter gradients) and VAE (encode, decode) with the GroupNorm kernel and
    splash attention (interpret mode) equal XLA's ops within float32 rounding (the budget above, per
    output)."""
    off = load_pipeline(tiny_pipelines[kind], attention_impl="einsum", fused_norm="off")
    on = load_pipeline(tiny_pipelines[kind], attention_impl="pallas", fused_norm="on")
    assert on.unet.fused_norm == on.vae.fused_norm == "on" and off.unet.fused_norm == "off"
    args, kwargs = unet_lib.dummy_inputs(off.unet.config, batch=2, seq_len=9)
    rng = jax.random.split(jax.random.PRNGKey(0), 4)
    sample = jax.random.normal(rng[0], (2, 12, 10, args[0].shape[-1]))  # odd latent: odd H x W at every level
    context = jax.random.normal(rng[1], args[2].shape)
    kwargs = {k: jax.random.normal(rng[2], v.shape) for k, v in kwargs.items()}

    def unet_out(pipe):
        @jax.jit
        def value_and_grad(params):
            f = lambda p: pipe.unet.apply({"params": p}, sample, jnp.array([10, 500]), context,  # noqa: E731
                                          **kwargs)
            out, vjp = jax.vjp(f, params)
            return out, vjp(jax.random.normal(rng[3], out.shape))[0]
        return value_and_grad(off.params["unet"])

    (y_on, g_on), (y_off, g_off) = unet_out(on), unet_out(off)
    assert _rel_err(y_on, y_off) < FP32_REL
    flat_on, flat_off = jax.tree.leaves_with_path(g_on), jax.tree.leaves(g_off)
    for (path, a), b in zip(flat_on, flat_off):
        assert _rel_err(a, b) < FP32_REL, jax.tree_util.keystr(path)

    images = jax.random.uniform(rng[0], (1, 40, 24, 3), minval=-1, maxval=1)
    for method in ("encode", "decode"):
        x = images if method == "encode" else jax.random.normal(rng[1], (1, 5, 3, 4))
        outs = [jax.jit(lambda x, p=p, m=method: p.vae.apply({"params": off.params["vae"]}, x, method=m))(x)
                for p in (on, off)]
        for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
            assert _rel_err(a, b) < FP32_REL, method


def test_kernels_split_the_batch_over_the_mesh():
    """On 8 devices with the batch sharded, the GroupNorm kernel runs per device (`batch_parallel`): no
    all-gather of the activations, and the scale/bias gradients are summed over the shards (equal to the
    reference's)."""
    code = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from dreambooth_jax import parallel
from dreambooth_jax.kernels.batch_parallel import batch_parallel
from dreambooth_jax.kernels.norm import group_norm, group_norm_reference
mesh = parallel.train_mesh(4)
k = jax.random.split(jax.random.PRNGKey(0), 3)
x = jax.random.normal(k[0], (8, 6, 5, 64))
s, b = jax.random.normal(k[1], (64,)), jax.random.normal(k[2], (64,))
def grads(fn, wrap):
    def loss(x, s, b):
        f = lambda x, s, b: fn(x, s, b, num_groups=32, eps=1e-5, activation="silu")
        return jnp.sum(jnp.sin(batch_parallel(f, x, s, b) if wrap else f(x, s, b)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
with parallel.traced_on(mesh):
    hlo = grads(group_norm, True).lower(xs, s, b).compile().as_text()
    got = grads(group_norm, True)(xs, s, b)
want = grads(group_norm_reference, False)(x, s, b)
assert "all-gather" not in hlo, "activations gathered"
for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))
print("ok")
"""
    env = {**os.environ, "XLA_FLAGS": xla_flags_with("--xla_force_host_platform_device_count=8"),
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
