"""Samplers on x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, equal to diffusers' DDPM, DDIM and PNDM schedulers."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from dreambooth_jax.diffusion.noise_schedule import (
    ScheduleConfig,
    alphas_cumprod,
    spaced_timesteps,
)
from dreambooth_jax.diffusion.sampler_base import (
    Sampler,
    as_f32,
    f32_tables,
    step_noise,
    value_at,
    x0_and_eps,
)
from dreambooth_jax.errors import UnsupportedError, UsageError


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
        x, m = as_f32(sample), as_f32(model_output)
        x0, eps = x0_and_eps(self.prediction_type, x, m, value_at(self.sqrt_a, i), value_at(self.sqrt_b, i))
        if self.config.clip_sample:
            x0 = jnp.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        prev = value_at(self.coef_x0, i) * x0
        if self.name == "ddpm":
            prev = (prev + value_at(self.coef_xt, i) * x
                    + value_at(self.std, i) * step_noise(rng, noise, sample))
        else:
            prev = prev + value_at(self.coef_eps, i) * eps
            if float(np.max(self.std)) > 0:  # eta > 0
                prev = prev + value_at(self.std, i) * step_noise(rng, noise, sample)
        return prev.astype(sample.dtype), state


def ddpm_sampler(cfg: ScheduleConfig, n: int, eta: float) -> DDPMSampler:
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
        raise UnsupportedError(f"DDPM variance_type={cfg.variance_type!r} is not implemented")
    return DDPMSampler(
        "ddpm", cfg, ts.astype(np.float32), 1.0, *f32_tables(
            np.sqrt(a_t), np.sqrt(1 - a_t), np.sqrt(a_prev) * beta / (1 - a_t),
            np.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t), np.zeros(len(ts)), np.where(ts > 0, std, 0.0)))


def ddim_sampler(cfg: ScheduleConfig, n: int, eta: float) -> DDPMSampler:
    ac = alphas_cumprod(cfg)
    ts = spaced_timesteps(cfg, n).astype(np.int64)
    # diffusers steps back by T // n whatever the spacing ("linspace"/"trailing" grids need not agree).
    prev = ts - cfg.num_train_timesteps // n
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    a_t, a_prev = ac[ts], np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    std = eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    return DDPMSampler(
        "ddim", cfg, ts.astype(np.float32), 1.0, *f32_tables(
            np.sqrt(a_t), np.sqrt(1 - a_t), np.sqrt(a_prev), np.zeros(len(ts)),
            np.sqrt(np.maximum(1 - a_prev - std**2, 0.0)), std))


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
        x, m = as_f32(sample), as_f32(model_output)
        ets, w, u = state["ets"], value_at(self.weights, i), value_at(self.acc_weights, i)
        cur = jnp.where(value_at(self.store_sample, i), x, state["cur_sample"])
        base = jnp.where(value_at(self.use_stored, i), cur, x)
        eps = w[0] * ets[0] + w[1] * ets[1] + w[2] * ets[2] + w[3] * m + w[4] * state["acc"]
        if self.prediction_type == "v_prediction":
            eps = value_at(self.sqrt_a, i) * eps + value_at(self.sqrt_b, i) * base
        prev = value_at(self.coef_x, i) * base - value_at(self.coef_eps, i) * eps
        new_ets = jnp.where(value_at(self.push, i), jnp.concatenate([ets[1:], m[None]]), ets)
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
            raise UsageError("PNDM with skip_prk_steps=False needs num_inference_steps >= 4")
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


def pndm_sampler(cfg: ScheduleConfig, n: int, eta: float) -> PNDMSampler:
    if cfg.prediction_type == "sample":
        raise UsageError("PNDM supports prediction_type 'epsilon' or 'v_prediction' (as diffusers)")
    ac = alphas_cumprod(cfg)
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    calls = _pndm_calls(cfg, n)
    t, t_from, t_to, w, u, push, store, use = (np.array(col) for col in zip(*calls))
    a_t, a_prev = ac[t_from], np.where(t_to >= 0, ac[np.maximum(t_to, 0)], final)
    denom = a_t * np.sqrt(1 - a_prev) + np.sqrt(a_t * (1 - a_t) * a_prev)
    return PNDMSampler("pndm", cfg, t.astype(np.float32), 1.0, *f32_tables(w, u), push, store, use,
                       *f32_tables(np.sqrt(a_t), np.sqrt(1 - a_t), np.sqrt(a_prev / a_t),
                                    (a_prev - a_t) / denom))
