"""The forward process q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I) and its host-side schedules.

Everything here mirrors diffusers' PyTorch schedulers (`diffusers/schedulers/scheduling_*.py`):

* `ScheduleConfig` reads a `scheduler/scheduler_config.json` the way `SomeScheduler.from_config(d)` does.
* `betas` / `alphas_cumprod` are float64 NumPy arrays holding the *values diffusers stores*: diffusers keeps
  β_t and ᾱ_t = prod_{s<=t} (1 - β_s) as float32 tensors, which differ from the exact float64 product by
  up to ~5e-7 (1e-5 relative at the noisy end). Every sampler coefficient derives from ᾱ, so we
  round β and ᾱ to float32 exactly where diffusers does, then compute everything downstream in float64.
* `spaced_timesteps`, `karras_sigmas`, `sigma_to_t`: the timestep / σ grids of `set_timesteps`.
* `add_noise`, `get_velocity`, `snr`: jit-friendly JAX training helpers (integer timesteps [B], NHWC).

For training, read the config as diffusers' DreamBooth script does (`DDPMScheduler.from_pretrained`):
`ScheduleConfig.from_diffusers_config(d, class_name="DDPMScheduler")`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from dreambooth_jax.errors import UnsupportedError, UsageError

_BASE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
             trained_betas=None, prediction_type="epsilon", steps_offset=0)
_DDPM_LIKE = dict(_BASE, clip_sample=True, clip_sample_range=1.0, timestep_spacing="leading",
                  rescale_betas_zero_snr=False)
_SIGMA_GRID = dict(use_karras_sigmas=False, use_exponential_sigmas=False, timestep_spacing="linspace",
                   rescale_betas_zero_snr=False, final_sigmas_type="zero")
# The __init__ keywords (and their defaults) of each class that change what we compute. diffusers'
# `from_config` passes a class only the keys its __init__ accepts; the rest take that class's defaults.
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDPMScheduler": dict(_DDPM_LIKE, variance_type="fixed_small"),
    "DDIMScheduler": dict(_DDPM_LIKE, set_alpha_to_one=True),
    "PNDMScheduler": dict(_BASE, skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading"),
    "EulerDiscreteScheduler": dict(_BASE, **_SIGMA_GRID, interpolation_type="linear",
                                   timestep_type="discrete"),
    "EulerAncestralDiscreteScheduler": dict(_BASE, timestep_spacing="linspace", rescale_betas_zero_snr=False),
    "DPMSolverMultistepScheduler": dict(
        _BASE, **_SIGMA_GRID, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=True, euler_at_final=False, lambda_min_clipped=-math.inf, variance_type=None),
}
# Keywords a class accepts that we do not implement: a truthy value raises instead of being ignored.
_UNSUPPORTED = {
    "DDPMScheduler": ("thresholding",), "DDIMScheduler": ("thresholding",),
    "EulerDiscreteScheduler": ("use_beta_sigmas",),
    "DPMSolverMultistepScheduler": ("thresholding", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
                                    "use_dynamic_shifting"),
}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """A diffusers scheduler config, as the class `class_name` reads it (defaults are behaviour-neutral for
    knobs a class does not have: e.g. PNDM never clips nor rescales)."""

    class_name: str = "DDPMScheduler"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False
    variance_type: str | None = None
    skip_prk_steps: bool = True
    interpolation_type: str = "linear"
    timestep_type: str = "discrete"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = -math.inf

    def __post_init__(self):
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise UsageError(f"beta_schedule={self.beta_schedule!r} is not supported; "
                             f"expected one of {BETA_SCHEDULES}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise UsageError(f"timestep_spacing={self.timestep_spacing!r}; "
                             f"expected one of {TIMESTEP_SPACINGS}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise UsageError(f"prediction_type={self.prediction_type!r}; expected one of {PREDICTION_TYPES}")

    @classmethod
    def from_diffusers_config(cls, d: dict, class_name: str | None = None) -> ScheduleConfig:
        """Reads `d` as `<class_name>.from_config(d)` would; `class_name` defaults to `d["_class_name"]`.

        Keys the class does not accept are ignored, absent ones (and those listed in `_use_default_values`,
        which diffusers records on loading) take the class's defaults. `sigma_min`/`sigma_max` are read
        whatever the class: diffusers registers unknown keys on the config, where its Karras code finds them.
        """
        name = class_name or d.get("_class_name", "")
        if name not in CLASS_DEFAULTS:
            raise UsageError(f"unsupported scheduler class {name!r}; "
                             f"expected one of {sorted(CLASS_DEFAULTS)}")
        defaults = set(d.get("_use_default_values", ()))
        given = {k: v for k, v in d.items() if k not in defaults}
        for key in _UNSUPPORTED.get(name, ()):
            if given.get(key):
                raise UnsupportedError(f"{name} with {key}={given[key]!r} is not implemented")
        values = {k: given.get(k, v) for k, v in CLASS_DEFAULTS[name].items()}
        values.update({k: given[k] for k in ("sigma_min", "sigma_max") if k in given})
        if values["trained_betas"] is not None:
            values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
        return cls(class_name=name, **values)


def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """β_t = min(1 - ᾱ(t+1/T) / ᾱ(t/T), max_beta) for the cosine ᾱ(s) = cos²((s + 0.008) / 1.008 · π/2)."""
    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)])


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Alg. 1: shift and scale sqrt(ᾱ_t) so that ᾱ_{T-1} = 0 and ᾱ_0 is unchanged (float32
    arithmetic, op for op as diffusers, so that ᾱ_{T-1} is exactly 0)."""
    sqrt_ab = np.sqrt(_cumprod_f32(np.float32(1) - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return np.float32(1) - alphas


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod of a float32 CPU tensor: accumulated in float64, each prefix rounded to float32."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def betas(config: ScheduleConfig) -> np.ndarray:
    """β_t, t = 0..T-1, float64 [T] (holding the float32 values diffusers stores)."""
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        b = np.asarray(config.trained_betas, np.float32)
    elif config.beta_schedule == "linear":
        b = np.linspace(config.beta_start, config.beta_end, T).astype(np.float32)
    elif config.beta_schedule == "scaled_linear":  # linear in sqrt(β), squared in float32 as torch does
        b = np.linspace(config.beta_start**0.5, config.beta_end**0.5, T).astype(np.float32) ** 2
    else:
        b = _betas_for_alpha_bar(T).astype(np.float32)
    if config.rescale_betas_zero_snr:
        b = _rescale_zero_terminal_snr(b)
    return b.astype(np.float64)


def alphas_cumprod(config: ScheduleConfig) -> np.ndarray:
    """ᾱ_t = prod_{s<=t} (1 - β_s), float64 [T], rounded to float32 as diffusers stores it."""
    return _cumprod_f32(np.float32(1) - betas(config).astype(np.float32)).astype(np.float64)


def sigmas_from_alphas_cumprod(ac: np.ndarray) -> np.ndarray:
    """The variance-exploding σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) of x_t / sqrt(ᾱ_t) = x_0 + σ_t ε, float32 [T]
    (float32 because diffusers' Euler/DPM grids start from these float32 values)."""
    ac = ac.astype(np.float32)
    return np.sqrt((np.float32(1) - ac) / ac)  # torch's `** 0.5` is a sqrt (np.power may differ by an ulp)


def spaced_timesteps(config: ScheduleConfig, n: int, *, round_linspace: bool = True) -> np.ndarray:
    """The n inference timesteps of `set_timesteps`, descending, float64 [n] (integers unless
    `round_linspace=False`, as Euler's "linspace" grid is not rounded). Table 2 of Lin et al. 2023:

    linspace: round(linspace(0, T-1, n));  leading: k·(T // n) + steps_offset;
    trailing: round(T - k·T/n) - 1.
    """
    T = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n)
        return (ts.round() if round_linspace else ts.astype(np.float32).astype(np.float64))[::-1].copy()
    if config.timestep_spacing == "leading":
        return (np.arange(n) * (T // n)).round()[::-1].astype(np.float64) + config.steps_offset
    return np.round(np.arange(T, 0, -T / n)) - 1  # "trailing"


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^{1/ρ} + i/(n-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, float64 [n]."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """σ_i geometric from σ_max down to σ_min, float64 [n]."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional timestep whose σ is `sigma`: linear interpolation of t in log σ over the training grid
    (`log_sigmas` [T] ascending in t), clipped to [0, T-1]."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * (low_idx + 1)).reshape(np.shape(sigma))


def _per_example(alphas_cumprod, t, like):
    """ᾱ_t gathered for a batch of integer timesteps t [B], float32, shaped [B, 1, ..., 1] to broadcast."""
    a = jnp.asarray(alphas_cumprod, jnp.float32)[t]
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def add_noise(alphas_cumprod, x0, noise, t):
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, a sample of q(x_t | x_0). x0, noise [B, ...]; t int [B]."""
    a = _per_example(alphas_cumprod, t, x0)
    return (jnp.sqrt(a).astype(x0.dtype) * x0 + jnp.sqrt(1 - a).astype(x0.dtype) * noise).astype(x0.dtype)


def get_velocity(alphas_cumprod, x0, noise, t):
    """The v-prediction target v_t = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022)."""
    a = _per_example(alphas_cumprod, t, x0)
    return (jnp.sqrt(a).astype(x0.dtype) * noise - jnp.sqrt(1 - a).astype(x0.dtype) * x0).astype(x0.dtype)


def snr(alphas_cumprod, t):
    """SNR(t) = ᾱ_t / (1 - ᾱ_t), float32 [B] (for min-SNR loss weighting)."""
    a = jnp.asarray(alphas_cumprod, jnp.float32)[t]
    return a / (1 - a)


def min_snr_weights(snr, gamma: float, prediction_type: str):
    """Min-SNR-γ loss weights (Hang et al. 2023) for the loss on `prediction_type`'s target, each making the
    weighted loss min(SNR, γ) x the x_0 loss (||ε̂ - ε||² = SNR ||x̂_0 - x_0||², ||v̂ - v||² = (SNR + 1)
    ||x̂_0 - x_0||²):
    ε: min(SNR, γ) / SNR, computed as min(1, γ / SNR) so that a zero-terminal-SNR timestep (SNR = 0) gets 1,
    not 0/0; v: min(SNR, γ) / (SNR + 1); x_0 ("sample"): min(SNR, γ)."""
    if prediction_type == "epsilon":
        return jnp.minimum(1.0, gamma / snr)
    if prediction_type == "v_prediction":
        return jnp.minimum(snr, gamma) / (snr + 1.0)
    return jnp.minimum(snr, gamma)
