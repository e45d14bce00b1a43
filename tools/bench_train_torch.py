"""The PyTorch side of `bench_train.py`: diffusers' DreamBooth training step (train_dreambooth.py; LoRA rows:
train_dreambooth_lora[_sdxl].py's peft adapters) on the same synthetic workload as our rows, timed the same
way."""

from __future__ import annotations

from bench_train_common import features, instance_rows, make_row, model_configs, synthetic_batch, time_loop


def torch_models(feats: dict, models: dict, dev):
    """(unet, vae, text encoders, trained params) as diffusers' DreamBooth scripts set them up under bf16
    mixed precision: trained modules fp32 (autocast computes in bf16), frozen ones bf16; LoRA
    (train_dreambooth_lora[_sdxl].py): peft adapters on the frozen bf16 base, their params fp32
    (`cast_training_params`)."""
    # heavy and optional: the PyTorch reference (torch, diffusers, peft) loads only where it runs
    import diffusers
    import torch
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth_jax import lora

    unet = diffusers.UNet2DConditionModel.from_config(models["unet_cfg"].to_diffusers_config()).to(dev)
    vae = diffusers.AutoencoderKL.from_config(models["vae_cfg"].to_diffusers_config()).to(dev, torch.bfloat16)
    texts = [CLIPTextModel(CLIPTextConfig(**models["text_cfg"].to_diffusers_config(with_projection=False)))]
    if "text_cfg_2" in models:  # SDXL
        config = models["text_cfg_2"].to_diffusers_config(with_projection=True)
        texts.append(CLIPTextModelWithProjection(CLIPTextConfig(**config)))
    vae.requires_grad_(False)
    trained = [unet, *texts] if feats["text_encoder"] else [unet]
    rank = feats["lora"]
    for module in (unet, *texts):
        trains = module is unet or feats["text_encoder"]
        module.to(dev).requires_grad_(trains and not rank)
        if rank or not trains:
            module.to(torch.bfloat16)  # frozen weights (LoRA's base too) in the compute dtype
        if rank and trains:
            targets = lora.UNET_TARGETS if module is unet else lora.TEXT_ENCODER_TARGETS
            config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(targets))
            if module is unet:
                unet.add_adapter(config)
            else:  # what transformers' `add_adapter` does (transformers 5's wants peft >= 0.22)
                inject_adapter_in_model(config, module)
    if rank:
        cast_training_params(trained, dtype=torch.float32)
    if feats["remat"]:
        unet.enable_gradient_checkpointing()
        for text in trained[1:]:  # renamed in transformers 5
            (getattr(text, "activation_checkpointing_enable", None) or text.gradient_checkpointing_enable)()
    return unet, vae, texts, [p for m in trained for p in m.parameters() if p.requires_grad]


def torch_conditioning(texts, batch) -> tuple:
    """(context, the UNet's added_cond_kwargs or None) as diffusers' scripts compute them: SD 1.5 the
    encoder's last hidden state; SDXL (train_dreambooth_lora_sdxl.py's `encode_prompt`) both encoders'
    penultimate hidden states concatenated, the second's projected pooled output and the time ids."""
    import torch

    if len(texts) == 1:
        return texts[0](batch["input_ids"].long())[0], None
    out = texts[0](batch["input_ids"].long(), output_hidden_states=True)
    out_2 = texts[1](batch["input_ids_2"].long(), output_hidden_states=True)
    context = torch.cat([out.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    return context, {"text_embeds": out_2.text_embeds, "time_ids": batch["time_ids"]}


def bench_torch(name: str, args, device: str = "cuda") -> dict:
    """diffusers' DreamBooth scripts' step on the same workload: AdamW, noise MSE of the instance half plus
    the class half, gradients clipped at norm 1. Off CUDA (`--torch_device cpu`) only as a smoke check."""
    import diffusers
    import torch
    import torch.nn.functional as F

    feats, dev = features(name), torch.device(device)
    rows = instance_rows(feats, args)
    models = model_configs(args)
    unet, vae, texts, params = torch_models(feats, models, dev)
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=1e-2)
    sched = diffusers.DDPMScheduler.from_config(models["scheduler_config"])
    host = synthetic_batch(models["text_cfg"], models["vae_cfg"], feats["cached"], rows, args.resolution,
                           text_2=models.get("text_cfg_2"))
    batch = {k: torch.from_numpy(v[0]).to(dev) for k, v in host.items()}
    nchw = {k: v.permute(0, 3, 1, 2).contiguous() for k, v in batch.items() if v.ndim == 4}
    losses = []

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            with torch.no_grad():
                if feats["cached"]:
                    mean, logvar = nchw["latent_mean"], nchw["latent_logvar"]
                    latents = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
                else:
                    latents = vae.encode(nchw["images"].to(torch.bfloat16)).latent_dist.sample()
                latents = latents.float() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), device=dev)
            with torch.set_grad_enabled(feats["text_encoder"]):
                context, added = torch_conditioning(texts, batch)
            noisy = sched.add_noise(latents, noise, t)
            pred = unet(noisy, t, context, added_cond_kwargs=added).sample.float()
        (pred_i, pred_p), (noise_i, noise_p) = pred.chunk(2), noise.chunk(2)
        loss = F.mse_loss(pred_i, noise_i) + F.mse_loss(pred_p, noise_p)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    cuda = dev.type == "cuda"
    step_s = time_loop(step, torch.cuda.synchronize if cuda else (lambda: None), args.warmup, args.steps)
    opt_bytes = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return make_row("diffusers", name, "adamw", args,
                    device=torch.cuda.get_device_name() if cuda else dev.type, chips=1, rows=rows,
                    step_s=step_s, peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
                    memory={"optimizer": opt_bytes}, loss=float(losses[-1]))
