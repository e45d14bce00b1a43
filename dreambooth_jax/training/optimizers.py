"""Optimizer and learning-rate schedules (the diffusers/transformers `get_scheduler` shapes, in optax)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dreambooth_jax.errors import UsageError

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def lr_schedule(name: str, peak_lr: float, *, warmup_steps: int, total_steps: int, num_cycles: int = 1,
                power: float = 1.0, lr_end: float = 1e-7) -> optax.Schedule:
    """lr(step) with a linear warm-up from 0 (except `constant`), as diffusers' `get_scheduler(name, ...)`.

    `cosine` is a half cosine to 0; `cosine_with_restarts` has `num_cycles` hard restarts; `polynomial`
    decays to `lr_end` with `power`.
    """
    if name not in LR_SCHEDULERS:
        raise UsageError(f"unknown lr scheduler {name!r}; choose one of {', '.join(LR_SCHEDULERS)}")
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
                               jnp.maximum(0.0,
                                           0.5 * (1.0 + jnp.cos(math.pi * ((num_cycles * progress) % 1.0)))))
        else:  # polynomial
            remaining = jnp.clip(1.0 - progress, 0.0, 1.0)
            factor = ((peak_lr - lr_end) * remaining**power + lr_end) / peak_lr
        return peak_lr * jnp.where(step < warmup_steps, warm, factor)

    return schedule


OPTIMIZERS = ("adamw", "adafactor", "lion", "prodigy")
# Each optimizer's own default second-moment decay, used unless --adam_beta2 is given (Lion's paper: 0.99).
DEFAULT_BETA2 = {"adamw": 0.999, "adafactor": None, "lion": 0.99, "prodigy": 0.999}


class AdafactorState(NamedTuple):
    count: jax.Array  # the number of updates made
    v_row: Any  # per leaf: the factored second moments (row, col), or the full one in `v_row` (col: a 0)
    v_col: Any


def _factored_dims(shape) -> tuple[int, int] | None:
    """The two axes transformers' Adafactor factors, in our (Flax) layout: PyTorch's last two axes are the
    Dense kernel's (in, out) -> our (0, 1), and the conv kernel's (kh, kw) -> our (0, 1); None for vectors."""
    if len(shape) < 2:
        return None
    return (0, 1) if len(shape) in (2, 4) else (len(shape) - 2, len(shape) - 1)


def adafactor(schedule: optax.Schedule, *, weight_decay: float = 0.0, scale_parameter: bool = True,
              clip_threshold: float = 1.0, decay_rate: float = 0.8, eps1: float = 1e-30,
              eps2: float = 1e-3) -> optax.GradientTransformation:
    """transformers' `Adafactor(lr, relative_step=False, warmup_init=False, beta1=None)` (Shazeer & Stern
    2018).

    Per parameter: v = b2_k v + (1 - b2_k)(g² + eps1), b2_k = 1 - k^-decay_rate, factored into row and column
    means for matrices and conv kernels (over the axes PyTorch's layout factors); u = g / sqrt(v) clipped to
    RMS(u) <= clip_threshold; step lr_k = schedule(k) x max(eps2, RMS(p)) (with `scale_parameter`);
    p <- p - lr_k (weight_decay p + u). Unlike optax's `adafactor(weight_decay_rate=...)`, whose decay is not
    scaled by the learning rate (p <- p - w p every step), the decay here is decoupled and scaled by lr_k, as
    transformers does.
    """

    def init(params):
        def moments(p):
            dims = _factored_dims(p.shape)
            if dims is None:
                # (Orbax refuses empty arrays)
                return jnp.zeros_like(p, jnp.float32), jnp.zeros((), jnp.float32)
            return (jnp.zeros(tuple(n for i, n in enumerate(p.shape) if i != dims[1]), jnp.float32),
                    jnp.zeros(tuple(n for i, n in enumerate(p.shape) if i != dims[0]), jnp.float32))

        pairs = jax.tree.map(moments, params)
        is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
        return AdafactorState(jnp.zeros((), jnp.int32), jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair),
                              jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair))

    def update(grads, state, params):
        count = state.count + 1
        k = count.astype(jnp.float32)
        beta2 = 1.0 - k ** (-decay_rate)
        lr = schedule(state.count)
        rms = lambda x: jnp.sqrt(jnp.mean(jnp.square(x)))  # noqa: E731

        def one(g, p, v_row, v_col):
            g = g.astype(jnp.float32)
            sq = jnp.square(g) + eps1
            dims = _factored_dims(g.shape)
            if dims is None:
                v_row = beta2 * v_row + (1 - beta2) * sq
                u = g * jax.lax.rsqrt(v_row)
            else:
                r_axis, c_axis = dims  # row stats average over c_axis (kept: r_axis), col stats over r_axis
                v_row = beta2 * v_row + (1 - beta2) * jnp.mean(sq, axis=c_axis)
                v_col = beta2 * v_col + (1 - beta2) * jnp.mean(sq, axis=r_axis)
                r_factor = jax.lax.rsqrt(v_row / jnp.mean(v_row, axis=r_axis, keepdims=True))
                c_factor = jax.lax.rsqrt(v_col)
                u = g * jnp.expand_dims(r_factor, c_axis) * jnp.expand_dims(c_factor, r_axis)
            u = u / jnp.maximum(1.0, rms(u) / clip_threshold)
            step_lr = lr * jnp.maximum(eps2, rms(p.astype(jnp.float32))) if scale_parameter else lr
            delta = -step_lr * (u + weight_decay * p.astype(jnp.float32))
            return delta.astype(p.dtype), v_row, v_col

        out = jax.tree.map(one, grads, params, state.v_row, state.v_col)
        is_triple = lambda x: isinstance(x, tuple) and len(x) == 3  # noqa: E731
        pick = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=is_triple)  # noqa: E731
        return pick(0), AdafactorState(count, pick(1), pick(2))

    return optax.GradientTransformation(init, update)


class ProdigyState(NamedTuple):
    count: jax.Array  # optimizer steps taken (the schedule's input)
    d: jax.Array  # the step-size estimate
    d_max: jax.Array
    d_numerator: jax.Array
    p0: Any  # the initial parameters
    s: Any
    exp_avg: Any
    exp_avg_sq: Any


def prodigy(schedule: optax.Schedule, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
            weight_decay: float = 0.0, d0: float = 1e-6, d_coef: float = 1.0) -> optax.GradientTransformation:
    """prodigyopt's `Prodigy(lr, betas, eps, weight_decay)` (Mishchenko & Defazio 2023): Adam whose step is
    lr x d, d a running estimate of the distance to the solution (decoupled weight decay, no bias correction,
    unbounded growth, beta3 = sqrt(b2)). As in prodigyopt, a step at lr 0 (e.g. the first of a warm-up)
    changes nothing; optax's `contrib.prodigy` turns it into NaN (0 / 0 in the estimate)."""
    beta3 = math.sqrt(b2)

    def init(params):
        zeros = lambda: jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)  # noqa: E731
        scalar = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        return ProdigyState(jnp.zeros((), jnp.int32), scalar(d0), scalar(d0), scalar(0.0),
                            jax.tree.map(lambda p: p.astype(jnp.float32), params), zeros(), zeros(), zeros())

    def update(grads, state, params):
        lr = jnp.asarray(schedule(state.count), jnp.float32)
        d = state.d
        dlr = d * lr
        g = jax.tree.map(lambda x: x.astype(jnp.float32), grads)
        p = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        tree_sum = lambda t: sum(jax.tree.leaves(t))  # noqa: E731
        numerator = beta3 * state.d_numerator + (d / d0) * dlr * tree_sum(
            jax.tree.map(lambda gi, p0, pi: jnp.vdot(gi, p0 - pi), g, state.p0, p))
        exp_avg = jax.tree.map(lambda m, gi: b1 * m + d * (1 - b1) * gi, state.exp_avg, g)
        exp_avg_sq = jax.tree.map(lambda v, gi: b2 * v + d * d * (1 - b2) * gi * gi, state.exp_avg_sq, g)
        s_new = jax.tree.map(lambda si, gi: beta3 * si + (d / d0) * dlr * gi, state.s, g)
        denom_sum = tree_sum(jax.tree.map(lambda si: jnp.sum(jnp.abs(si)), s_new))
        active = lr > 0  # prodigyopt skips every update at lr 0
        moves = active & (denom_sum > 0)  # ... and the step itself when all gradients are zero
        d_hat = d_coef * numerator / jnp.where(moves, denom_sum, 1.0)
        d_max = jnp.where(moves, jnp.maximum(state.d_max, d_hat), state.d_max)
        d_new = jnp.where(moves, d_max, d)  # growth_rate = inf: d <- d_max
        updates = jax.tree.map(
            lambda m, v, pi, x: jnp.where(moves, -dlr * (weight_decay * pi + m / (jnp.sqrt(v) + d_new * eps)),
                                          0.0).astype(x.dtype), exp_avg, exp_avg_sq, p, params)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)  # noqa: E731
        return updates, ProdigyState(state.count + 1, d_new, d_max,
                                     jnp.where(moves, numerator, state.d_numerator), state.p0,
                                     keep(s_new, state.s), keep(exp_avg, state.exp_avg),
                                     keep(exp_avg_sq, state.exp_avg_sq))

    return optax.GradientTransformation(init, update)


def make_optimizer(name: str, schedule: optax.Schedule, *, b1: float = 0.9, b2: float | None = None,
                   eps: float = 1e-8, weight_decay: float = 1e-2) -> optax.GradientTransformation:
    """An optax optimizer by name, on the learning-rate `schedule` (clipping is done by the train step).

    Each equals the PyTorch implementation users know (tested against it): adamw: torch.optim.AdamW (decoupled
    weight decay). adafactor: transformers' Adafactor with a given lr (factored second moments, least memory;
    decay scaled by lr). lion: lion-pytorch (sign updates, one moment; use a ~3-10x smaller lr). prodigy:
    prodigyopt's Prodigy (learning-rate-free Adam; the schedule multiplies its estimate: use lr 1.0). `b2`
    None: the optimizer's own default (DEFAULT_BETA2: Lion 0.99, Adam 0.999).
    """
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    b2 = DEFAULT_BETA2[name] if b2 is None else b2
    if name == "adamw":
        return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if name == "adafactor":
        return adafactor(schedule, weight_decay=weight_decay)
    if name == "lion":
        return optax.lion(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
    return prodigy(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
