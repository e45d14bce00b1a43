"""What every sampler shares: the `Sampler` interface (precomputed per-call tables, a pure `step`) and the
helpers that turn a network output into (x̂_0, ε̂)."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax.diffusion.noise_schedule import (
    ScheduleConfig,
)


def value_at(table: np.ndarray, i):
    """table[i] as a float32 (or bool) scalar; i may be traced."""
    return jnp.asarray(table)[i]


def as_f32(x):
    return jnp.asarray(x).astype(jnp.float32)


def step_noise(rng, noise, sample):
    if noise is not None:
        return as_f32(noise)
    if rng is None:
        raise ValueError("this sampler is stochastic: pass `rng` (or `noise`) to step()")
    return jax.random.normal(rng, sample.shape, sample.dtype).astype(jnp.float32)


def x0_and_eps(prediction_type: str, x, m, sqrt_a, sqrt_b):
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


def f32_tables(*tables):
    return tuple(np.asarray(t, np.float64).astype(np.float32) for t in tables)
