"""The flow-matching training objective (Flux.1's) against diffusers: the training scheduler's table,
`training_utils`' timestep densities and SD3 loss weightings fed the same random draws, the forward process
of `FlowMatchEulerDiscreteScheduler.scale_noise`, and kohya's shifted samplings against the SD3 paper's shift
and diffusers' exponential time shift."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, training_utils
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from dreambooth_jax.diffusion.objectives import FlowMatchingObjective
from dreambooth_jax.errors import UsageError

DEV = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
           use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
           base_image_seq_len=256, max_image_seq_len=4096)
SD3 = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
           use_dynamic_shifting=False)
# float32 formulas evaluated by torch and XLA: a few ulp of values <= 1 (the sigmoid, cos and exp of draws
# of size <= 4), well below 1e-6
F32_TOL = 1e-6


def _scheduler(config):
    return FlowMatchEulerDiscreteScheduler(**{k: v for k, v in config.items() if k != "_class_name"})


@pytest.mark.parametrize("config", [DEV, SD3], ids=["flux-dev", "static-shift-3"])
def test_training_table_equals_the_scheduler(config):
    """The table `train_dreambooth_lora_flux.py` indexes: the scheduler's sigmas and timesteps at
    construction (dev: unshifted, it shifts dynamically at sampling only; SD3-like: shifted by 3)."""
    ours = FlowMatchingObjective.from_scheduler_config(config)
    ref = _scheduler(config)
    np.testing.assert_array_equal(ours.sigmas_table, ref.sigmas.numpy())
    np.testing.assert_array_equal(ours.sigmas_table * np.float32(1000), ref.timesteps.numpy())


@pytest.mark.parametrize("scheme, options", [
    ("none", {}), ("logit_normal", dict(logit_mean=0.3, logit_std=1.2)), ("mode", dict(mode_scale=1.29)),
    ("cosmap", {}), ("sigma_sqrt", {})])
def test_densities_and_weights_equal_diffusers_on_the_same_draws(scheme, options, monkeypatch):
    """diffusers' `compute_density_for_timestep_sampling` with torch's draws replaced by ours, then its
    index into the scheduler's timesteps, as its Flux DreamBooth script does; the weights
    `compute_loss_weighting_for_sd3` gives those sigmas."""
    rng = np.random.default_rng(0)
    uniform = rng.uniform(size=256).astype(np.float32)
    normal = rng.standard_normal(256).astype(np.float32)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.from_numpy(uniform))
    monkeypatch.setattr(torch, "normal", lambda mean, std, **k: mean + std * torch.from_numpy(normal))
    ref = _scheduler(SD3)
    u = training_utils.compute_density_for_timestep_sampling(
        scheme, 256, logit_mean=options.get("logit_mean"), logit_std=options.get("logit_std"),
        mode_scale=options.get("mode_scale"))
    indices = (u * ref.config.num_train_timesteps).long()
    timesteps = ref.timesteps[indices]
    sigmas = ref.sigmas[indices]
    weights = training_utils.compute_loss_weighting_for_sd3(scheme, sigmas)

    ours = FlowMatchingObjective.from_scheduler_config(SD3, weighting_scheme=scheme, **options)
    sigma = np.asarray(ours.sigmas_from_draws(jnp.asarray(uniform), jnp.asarray(normal)))
    # the same table entries: both sides form u and floor(u T) in float32
    np.testing.assert_array_equal(sigma, sigmas.numpy())
    t = sigma * np.float32(1000)
    np.testing.assert_array_equal(t, timesteps.numpy())
    # weights from t / 1000 (1 ulp from the table's sigma): sigma^-2 carries 2 ulp, relative
    np.testing.assert_allclose(np.asarray(ours.weights(jnp.asarray(t))), weights.numpy(), rtol=1e-6)


def test_forward_process_and_target_equal_scale_noise():
    """x_σ = (1 - σ) x_0 + σ ε as `FlowMatchEulerDiscreteScheduler.scale_noise` computes it at the
    scheduler's own timesteps; the target the velocity ε - x_0 (diffusers' scripts' `noise - model_input`)."""
    ref = _scheduler(SD3)
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((4, 8, 8, 16)).astype(np.float32)
    noise = rng.standard_normal((4, 8, 8, 16)).astype(np.float32)
    timesteps = ref.timesteps[[0, 250, 600, 999]]
    expected = ref.scale_noise(torch.from_numpy(x0), timesteps, torch.from_numpy(noise)).numpy()
    ours = FlowMatchingObjective.from_scheduler_config(SD3)
    t = jnp.asarray(timesteps.numpy())
    np.testing.assert_allclose(np.asarray(ours.noisy(x0, noise, t)), expected, atol=F32_TOL * 4)
    np.testing.assert_array_equal(np.asarray(ours.target(x0, noise, t)), noise - x0)


def test_kohya_samplings():
    """kohya's rules from the same normal draws: sigmoid(s z); SD3's shift s σ / (1 + (s - 1) σ) (Esser et
    al. 2024, eq. 23); Flux's exponential shift as diffusers' scheduler applies it with mu from the image
    tokens (`calculate_shift`)."""
    normal = np.random.default_rng(2).standard_normal(64).astype(np.float32)
    z = jnp.asarray(normal)
    base = dict(sigmas_table=np.zeros(1000, np.float32), sigmoid_scale=1.5)
    plain = 1 / (1 + np.exp(-1.5 * normal.astype(np.float64)))
    sigmoid = FlowMatchingObjective(**base, timestep_sampling="sigmoid").sigmas_from_draws(z * 0, z)
    np.testing.assert_allclose(np.asarray(sigmoid), plain, atol=F32_TOL)
    shifted = FlowMatchingObjective(**base, timestep_sampling="shift", discrete_flow_shift=3.1)
    np.testing.assert_allclose(np.asarray(shifted.sigmas_from_draws(z * 0, z)),
                               3.1 * plain / (1 + 2.1 * plain), atol=F32_TOL)
    for tokens in (256, 1024, 4096):
        ours = FlowMatchingObjective(**base, timestep_sampling="flux_shift", image_seq_len=tokens)
        mu = calculate_shift(tokens)
        expected = _scheduler(DEV).time_shift(mu, 1.0, torch.from_numpy(plain)).numpy()
        np.testing.assert_allclose(np.asarray(ours.sigmas_from_draws(z * 0, z)), expected, atol=F32_TOL)
    uniform = jnp.linspace(0, 0.999, 7)
    np.testing.assert_array_equal(FlowMatchingObjective(**base, timestep_sampling="uniform")
                                  .sigmas_from_draws(uniform, z[:7]), uniform)


def test_timesteps_are_per_key_and_in_range():
    """One σ per example key (the train step's per-example draws): the same key, the same t; t in
    (0, 1000]."""
    ours = FlowMatchingObjective.from_scheduler_config(DEV, weighting_scheme="logit_normal")
    keys = jax.random.split(jax.random.key(0), 512)
    t = np.asarray(ours.timesteps(keys))
    assert t.shape == (512,) and t.min() > 0 and t.max() <= 1000 and len(np.unique(t)) > 100
    np.testing.assert_array_equal(np.asarray(ours.timesteps(keys[:5])), t[:5])
    # logit-normal(0, 1) puts the median at sigma 0.5
    assert abs(np.median(t) / 1000 - 0.5) < 0.05


def test_bad_options_are_refused():
    table = np.zeros(1000, np.float32)
    for kwargs, match in ((dict(weighting_scheme="lognorm"), "weighting_scheme"),
                          (dict(timestep_sampling="sigma"), "timestep_sampling"),
                          (dict(logit_std=0.0), "must be > 0"),
                          (dict(discrete_flow_shift=-1.0), "must be > 0")):
        with pytest.raises(UsageError, match=match):
            FlowMatchingObjective(sigmas_table=table, **kwargs)
    assert math.isclose(FlowMatchingObjective(sigmas_table=table).mode_scale, 1.29)
