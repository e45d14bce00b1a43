"""Samplers x_t -> x_{t-1} equal to diffusers' schedulers, as pure, jit-able JAX steps.

    sampler = make_sampler("dpmpp_2m", pipe.scheduler_config, 25)
    x = jax.random.normal(rng, shape) * sampler.init_noise_sigma
    state = sampler.init_state(x)
    for i in range(sampler.num_model_calls):          # or lax.fori_loop / lax.scan with a traced i
        eps = unet(sampler.scale_model_input(x, i), sampler.timesteps[i], ...)
        x, state = sampler.step(state, i, eps, x, jax.random.fold_in(noise_rng, i))

diffusers' schedulers are stateful objects whose `step` branches in Python on counters (PNDM's Runge-Kutta
warm-up, DPM-Solver's order ramp). Those counters do not depend on the data, so `make_sampler` runs that
bookkeeping once on the host and stores, per model call i, every coefficient in float64-computed float32
tables; `step` only indexes them with the traced i and forms linear combinations. Data-dependent state
(PLMS history, DPM-Solver's previous outputs) is a pytree carried by the caller.

Parametrisations: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (DDPM, DDIM, PNDM) or, with σ_t = sqrt((1-ᾱ_t)/ᾱ_t),
x_t / sqrt(ᾱ_t) = x_0 + σ_t ε (Euler, DPM-Solver). The network predicts ε, v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x_0
or x_0 ("epsilon", "v_prediction", "sample").
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax.noise_schedule import (
    ScheduleConfig,
    alphas_cumprod,
    exponential_sigmas,
    karras_sigmas,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)

SCHEDULER_NAMES = ("ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "ddpm")
_CLASS_FOR = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
              "ddpm": "DDPMScheduler"}
_NAME_FOR = {cls: name for name, cls in _CLASS_FOR.items()}


def scheduler_name_for(config_dict: dict) -> str:
    """Our name for a diffusers scheduler_config.json, by its `_class_name`."""
    cls = config_dict.get("_class_name")
    if cls not in _NAME_FOR:
        raise ValueError(f"unsupported scheduler class {cls!r}; supported: {SCHEDULER_NAMES} "
                         f"(diffusers classes {sorted(_NAME_FOR)})")
    return _NAME_FOR[cls]


def _at(table: np.ndarray, i):
    """table[i] as a float32 (or bool) scalar; i may be traced."""
    return jnp.asarray(table)[i]


def _f32(x):
    return jnp.asarray(x).astype(jnp.float32)


def _noise(rng, noise, sample):
    if noise is not None:
        return _f32(noise)
    if rng is None:
        raise ValueError("this sampler is stochastic: pass `rng` (or `noise`) to step()")
    return jax.random.normal(rng, sample.shape, sample.dtype).astype(jnp.float32)


def _x0_eps(prediction_type: str, x, m, sqrt_a, sqrt_b):
    """(x̂_0, ε̂) from the network output m, with x_t = sqrt(ᾱ) x_0 + sqrt(1-ᾱ) ε."""
    if prediction_type == "epsilon":
        return (x - sqrt_b * m) / sqrt_a, m
    if prediction_type == "sample":
        return m, (x - sqrt_a * m) / sqrt_b
    return sqrt_a * x - sqrt_b * m, sqrt_a * m + sqrt_b * x


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashable by identity, usable as a static arg
class Sampler(abc.ABC):
    """A sampler with all per-call constants precomputed. Arrays are NumPy (closed over when jitted)."""

    name: str
    config: ScheduleConfig
    timesteps: np.ndarray  # [num_model_calls] float32: the UNet's timestep at each call
    init_noise_sigma: float  # x_T = N(0, I) * init_noise_sigma

    @property
    def num_model_calls(self) -> int:
        return len(self.timesteps)

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    def scale_model_input(self, sample, i):
        """The UNet input at call i (identity except for the σ-parametrised Euler samplers)."""
        return sample

    def init_state(self, sample) -> Any:
        """The carried state before the first call: a pytree of float32 arrays (empty for most)."""
        return ()

    @abc.abstractmethod
    def step(self, state, i, model_output, sample, rng=None, *, noise=None):
        """One model call's update: returns (x_prev, new_state). `noise` [like sample] replaces the
        N(0, I) draw from `rng` of the stochastic samplers (to match a reference's noise)."""


@dataclasses.dataclass(frozen=True, eq=False)
class DDPMSampler(Sampler):
    """x_{t'} = c_0 x̂_0 + c_t x_t + c_ε ε̂ + s z, z ~ N(0, I), t' the previous timestep of the grid.

    DDPM (c_ε = 0): ancestral sampling of the posterior q(x_{t'} | x_t, x̂_0) (Ho et al. 2020, eq. 7).
    DDIM (c_t = 0): c_0 = sqrt(ᾱ_{t'}), c_ε = sqrt(1 - ᾱ_{t'} - s²), s = η σ_t (Song et al. 2021, eq. 12)."""

    sqrt_a: np.ndarray  # sqrt(ᾱ_t)
    sqrt_b: np.ndarray  # sqrt(1 - ᾱ_t)
    coef_x0: np.ndarray
    coef_xt: np.ndarray
    coef_eps: np.ndarray
    std: np.ndarray  # s, 0 where no noise is added

    def step(self, state, i, model_output, sample, rng=None, *, noise=None):
        x, m = _f32(sample), _f32(model_output)
        x0, eps = _x0_eps(self.prediction_type, x, m, _at(self.sqrt_a, i), _at(self.sqrt_b, i))
        if self.config.clip_sample:
            x0 = jnp.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        prev = _at(self.coef_x0, i) * x0
        if self.name == "ddpm":
            prev = prev + _at(self.coef_xt, i) * x + _at(self.std, i) * _noise(rng, noise, sample)
        else:
            prev = prev + _at(self.coef_eps, i) * eps
            if float(np.max(self.std)) > 0:  # eta > 0
                prev = prev + _at(self.std, i) * _noise(rng, noise, sample)
        return prev.astype(sample.dtype), state


def _ddpm(cfg: ScheduleConfig, n: int, eta: float) -> DDPMSampler:
    ac = alphas_cumprod(cfg)
    ts = spaced_timesteps(cfg, n).astype(np.int64)
    prev = np.append(ts[1:], -1)  # DDPM steps to the next timestep of the grid
    a_t, a_prev = ac[ts], np.where(prev >= 0, ac[prev], 1.0)
    beta = 1 - a_t / a_prev
    var = np.maximum((1 - a_prev) / (1 - a_t) * beta, 1e-20)
    if cfg.variance_type in ("fixed_small", "fixed_small_log"):
        std = np.sqrt(var)
    elif cfg.variance_type == "fixed_large":
        std = np.sqrt(beta)
    else:
        raise NotImplementedError(f"DDPM variance_type={cfg.variance_type!r} is not implemented")
    return DDPMSampler(
        "ddpm", cfg, ts.astype(np.float32), 1.0, *_f32_tables(
            np.sqrt(a_t), np.sqrt(1 - a_t), np.sqrt(a_prev) * beta / (1 - a_t),
            np.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t), np.zeros(len(ts)), np.where(ts > 0, std, 0.0)))


def _ddim(cfg: ScheduleConfig, n: int, eta: float) -> DDPMSampler:
    ac = alphas_cumprod(cfg)
    ts = spaced_timesteps(cfg, n).astype(np.int64)
    # diffusers steps back by T // n whatever the spacing ("linspace"/"trailing" grids need not agree).
    prev = ts - cfg.num_train_timesteps // n
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    a_t, a_prev = ac[ts], np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    std = eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    return DDPMSampler(
        "ddim", cfg, ts.astype(np.float32), 1.0, *_f32_tables(
            np.sqrt(a_t), np.sqrt(1 - a_t), np.sqrt(a_prev), np.zeros(len(ts)),
            np.sqrt(np.maximum(1 - a_prev - std**2, 0.0)), std))


def _f32_tables(*tables):
    return tuple(np.asarray(t, np.float64).astype(np.float32) for t in tables)


@dataclasses.dataclass(frozen=True, eq=False)
class PNDMSampler(Sampler):
    """Pseudo numerical methods (Liu et al. 2022): the transfer
    x_{t'} = sqrt(ᾱ_{t'}/ᾱ_t) x_t - (ᾱ_{t'} - ᾱ_t) / (ᾱ_t sqrt(1-ᾱ_{t'}) + sqrt(ᾱ_t (1-ᾱ_t) ᾱ_{t'})) ε̂,
    with ε̂ a linear multistep (PLMS: Adams-Bashforth up to 4th order) or Runge-Kutta (PRK) combination.

    Per call: ε̂ = w · (E_0, E_1, E_2, ε_i, acc) over the three last stored outputs E (E_2 newest), this
    call's output and the RK accumulator; acc' = u · (acc, ε_i); base sample x_t or the stored one."""

    weights: np.ndarray  # [N, 5]
    acc_weights: np.ndarray  # [N, 2]
    push: np.ndarray  # [N] bool: append ε_i to E
    store_sample: np.ndarray  # [N] bool: remember x_t as the base of the next calls
    use_stored: np.ndarray  # [N] bool: transfer from the remembered sample instead of x_t
    sqrt_a: np.ndarray
    sqrt_b: np.ndarray
    coef_x: np.ndarray  # sqrt(ᾱ_{t'}/ᾱ_t)
    coef_eps: np.ndarray

    def init_state(self, sample):
        z = jnp.zeros(sample.shape, jnp.float32)
        return {"ets": jnp.zeros((3,) + sample.shape, jnp.float32), "cur_sample": z, "acc": z}

    def step(self, state, i, model_output, sample, rng=None, *, noise=None):
        x, m = _f32(sample), _f32(model_output)
        ets, w, u = state["ets"], _at(self.weights, i), _at(self.acc_weights, i)
        cur = jnp.where(_at(self.store_sample, i), x, state["cur_sample"])
        base = jnp.where(_at(self.use_stored, i), cur, x)
        eps = w[0] * ets[0] + w[1] * ets[1] + w[2] * ets[2] + w[3] * m + w[4] * state["acc"]
        if self.prediction_type == "v_prediction":
            eps = _at(self.sqrt_a, i) * eps + _at(self.sqrt_b, i) * base
        prev = _at(self.coef_x, i) * base - _at(self.coef_eps, i) * eps
        new_ets = jnp.where(_at(self.push, i), jnp.concatenate([ets[1:], m[None]]), ets)
        acc = u[0] * state["acc"] + u[1] * m
        return prev.astype(sample.dtype), {"ets": new_ets, "cur_sample": cur, "acc": acc}


_PLMS = {1: [0, 0, 0, 1], 2: [0, 0, -1 / 2, 3 / 2], 3: [0, 5 / 12, -16 / 12, 23 / 12],
         4: [-9 / 24, 37 / 24, -59 / 24, 55 / 24]}  # on (E_0, E_1, E_2, ε_i)


def _pndm_calls(cfg: ScheduleConfig, n: int) -> list[tuple]:
    """diffusers' PNDM counter logic, unrolled: per call (t, t_from, t_to, w, u, push, store, use_stored)."""
    ratio = cfg.num_train_timesteps // n
    base = spaced_timesteps(cfg, n)[::-1].astype(np.int64)  # ascending, as diffusers' `_timesteps`
    calls, pushed = [], 0
    if cfg.skip_prk_steps:
        prk = np.array([], np.int64)
        plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
    else:
        if n < 4:
            raise ValueError("PNDM with skip_prk_steps=False needs num_inference_steps >= 4")
        prk = np.repeat(base[-4:], 2) + np.tile([0, ratio // 2], 4)
        prk = np.repeat(prk[:-1], 2)[1:-1][::-1]
        plms = base[:-3][::-1]
    for c, t in enumerate(prk):  # Runge-Kutta warm-up: 4 calls per step from the same x_t
        k = c % 4
        t_to = t - (0 if c % 2 else ratio // 2)
        w = [0, 0, 0, 1 / 6, 1] if k == 3 else [0, 0, 0, 1, 0]
        u = [(1, 1 / 6), (1, 1 / 3), (1, 1 / 3), (0, 0)][k]
        calls.append((t, prk[c // 4 * 4], t_to, w, u, k == 0, k == 0, True))
        pushed += k == 0
    for c, t in enumerate(plms, start=len(prk)):
        if c == 1:  # the second call redoes step 0 from the same x_t with the mean of both outputs
            calls.append((t, t + ratio, t, [0, 0, 1 / 2, 1 / 2, 0], (0, 0), False, False, True))
            continue
        order = min(pushed, 3) + 1
        calls.append((t, t, t - ratio, _PLMS[order] + [0], (0, 0), True, c == 0, c == 0))
        pushed += 1
    return calls


def _pndm(cfg: ScheduleConfig, n: int, eta: float) -> PNDMSampler:
    if cfg.prediction_type == "sample":
        raise ValueError("PNDM supports prediction_type 'epsilon' or 'v_prediction' (as diffusers)")
    ac = alphas_cumprod(cfg)
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    calls = _pndm_calls(cfg, n)
    t, t_from, t_to, w, u, push, store, use = (np.array(col) for col in zip(*calls))
    a_t, a_prev = ac[t_from], np.where(t_to >= 0, ac[np.maximum(t_to, 0)], final)
    denom = a_t * np.sqrt(1 - a_prev) + np.sqrt(a_t * (1 - a_t) * a_prev)
    return PNDMSampler("pndm", cfg, t.astype(np.float32), 1.0, *_f32_tables(w, u), push, store, use,
                       *_f32_tables(np.sqrt(a_t), np.sqrt(1 - a_t), np.sqrt(a_prev / a_t),
                                    (a_prev - a_t) / denom))


def _sigma_schedule(cfg: ScheduleConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ᾱ_t, σ_t, log σ_t) [T], σ in float32, with diffusers' ᾱ_{T-1} = 2^-24 under zero terminal SNR."""
    ac = alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:
        ac[-1] = 2.0**-24  # keeps σ_{T-1} finite
    full = sigmas_from_alphas_cumprod(ac)
    return ac, full, np.log(full)


def _custom_sigmas(cfg: ScheduleConfig, lo: float, hi: float, n: int, log_sigmas) -> tuple | None:
    """Karras / exponential σ grid from [lo, hi] (config sigma_min/max override) and its timesteps."""
    lo = cfg.sigma_min if cfg.sigma_min is not None else lo
    hi = cfg.sigma_max if cfg.sigma_max is not None else hi
    if cfg.use_karras_sigmas:
        sig = karras_sigmas(lo, hi, n)
    elif cfg.use_exponential_sigmas:
        sig = exponential_sigmas(lo, hi, n)
    else:
        return None
    return sig, sigma_to_t(sig, log_sigmas)


def _final_sigma(cfg: ScheduleConfig, full: np.ndarray) -> float:
    if cfg.final_sigmas_type not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type={cfg.final_sigmas_type!r}; expected 'zero' or 'sigma_min'")
    return float(full[0]) if cfg.final_sigmas_type == "sigma_min" else 0.0


@dataclasses.dataclass(frozen=True, eq=False)
class EulerSampler(Sampler):
    """Euler steps of the probability-flow ODE dx/dσ = (x - x̂_0)/σ on x_σ = x_0 + σ ε (Karras et al. 2022,
    Alg. 1 without churn); the UNet sees x_σ / sqrt(σ² + 1). Ancestral: step down to
    σ_down = sqrt(σ'² - σ_up²), then add σ_up z, σ_up² = σ'² (σ² - σ'²) / σ²."""

    sigmas: np.ndarray  # [N + 1] float32, as diffusers' `sigmas`
    in_scale: np.ndarray  # sqrt(σ_i² + 1)
    c_out: np.ndarray  # v-prediction: x̂_0 = c_out m + c_skip x
    c_skip: np.ndarray
    dt: np.ndarray  # σ_{i+1} - σ_i   (ancestral: σ_down - σ_i)
    sigma_up: np.ndarray  # 0 for the deterministic sampler

    def scale_model_input(self, sample, i):
        return (_f32(sample) / _at(self.in_scale, i)).astype(sample.dtype)

    def step(self, state, i, model_output, sample, rng=None, *, noise=None):
        x, m, sigma = _f32(sample), _f32(model_output), _at(self.sigmas, i)
        if self.prediction_type == "epsilon":
            x0 = x - sigma * m
        elif self.prediction_type == "v_prediction":
            x0 = m * _at(self.c_out, i) + x * _at(self.c_skip, i)
        else:
            x0 = m
        prev = x + (x - x0) / sigma * _at(self.dt, i)
        if self.name == "euler_a":
            prev = prev + _noise(rng, noise, sample) * _at(self.sigma_up, i)
        return prev.astype(sample.dtype), state


def _euler(cfg: ScheduleConfig, n: int, eta: float, ancestral: bool = False) -> EulerSampler:
    if ancestral and cfg.prediction_type == "sample":
        raise NotImplementedError("euler_a with prediction_type 'sample' (not implemented in diffusers)")
    _, full, log_sigmas = _sigma_schedule(cfg)
    ts = spaced_timesteps(cfg, n, round_linspace=False)
    if cfg.interpolation_type == "linear":
        sig = np.interp(ts, np.arange(len(full)), full)
    elif cfg.interpolation_type == "log_linear":  # n + 1 values: the last step ends at σ_min (as diffusers)
        sig = np.exp(np.linspace(np.log(full[-1]), np.log(full[0]), n + 1))
    else:
        raise ValueError(f"interpolation_type={cfg.interpolation_type!r}; expected 'linear' or 'log_linear'")
    custom = _custom_sigmas(cfg, sig[-1], sig[0], n, log_sigmas)
    if custom is not None:
        sig, ts = custom
    sigmas = np.append(sig, _final_sigma(cfg, full)).astype(np.float32)
    if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
        ts = 0.25 * np.log(sigmas[:-1])
    s = sigmas.astype(np.float64)
    max_sigma = float(sigmas.max())
    init = max_sigma if cfg.timestep_spacing in ("linspace", "trailing") else math.sqrt(max_sigma**2 + 1)
    s_from, s_to = s[:n], s[1 : n + 1]
    if ancestral:
        up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        dt = np.sqrt(np.maximum(s_to**2 - up**2, 0)) - s_from
    else:
        up, dt = np.zeros(n), sigmas[1 : n + 1] - sigmas[:n]  # float32 subtraction, as diffusers
    return EulerSampler("euler_a" if ancestral else "euler", cfg, ts.astype(np.float32), init, sigmas,
                        *_f32_tables(np.sqrt(s_from**2 + 1), -s_from / np.sqrt(s_from**2 + 1),
                                     1 / (s_from**2 + 1), dt, up))


@dataclasses.dataclass(frozen=True, eq=False)
class DPMSolverSampler(Sampler):
    """Multistep DPM-Solver(++) (Lu et al. 2022): with λ = log(α/σ), h = λ_{i+1} - λ_i, and the data
    prediction D_i = x̂_0 (dpmsolver++; ε̂ for dpmsolver), 2M midpoint:
    x_{i+1} = (σ_{i+1}/σ_i) x_i - α_{i+1} (e^{-h} - 1) (D_i + (D_i - D_{i-1}) / (2 r)),  r = h_{i-1}/h.
    All orders/variants reduce to x_{i+1} = c · (x_i, D_i, D_{i-1}, D_{i-2}), with c precomputed."""

    sigmas: np.ndarray  # [N + 1] float32, as diffusers' `sigmas`
    alpha: np.ndarray  # α_i = 1/sqrt(σ_i² + 1)
    sigma_t: np.ndarray  # σ_i α_i
    coefs: np.ndarray  # [N, 4]

    def init_state(self, sample):
        z = jnp.zeros(sample.shape, jnp.float32)
        return (z, z)  # (D_{i-1}, D_{i-2})

    def step(self, state, i, model_output, sample, rng=None, *, noise=None):
        x, m = _f32(sample), _f32(model_output)
        a, s, p = _at(self.alpha, i), _at(self.sigma_t, i), self.prediction_type
        if self.config.algorithm_type == "dpmsolver++":
            d = {"epsilon": lambda: (x - s * m) / a, "v_prediction": lambda: a * x - s * m,
                 "sample": lambda: m}[p]()
        else:
            d = {"epsilon": lambda: m, "v_prediction": lambda: a * m + s * x,
                 "sample": lambda: (x - a * m) / s}[p]()
        c = _at(self.coefs, i)
        prev = c[0] * x + c[1] * d + c[2] * state[0] + c[3] * state[1]
        return prev.astype(sample.dtype), (d, state[0])


def _dpm_timesteps(cfg: ScheduleConfig, n: int, ac: np.ndarray) -> np.ndarray:
    """diffusers' DPM grid: n of n + 1 spaced points (the last, t = 0, dropped), below λ_min_clipped."""
    T, ac = cfg.num_train_timesteps, ac.astype(np.float32)
    lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1) - ac))  # λ_t in float32, as diffusers
    last = T - int(np.searchsorted(lam[::-1], cfg.lambda_min_clipped))
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy()
    if cfg.timestep_spacing == "leading":
        return (np.arange(n + 1) * (last // (n + 1))).round()[::-1][:-1] + cfg.steps_offset
    return np.arange(last, 0, -T / n).round() - 1


def _dpm_coefs(cfg: ScheduleConfig, sigmas: np.ndarray) -> np.ndarray:
    n, order = len(sigmas) - 1, cfg.solver_order
    s = sigmas.astype(np.float64)
    alpha = 1 / np.sqrt(s**2 + 1)
    sig = s * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sig)  # +inf at a final σ = 0
    plus = cfg.algorithm_type == "dpmsolver++"
    coefs = np.zeros((n, 4))
    for i in range(n):
        last = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                               or cfg.final_sigmas_type == "zero")
        second_last = i == n - 2 and cfg.lower_order_final and n < 15
        done = min(i, order)  # diffusers' `lower_order_nums`
        o = 1 if (order == 1 or done < 1 or last) else 2 if (order == 2 or done < 2 or second_last) else 3
        h, a_t, s_t = lam[i + 1] - lam[i], alpha[i + 1], sig[i + 1]
        # x_{i+1} = cs x_i - phi D0 + k1 D1 + k2 D2 (D0 = D_i; D1, D2: divided differences)
        cs, phi = (s_t / sig[i], a_t * (np.exp(-h) - 1)) if plus else (a_t / alpha[i], s_t * (np.exp(h) - 1))
        d = np.array([-phi, 0.0, 0.0])  # on (D_i, D_{i-1}, D_{i-2})
        if o >= 2:
            if cfg.solver_type == "midpoint" and o == 2:
                k1 = -0.5 * phi
            else:
                k1 = a_t * ((np.exp(-h) - 1) / h + 1) if plus else -s_t * ((np.exp(h) - 1) / h - 1)
            if plus:
                k2 = -a_t * ((np.exp(-h) - 1 + h) / h**2 - 0.5)
            else:
                k2 = -s_t * ((np.exp(h) - 1 - h) / h**2 - 0.5)
            r0 = (lam[i] - lam[i - 1]) / h
            d1 = np.array([1 / r0, -1 / r0, 0.0])
            if o == 2:
                d += k1 * d1
            else:
                r1 = (lam[i - 1] - lam[i - 2]) / h
                d1_1 = np.array([0.0, 1 / r1, -1 / r1])
                d += k1 * (d1 + r0 / (r0 + r1) * (d1 - d1_1)) + k2 * (d1 - d1_1) / (r0 + r1)
        coefs[i] = [cs, *d]
    return coefs


def _dpm(cfg: ScheduleConfig, n: int, eta: float) -> DPMSolverSampler:
    if cfg.algorithm_type not in ("dpmsolver++", "dpmsolver") or cfg.solver_type not in ("midpoint", "heun"):
        raise NotImplementedError(f"DPM-Solver algorithm_type={cfg.algorithm_type!r}, solver_type="
                                  f"{cfg.solver_type!r} (have: dpmsolver++/dpmsolver, midpoint/heun)")
    if cfg.solver_order not in (1, 2, 3) or cfg.variance_type is not None:
        raise NotImplementedError(f"DPM-Solver solver_order={cfg.solver_order}, variance_type={cfg.variance_type!r} "
                                  "(have: solver_order 1-3, variance_type None)")
    if cfg.algorithm_type == "dpmsolver" and cfg.final_sigmas_type == "zero":
        raise ValueError("final_sigmas_type 'zero' needs algorithm_type 'dpmsolver++' (as diffusers)")
    ac, full, log_sigmas = _sigma_schedule(cfg)
    ts = _dpm_timesteps(cfg, n, ac)
    custom = _custom_sigmas(cfg, full[0], full[-1], n, log_sigmas)
    if custom is None:
        sig = np.interp(ts, np.arange(len(full)), full)
    else:
        sig, ts = custom
        if cfg.use_karras_sigmas and cfg.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
    sigmas = np.append(sig, _final_sigma(cfg, full)).astype(np.float32)
    s = sigmas[:-1].astype(np.float64)
    return DPMSolverSampler("dpmpp_2m", cfg, ts.astype(np.int64).astype(np.float32), 1.0, sigmas,
                            *_f32_tables(1 / np.sqrt(s**2 + 1), s / np.sqrt(s**2 + 1),
                                         _dpm_coefs(cfg, sigmas)))


_BUILDERS = {"ddpm": _ddpm, "ddim": _ddim, "pndm": _pndm, "euler": _euler, "dpmpp_2m": _dpm,
             "euler_a": lambda cfg, n, eta: _euler(cfg, n, eta, ancestral=True)}


def make_sampler(name: str, config_dict: dict, num_inference_steps: int, *, eta: float = 0.0,
                 use_karras_sigmas: bool | None = None) -> Sampler:
    """The sampler `name` for a pipeline's scheduler_config.json, after diffusers' `set_timesteps(n)`.

    When `name` differs from the config's class, the config is read as `NewScheduler.from_config(config)`
    (same betas / prediction_type / spacing, the new class's defaults for the rest). `eta` is DDIM's η and
    ignored by the others (as diffusers' pipelines do); `use_karras_sigmas` overrides the config for
    euler / dpmpp_2m. "dpmpp_2m" follows a DPMSolverMultistepScheduler config's algorithm/order if given.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {SCHEDULER_NAMES}")
    cfg = ScheduleConfig.from_diffusers_config(config_dict, class_name=_CLASS_FOR[name])
    if use_karras_sigmas is not None:
        if use_karras_sigmas and name not in ("euler", "dpmpp_2m"):
            raise ValueError(f"use_karras_sigmas applies to 'euler' and 'dpmpp_2m', not {name!r}")
        cfg = dataclasses.replace(cfg, use_karras_sigmas=use_karras_sigmas)
    if cfg.use_karras_sigmas and cfg.use_exponential_sigmas:
        raise ValueError("only one of use_karras_sigmas / use_exponential_sigmas can be set")
    T = cfg.num_train_timesteps
    if num_inference_steps < 1 or (name in ("ddpm", "ddim") and num_inference_steps > T):
        raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, {T}]")
    return _BUILDERS[name](cfg, num_inference_steps, eta)
