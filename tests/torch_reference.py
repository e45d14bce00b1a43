"""The reference for the trainer's options: the same DreamBooth steps in PyTorch, with diffusers' UNet,
DDPMScheduler, `compute_snr`, `get_scheduler` and `EMAModel`, transformers' CLIP text encoder, torch's
`clip_grad_norm_` and the optimizers' own PyTorch implementations.

Only the random draws of each example (z_0, ε, the offset-noise draw, t) and the batch layout (which image and
prompt each row holds) come from our code (`step.draw_example_inputs`, `inputs.TrainInputs`): they are the
inputs. Everything the options change (targets, weights, losses, clipping, optimizer, schedule, EMA) is
computed here by the reference libraries.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import torch

from dreambooth_jax import parallel
from dreambooth_jax.pipeline import load_pipeline
from dreambooth_jax.training import step as train_step
from dreambooth_jax.training.concepts import read_concepts
from dreambooth_jax.training.config import TrainConfig
from dreambooth_jax.training.data import DreamBoothData
from dreambooth_jax.training.inputs import TrainInputs
from dreambooth_jax.training.specs import BatchSpec


def _nchw(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x, np.float32)).permute(0, 3, 1, 2).contiguous()


@dataclasses.dataclass
class StepInputs:
    latents: torch.Tensor  # z_0 [B, C, h, w]
    noise: torch.Tensor  # ε
    offset: torch.Tensor  # the offset-noise draw [B, C, 1, 1]
    timesteps: torch.Tensor
    is_prior: np.ndarray
    prompts: list[str]
    time_ids: torch.Tensor | None = None  # SDXL's [B, 6] size and crop conditioning, from our batch


class OurInputs:
    """The inputs of each step of a run of `cfg` (one device, no accumulation), as our trainer draws them."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.pipe = load_pipeline(cfg.pretrained_model_name_or_path)
        data = DreamBoothData(read_concepts(cfg), resolution=cfg.resolution, center_crop=cfg.center_crop,
                              random_flip=cfg.random_flip, seed=cfg.seed)
        if cfg.with_prior_preservation:
            data.add_class_images()
        self.concepts = read_concepts(cfg)
        self.inputs = TrainInputs(BatchSpec.of(cfg), self.pipe, data, parallel.data_mesh())
        self.spec = train_step.StepSpec.of(self.pipe,
                                           noise_offset=cfg.noise_offset if cfg.offset_noise else 0.0)

    def step(self, step: int) -> StepInputs:
        batch = jax.tree.map(lambda x: x[0], self.inputs.host_batch(step))  # the one micro-batch
        rng = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), step)
        draws = train_step.draw_example_inputs(self.spec, self.pipe.params, batch, rng)
        c = self.concepts[0]
        prompts = [c.class_prompt if p else c.instance_prompt for p in batch["is_prior"]]
        time_ids = torch.tensor(np.asarray(batch["time_ids"])) if "time_ids" in batch else None
        return StepInputs(_nchw(draws["latents"]), _nchw(draws["noise"]), _nchw(draws["offset"]),
                          torch.tensor(np.asarray(draws["timesteps"]), dtype=torch.long),
                          np.asarray(batch["is_prior"]), prompts, time_ids)


class TorchTrainer:
    """diffusers-style DreamBooth training in PyTorch, fp32 on CPU: the UNet, and with --train_text_encoder
    the text encoder(s) (at --text_encoder_lr). SDXL pipelines as diffusers' `train_dreambooth_lora_sdxl.py`
    conditions the UNet (`encode_prompt`, `added_cond_kwargs`)."""

    def __init__(self, cfg: TrainConfig, max_steps: int):
        # diffusers and transformers' PyTorch models: heavy, loaded only when a reference runs
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        path = cfg.pretrained_model_name_or_path
        self.cfg = cfg
        with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
            self.sdxl = json.load(f)["_class_name"] == "StableDiffusionXLPipeline"
        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").train()
        self.encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval()]
        self.tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
        if self.sdxl:
            encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2")
            self.encoders.append(encoder_2.eval())
            self.tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
        self.text_encoder, self.tokenizer = self.encoders[0], self.tokenizers[0]
        self.scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        params = list(self.unet.parameters())
        groups = [{"params": params}]
        if cfg.train_text_encoder:
            groups.append({"params": [p for e in self.encoders for p in e.parameters()],
                           "lr": cfg.text_encoder_lr or cfg.learning_rate})
        self.trained = [p for g in groups for p in g["params"]]
        self.optimizer = make_torch_optimizer(cfg, groups)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=max_steps,
                                          num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
        self.ema = EMAModel(params, decay=cfg.ema_decay) if cfg.use_ema else None

    def text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, pooled or None) of `prompts`."""
        outs = []
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            length = self.cfg.tokenizer_max_length or tokenizer.model_max_length
            tok = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                            return_tensors="pt")
            mask = tok.attention_mask if self.cfg.text_encoder_use_attention_mask else None
            with torch.set_grad_enabled(self.cfg.train_text_encoder):
                outs.append(encoder(tok.input_ids, attention_mask=mask, output_hidden_states=True,
                                    return_dict=False))
        if not self.sdxl:
            return outs[0][0], None
        # diffusers' train_dreambooth_lora_sdxl.py `encode_prompt`: each encoder's hidden_states[-2],
        # concatenated; the pooled embedding is the last encoder's first output (text_embeds of the projection
        # model).
        return torch.cat([out[-1][-2] for out in outs], dim=-1), outs[-1][0]

    def loss(self, x: StepInputs) -> tuple[torch.Tensor, dict]:
        cfg, sched = self.cfg, self.scheduler
        noise = x.noise + (cfg.noise_offset * x.offset if cfg.offset_noise else 0.0)
        noisy = sched.add_noise(x.latents, noise, x.timesteps)
        context, pooled = self.text(x.prompts)
        added = {"text_embeds": pooled, "time_ids": x.time_ids} if self.sdxl else None
        pred = self.unet(noisy, x.timesteps, context, added_cond_kwargs=added).sample
        kind = sched.config.prediction_type
        target = {"epsilon": noise, "v_prediction": sched.get_velocity(x.latents, noise, x.timesteps),
                  "sample": x.latents}[kind]
        mse = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma is not None:  # diffusers' train_text_to_image.py Min-SNR branch
            from diffusers.training_utils import compute_snr  # heavy: only --snr_gamma's reference needs it

            snr = compute_snr(sched, x.timesteps)
            weights = torch.stack([snr, cfg.snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
            if kind == "epsilon":
                weights = weights / snr
            elif kind == "v_prediction":
                weights = weights / (snr + 1)
            mse = mse * weights
        prior = torch.tensor(x.is_prior)
        instance_loss = mse[~prior].mean()
        prior_loss = mse[prior].mean() if prior.any() else torch.zeros(())
        loss = instance_loss + cfg.prior_loss_weight * prior_loss
        return loss, {"loss": loss.item(), "instance_loss": instance_loss.item(),
                      "prior_loss": prior_loss.item()}

    def train_step(self, x: StepInputs) -> dict:
        lr = self.optimizer.param_groups[0]["lr"]
        loss, metrics = self.loss(x)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.trained, self.cfg.max_grad_norm
                                              if self.cfg.max_grad_norm > 0 else float("inf"))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        if self.ema is not None:
            self.ema.step(self.unet.parameters())
        return {**metrics, "grad_norm": float(norm), "lr": lr}

    def weights(self, ema: bool = False) -> dict[str, np.ndarray]:
        if ema:
            return {name: p.detach().numpy().copy() for (name, _), p in
                    zip(self.unet.named_parameters(), self.ema.shadow_params)}
        return {name: p.detach().numpy().copy() for name, p in self.unet.named_parameters()}


def make_torch_optimizer(cfg: TrainConfig, params):
    b2 = cfg.adam_beta2
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, b2 or 0.999),
                                 eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor  # PyTorch optimizer: only --optimizer adafactor

        return Adafactor(params, lr=cfg.learning_rate, relative_step=False, scale_parameter=True,
                         warmup_init=False, weight_decay=cfg.adam_weight_decay)
    if cfg.optimizer == "lion":
        from lion_pytorch import Lion  # optional test extra: only --optimizer lion needs it

        return Lion(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, b2 or 0.99),
                    weight_decay=cfg.adam_weight_decay)
    from prodigyopt import Prodigy  # optional test extra: only --optimizer prodigy needs it

    return Prodigy(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, b2 or 0.999), eps=cfg.adam_epsilon,
                   weight_decay=cfg.adam_weight_decay)


def reference_run(cfg: TrainConfig, steps: int) -> tuple[TorchTrainer, list[dict]]:
    """`steps` steps of `cfg` in PyTorch, on our runs' inputs; returns (the trainer, per-step metrics)."""
    ours, ref = OurInputs(cfg), TorchTrainer(cfg, steps)
    metrics = [ref.train_step(ours.step(s)) for s in range(steps)]
    return ref, metrics


def read_metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "logs", "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def exported_unet(output_dir) -> dict[str, np.ndarray]:
    """The UNet our run exported, read by diffusers (PyTorch layout and names)."""
    from diffusers import UNet2DConditionModel  # heavy: loaded only when a test reads an export

    unet = UNet2DConditionModel.from_pretrained(output_dir, subfolder="unet")
    return {name: p.detach().numpy() for name, p in unet.named_parameters()}


def assert_same_training(ours: dict, ref: dict, init: dict, *, max_mismatch: float = 1e-2) -> None:
    """Our trained weights equal the reference's, for every weight but the few whose update a sign decided.

    Error budget: the two UNets compute the gradients in float32 in different orders, ~1e-5 relative apart.
    Adam's first steps and Lion move each weight by ~lr x sign(update), so a weight whose update is within
    that noise of zero may move the other way or by another amount: those are rare (measured on the tiny UNet:
    up to 1e-3 of the weights with AdamW at eps 1e-6, 1e-4 with Lion, none with Adafactor), and the test
    allows `max_mismatch` of them; a wrong rule (decay, moment, schedule, EMA) moves nearly every weight.
    Every other weight must be within 1e-4 of the largest move, plus a few float32 ulps of the weight itself
    (and the moves must be real: a run that did not train fails).
    """
    assert ours.keys() == ref.keys()
    moved = np.concatenate([(ref[k] - init[k]).ravel() for k in ref])
    scale = np.abs(moved).max()
    assert scale > 0, "the reference did not train"
    diff = np.concatenate([(ours[k] - ref[k]).ravel() for k in ref])
    magnitude = np.concatenate([np.abs(ref[k]).ravel() for k in ref])
    # plus the float32 rounding of the weights themselves: half an ulp per step on each side, a few steps
    bad = np.abs(diff) > 1e-4 * scale + 4 * np.finfo(np.float32).eps * magnitude
    assert bad.mean() <= max_mismatch, (
        f"{bad.sum()} of {bad.size} weights differ by more than 1e-4 of the largest move {scale:.3g} "
        f"(max difference {np.abs(diff).max():.3g})")
