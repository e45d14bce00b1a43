"""Noise schedules and samplers against diffusers' PyTorch schedulers (CPU, fp32, no model weights).

Each loop case runs a fixed fake "model", m = 0.9 · x_in + 0.1 · sin(0.01 t + φ), through a full sampling
loop twice: diffusers (`scale_model_input`, `step(...).prev_sample`) and ours (`jax.jit` of a `lax.scan`
over the traced step index), feeding both the same N(0, I) draws for the stochastic samplers. Tolerance on
the final sample: max abs error <= 1e-5 (measured <= 2.6e-6); on the cosine and zero-terminal-SNR
schedules, where 1/sqrt(ᾱ) amplifies float32 rounding, 3e-5 · max(1, max |x|) (measured <= 9e-6 abs, or
<= 2e-6 relative for the σ-samplers whose samples reach |x| ≈ 300 there).

Flow matching ("flow_euler") is checked against diffusers' FlowMatchEulerDiscreteScheduler driven as the Flux
pipeline drives it (its σ grid, `calculate_shift` and `retrieve_timesteps`): tables bit for bit, loops bit for
bit op by op and within a stated float32 budget when jitted.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.pipelines.flux import pipeline_flux  # noqa: E402
from diffusers.schedulers import (  # noqa: E402
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_euler_ancestral_discrete,
    scheduling_flow_match_euler_discrete,
)

from dreambooth_jax.diffusion import flow_samplers  # noqa: E402
from dreambooth_jax.diffusion import noise_schedule as ns  # noqa: E402
from dreambooth_jax.diffusion import samplers as schedulers  # noqa: E402
from dreambooth_jax.diffusion.samplers import (  # noqa: E402
    FLOW_MATCHING_NAMES,
    SCHEDULER_NAMES,
    make_sampler,
    scheduler_name_for,
)
from dreambooth_jax.errors import UnsupportedError, UsageError  # noqa: E402

SD = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
          trained_betas=None, clip_sample=False)
DPM = dict(SD, _class_name="DPMSolverMultistepScheduler")
LINEAR = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SHAPE = (2, 8, 8, 4)
_rs = np.random.RandomState(0)
X_T = _rs.randn(*SHAPE).astype(np.float32)
PHASE = (_rs.rand(*SHAPE) * 6).astype(np.float32)
NOISE_SAMPLERS = tuple(n for n in SCHEDULER_NAMES if n not in FLOW_MATCHING_NAMES)  # the DDPM family


def _cases():
    cases = []
    for name in NOISE_SAMPLERS:
        for pred in ("epsilon", "v_prediction"):
            cases += [(name, n, {}, dict(prediction_type=pred)) for n in (10, 25)]
        cases += [(name, 10, {}, LINEAR), (name, 25, {}, dict(beta_schedule="squaredcos_cap_v2"))]
        cases += [(name, 10, {}, dict(timestep_spacing=spacing)) for spacing in TIMESTEP_SPACINGS]
        cases += [(name, 7, {}, dict(timestep_spacing=spacing, prediction_type="v_prediction"))
                  for spacing in ("trailing", "linspace")]
        if name != "pndm":  # PNDM has no rescale_betas_zero_snr
            cases.append((name, 10, {}, dict(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                             prediction_type="v_prediction")))
        if name in ("ddim", "ddpm", "euler", "dpmpp_2m"):
            cases.append((name, 10, {}, dict(prediction_type="sample")))
    cases += [(name, 10, {}, dict(set_alpha_to_one=True)) for name in ("ddim", "pndm")]
    for name in ("ddim", "ddpm"):
        cases += [(name, 10, {}, dict(clip_sample=True)),
                  (name, 10, {}, dict(clip_sample=True, clip_sample_range=0.5,
                                      prediction_type="v_prediction"))]
    cases += [("ddim", 10, dict(eta=1.0), {}),
              ("ddim", 25, dict(eta=0.5), dict(prediction_type="v_prediction")),
              ("ddpm", 10, {}, dict(variance_type="fixed_large")),
              ("pndm", 10, {}, dict(skip_prk_steps=False)),
              ("pndm", 25, {}, dict(skip_prk_steps=False, prediction_type="v_prediction")),
              ("euler", 10, {}, dict(interpolation_type="log_linear")),
              ("euler", 10, {}, dict(timestep_type="continuous", prediction_type="v_prediction"))]
    for name in ("euler", "dpmpp_2m"):
        for pred in ("epsilon", "v_prediction"):
            cases += [(name, n, dict(use_karras_sigmas=True), dict(prediction_type=pred)) for n in (10, 25)]
        cases += [(name, 10, {}, dict(use_exponential_sigmas=True)),
                  (name, 10, {}, dict(final_sigmas_type="sigma_min")),
                  (name, 20, dict(use_karras_sigmas=True), dict(final_sigmas_type="sigma_min",
                                                                timestep_spacing="leading"))]
    for over in [dict(euler_at_final=True), dict(lower_order_final=False), dict(solver_order=3),
                 dict(solver_order=3, lower_order_final=False), dict(solver_type="heun"),
                 dict(solver_order=1),
                 dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
                 dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3,
                      prediction_type="v_prediction"),
                 dict(lambda_min_clipped=-5.1),
                 dict(solver_type="heun", final_sigmas_type="sigma_min", lower_order_final=False)]:
        # n >= 15 switches lower_order_final off: both sides of it where the final steps differ
        steps = (10, 20) if {"lower_order_final", "euler_at_final", "solver_order"} & set(over) else (10,)
        cases += [("dpmpp_2m", n, {}, dict(DPM, **over)) for n in steps]
    return cases


def _diffusers_loop(monkeypatch, name, config, n, eta, noises):
    """diffusers' sampling loop, its N(0, I) draws replaced by noises[i] at step i."""
    sched = getattr(diffusers, schedulers.DIFFUSERS_CLASS[name]).from_config(config)
    sched.set_timesteps(n)
    step = [0]
    for module in (scheduling_ddpm, scheduling_ddim, scheduling_euler_ancestral_discrete):
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(noises[step[0]]))
    x = torch.from_numpy(X_T) * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        step[0] = i
        x_in = sched.scale_model_input(x, t)
        out = 0.9 * x_in + 0.1 * torch.sin(0.01 * t.float() + torch.from_numpy(PHASE))
        x = sched.step(out, t, x, **(dict(eta=eta) if name == "ddim" else {})).prev_sample
    return sched, x.numpy()


def _our_loop(sampler, noises, dtype=jnp.float32):
    def body(carry, inputs):
        x, state = carry
        i, z = inputs
        t = jnp.asarray(sampler.timesteps)[i]
        out = 0.9 * sampler.scale_model_input(x, i) + 0.1 * jnp.sin(0.01 * t + PHASE)
        return sampler.step(state, i, out.astype(dtype), x, None, noise=z), None

    @jax.jit
    def run(x_t, noises):
        x = (x_t * sampler.init_noise_sigma).astype(dtype)
        steps = jnp.arange(sampler.num_model_calls)
        (x, _), _ = jax.lax.scan(body, (x, sampler.init_state(x)), (steps, noises))
        return x

    return np.asarray(run(X_T, noises).astype(jnp.float32))


@pytest.mark.parametrize("name,n,kwargs,over", _cases(), ids=lambda v: str(v) if v != {} else "-")
def test_sampling_loop_matches_diffusers(monkeypatch, name, n, kwargs, over):
    config = dict(SD, **over)
    sampler = make_sampler(name, config, n, **kwargs)
    if "use_karras_sigmas" in kwargs:
        config["use_karras_sigmas"] = kwargs["use_karras_sigmas"]
    noises = np.random.RandomState(1).randn(sampler.num_model_calls, *SHAPE).astype(np.float32)
    sched, ref = _diffusers_loop(monkeypatch, name, config, n, kwargs.get("eta", 0.0), noises)

    assert sampler.num_model_calls == len(sched.timesteps)
    # Integer grids are equal; σ-derived fractional timesteps move with the last ulp of σ.
    fractional = sampler.config.use_karras_sigmas or sampler.config.use_exponential_sigmas
    np.testing.assert_allclose(sampler.timesteps, sched.timesteps.numpy().astype(np.float32),
                               rtol=0, atol=1e-3 if fractional and name == "euler" else 1e-6)
    if hasattr(sched, "sigmas"):
        np.testing.assert_allclose(sampler.sigmas, sched.sigmas.numpy(), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(sampler.init_noise_sigma, float(sched.init_noise_sigma), rtol=2e-6)

    ours = _our_loop(sampler, noises)
    # Schedules reaching ᾱ ≈ 0 (cosine: ᾱ_{T-1} ≈ 2e-9, σ_max ≈ 2e4; zero terminal SNR: σ_max = 4096) amplify
    # float32 rounding by 1/sqrt(ᾱ) in both implementations: there the bound is 3e-5 · max(1, max |x|).
    extreme = over.get("beta_schedule") == "squaredcos_cap_v2" or over.get("rescale_betas_zero_snr")
    tol = 3e-5 * max(1.0, float(np.abs(ref).max())) if extreme else 1e-5
    assert np.abs(ours - ref).max() <= tol


def test_bf16_latents_and_rng_noise():
    sampler = make_sampler("euler_a", SD, 10)
    noises = np.random.RandomState(1).randn(sampler.num_model_calls, *SHAPE).astype(np.float32)
    fp32 = _our_loop(sampler, noises)
    bf16 = _our_loop(sampler, noises, dtype=jnp.bfloat16)
    assert np.abs(bf16 - fp32).max() < 0.1
    x = jnp.asarray(X_T)
    step = jax.jit(sampler.step)
    a = step(sampler.init_state(x), 3, x, x, jax.random.key(0))[0]
    b = step(sampler.init_state(x), 3, x, x, jax.random.key(0))[0]
    c = step(sampler.init_state(x), 3, x, x, jax.random.key(1))[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="rng"):
        sampler.step((), 0, x, x, None)


def test_config_read_as_another_class_like_from_config():
    # An instantiated scheduler's config lists the keys it defaulted (`_use_default_values`): those
    # take the new class's defaults (e.g. DPM's "linspace" spacing, not PNDM's "leading").
    pndm_config = dict(diffusers.PNDMScheduler.from_config(SD).config)
    for name in NOISE_SAMPLERS:
        sched = getattr(diffusers, schedulers.DIFFUSERS_CLASS[name]).from_config(pndm_config)
        sched.set_timesteps(20)
        sampler = make_sampler(name, pndm_config, 20)
        np.testing.assert_array_equal(sampler.timesteps, sched.timesteps.numpy().astype(np.float32))
        assert scheduler_name_for(dict(sched.config)) == name
    assert make_sampler("pndm", SD, 10).num_model_calls == 11  # skip_prk_steps: n + 1 calls
    assert make_sampler("pndm", dict(SD, skip_prk_steps=False), 10).num_model_calls == 19  # 12 RK + 7


@pytest.mark.parametrize("over", [{}, LINEAR, dict(beta_schedule="squaredcos_cap_v2"),
                                  dict(rescale_betas_zero_snr=True),
                                  dict(trained_betas=list(np.linspace(1e-4, 0.02, 1000)))])
def test_schedule_matches_diffusers(over):
    ref = diffusers.DDPMScheduler.from_config(dict(SD, **over))
    cfg = ns.ScheduleConfig.from_diffusers_config(dict(SD, **over), class_name="DDPMScheduler")
    betas, ac = ns.betas(cfg), ns.alphas_cumprod(cfg)
    assert betas.dtype == ac.dtype == np.float64
    # torch's vectorised float32 linspace may differ in the last bit (a few ulps of β after squaring);
    # rescaled β = 1 - ᾱ_t/ᾱ_{t-1} cancels in float32, so an ulp of ᾱ is 1e-4 of β there.
    rescaled = over.get("rescale_betas_zero_snr", False)
    np.testing.assert_allclose(betas, ref.betas.numpy(), rtol=0 if rescaled else 5e-7,
                               atol=1e-5 if rescaled else 0)
    # ᾱ_t is a product of t + 1 float32 factors; ours and torch's round (and may order) them differently, each
    # rounding worth <= eps32 / 2 relative: a budget of T * eps32 relative, plus a few ulps of 1 absolute for
    # the tail of rescaled schedules, where ᾱ -> 0.
    eps32 = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(ac, ref.alphas_cumprod.numpy(), rtol=len(ac) * eps32, atol=4 * eps32)
    if over.get("rescale_betas_zero_snr"):
        assert ac[-1] == 0.0


def test_training_helpers_match_diffusers():
    ref = diffusers.DDPMScheduler.from_config(dict(SD, prediction_type="v_prediction"))
    ac = ns.alphas_cumprod(ns.ScheduleConfig.from_diffusers_config(SD, class_name="DDPMScheduler"))
    rs = np.random.RandomState(2)
    x0, noise = rs.randn(4, 8, 8, 4).astype(np.float32), rs.randn(4, 8, 8, 4).astype(np.float32)
    t = np.array([0, 1, 500, 999])
    a = ac[t][:, None, None, None]
    tx0, tnoise, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    noisy = jax.jit(ns.add_noise)(ac, x0, noise, t)
    velocity = jax.jit(ns.get_velocity)(ac, x0, noise, t)
    np.testing.assert_allclose(noisy, ref.add_noise(tx0, tnoise, tt).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(noisy, np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, rtol=0, atol=1e-6)
    np.testing.assert_allclose(velocity, ref.get_velocity(tx0, tnoise, tt).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(velocity, np.sqrt(a) * noise - np.sqrt(1 - a) * x0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ns.snr(ac, t), ac[t] / (1 - ac[t]), rtol=1e-5)
    assert noisy.dtype == jnp.float32
    assert ns.add_noise(ac, x0.astype(jnp.bfloat16), noise, t).dtype == jnp.bfloat16


def test_errors():
    with pytest.raises(ValueError, match="ddim.*pndm.*euler.*euler_a.*dpmpp_2m.*ddpm"):
        make_sampler("lms", SD, 10)
    with pytest.raises(ValueError, match="ddim.*dpmpp_2m"):
        scheduler_name_for({"_class_name": "LMSDiscreteScheduler"})
    with pytest.raises(ValueError, match="beta_schedule"):
        make_sampler("ddim", dict(SD, beta_schedule="sigmoid"), 10)
    with pytest.raises(ValueError, match="beta_schedule"):
        ns.ScheduleConfig.from_diffusers_config(dict(SD, beta_schedule="nope"))
    with pytest.raises(NotImplementedError, match="thresholding"):
        make_sampler("ddim", dict(SD, thresholding=True), 10)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        make_sampler("ddim", SD, 10, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="prediction_type"):
        make_sampler("pndm", dict(SD, prediction_type="sample"), 10)


def test_sampler_is_frozen_and_hashable():
    sampler = make_sampler("dpmpp_2m", SD, 10, use_karras_sigmas=True)
    assert sampler.config.use_karras_sigmas
    # A static jit argument: the same sampler reuses its trace, another one (even an equal one) traces anew.
    traces = []
    step = jax.jit(lambda smp, x: (traces.append(1), x * smp.init_noise_sigma)[1], static_argnums=0)
    step(sampler, jnp.ones(2))
    step(sampler, jnp.ones(2))
    step(make_sampler("dpmpp_2m", SD, 10, use_karras_sigmas=True), jnp.ones(2))
    assert len(traces) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        sampler.name = "x"


# Flow matching. The released Flux.1 configs (dev shifts by the resolution; schnell, distilled to 4 steps,
# does not shift), and SD3's static shift.
FLUX_DEV = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
                use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096, time_shift_type="exponential")
FLUX_SCHNELL = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=1.0,
                    use_dynamic_shifting=False)
SD3 = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0)
FLOW_SHAPE = (2, 64, 16)  # [B, image tokens, channels], as Flux's packed latents
_frs = np.random.RandomState(3)
FLOW_X = _frs.randn(*FLOW_SHAPE).astype(np.float32)
FLOW_R = _frs.randn(8, *FLOW_SHAPE).astype(np.float32)  # the fake model's per-step random part
FLOW_Z = _frs.randn(8, *FLOW_SHAPE).astype(np.float32)  # stochastic_sampling's noise draws


def _flux_pipeline_scheduler(config, n, image_seq_len):
    """A FlowMatchEulerDiscreteScheduler after FluxPipeline.__call__'s step 5 ("Prepare timesteps"): its σ
    grid (none under use_flow_sigmas), μ from the scheduler's config, retrieve_timesteps; then
    set_begin_index(0) as the pipeline does before its loop."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = np.linspace(1.0, 1 / n, n)
    if getattr(sched.config, "use_flow_sigmas", False):
        sigmas = None
    get = sched.config.get
    mu = pipeline_flux.calculate_shift(image_seq_len, get("base_image_seq_len", 256),
                                       get("max_image_seq_len", 4096), get("base_shift", 0.5),
                                       get("max_shift", 1.15))
    pipeline_flux.retrieve_timesteps(sched, n, "cpu", sigmas=sigmas, mu=mu)
    sched.set_begin_index(0)
    return sched


def _flow_table_cases():
    cases = [(FLUX_DEV, n, seq) for seq in (256, 1024, 4096) for n in (1, 4, 28)]  # 256, 512, 1024 px
    cases += [(FLUX_SCHNELL, 4, 4096), (SD3, 4, 4096), (SD3, 28, 4096)]
    # The variants diffusers offers (LTX-Video's shift_terminal, Mochi's invert_sigmas, ...).
    cases += [(dict(FLUX_DEV, **over), n, 1024) for n in (4, 28) for over in [
        dict(time_shift_type="linear"), dict(shift_terminal=0.1), dict(use_karras_sigmas=True),
        dict(use_exponential_sigmas=True), dict(use_karras_sigmas=True, sigma_min=0.02, sigma_max=0.9),
        dict(invert_sigmas=True), dict(use_flow_sigmas=True)]]
    cases += [(dict(SD3, **over), 28, 4096) for over in [
        dict(shift=1.15), dict(use_flow_sigmas=True),
        dict(use_flow_sigmas=True, shift=1.15, shift_terminal=0.1)]]
    return cases


def _differs(config, base):
    return {k: v for k, v in config.items() if base.get(k, None) != v} or "-"


@pytest.mark.parametrize("config,n,image_seq_len", _flow_table_cases(),
                         ids=lambda v: str(_differs(v, FLUX_DEV)) if isinstance(v, dict) else str(v))
def test_flow_tables_equal_diffusers(config, n, image_seq_len):
    sched = _flux_pipeline_scheduler(config, n, image_seq_len)
    sampler = make_sampler(scheduler_name_for(config), config, n, image_seq_len=image_seq_len)
    assert sampler.name == "flow_euler" and sampler.num_model_calls == len(sched.timesteps) == n
    assert sampler.timesteps.dtype == sampler.sigmas.dtype == np.float32
    # Bit for bit: the grid repeats diffusers' NumPy expressions on the same dtypes.
    np.testing.assert_array_equal(sampler.sigmas, sched.sigmas.numpy())
    np.testing.assert_array_equal(sampler.timesteps, sched.timesteps.numpy())
    assert sampler.sigmas[-1] == (1.0 if config.get("invert_sigmas") else 0.0)


def test_flow_config_read_from_an_instantiated_scheduler():
    # A loaded scheduler's config lists its defaulted keys (`_use_default_values`, which from_config then
    # ignores); our use_karras_sigmas override must win over that listing.
    config = dict(diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV).config)
    assert "use_karras_sigmas" in config["_use_default_values"]
    sched = _flux_pipeline_scheduler(dict(FLUX_DEV, use_karras_sigmas=True), 12, 1024)
    ours = make_sampler("flow_euler", config, 12, image_seq_len=1024, use_karras_sigmas=True)
    np.testing.assert_array_equal(ours.sigmas, sched.sigmas.numpy())
    plain = make_sampler("flow_euler", config, 12, image_seq_len=1024)
    np.testing.assert_array_equal(plain.sigmas, _flux_pipeline_scheduler(config, 12, 1024).sigmas.numpy())


def _flow_model(r, t, x):
    """The fake velocity: random in the step, linear in x, scaled by the transformer's timestep t / 1000;
    only float32 products and sums, which torch and XLA round alike (no transcendental functions)."""
    return r * (t / 1000) - 0.5 * x


def _diffusers_flow_loop(monkeypatch, config, n, image_seq_len):
    sched = _flux_pipeline_scheduler(config, n, image_seq_len)
    step = [0]
    monkeypatch.setattr(scheduling_flow_match_euler_discrete, "randn_tensor",
                        lambda *a, **k: torch.from_numpy(FLOW_Z[step[0]]))
    x = torch.from_numpy(FLOW_X)
    for i, t in enumerate(sched.timesteps):
        step[0] = i
        x = sched.step(_flow_model(torch.from_numpy(FLOW_R[i]), t, x), t, x).prev_sample
    return x.numpy()


def _our_flow_loop(sampler, jit: bool):
    def body(carry, inputs):
        x, state = carry
        i, r, z = inputs
        out = _flow_model(r, jnp.asarray(sampler.timesteps)[i], x)
        return sampler.step(state, i, out, x, None, noise=z), None

    n = sampler.num_model_calls
    x, state = jnp.asarray(FLOW_X), sampler.init_state(FLOW_X)
    if jit:
        (x, _), _ = jax.jit(lambda c, xs: jax.lax.scan(body, c, xs))((x, state), (jnp.arange(n), FLOW_R[:n],
                                                                                  FLOW_Z[:n]))
        return np.asarray(x)
    for i in range(n):  # op by op: every multiply and add rounded on its own, as torch does
        (x, state), _ = body((x, state), (i, jnp.asarray(FLOW_R[i]), jnp.asarray(FLOW_Z[i])))
    return np.asarray(x)


@pytest.mark.parametrize("config,image_seq_len", [(FLUX_DEV, 1024), (SD3, 4096),
                                                  (dict(FLUX_DEV, stochastic_sampling=True), 4096)],
                         ids=["flux-dev", "sd3", "stochastic"])
def test_flow_sampling_loop_matches_diffusers(monkeypatch, config, image_seq_len):
    ref = _diffusers_flow_loop(monkeypatch, config, 8, image_seq_len)
    sampler = make_sampler("flow_euler", config, 8, image_seq_len=image_seq_len)
    assert sampler.init_noise_sigma == 1.0 and sampler.init_state(FLOW_X) == ()
    assert sampler.scale_model_input(FLOW_X, 3) is FLOW_X and sampler.prediction_type == "flow"
    # Op by op our step is diffusers' step (float32 sample + dt · v), so the loops agree bit for bit.
    np.testing.assert_array_equal(_our_flow_loop(sampler, jit=False), ref)
    # Jitted, XLA fuses each a + b·c into one FMA (the product is not rounded). Per step that moves x by
    # <= 2 ulp of M, the largest |x|, |v|, |z| of the loop: the skipped rounding of the product, a final
    # rounding that may go the other way, and the same in the fake model's v. An error e in x then grows by
    # at most 1 + 1.5 |dt| per step (Euler: 1 + 0.5 |dt|, as v holds -0.5 x; stochastic: (1 - σ')(1 + σ/2) =
    # 1 - σ'/2 - σσ'/2 + 1.5 |dt|), so by e^{1.5 Σ|dt|} = e^1.5 < 4.5 over the loop (Σ|dt| = 1). Budget:
    # 8 steps · 2 ulp · 4.5 < 80 ulp of M (measured: <= 2 ulp of max |x|).
    ours = _our_flow_loop(sampler, jit=True)
    big = max(float(np.abs(a).max()) for a in (ref, FLOW_X, FLOW_R, FLOW_Z))
    assert np.abs(ours - ref).max() <= 80 * float(np.finfo(np.float32).eps) * big


def test_calculate_shift_equals_diffusers():
    for seq in (256, 1024, 4096, 777, 16384):
        assert flow_samplers.calculate_shift(seq) == pipeline_flux.calculate_shift(seq)
    args = (1024, 256, 6400, 0.25, 1.5)
    assert flow_samplers.calculate_shift(*args) == pipeline_flux.calculate_shift(*args)
    assert flow_samplers.calculate_shift(256) == 0.5  # base_shift at base_seq_len, max_shift at max_seq_len
    assert abs(flow_samplers.calculate_shift(4096) - 1.15) < 1e-12


def test_flow_errors():
    assert scheduler_name_for(FLUX_DEV) == "flow_euler"
    for name in NOISE_SAMPLERS:  # a velocity model read as ε / v / x_0
        with pytest.raises(UsageError, match="does not fit this model's training.*flow-matching"):
            make_sampler(name, FLUX_DEV, 10)
    with pytest.raises(UsageError, match="does not fit this model's training.*noise-prediction"):
        make_sampler("flow_euler", SD, 10)  # SD's PNDMScheduler config
    with pytest.raises(UsageError, match="image_seq_len"):
        make_sampler("flow_euler", FLUX_DEV, 10)
    make_sampler("flow_euler", FLUX_SCHNELL, 4)  # no dynamic shift: no image_seq_len needed
    with pytest.raises(UnsupportedError, match="use_beta_sigmas"):
        make_sampler("flow_euler", dict(FLUX_DEV, use_beta_sigmas=True), 10, image_seq_len=1024)
    with pytest.raises(UsageError, match="time_shift_type"):
        make_sampler("flow_euler", dict(FLUX_DEV, time_shift_type="cubic"), 10, image_seq_len=1024)
    with pytest.raises(UsageError, match="only one of"):
        make_sampler("flow_euler", dict(SD3, use_exponential_sigmas=True), 10, use_karras_sigmas=True)
    with pytest.raises(UsageError, match="shift_terminal"):  # diffusers returns NaN σ here
        make_sampler("flow_euler", dict(SD3, shift_terminal=0.1), 1)
    with pytest.raises(UsageError, match="num_inference_steps"):
        make_sampler("flow_euler", SD3, 0)
    with pytest.raises(ValueError, match="rng"):
        sampler = make_sampler("flow_euler", dict(SD3, stochastic_sampling=True), 4)
        sampler.step((), 0, FLOW_X, FLOW_X, None)
