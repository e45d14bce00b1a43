"""Which implementation runs where: the one place that decides `--attention` and `--fused_norm`.

attention ("auto", per call site, from the shapes and the backend):
  GPU  cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`) where its constraints
       hold: fp16/bf16, head_dim a multiple of 8 and <= 128 (<= 256 from Hopper, compute capability 9.0), no
       mask (with a mask cuDNN takes a bias, and training then needs even sequence lengths: CLIP's 77 tokens
       are odd); otherwise XLA.
  TPU  Pallas splash attention (`kernels.attention.splash_attention`, padded to its tiles) for queries of
       >= 4096 tokens (SD 1.5's 64 x 64 level at 512 px, SDXL's at 1024 px, the VAE mid-block), unmasked;
       XLA for shorter ones, where the padding of head_dim (40 -> 128) and of 77 keys costs more than the
       kernel saves (MaxDiffusion's threshold).
  CPU  XLA.
fused_norm ("auto"): the Pallas GroupNorm kernel on GPU and TPU; XLA on CPU, where Pallas only interprets.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from dreambooth_jax.errors import UsageError

# "einsum": our pure-JAX reference (`kernels.attention.attention_reference`), the only one honouring
# upcast=False. "dot_product": XLA's `jax.nn.dot_product_attention(implementation="xla")`. "cudnn": cuDNN
# flash attention (GPU only, fp16/bf16). "pallas": the Pallas TPU splash kernel (interpret mode on CPU) for
# every unmasked call; masked ones (the text encoder's causal attention) use XLA.
ATTENTION_IMPLS = ("auto", "einsum", "dot_product", "cudnn", "pallas")
FUSED_NORM = ("auto", "on", "off")
SPLASH_MIN_QUERIES = 4096


_TARGET: list[str] = []


@contextlib.contextmanager
def target_backend(platform: str):
    """Decide (and lower kernels) for `platform` ("tpu", "gpu", "cpu") instead of JAX's default backend while
    tracing: for ahead-of-time compilation on compile-only devices (`tools/bench_memory.py --topologies`)."""
    _TARGET.append("gpu" if platform in ("cuda", "rocm") else platform)
    try:
        yield
    finally:
        _TARGET.pop()


def backend() -> str:
    """The backend programs are traced for: `target_backend`'s, else JAX's default ("cpu", "gpu", "tpu")."""
    return _TARGET[-1] if _TARGET else jax.default_backend()


def _backend(backend_name: str | None) -> str:
    return backend_name or backend()


def _gpu_capability() -> float:
    try:
        return float(jax.devices()[0].compute_capability)
    except (AttributeError, ValueError, TypeError):
        return 0.0


def check_attention(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise UsageError(f"unknown attention implementation {impl!r}; expected one of "
                         f"{', '.join(ATTENTION_IMPLS)}")
    return impl


def attention(impl: str, *, q_len: int, kv_len: int, head_dim: int, dtype, masked: bool,
              backend: str | None = None, gpu_capability: float | None = None) -> str:
    """The implementation one attention call uses: `impl` itself unless it is "auto" (see the module
    docstring).

    Args:
      impl: one of `ATTENTION_IMPLS`.
      q_len, kv_len, head_dim, dtype: the call's query length, key length, head width and compute dtype.
      masked: whether the call has a mask.
      backend: "cpu", "gpu" or "tpu" (default: JAX's default backend).
      gpu_capability: CUDA compute capability, e.g. 9.0 (default: the first device's).
    """
    check_attention(impl)
    if impl == "pallas" and masked:
        return "dot_product"  # splash runs unmasked calls; the text encoder's causal attention stays on XLA
    if impl != "auto":
        return impl
    backend = _backend(backend)
    del kv_len  # every rule below holds for any key length (splash pads and masks the 77 text tokens)
    if backend in ("gpu", "cuda", "rocm"):
        if backend == "rocm" or masked or jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16),
                                                                   jnp.dtype(jnp.float16)):
            return "dot_product"
        capability = _gpu_capability() if gpu_capability is None else gpu_capability
        max_head = 256 if capability >= 9.0 else 128
        return "cudnn" if head_dim % 8 == 0 and head_dim <= max_head else "dot_product"
    if backend == "tpu" and not masked and q_len >= SPLASH_MIN_QUERIES:
        return "pallas"
    return "dot_product"


def check_fused_norm(setting: str | bool) -> str | bool:
    if not isinstance(setting, bool) and setting not in FUSED_NORM:
        raise UsageError(f"fused_norm={setting!r}: expected one of {', '.join(FUSED_NORM)}")
    return setting


def fused_norm(setting: str | bool, backend: str | None = None) -> bool:
    """Whether GroupNorm runs as the Pallas kernel: "on", "off", or "auto" (on for GPU and TPU)."""
    if isinstance(check_fused_norm(setting), bool):
        return setting
    if setting == "auto":
        return _backend(backend) in ("gpu", "cuda", "tpu")
    return setting == "on"
