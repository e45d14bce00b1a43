"""The DreamBooth train step: one pure function `(state, batch, rng) -> (state, metrics)`.

Loss (Ruiz et al. 2023, eq. 2): E ||x̂(z_t, t, c) - target||² on the instance examples plus
`prior_loss_weight` x the same on the class (prior-preservation) examples, where z_t ~ q(z_t | z_0) and the
target is ε, v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) z_0, or z_0 per the scheduler's `prediction_type`. Instance
and class examples travel in one batch (one forward pass), told apart by `batch["is_prior"]`.

The batch has a leading micro-batch axis [A, B, ...]: gradient accumulation is a `lax.scan` inside the
compiled step. `batch["example_id"]` numbers the step's examples; each draws its noise from it. Static parts (modules, schedule, weights) are bound with `functools.partial`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dreambooth_jax import noise_schedule


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes (or is needed) across steps; `frozen` holds the params not trained."""

    step: jax.Array
    params: dict  # trained: {'unet'[, 'text_encoder']}
    opt_state: Any
    frozen: dict  # not trained: {'vae'[, 'text_encoder']}
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params: dict, frozen: dict, tx: optax.GradientTransformation) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), frozen=frozen, tx=tx)


@dataclasses.dataclass(frozen=True, eq=False)
class StepSpec:
    """The static parts of the step."""

    unet: Any
    vae: Any
    text_encoder: Any
    alphas_cumprod: np.ndarray  # float64 [T] (cast to float32 in the step)
    prediction_type: str = "epsilon"
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False
    use_attention_mask: bool = False


def _text_context(spec: StepSpec, params, frozen, batch):
    if "context" in batch:  # precomputed text embeddings
        return batch["context"]
    te_params = params["text_encoder"] if spec.train_text_encoder else frozen["text_encoder"]
    mask = batch.get("attention_mask") if spec.use_attention_mask else None
    out = spec.text_encoder.apply({"params": te_params}, batch["input_ids"], mask).last_hidden_state
    return out if spec.train_text_encoder else jax.lax.stop_gradient(out)


def _normal(keys, shape):
    """One standard normal draw of `shape` per key: [B] keys -> [B, *shape]."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def clean_latents(spec: StepSpec, frozen, batch, keys):
    """z_0 = scaling * sample from q(z | x): from cached (mean, logvar) or by encoding the images."""
    if "latent_mean" in batch:
        mean, logvar = batch["latent_mean"], batch["latent_logvar"]
    else:
        mean, logvar = spec.vae.apply({"params": frozen["vae"]}, batch["images"], method=spec.vae.encode)
    z = mean + jnp.exp(0.5 * logvar) * _normal(keys, mean.shape[1:])
    return jax.lax.stop_gradient(spec.vae.scale_latents(z))


def per_example_loss(spec: StepSpec, params, frozen, batch, latents, noise, timesteps):
    """Per-example MSE [B] (float32) of the UNet's prediction, for given clean latents, noise and timesteps."""
    ac = jnp.asarray(spec.alphas_cumprod, jnp.float32)
    noisy = noise_schedule.add_noise(ac, latents, noise, timesteps)
    context = _text_context(spec, params, frozen, batch)
    pred = spec.unet.apply({"params": params["unet"]}, noisy.astype(spec.unet.dtype), timesteps, context)
    if spec.prediction_type == "epsilon":
        target = noise
    elif spec.prediction_type == "v_prediction":
        target = noise_schedule.get_velocity(ac, latents, noise, timesteps)
    else:  # "sample"
        target = latents
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))


def combine_losses(mse, is_prior, prior_loss_weight: float):
    """(loss, instance loss, prior loss): means over each half, the prior one weighted."""
    inst = ~is_prior
    instance_loss = jnp.sum(mse * inst) / jnp.maximum(1, jnp.sum(inst))
    prior_loss = jnp.sum(mse * is_prior) / jnp.maximum(1, jnp.sum(is_prior))
    return instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss


def micro_batch_loss(params, frozen, batch, rng, *, spec: StepSpec):
    """The DreamBooth loss of one micro-batch with freshly drawn latents, noise and timesteps.

    Each example draws from `fold_in(rng, example_id)`: its draws do not depend on where it sits in the
    batch, so device count and micro-batching do not change the result.
    """
    keys = jax.vmap(lambda e: jax.random.split(jax.random.fold_in(rng, e), 3))(batch["example_id"])
    latents = clean_latents(spec, frozen, batch, keys[:, 0])
    noise = _normal(keys[:, 1], latents.shape[1:])
    timesteps = jax.vmap(lambda k: jax.random.randint(k, (), 0, len(spec.alphas_cumprod)))(keys[:, 2])
    mse = per_example_loss(spec, params, frozen, batch, latents, noise, timesteps)
    loss, instance_loss, prior_loss = combine_losses(mse, batch["is_prior"], spec.prior_loss_weight)
    return loss, {"loss": loss, "instance_loss": instance_loss, "prior_loss": prior_loss}


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, spec: StepSpec, schedule=None):
    """One optimizer step over `A` accumulated micro-batches.

    Args:
      state: the train state (donated).
      batch: arrays with leading axes [A, B]; see the module docstring.
      rng: the run's base key; this step draws from `fold_in(rng, state.step)`.
      spec: static parts (bound with functools.partial). schedule: lr schedule, for the metrics.

    Returns:
      (new state, metrics: loss, instance_loss, prior_loss, grad_norm, lr).
    """
    step_rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.grad(micro_batch_loss, has_aux=True)
    num_micro = jax.tree.leaves(batch)[0].shape[0]

    def accumulate(carry, xs):
        grads_sum, metrics_sum = carry
        micro = xs
        grads, metrics = grad_fn(state.params, state.frozen, micro, step_rng, spec=spec)
        return (jax.tree.map(jnp.add, grads_sum, grads), jax.tree.map(jnp.add, metrics_sum, metrics)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    zero_metrics = {k: jnp.zeros((), jnp.float32) for k in ("loss", "instance_loss", "prior_loss")}
    (grads, metrics), _ = jax.lax.scan(accumulate, (zeros, zero_metrics), batch)
    grads = jax.tree.map(lambda g: g / num_micro, grads)
    metrics = {k: v / num_micro for k, v in metrics.items()}
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    if schedule is not None:
        metrics["lr"] = schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
