"""Optimizer and learning-rate schedules (the diffusers/transformers `get_scheduler` shapes, in optax)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def lr_schedule(name: str, peak_lr: float, *, warmup_steps: int, total_steps: int, num_cycles: int = 1,
                power: float = 1.0, lr_end: float = 1e-7) -> optax.Schedule:
    """lr(step) with a linear warm-up from 0 (except `constant`), as diffusers' `get_scheduler(name, ...)`.

    `cosine` is a half cosine to 0; `cosine_with_restarts` has `num_cycles` hard restarts; `polynomial`
    decays to `lr_end` with `power`.
    """
    if name not in LR_SCHEDULERS:
        raise ValueError(f"unknown lr scheduler {name!r}; choose one of {', '.join(LR_SCHEDULERS)}")
    warmup = max(1, warmup_steps)
    decay_steps = max(1, total_steps - warmup_steps)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        warm = step / warmup
        progress = (step - warmup_steps) / decay_steps
        if name == "constant":
            return jnp.full_like(step, peak_lr)
        if name == "constant_with_warmup":
            factor = jnp.ones_like(step)
        elif name == "linear":
            factor = jnp.maximum(0.0, (total_steps - step) / decay_steps)
        elif name == "cosine":
            factor = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * 0.5 * 2.0 * progress)))
        elif name == "cosine_with_restarts":
            factor = jnp.where(progress >= 1.0, 0.0,
                               jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * ((num_cycles * progress) % 1.0)))))
        else:  # polynomial
            remaining = jnp.clip(1.0 - progress, 0.0, 1.0)
            factor = ((peak_lr - lr_end) * remaining**power + lr_end) / peak_lr
        return peak_lr * jnp.where(step < warmup_steps, warm, factor)

    return schedule


def adamw(schedule: optax.Schedule, *, b1: float, b2: float, eps: float, weight_decay: float,
          max_grad_norm: float) -> optax.GradientTransformation:
    """Clip by global norm (when > 0), then AdamW with decoupled weight decay (as torch.optim.AdamW)."""
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)
