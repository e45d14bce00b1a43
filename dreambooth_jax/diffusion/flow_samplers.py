"""Flow-matching sampling equal to diffusers' `FlowMatchEulerDiscreteScheduler`, as the Flux pipeline uses it.

A rectified-flow model (Flux, SD3) is trained on x_σ = (1 - σ) x_0 + σ ε, σ in [0, 1], to predict the velocity
v = ε - x_0 = dx_σ/dσ. Sampling integrates that ODE from pure noise (σ = 1) to σ = 0 with Euler steps,
x_{i+1} = x_i + (σ_{i+1} - σ_i) v̂_i. The timesteps are σ_i · 1000; Flux's transformer is given them / 1000.

The σ grid is the Flux pipeline's: `sigmas = linspace(1, 1/N, N)` given to `set_timesteps(sigmas=..., mu=mu)`,
which shifts it towards the noisy end, either statically, σ' = s σ / (1 + (s - 1) σ) (SD3: s = 3), or by the
resolution, σ' = e^μ / (e^μ + (1/σ - 1)) with μ linear in the number of image tokens (`calculate_shift`), and
appends σ_N = 0. diffusers computes that grid in float32 NumPy (and some variants in float64); we repeat the
same NumPy expressions on the same dtypes, so our tables equal diffusers' bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from dreambooth_jax.diffusion.noise_schedule import exponential_sigmas, karras_sigmas
from dreambooth_jax.diffusion.sampler_base import Sampler, as_f32, step_noise, value_at
from dreambooth_jax.errors import UnsupportedError, UsageError

CLASS_NAME = "FlowMatchEulerDiscreteScheduler"
TIME_SHIFT_TYPES = ("exponential", "linear")
# FlowMatchEulerDiscreteScheduler.__init__'s keywords and defaults (diffusers 0.42).
_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    time_shift_type="exponential", stochastic_sampling=False)
# Keywords the class accepts that we do not implement: a truthy value raises instead of being ignored.
# (Beta sigmas need scipy's beta quantiles: not worth a dependency for a variant no released model uses.)
_UNSUPPORTED = ("use_beta_sigmas",)
# Keys that are not __init__ keywords but that diffusers still registers on the config (`from_config`
# keeps unknown keys as hidden config entries), where its code reads them: the Karras / exponential grids
# read sigma_min / sigma_max, the Flux pipeline drops its σ grid when use_flow_sigmas is truthy.
_HIDDEN = dict(sigma_min=None, sigma_max=None, use_flow_sigmas=False)


@dataclasses.dataclass(frozen=True)
class FlowMatchConfig:
    """A FlowMatchEulerDiscreteScheduler config, read as `FlowMatchEulerDiscreteScheduler.from_config(d)`."""

    class_name: str = CLASS_NAME
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    use_flow_sigmas: bool = False

    def __post_init__(self):
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise UsageError(f"time_shift_type={self.time_shift_type!r}; expected one of {TIME_SHIFT_TYPES}")
        if sum(map(bool, (self.use_karras_sigmas, self.use_exponential_sigmas, self.use_beta_sigmas))) > 1:
            raise UsageError("only one of use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas "
                             "can be set")
        for key in _UNSUPPORTED:
            if getattr(self, key):
                raise UnsupportedError(f"{self.class_name} with {key}={getattr(self, key)!r} is not "
                                       "implemented")

    @property
    def prediction_type(self) -> str:
        """What the network predicts: the flow velocity ε - x_0 (not ε, v or x_0 of the DDPM family)."""
        return "flow"

    @classmethod
    def from_diffusers_config(cls, d: dict) -> FlowMatchConfig:
        """Reads `d` as `FlowMatchEulerDiscreteScheduler.from_config(d)`: keys the class does not accept are
        ignored (except `_HIDDEN`'s), absent ones and those listed in `_use_default_values` (which diffusers
        records on loading) take the class's defaults."""
        defaults = set(d.get("_use_default_values", ()))
        given = {k: v for k, v in d.items() if k not in defaults}
        values = {k: given.get(k, v) for k, v in {**_DEFAULTS, **_HIDDEN}.items()}
        return cls(**values)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """μ of the resolution-dependent shift, linear in the number of image tokens: base_shift at
    base_seq_len, max_shift at max_seq_len (diffusers' pipeline_flux.calculate_shift, op for op, so that μ
    is the same float64)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _time_shift(cfg: FlowMatchConfig, mu: float, t: np.ndarray) -> np.ndarray:
    """diffusers' `time_shift(mu, 1.0, t)`: e^μ / (e^μ + (1/t - 1)^1) or μ / (μ + (1/t - 1)^1). Written as
    diffusers writes it (x^1 = x exactly, so the power is left out), so that NumPy evaluates it in t's dtype
    (NEP 50: the Python float e^μ is rounded to float32 for a float32 t), giving the same bits."""
    if cfg.time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    return mu / (mu + (1 / t - 1))


def _static_shift(shift: float, t: np.ndarray) -> np.ndarray:
    """σ' = s σ / (1 + (s - 1) σ), in t's dtype (as diffusers)."""
    return shift * t / (1 + (shift - 1) * t)


def _default_grid(cfg: FlowMatchConfig, n: int) -> np.ndarray:
    """The grid `set_timesteps(n)` makes without `sigmas` (the Flux pipeline's path under use_flow_sigmas):
    n points of t, linear from the training table's first to last timestep, σ = t / T, float64.

    The training table is `__init__`'s: σ_k = k / T, k = T..1, in float32 (torch there), statically shifted
    unless dynamic shifting is on. So with a static shift the grid's end σ_min is shifted once here and again
    by `set_timesteps`."""
    T = cfg.num_train_timesteps
    train = np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)
    if not cfg.use_dynamic_shifting:
        train = _static_shift(cfg.shift, train)
    return np.linspace(float(train[0]) * T, float(train[-1]) * T, n) / T


def flow_sigmas(cfg: FlowMatchConfig, n: int, mu: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(σ [n + 1], timesteps [n]), float32, as diffusers' `set_timesteps(sigmas=linspace(1, 1/n, n), mu=mu)`
    stores them in `scheduler.sigmas` / `scheduler.timesteps` (the grid the Flux pipeline passes; under a
    config's use_flow_sigmas the pipeline passes none, and this is `set_timesteps(n, mu=mu)`'s grid).

    Every step repeats diffusers' NumPy expression on the same dtype, and the torch steps are single
    float32 roundings (float64 -> float32, σ · T, 1 - σ) that NumPy rounds identically: bit-exact."""
    if cfg.use_flow_sigmas:
        sig = _default_grid(cfg, n)  # float64, and stays so below (diffusers' path for sigmas=None)
    else:
        sig = np.linspace(1.0, 1 / n, n).astype(np.float32)  # the pipeline's float64 grid; diffusers casts
    if cfg.use_dynamic_shifting:
        sig = _time_shift(cfg, mu, sig)
    else:
        sig = _static_shift(cfg.shift, sig)
    if cfg.shift_terminal:  # stretch 1 - σ so that the grid ends at shift_terminal (LTX-Video)
        one_minus = 1 - sig
        if one_minus[-1] == 0:  # diffusers divides 0 by 0 here and samples from NaN σ
            raise UsageError("shift_terminal needs a grid that ends below σ = 1: num_inference_steps >= 2")
        sig = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    if cfg.use_karras_sigmas or cfg.use_exponential_sigmas:  # float64 from the float32 / 64 end points
        lo = cfg.sigma_min if cfg.sigma_min is not None else sig[-1].item()
        hi = cfg.sigma_max if cfg.sigma_max is not None else sig[0].item()
        sig = (karras_sigmas if cfg.use_karras_sigmas else exponential_sigmas)(lo, hi, n)
    sig = sig.astype(np.float32)
    end = np.float32(0)
    if cfg.invert_sigmas:  # Mochi: the schedule runs 0 -> 1 and ends at σ = 1
        sig, end = np.float32(1) - sig, np.float32(1)
    return np.append(sig, end).astype(np.float32), sig * np.float32(cfg.num_train_timesteps)


@dataclasses.dataclass(frozen=True, eq=False)
class FlowEulerSampler(Sampler):
    """Euler steps of the flow ODE dx/dσ = v̂ on x_σ = (1 - σ) x_0 + σ ε: x' = x + (σ' - σ) v̂. With
    stochastic_sampling, x' re-noises the prediction x̂_0 = x - σ v̂ to σ' with fresh noise:
    x' = (1 - σ') x̂_0 + σ' z. No input scaling, x_T ~ N(0, I)."""

    config: FlowMatchConfig  # (the base class's field, narrowed: flow configs are not ScheduleConfigs)
    sigmas: np.ndarray  # [N + 1] float32, as diffusers' `sigmas` (σ_N = 0; 1 under invert_sigmas)
    dt: np.ndarray  # [N] σ_{i+1} - σ_i, subtracted in float32 as diffusers does

    def step(self, state, i, model_output, sample, rng=None, *, noise=None):
        # float32 throughout, as diffusers upcasts the sample (it rounds dt · v̂ in v̂'s dtype: in bf16 for a
        # bf16 model, where ours stays float32).
        x, v = as_f32(sample), as_f32(model_output)
        if self.config.stochastic_sampling:
            sigma_next = value_at(self.sigmas, i + 1)
            x0 = x - value_at(self.sigmas, i) * v
            prev = (1 - sigma_next) * x0 + sigma_next * step_noise(rng, noise, sample)
        else:
            prev = x + value_at(self.dt, i) * v
        return prev.astype(sample.dtype), state


def flow_euler_sampler(config_dict: dict, num_inference_steps: int, *,
                       image_seq_len: int | None = None) -> FlowEulerSampler:
    """The Flux pipeline's sampler for a FlowMatchEulerDiscreteScheduler scheduler_config.json.

    `image_seq_len` is the number of image tokens the transformer sees ((H/16) · (W/16) for Flux's packed
    2x2 latent patches: 4096 at 1024 px); it sets μ = calculate_shift(image_seq_len, <config's
    base/max_image_seq_len, base/max_shift>) and is required when the config shifts dynamically.
    `timesteps[i]` is diffusers' `scheduler.timesteps[i]` (σ_i · 1000): Flux's transformer takes it / 1000.
    """
    cfg = FlowMatchConfig.from_diffusers_config(config_dict)
    if num_inference_steps < 1:
        raise UsageError(f"num_inference_steps={num_inference_steps} must be >= 1")
    mu = None
    if cfg.use_dynamic_shifting:
        if image_seq_len is None:
            raise UsageError("this scheduler shifts its timesteps by the image size "
                             "(use_dynamic_shifting): pass image_seq_len, the number of image tokens")
        if cfg.base_shift is None or cfg.max_shift is None:
            raise UsageError("use_dynamic_shifting needs base_shift and max_shift in the scheduler config")
        mu = calculate_shift(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                             cfg.max_shift)
    sigmas, timesteps = flow_sigmas(cfg, num_inference_steps, mu)
    return FlowEulerSampler("flow_euler", cfg, timesteps, 1.0, sigmas, sigmas[1:] - sigmas[:-1])
