"""Training objectives: what the denoiser is trained to predict, at which noise levels, with which weights.

An objective is a frozen dataclass the train step asks, per micro-batch: `timesteps(keys)` (one draw per
example, from its own key), `noisy(x_0, noise, t)`, `target(x_0, noise, t)` and `weights(t)` (the per-example
loss weights). The step never branches on the objective's kind.

`DDPMObjective`: the discrete-time diffusion of SD 1.x/2.x and SDXL (Ho et al. 2020), t uniform in
[0, T), z_t ~ q(z_t | z_0), the target ε, v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) z_0 or z_0 per the scheduler's
`prediction_type`, and w(t) = 1 or the Min-SNR-γ weight (Hang et al. 2023).

`FlowMatchingObjective`: rectified flow (Flux.1), with diffusers' and kohya's timestep samplings and SD3's
loss weightings.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax.diffusion import noise_schedule
from dreambooth_jax.diffusion.flow_samplers import FlowMatchConfig
from dreambooth_jax.errors import UsageError


@dataclasses.dataclass(frozen=True, eq=False)
class DDPMObjective:
    alphas_cumprod: np.ndarray  # float64 [T] (cast to float32 in the step)
    prediction_type: str = "epsilon"
    snr_gamma: float | None = None  # Min-SNR weighting

    @classmethod
    def from_scheduler_config(cls, scheduler_config: dict, snr_gamma: float | None = None) -> DDPMObjective:
        """As diffusers' DreamBooth scripts read the schedule: `DDPMScheduler.from_pretrained(...)`."""
        schedule = noise_schedule.ScheduleConfig.from_diffusers_config(scheduler_config,
                                                                       class_name="DDPMScheduler")
        return cls(noise_schedule.alphas_cumprod(schedule), schedule.prediction_type, snr_gamma)

    @property
    def _ac(self):
        return jnp.asarray(self.alphas_cumprod, jnp.float32)

    def timesteps(self, keys):
        """int32 [B]: t uniform in [0, T), one draw per key."""
        return jax.vmap(lambda k: jax.random.randint(k, (), 0, len(self.alphas_cumprod)))(keys)

    def noisy(self, latents, noise, timesteps):
        return noise_schedule.add_noise(self._ac, latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return noise_schedule.get_velocity(self._ac, latents, noise, timesteps)
        return latents  # "sample"

    def weights(self, timesteps):
        """Per-example loss weights [B]: 1, or Min-SNR-γ (see `noise_schedule.min_snr_weights`)."""
        if self.snr_gamma is None:
            return jnp.ones(timesteps.shape, jnp.float32)
        snr = noise_schedule.snr(self._ac, timesteps)
        return noise_schedule.min_snr_weights(snr, self.snr_gamma, self.prediction_type)


WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
TIMESTEP_SAMPLINGS = ("uniform", "sigmoid", "shift", "flux_shift")


@dataclasses.dataclass(frozen=True, eq=False)
class FlowMatchingObjective:
    """Rectified flow (Flux.1, SD3; Esser et al. 2024): x_σ = (1 - σ) x_0 + σ ε, the target the velocity
    ε - x_0, and the denoiser called at t = σ x T (T = 1000; Flux's transformer divides by it again).

    σ is drawn as diffusers' `train_dreambooth_lora_flux.py` draws it unless `timestep_sampling` is set:
    u from `weighting_scheme`'s density (`training_utils.compute_density_for_timestep_sampling`: uniform,
    logit-normal with `logit_mean` / `logit_std`, or SD3's mode density with `mode_scale`), then the training
    scheduler's σ at index floor(u T) (`sigmas_table`: `FlowMatchEulerDiscreteScheduler`'s at construction,
    with its static shift unless it shifts dynamically). `timestep_sampling` takes kohya's sd-scripts rules
    instead: σ uniform ("uniform"), sigmoid(s z) ("sigmoid"), that shifted by `discrete_flow_shift`
    ("shift") or by Flux's resolution-dependent exponential shift of `image_seq_len` tokens ("flux_shift");
    s = `sigmoid_scale`. The loss weights are SD3's (`compute_loss_weighting_for_sd3`): 1, "sigma_sqrt"
    σ^-2 or "cosmap" 2 / (π (1 - 2σ + 2σ²)), per example, so prior preservation weighs each half by its own
    examples' σ.
    """

    sigmas_table: np.ndarray  # float32 [T], descending, as the scheduler stores it
    num_train_timesteps: int = 1000
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    timestep_sampling: str | None = None
    discrete_flow_shift: float = 3.0
    sigmoid_scale: float = 1.0
    image_seq_len: int = 4096  # flux_shift's: the packed image tokens (4096 at 1024 px)

    def __post_init__(self):
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise UsageError(f"--weighting_scheme {self.weighting_scheme!r}: expected one of "
                             f"{', '.join(WEIGHTING_SCHEMES)}")
        if self.timestep_sampling is not None and self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise UsageError(f"--timestep_sampling {self.timestep_sampling!r}: expected one of "
                             f"{', '.join(TIMESTEP_SAMPLINGS)}")
        if self.logit_std <= 0 or self.sigmoid_scale <= 0 or self.discrete_flow_shift <= 0:
            raise UsageError("--logit_std, --sigmoid_scale and --discrete_flow_shift must be > 0")

    @classmethod
    def from_scheduler_config(cls, scheduler_config: dict, **options) -> FlowMatchingObjective:
        """The training table as `FlowMatchEulerDiscreteScheduler.from_pretrained` builds it: σ_i = t_i / T
        for t = T, T-1, ..., 1 (float32), shifted by the static `shift` unless `use_dynamic_shifting`."""
        cfg = FlowMatchConfig.from_diffusers_config(scheduler_config)
        steps = cfg.num_train_timesteps
        sigmas = (np.linspace(1, steps, steps, dtype=np.float32)[::-1].copy() / np.float32(steps))
        if not cfg.use_dynamic_shifting:
            shift = np.float32(cfg.shift)
            sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)
        return cls(sigmas_table=sigmas, num_train_timesteps=steps, **options)

    def sigmas_from_draws(self, uniform, normal):
        """σ [B] from one uniform draw in [0, 1) and one standard normal draw per example (the
        deterministic part of `timesteps`, so that a test can feed a reference the same draws)."""
        if self.timestep_sampling == "uniform":
            return uniform
        if self.timestep_sampling is not None:
            sigma = jax.nn.sigmoid(self.sigmoid_scale * normal)
            if self.timestep_sampling == "shift":
                shift = self.discrete_flow_shift
                sigma = sigma * shift / (1 + (shift - 1) * sigma)
            elif self.timestep_sampling == "flux_shift":  # mu linear in the tokens: 0.5 at 256, 1.15 at 4096
                mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (self.image_seq_len - 256)
                sigma = math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))
            return sigma
        if self.weighting_scheme == "logit_normal":
            u = jax.nn.sigmoid(self.logit_mean + self.logit_std * normal)
        elif self.weighting_scheme == "mode":
            u = 1 - uniform - self.mode_scale * (jnp.cos(math.pi * uniform / 2) ** 2 - 1 + uniform)
        else:
            u = uniform
        table = jnp.asarray(self.sigmas_table, jnp.float32)
        index = jnp.clip((u * self.num_train_timesteps).astype(jnp.int32), 0, len(self.sigmas_table) - 1)
        return table[index]

    def timesteps(self, keys):
        """float32 [B]: t = σ T, one σ per key."""
        def draw(key):
            k_uniform, k_normal = jax.random.split(key)
            return jax.random.uniform(k_uniform, ()), jax.random.normal(k_normal, ())

        uniform, normal = jax.vmap(draw)(keys)
        return self.sigmas_from_draws(uniform, normal).astype(jnp.float32) * self.num_train_timesteps

    def _sigmas(self, timesteps, ndim: int):
        sigma = jnp.asarray(timesteps, jnp.float32) / self.num_train_timesteps
        return sigma.reshape(-1, *([1] * (ndim - 1)))

    def noisy(self, latents, noise, timesteps):
        sigma = self._sigmas(timesteps, latents.ndim)
        return (1 - sigma) * latents + sigma * noise

    def target(self, latents, noise, timesteps):
        return noise - latents

    def weights(self, timesteps):
        sigma = jnp.asarray(timesteps, jnp.float32) / self.num_train_timesteps
        if self.weighting_scheme == "sigma_sqrt":
            return sigma**-2.0
        if self.weighting_scheme == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
        return jnp.ones_like(sigma)
