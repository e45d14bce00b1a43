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


OPTIMIZERS = ("adamw", "adafactor", "lion", "prodigy")


def make_optimizer(name: str, schedule: optax.Schedule, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 1e-2) -> optax.GradientTransformation:
    """An optax optimizer by name, on the learning-rate `schedule` (clipping is done by the train step).

    adamw: decoupled weight decay as torch.optim.AdamW. adafactor: factored second moments (least memory),
    weight decay as its `weight_decay_rate`. lion: sign updates, one moment (use a ~3-10x smaller lr).
    prodigy: learning-rate-free Adam (the schedule multiplies its estimate; use lr 1.0).
    """
    if name == "adamw":
        return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if name == "adafactor":
        return optax.adafactor(schedule, weight_decay_rate=weight_decay or None)
    if name == "lion":
        return optax.lion(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
    if name == "prodigy":
        from optax.contrib import prodigy

        return prodigy(schedule, betas=(b1, b2), eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
