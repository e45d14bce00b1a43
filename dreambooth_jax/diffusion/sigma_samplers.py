"""Samplers on x_σ = x_0 + σ ε, σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), equal to diffusers' Euler, Euler ancestral and
DPM-Solver++ (multistep) schedulers."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from dreambooth_jax.diffusion.noise_schedule import (
    ScheduleConfig,
    alphas_cumprod,
    exponential_sigmas,
    karras_sigmas,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)
from dreambooth_jax.diffusion.sampler_base import Sampler, as_f32, f32_tables, step_noise, value_at
from dreambooth_jax.errors import UnsupportedError, UsageError


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
        raise UsageError(f"final_sigmas_type={cfg.final_sigmas_type!r}; expected 'zero' or 'sigma_min'")
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
        return (as_f32(sample) / value_at(self.in_scale, i)).astype(sample.dtype)

    def step(self, state, i, model_output, sample, rng=None, *, noise=None):
        x, m, sigma = as_f32(sample), as_f32(model_output), value_at(self.sigmas, i)
        if self.prediction_type == "epsilon":
            x0 = x - sigma * m
        elif self.prediction_type == "v_prediction":
            x0 = m * value_at(self.c_out, i) + x * value_at(self.c_skip, i)
        else:
            x0 = m
        prev = x + (x - x0) / sigma * value_at(self.dt, i)
        if self.name == "euler_a":
            prev = prev + step_noise(rng, noise, sample) * value_at(self.sigma_up, i)
        return prev.astype(sample.dtype), state


def euler_sampler(cfg: ScheduleConfig, n: int, eta: float, ancestral: bool = False) -> EulerSampler:
    if ancestral and cfg.prediction_type == "sample":
        raise UnsupportedError("euler_a with prediction_type 'sample' (not implemented in diffusers)")
    _, full, log_sigmas = _sigma_schedule(cfg)
    ts = spaced_timesteps(cfg, n, round_linspace=False)
    if cfg.interpolation_type == "linear":
        sig = np.interp(ts, np.arange(len(full)), full)
    elif cfg.interpolation_type == "log_linear":  # n + 1 values: the last step ends at σ_min (as diffusers)
        sig = np.exp(np.linspace(np.log(full[-1]), np.log(full[0]), n + 1))
    else:
        raise UsageError(f"interpolation_type={cfg.interpolation_type!r}; expected 'linear' or 'log_linear'")
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
                        *f32_tables(np.sqrt(s_from**2 + 1), -s_from / np.sqrt(s_from**2 + 1),
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
        x, m = as_f32(sample), as_f32(model_output)
        a, s, p = value_at(self.alpha, i), value_at(self.sigma_t, i), self.prediction_type
        if self.config.algorithm_type == "dpmsolver++":
            d = {"epsilon": lambda: (x - s * m) / a, "v_prediction": lambda: a * x - s * m,
                 "sample": lambda: m}[p]()
        else:
            d = {"epsilon": lambda: m, "v_prediction": lambda: a * m + s * x,
                 "sample": lambda: (x - a * m) / s}[p]()
        c = value_at(self.coefs, i)
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


def dpm_solver_sampler(cfg: ScheduleConfig, n: int, eta: float) -> DPMSolverSampler:
    if cfg.algorithm_type not in ("dpmsolver++", "dpmsolver") or cfg.solver_type not in ("midpoint", "heun"):
        raise UnsupportedError(f"DPM-Solver algorithm_type={cfg.algorithm_type!r}, solver_type="
                                  f"{cfg.solver_type!r} (have: dpmsolver++/dpmsolver, midpoint/heun)")
    if cfg.solver_order not in (1, 2, 3) or cfg.variance_type is not None:
        raise UnsupportedError(f"DPM-Solver solver_order={cfg.solver_order}, "
                               f"variance_type={cfg.variance_type!r} "
                                  "(have: solver_order 1-3, variance_type None)")
    if cfg.algorithm_type == "dpmsolver" and cfg.final_sigmas_type == "zero":
        raise UsageError("final_sigmas_type 'zero' needs algorithm_type 'dpmsolver++' (as diffusers)")
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
                            *f32_tables(1 / np.sqrt(s**2 + 1), s / np.sqrt(s**2 + 1),
                                         _dpm_coefs(cfg, sigmas)))
