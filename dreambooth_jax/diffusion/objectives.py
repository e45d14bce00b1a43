"""Training objectives: what the denoiser is trained to predict, at which noise levels, with which weights.

An objective is a frozen dataclass the train step asks, per micro-batch: `timesteps(keys)` (one draw per
example, from its own key), `noisy(x_0, noise, t)`, `target(x_0, noise, t)` and `weights(t)` (the per-example
loss weights). The step never branches on the objective's kind.

`DDPMObjective`: the discrete-time diffusion of SD 1.x/2.x and SDXL (Ho et al. 2020), t uniform in
[0, T), z_t ~ q(z_t | z_0), the target ε, v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) z_0 or z_0 per the scheduler's
`prediction_type`, and w(t) = 1 or the Min-SNR-γ weight (Hang et al. 2023).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax.diffusion import noise_schedule


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
