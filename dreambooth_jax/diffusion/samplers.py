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

Flow matching (Flux, SD3: x_σ = (1 - σ) x_0 + σ ε, the network predicts the velocity ε - x_0) is a different
training, not a parametrisation: "flow_euler" (`flow_samplers`) samples only FlowMatch* configs, the others
only DDPM-type ones, and `make_sampler` refuses a mix. Flux shifts its grid by the image size: pass
`image_seq_len`, the number of image tokens, and give the transformer `timesteps[i] / 1000`.
"""

from __future__ import annotations

import dataclasses

from dreambooth_jax.diffusion.alpha_samplers import ddim_sampler, ddpm_sampler, pndm_sampler
from dreambooth_jax.diffusion.flow_samplers import flow_euler_sampler
from dreambooth_jax.diffusion.noise_schedule import ScheduleConfig
from dreambooth_jax.diffusion.sampler_base import Sampler
from dreambooth_jax.diffusion.sigma_samplers import dpm_solver_sampler, euler_sampler
from dreambooth_jax.errors import UsageError

SCHEDULER_NAMES = ("ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "ddpm", "flow_euler")
FLOW_MATCHING_NAMES = ("flow_euler",)  # samplers of velocity-predicting flow-matching models
DIFFUSERS_CLASS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
              "ddpm": "DDPMScheduler", "flow_euler": "FlowMatchEulerDiscreteScheduler"}
_NAME_FOR = {cls: name for name, cls in DIFFUSERS_CLASS.items()}


def scheduler_name_for(config_dict: dict) -> str:
    """Our name for a diffusers scheduler_config.json, by its `_class_name`."""
    cls = config_dict.get("_class_name")
    if cls not in _NAME_FOR:
        raise UsageError(f"unsupported scheduler class {cls!r}; supported: {SCHEDULER_NAMES} "
                         f"(diffusers classes {sorted(_NAME_FOR)})")
    return _NAME_FOR[cls]


def is_flow_matching(config_dict: dict) -> bool:
    """Whether a scheduler_config.json belongs to a flow-matching model (diffusers' FlowMatch* classes)."""
    return str(config_dict.get("_class_name", "")).startswith("FlowMatch")


def _names(flow: bool) -> tuple[str, ...]:
    """Our samplers of one family (flow matching or noise prediction), for error messages."""
    return tuple(n for n in SCHEDULER_NAMES if (n in FLOW_MATCHING_NAMES) == flow)


def _check_family(name: str, config_dict: dict) -> None:
    """UsageError when sampler `name` and the config come from different trainings: a model trained by flow
    matching predicts a velocity that a DDPM-family sampler would read as ε (or v, x_0), and vice versa.
    A config without `_class_name` fits either (it is read with the sampler's class defaults)."""
    cls = config_dict.get("_class_name")
    flow_sampler = name in FLOW_MATCHING_NAMES
    if cls is None or flow_sampler == is_flow_matching(config_dict):
        return
    if flow_sampler:
        raise UsageError(f"scheduler {name!r} does not fit this model's training: it samples flow-matching "
                         f"models (FlowMatch* schedulers), the model's {cls} is a noise-prediction (DDPM) "
                         f"scheduler; choose one of {_names(flow=False)}")
    raise UsageError(f"scheduler {name!r} does not fit this model's training: the model's {cls} is a "
                     "flow-matching scheduler (it predicts a velocity, not noise); choose one of "
                     f"{_names(flow=True)}")


def _with_karras(config_dict: dict, use_karras_sigmas: bool) -> dict:
    """`config_dict` with use_karras_sigmas set (and no longer listed among the defaulted keys)."""
    defaulted = [k for k in config_dict.get("_use_default_values", ()) if k != "use_karras_sigmas"]
    return {**config_dict, "use_karras_sigmas": use_karras_sigmas, "_use_default_values": defaulted}


_BUILDERS = {"ddpm": ddpm_sampler, "ddim": ddim_sampler, "pndm": pndm_sampler, "euler": euler_sampler,
             "dpmpp_2m": dpm_solver_sampler,
             "euler_a": lambda cfg, n, eta: euler_sampler(cfg, n, eta, ancestral=True)}


def make_sampler(name: str, config_dict: dict, num_inference_steps: int, *, eta: float = 0.0,
                 use_karras_sigmas: bool | None = None, image_seq_len: int | None = None) -> Sampler:
    """The sampler `name` for a pipeline's scheduler_config.json, after diffusers' `set_timesteps(n)`.

    When `name` differs from the config's class, the config is read as `NewScheduler.from_config(config)`
    (same betas / prediction_type / spacing, the new class's defaults for the rest). `eta` is DDIM's η and
    ignored by the others (as diffusers' pipelines do); `use_karras_sigmas` overrides the config for
    euler / dpmpp_2m / flow_euler. "dpmpp_2m" follows a DPMSolverMultistepScheduler config's algorithm/order
    if given. "flow_euler" is the Flux pipeline's sampling (`flow_samplers.flow_euler_sampler`), for
    FlowMatch* configs only; `image_seq_len` (its number of image tokens) sets its resolution-dependent
    shift and is ignored by the other samplers.
    """
    if name not in _BUILDERS and name not in FLOW_MATCHING_NAMES:
        raise UsageError(f"unknown scheduler {name!r}; expected one of {SCHEDULER_NAMES}")
    _check_family(name, config_dict)
    if name == "flow_euler":
        if use_karras_sigmas is not None:
            config_dict = _with_karras(config_dict, use_karras_sigmas)
        return flow_euler_sampler(config_dict, num_inference_steps, image_seq_len=image_seq_len)
    cfg = ScheduleConfig.from_diffusers_config(config_dict, class_name=DIFFUSERS_CLASS[name])
    if use_karras_sigmas is not None:
        if use_karras_sigmas and name not in ("euler", "dpmpp_2m"):
            raise UsageError(f"use_karras_sigmas applies to 'euler', 'dpmpp_2m' and 'flow_euler', "
                             f"not {name!r}")
        cfg = dataclasses.replace(cfg, use_karras_sigmas=use_karras_sigmas)
    if cfg.use_karras_sigmas and cfg.use_exponential_sigmas:
        raise UsageError("only one of use_karras_sigmas / use_exponential_sigmas can be set")
    T = cfg.num_train_timesteps
    if num_inference_steps < 1 or (name in ("ddpm", "ddim") and num_inference_steps > T):
        raise UsageError(f"num_inference_steps={num_inference_steps} must be in [1, {T}]")
    return _BUILDERS[name](cfg, num_inference_steps, eta)
