"""The DreamBooth train step: one pure function `(state, batch, rng) -> (state, metrics)`.

Loss (Ruiz et al. 2023, eq. 2): E w(t) ||x̂(z_t, t, c) - target||² on the instance examples plus
`prior_loss_weight` x the same on the class (prior-preservation) examples. The objective (`spec.objective`,
`diffusion.objectives`) says how z_t is drawn, what the target is and the weights w(t); the model family
(`spec.family`) how the text conditioning c is computed and the denoiser called. Instance and class examples
travel in one batch (one forward pass), told apart by `batch["is_prior"]`.

The batch has a leading micro-batch axis [A, B, ...]: gradient accumulation is a `lax.scan` inside the
compiled step. `batch["example_id"]` numbers the step's examples; each draws its noise from it. Static parts
(modules, schedule, weights) are bound with `functools.partial`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dreambooth_jax import lora, parallel
from dreambooth_jax.models.vae import sample_latents
from dreambooth_jax.training.state import TrainState


@dataclasses.dataclass(frozen=True, eq=False)
class StepSpec:
    """The static parts of the step: the model family, its modules (weights not needed), the objective."""

    family: Any  # families.Family
    modules: Mapping[str, Any]  # component folder -> Flax module
    objective: Any  # diffusion.objectives (what is predicted, at which timesteps, with which weights)
    prior_loss_weight: float = 1.0
    use_attention_mask: bool = False
    noise_offset: float = 0.0  # offset noise strength (0: off)
    max_grad_norm: float = 1.0  # clip the global norm of all trained parts' gradients (0: off)
    ema_decay: float = 0.9999
    lora: Any = None  # lora.LoraConfig when training LoRA factors (params '<part>_lora')
    # the family's constant denoiser inputs
    inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, pipe, *, snr_gamma: float | None = None, run_options: Mapping | None = None,
           **options) -> StepSpec:
        """The spec of a pipeline: its modules, its family's objective (from its scheduler config) and
        constant denoiser inputs (from the run's options, `run_options`)."""
        objective = pipe.family.objective(pipe.scheduler_config, snr_gamma)
        inputs = pipe.family.train_inputs(run_options or {})
        return cls(family=pipe.family, modules=dict(pipe.modules), objective=objective, inputs=inputs,
                   **options)


def apply_part(spec: StepSpec, part: str, params, frozen, *args, dropout_rng=None, **kwargs):
    """Runs component `part` with its trained params, its frozen ones, or (LoRA) its frozen base plus the
    trained `<part>_lora` factors."""
    module = spec.modules[part]
    factors = params.get(f"{part}_lora", frozen.get(f"{part}_lora"))  # frozen ones: stopped text-encoder LoRA
    if factors is not None:
        return lora.apply(module, frozen[part], factors, spec.lora, *args, dropout_rng=dropout_rng, **kwargs)
    out = module.apply({"params": params[part] if part in params else frozen[part]}, *args, **kwargs)
    return out if part in params else jax.tree.map(jax.lax.stop_gradient, out)


def runner(spec: StepSpec, params, frozen, dropout_rng=None):
    """run(component, *args, **kwargs) for the family's functions: `apply_part` with the component's own LoRA
    dropout key (the denoiser's, the first text encoder's, then `fold_in(that, i + 1)` for encoder i > 0)."""
    text_rng, denoiser_rng = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    rngs = {spec.family.denoiser: denoiser_rng}
    for i, name in enumerate(spec.family.text_encoders):
        rngs[name] = text_rng if i == 0 or text_rng is None else jax.random.fold_in(text_rng, i + 1)
    return lambda part, *args, **kwargs: apply_part(spec, part, params, frozen, *args,
                                                    dropout_rng=rngs.get(part), **kwargs)


def conditioning(spec: StepSpec, run, batch) -> dict:
    """The denoiser's text conditioning {"context"[, "pooled"]} of the batch's prompts: precomputed, or from
    the text encoder(s) (`Family.encode`)."""
    if "context" in batch:  # precomputed text embeddings
        return {k: batch[k] for k in ("context", "pooled") if k in batch}
    return spec.family.encode(run, batch, spec.use_attention_mask)


def _normal(keys, shape):
    """One standard normal draw of `shape` per key: [B] keys -> [B, *shape]."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def clean_latents(spec: StepSpec, frozen, batch, keys):
    """z_0 = scaling * sample from q(z | x): from cached (mean, logvar) or by encoding the images."""
    vae = spec.modules[spec.family.vae]
    if "latent_mean" in batch:
        mean, logvar = batch["latent_mean"], batch["latent_logvar"]
    else:
        mean, logvar = vae.apply({"params": frozen[spec.family.vae]}, batch["images"], method=vae.encode)
    z = jax.vmap(sample_latents)(mean, logvar, keys)  # one draw per example, from its own key
    return jax.lax.stop_gradient(vae.scale_latents(z))


def per_example_loss(spec: StepSpec, params, frozen, batch, latents, noise, timesteps, dropout_rng=None):
    """Per-example weighted MSE [B] (float32) of the denoiser's prediction, for given z_0, noise and
    timesteps.

    `dropout_rng` drives LoRA dropout only (the networks themselves have none)."""
    objective = spec.objective
    noisy = objective.noisy(latents, noise, timesteps)
    run = runner(spec, params, frozen, dropout_rng)
    cond = conditioning(spec, run, batch)
    denoiser = spec.modules[spec.family.denoiser]
    pred = spec.family.denoise(run, noisy.astype(denoiser.dtype), timesteps, cond, {**spec.inputs, **batch})
    target = objective.target(latents, noise, timesteps)
    mse = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))
    return mse * objective.weights(timesteps)


def combine_losses(mse, is_prior, prior_loss_weight: float):
    """(loss, instance loss, prior loss): means over each half, the prior one weighted."""
    inst = ~is_prior
    instance_loss = jnp.sum(mse * inst) / jnp.maximum(1, jnp.sum(inst))
    prior_loss = jnp.sum(mse * is_prior) / jnp.maximum(1, jnp.sum(is_prior))
    return instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss


def draw_example_inputs(spec: StepSpec, frozen, batch, rng) -> dict:
    """What each example of a micro-batch draws: {"latents": z_0 [B, h, w, c] (a sample of q(z | x), scaled),
    "noise": ε [B, h, w, c], "offset": the offset-noise draw [B, 1, 1, c] (zeros without offset noise),
    "timesteps": t int32 [B]}.

    Each example draws from `fold_in(rng, example_id)`: its draws do not depend on where it sits in the batch,
    so the device count and micro-batching do not change the result.
    """
    keys = jax.vmap(lambda e: jax.random.split(jax.random.fold_in(rng, e), 4))(batch["example_id"])
    latents = clean_latents(spec, frozen, batch, keys[:, 0])
    shape = latents.shape[1:]
    offset = (_normal(keys[:, 2], (1, 1, shape[-1])) if spec.noise_offset
              else jnp.zeros((len(keys), 1, 1, shape[-1])))
    timesteps = spec.objective.timesteps(keys[:, 3])
    return {"latents": latents, "noise": _normal(keys[:, 1], shape), "offset": offset, "timesteps": timesteps,
            "keys": keys}


def micro_batch_loss(params, frozen, batch, rng, *, spec: StepSpec):
    """The DreamBooth loss of one micro-batch with freshly drawn latents, noise and timesteps; offset noise
    adds `noise_offset` x one N(0, 1) value per example and channel to ε."""
    draws = draw_example_inputs(spec, frozen, batch, rng)
    noise = draws["noise"] + spec.noise_offset * draws["offset"]
    # LoRA dropout masks span the micro-batch: drawn from its first example's id (distinct per micro-batch).
    with_dropout = spec.lora is not None and spec.lora.dropout > 0
    dropout_rng = jax.random.fold_in(draws["keys"][0, 0], 1) if with_dropout else None
    mse = per_example_loss(spec, params, frozen, batch, draws["latents"], noise, draws["timesteps"],
                           dropout_rng)
    loss, instance_loss, prior_loss = combine_losses(mse, batch["is_prior"], spec.prior_loss_weight)
    return loss, {"loss": loss, "instance_loss": instance_loss, "prior_loss": prior_loss}


def ema_decay_at(step, max_decay: float):
    """diffusers' `EMAModel.get_decay` for update number `step` (0-based): 0 at the first update (the average
    starts as the weights after the first optimizer step), then min(max_decay, (1 + k) / (10 + k))."""
    k = jnp.asarray(step, jnp.float32)
    return jnp.where(k < 1, 0.0, jnp.minimum(max_decay, (1.0 + k) / (10.0 + k)))


def update_ema(ema: dict, params: dict, step, max_decay: float) -> dict:
    """e <- d_k e + (1 - d_k) p for every part in `params` (others, e.g. stopped ones, are kept)."""
    d = ema_decay_at(step, max_decay)
    return {**ema,
            **{k: jax.tree.map(lambda e, p: e + (1.0 - d) * (p - e), ema[k], params[k]) for k in params}}


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, spec: StepSpec, schedules=None):
    """One optimizer step over `A` accumulated micro-batches.

    Args:
      state: the train state (donated).
      batch: arrays with leading axes [A, B]; see the module docstring.
      rng: the run's base key; this step draws from `fold_in(rng, state.step)`.
      spec: static parts (bound with functools.partial). schedules: {part: lr schedule}, for the metrics.

    Returns:
      (new state, metrics: loss, instance_loss, prior_loss, grad_norm, lr[_text_encoder]).
    """
    step_rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.grad(micro_batch_loss, has_aux=True)

    def accumulate(carry, micro):
        grads_sum, metrics_sum = carry
        grads, metrics = grad_fn(state.params, state.frozen, micro, step_rng, spec=spec)
        return (jax.tree.map(jnp.add, grads_sum, grads), jax.tree.map(jnp.add, metrics_sum, metrics)), None

    num_micro = jax.tree.leaves(batch)[0].shape[0]
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    zero_metrics = {k: jnp.zeros((), jnp.float32) for k in ("loss", "instance_loss", "prior_loss")}
    (grads, metrics), _ = jax.lax.scan(accumulate, (zeros, zero_metrics), batch)
    grads = jax.tree.map(lambda g: g / num_micro, grads)
    metrics = {k: v / num_micro for k, v in metrics.items()}
    metrics["grad_norm"] = norm = optax.global_norm(grads)
    if spec.max_grad_norm > 0:  # one global norm over every trained part, exactly as torch's clip_grad_norm_
        scale = jnp.minimum(1.0, spec.max_grad_norm / (norm + 1e-6))
        grads = jax.tree.map(lambda g: g * scale, grads)
    params, opt_state = {}, {}
    for part, tx in state.txs:
        updates, opt_state[part] = tx.update(grads[part], state.opt_state[part], state.params[part])
        params[part] = optax.apply_updates(state.params[part], updates)
    ema = None if state.ema is None else update_ema(state.ema, params, state.step, spec.ema_decay)
    for part, _ in state.txs:  # the parts still trained (a stopped text encoder has no lr any more)
        if part in (schedules or {}):
            metrics["lr" if part.startswith("unet") else f"lr_{part}"] = schedules[part](state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


def subjects_train_step(state: TrainState, batch: dict, rng: jax.Array, *, spec: StepSpec, schedules=None):
    """`train_step` of K independent subjects at once (`jax.vmap` over them): their trained params, optimizer
    states, EMA and stopped (trained, then frozen) parts have a leading subject axis K, the other frozen
    networks are shared; `batch` has leading axes [K, A, B], `rng` holds K base keys [K, 2] (each subject's
    own stream). Subject k's result is `train_step` of its own slices. Returns (new state, metrics [K])."""
    stopped = state.per_subject()["stopped"]
    shared = {k: v for k, v in state.frozen.items() if k not in stopped}

    def one(params, opt_state, ema, stopped, batch, rng):
        alone = state.replace(params=params, opt_state=opt_state, ema=ema, frozen={**shared, **stopped})
        new, metrics = train_step(alone, batch, rng, spec=spec, schedules=schedules)
        return new.params, new.opt_state, new.ema, metrics

    # Traced on a mesh with a `subject` axis, the vmapped axis is split over it: kernels that run per device
    # on their share of the batch (`kernels.batch_parallel`) then see one subject's batch.
    mesh = jax.sharding.get_abstract_mesh()
    axis = parallel.SUBJECT_AXIS if not mesh.empty and parallel.SUBJECT_AXIS in mesh.axis_names else None
    params, opt_state, ema, metrics = jax.vmap(one, spmd_axis_name=axis)(state.params, state.opt_state,
                                                                         state.ema, stopped, batch, rng)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                         frozen={**shared, **stopped}), metrics
