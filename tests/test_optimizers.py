"""Optimizers, lr schedules, EMA and Min-SNR weights against their PyTorch references, fed identical inputs.

Each optimizer gets the same random gradient sequence as its reference (torch.optim.AdamW, transformers'
Adafactor, lion-pytorch, prodigyopt) on parameters of every layout the models have (Dense and conv kernels in
our layout, transposed to PyTorch's for the reference; vectors), with a warm-up schedule and weight decay.
Error budget: both sides compute in float32; over 6 steps the updates agree to a few ulps of the parameters
except where a near-zero quantity decides a sign (Adam's first steps and Lion are ~lr x sign), so the test
asserts 1e-5 relative on the parameters and, separately, that the updates themselves agree.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from dreambooth_jax.diffusion import noise_schedule
from dreambooth_jax.training import optimizers
from dreambooth_jax.training import step as train_step

SHAPES = {"dense": (12, 10), "conv": (3, 3, 6, 8), "bias": (8,), "embedding": (16, 10)}
STEPS, WARMUP = 6, 2


def _to_torch(name: str, x: np.ndarray) -> np.ndarray:
    """Our layout -> PyTorch's: Dense [in, out] -> [out, in]; conv [kh, kw, in, out] -> [out, in, kh, kw]."""
    if name == "dense":
        return np.ascontiguousarray(x.T)
    if x.ndim == 4:
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return x


def _from_torch(name: str, x: np.ndarray) -> np.ndarray:
    if name == "dense":
        return x.T
    if x.ndim == 4:
        return x.transpose(2, 3, 1, 0)
    return x


def _torch_optimizer(name, params, lr, weight_decay):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    if name == "adafactor":
        # each reference is an optional torch package: loaded only by its own case
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, relative_step=False, scale_parameter=True, warmup_init=False,
                         weight_decay=weight_decay)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)  # Lion's own default b2
    from prodigyopt import Prodigy

    return Prodigy(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


# Prodigy steps lr x d, d from 1e-6: a large lr makes its moves well above the rounding of the weights.
LR = {"adamw": 1e-2, "adafactor": 1e-2, "lion": 3e-3, "prodigy": 100.0}


@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_optimizer_equals_its_pytorch_reference(name):
    from diffusers.optimization import get_scheduler

    rng = np.random.default_rng(0)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(STEPS)]
    lr, wd = LR[name], 0.1

    tp = {k: torch.nn.Parameter(torch.tensor(_to_torch(k, v))) for k, v in init.items()}
    opt = _torch_optimizer(name, list(tp.values()), lr, wd)
    sched = get_scheduler("cosine", opt, num_warmup_steps=WARMUP, num_training_steps=STEPS)
    ours = {k: jnp.asarray(v) for k, v in init.items()}
    tx = optimizers.make_optimizer(name, optimizers.lr_schedule("cosine", lr, warmup_steps=WARMUP,
                                                                total_steps=STEPS), weight_decay=wd)
    state = tx.init(ours)
    for g in grads:
        for k in tp:
            tp[k].grad = torch.tensor(_to_torch(k, g[k]))
        opt.step()
        sched.step()
        updates, state = tx.update(g, state, ours)
        ours = optax.apply_updates(ours, updates)
    for k in tp:
        ref = _from_torch(k, tp[k].detach().numpy())
        np.testing.assert_allclose(np.asarray(ours[k]), ref, rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")
        moved = ref - init[k]
        assert np.abs(moved).max() > 10 * 1e-6  # the test sees the updates, not only the start
        np.testing.assert_allclose(np.asarray(ours[k]) - init[k], moved, rtol=1e-3, atol=1e-6)


def test_adafactor_decay_is_scaled_by_the_learning_rate():
    """The bug this replaces: optax's `adafactor(weight_decay_rate=w)` does p <- p - w p every step, whatever
    the lr; at lr 0 nothing may move."""
    params = {"w": jnp.ones((4, 4))}
    tx = optimizers.make_optimizer("adafactor", lambda c: 0.0, weight_decay=1e-2)
    updates, _ = tx.update({"w": jnp.ones((4, 4))}, tx.init(params), params)
    assert float(jnp.abs(updates["w"]).max()) == 0.0


def test_lion_defaults_to_its_own_beta2():
    tx = optimizers.make_optimizer("lion", 1e-3)
    ref = optax.lion(1e-3, b1=0.9, b2=0.99, weight_decay=1e-2)
    params, rng = {"w": jnp.zeros(64)}, np.random.default_rng(1)
    s, r = tx.init(params), ref.init(params)
    for _ in range(3):
        g = {"w": jnp.asarray(rng.standard_normal(64), jnp.float32)}
        (u, s), (v, r) = tx.update(g, s, params), ref.update(g, r, params)
        np.testing.assert_array_equal(u["w"], v["w"])


@pytest.mark.parametrize("name, kwargs", [
    ("constant", {}), ("constant_with_warmup", {}), ("linear", {}), ("cosine", {}),
    ("cosine_with_restarts", {"num_cycles": 3}), ("polynomial", {"power": 2.0}),
])
def test_lr_schedule_equals_diffusers_get_scheduler(name, kwargs):
    from diffusers.optimization import get_scheduler

    peak, warmup, total = 1e-4, 7, 50
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    ref_kwargs = {"num_cycles": kwargs["num_cycles"]} if "num_cycles" in kwargs else {}
    if "power" in kwargs:
        ref_kwargs["power"] = kwargs["power"]
    ref = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total, **ref_kwargs)
    expected = []
    for _ in range(total + 5):  # past the end too
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    ours = optimizers.lr_schedule(name, peak, warmup_steps=warmup, total_steps=total, **kwargs)
    got = [float(ours(k)) for k in range(total + 5)]
    # float32 schedule vs Python float64: a few ulps of the peak lr
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * peak)


def test_ema_equals_diffusers_ema_model():
    """Fed the same weights after each optimizer step, our EMA equals `EMAModel` (decay 0 at the first
    step)."""
    from diffusers.training_utils import EMAModel

    decay, steps = 0.9, 30
    rng = np.random.default_rng(0)
    seq = [rng.standard_normal(5).astype(np.float32) for _ in range(steps)]
    param = torch.nn.Parameter(torch.zeros(5))
    ref = EMAModel([param], decay=decay)
    ema = {"unet": {"w": jnp.zeros(5)}}
    for k, p in enumerate(seq):
        param.data = torch.tensor(p)
        ref.step([param])
        ema = train_step.update_ema(ema, {"unet": {"w": jnp.asarray(p)}}, k, decay)
        np.testing.assert_allclose(np.asarray(ema["unet"]["w"]), ref.shadow_params[0].numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=f"update {k}")
    np.testing.assert_array_equal(  # the first update copies the weights (decay 0)
        np.asarray(train_step.update_ema({"unet": {"w": jnp.zeros(5)}}, {"unet": {"w": jnp.asarray(seq[0])}},
                                         0, decay)["unet"]["w"]), seq[0])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_equal_diffusers(prediction_type):
    """diffusers' `compute_snr` and the weights of its train_text_to_image.py Min-SNR branch (ε: / SNR,
    v: / (SNR + 1), x_0: none), on a normal schedule."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type)
    t = torch.tensor([0, 10, 300, 700, 999])
    snr = compute_snr(sched, t)
    w = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        w = w / snr
    elif prediction_type == "v_prediction":
        w = w / (snr + 1)
    cfg = noise_schedule.ScheduleConfig.from_diffusers_config(dict(sched.config), class_name="DDPMScheduler")
    ours_snr = noise_schedule.snr(noise_schedule.alphas_cumprod(cfg), jnp.asarray(t.numpy()))
    ours = noise_schedule.min_snr_weights(ours_snr, 5.0, prediction_type)
    # SNR spans 1e-4 .. 1e3: float32 relative error of ᾱ / (1 - ᾱ) near ᾱ -> 1 is ~1e-6 / (1 - ᾱ)
    np.testing.assert_allclose(np.asarray(ours_snr), snr.numpy(), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(ours), w.numpy(), rtol=1e-4)


def test_min_snr_is_finite_at_zero_terminal_snr():
    """ε-prediction on a zero-terminal-SNR schedule: SNR(T-1) = 0, where min(SNR, γ) / SNR -> 1 (not 0/0)."""
    cfg = noise_schedule.ScheduleConfig.from_diffusers_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "rescale_betas_zero_snr": True}, class_name="DDPMScheduler")
    ac = noise_schedule.alphas_cumprod(cfg)
    t = jnp.array([0, 500, 999])
    snr = noise_schedule.snr(ac, t)
    assert float(snr[-1]) == 0.0
    for kind in ("epsilon", "v_prediction", "sample"):
        w = np.asarray(noise_schedule.min_snr_weights(snr, 5.0, kind))
        assert np.isfinite(w).all(), kind
    np.testing.assert_array_equal(np.asarray(noise_schedule.min_snr_weights(snr, 5.0, "epsilon"))[-1], 1.0)
    assert math.isclose(float(noise_schedule.min_snr_weights(snr, 5.0, "sample")[-1]), 0.0)
