"""Text -> image generation: one jit-compiled program (text encoders, the whole denoising loop as a
`lax.scan`, VAE decode), data parallel over every device.

    images = generate(pipe, ["a photo of sks dog"], num_inference_steps=30, scheduler="dpmpp_2m", seed=0)

Image `i` of a call starts from the noise of seed `seed + i` (and draws its ancestral noise from it), so an
image depends on its own seed only: not on the batch it was generated in, nor on the number of devices.

`subject_params` samples K parameter sets (e.g. K DreamBooth subjects trained together) in the same program,
vmapped over their leading axis: images [K, N, H, W, 3], set k's images as a call with those params would
give.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dreambooth_jax import parallel
from dreambooth_jax.diffusion.samplers import SCHEDULER_NAMES, make_sampler, scheduler_name_for
from dreambooth_jax.errors import UsageError

log = logging.getLogger(__name__)


def _interleave(a, b):
    """[B, ...], [B, ...] -> [2B, ...] as a0, b0, a1, b1...: each device keeps its own examples' pairs."""
    return jnp.stack([a, b], axis=1).reshape(-1, *a.shape[1:])


def rescale_guidance(noise_cfg, noise_cond, guidance_rescale):
    """Guidance rescale (Lin et al. 2023, sec. 3.4), as diffusers' `rescale_noise_cfg`."""
    axes = tuple(range(1, noise_cfg.ndim))
    std_cond = jnp.std(noise_cond, axis=axes, keepdims=True)
    std_cfg = jnp.std(noise_cfg, axis=axes, keepdims=True)
    rescaled = noise_cfg * (std_cond / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def full_view(height: int, width: int, n: int) -> np.ndarray:
    """The geometry of `n` generated pictures [n, 6] (as a family's `view_inputs` takes it): their own size,
    uncropped."""
    return np.tile(np.array([[height, width, 0, 0, height, width]], np.float32), (n, 1))


def _runner(pipe, params):
    """run(component, *args, **kwargs): the pipeline's module `component` applied with its params."""
    return lambda name, *args, **kwargs: pipe.modules[name].apply({"params": params[name]}, *args, **kwargs)


def _sample(params, tokens, neg_tokens, empty, noise, seeds, guidance_scale, guidance_rescale, *, pipe,
            sampler, cfg: bool, sharded: bool = False):
    """The compiled program: conditioning -> denoising scan -> decode. Batch-sharded inputs, images out."""
    family, run = pipe.family, _runner(pipe, params)
    denoiser = family.denoiser
    cond = family.encode(run, tokens)
    if cfg:
        negative = family.negative(family.encode(run, neg_tokens), empty, pipe.model_index)
        cond = jax.tree.map(_interleave, negative, cond)
    rows = len(noise) * (2 if cfg else 1)
    h, w = noise.shape[1] * pipe.vae_scale_factor, noise.shape[2] * pipe.vae_scale_factor
    inputs = jax.tree.map(jnp.asarray, family.view_inputs(full_view(h, w, rows)))
    if family.guidance == "embedded":
        inputs["guidance"] = jnp.full((rows,), guidance_scale, jnp.float32)
    step_keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), 1))(seeds)
    timesteps = jnp.asarray(sampler.timesteps)
    latents = noise.astype(jnp.float32) * sampler.init_noise_sigma
    state = jax.vmap(sampler.init_state)(latents)

    def body(carry, i):
        latents, state = carry
        step_run = run
        if sharded:
            # The denoiser's params tied to this step's latents, so that XLA cannot hoist their
            # (loop-invariant) fsdp all-gathers out of the loop: a gathered copy of the whole model per
            # device. Not when replicated: there it would redo loop-invariant casts every step.
            step_params, latents = jax.lax.optimization_barrier(({denoiser: params[denoiser]}, latents))
            step_run = _runner(pipe, {**params, **step_params})
        x = sampler.scale_model_input(latents, i).astype(pipe.denoiser.dtype)
        if cfg:
            x = _interleave(x, x)
        out = family.denoise(step_run, x, timesteps[i], cond, inputs).astype(jnp.float32)
        if cfg:
            out = out.reshape(-1, 2, *out.shape[1:])
            uncond_out, cond_out = out[:, 0], out[:, 1]
            out = uncond_out + guidance_scale * (cond_out - uncond_out)
            out = jnp.where(guidance_rescale > 0, rescale_guidance(out, cond_out, guidance_rescale), out)
        keys = jax.vmap(jax.random.fold_in, (0, None))(step_keys, i)
        latents, state = jax.vmap(sampler.step, (0, None, 0, 0, 0))(state, i, out, latents, keys)
        return (latents, state), None

    (latents, _), _ = jax.lax.scan(body, (latents, state), jnp.arange(sampler.num_model_calls))
    vae = pipe.vae
    images = vae.apply({"params": params["vae"]}, vae.unscale_latents(latents).astype(vae.dtype),
                       method=vae.decode)
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def _sample_sets(params, subject, *args, pipe, sampler, cfg: bool, sharded: bool):
    """`_sample`, vmapped over the leading (set) axis of the `subject` networks' params when there are any:
    images [K, B, H, W, 3]; the other networks (`params`) and the batch are shared by the K sets."""
    sample = functools.partial(_sample, pipe=pipe, sampler=sampler, cfg=cfg, sharded=sharded)
    if not subject:
        return sample(params, *args)
    axes = {net: 0 if net in subject else None for net in (*params, *subject)}
    return jax.vmap(sample, in_axes=(axes, *[None] * len(args)))({**params, **subject}, *args)


def _compiled(pipe, sampler_key: tuple, cfg: bool, subject_nets: tuple[str, ...], mesh):
    """The jitted sampling program for (scheduler, steps, eta, karras, the denoiser's image sequence length;
    cfg, networks with a set axis), cached on the pipeline. With `subject_nets`, the examples are axis 1 of
    the [K, B, ...] output."""
    cache = pipe.cache.setdefault("sampling", {})
    key = (sampler_key, cfg, subject_nets, tuple(d.id for d in mesh.devices.flat), tuple(mesh.shape.items()))
    if key not in cache:
        name, steps, eta, karras, image_seq_len = sampler_key
        sampler = make_sampler(name, pipe.scheduler_config, steps, eta=eta, use_karras_sigmas=karras,
                               image_seq_len=image_seq_len)
        batch, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
        out = parallel.batch_sharding(mesh, batch_axis=1 if subject_nets else 0)
        fn = functools.partial(_sample_sets, pipe=pipe, sampler=sampler, cfg=cfg,
                               sharded=parallel.fsdp_size(mesh) > 1)
        shared = _param_shardings({n: p for n, p in pipe.params.items() if n not in subject_nets}, mesh)
        cache[key] = jax.jit(fn, in_shardings=(shared, repl, batch, batch, batch, batch, batch, repl, repl),
                             out_shardings=out)
    return cache[key]


def _param_shardings(params: dict, mesh):
    """Replicated on a data mesh; on a mesh with an `fsdp` axis, split over it by the fsdp rule: models that
    fit no single device (Flux.1's 24 GB transformer and 9.5 GB T5 in bf16 on a 16 GB chip) are gathered
    layer by layer as the program runs."""
    if parallel.fsdp_size(mesh) > 1:
        return parallel.state_shardings(params, mesh)
    return parallel.replicated(mesh)


def _check_subject_params(pipe, subject_params: dict) -> None:
    """UsageError unless `subject_params` maps networks of `pipe` to their params with a leading set axis [K]
    on every leaf, the same K >= 1 for all."""
    if not subject_params or set(subject_params) - set(pipe.params):
        raise UsageError("subject_params must map networks of the pipeline "
                         f"({', '.join(sorted(pipe.params))}) to params with a leading set axis; got "
                         f"{sorted(subject_params) or 'none'}")
    sizes = set()
    for net, tree in subject_params.items():
        leaves, treedef = jax.tree.flatten(tree)
        ref_leaves, ref_treedef = jax.tree.flatten(pipe.params[net])
        if treedef != ref_treedef or any(np.ndim(x) != np.ndim(r) + 1 or np.shape(x)[1:] != np.shape(r)
                                         for x, r in zip(leaves, ref_leaves)):
            raise UsageError(f"subject_params[{net!r}] must be the pipeline's {net} params with a leading "
                             "set axis [K] on every leaf (got another tree structure or other leaf shapes)")
        sizes.update(np.shape(x)[0] for x in leaves)
    if len(sizes) != 1 or min(sizes) < 1:
        raise UsageError("every leaf of subject_params needs the same leading size K >= 1; got sizes "
                         f"{sorted(sizes)}")


def _noise(seeds: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal starting latents, image i from `PRNGKey(seeds[i])` alone."""
    return np.asarray(jax.jit(jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), shape)))(seeds))


def _check_size(pipe, height, width) -> tuple[int, int]:
    f = pipe.vae_scale_factor * pipe.family.latent_patch
    default = pipe.family.sample_size(pipe)
    height, width = height or default, width or default
    if height % f or width % f or height <= 0 or width <= 0:
        what = "the VAE's downscaling factor" + (" times the denoiser's patch side"
                                                 if pipe.family.latent_patch > 1 else "")
        raise UsageError(f"height and width must be positive multiples of {f} ({what}); got {height}x{width}")
    return height, width


def _max_length(family, max_sequence_length: int | None) -> int | None:
    """The prompt length of the family's long-prompt encoder (Flux's T5): the given one or the family's."""
    if max_sequence_length is None:
        return family.max_sequence_length
    if family.max_sequence_length is None:
        raise UsageError(f"max_sequence_length applies to families with a long-prompt text encoder (Flux's "
                         f"T5), not to {family.name}")
    if not 1 <= max_sequence_length <= 512:
        raise UsageError(f"max_sequence_length must be in [1, 512] (T5's trained length, as diffusers "
                         f"allows); got {max_sequence_length}")
    return max_sequence_length


def generate(pipe, prompts: Sequence[str], *, negative_prompts=None, num_inference_steps: int | None = None,
             guidance_scale: float | None = None, scheduler: str | None = None, seed: int = 0, latents=None,
             height: int | None = None, width: int | None = None, eta: float = 0.0,
             guidance_rescale: float = 0.0, use_karras_sigmas: bool | None = None,
             batch_size: int | None = None, mesh=None, progress: bool = False,
             subject_params: dict | None = None, max_sequence_length: int | None = None) -> np.ndarray:
    """Generates one image per prompt (per parameter set, with `subject_params`).

    Args:
      pipe: what `dreambooth_jax.load_pipeline` returns.
      prompts: the prompts, one image each.
      negative_prompts: one string for all, or one per prompt (default: none, encoded as "" or, for SDXL
        pipelines with `force_zeros_for_empty_prompt`, zero conditioning, as diffusers does).
      num_inference_steps: denoising steps (default: the family's, as diffusers' pipelines: 50; Flux.1-dev 28,
        -schnell 4).
      scheduler: a name of `SCHEDULER_NAMES` (default: the pipeline's own scheduler).
      seed: image i starts from the noise of seed `seed + i`.
      latents: optional starting noise [N, H/f, W/f, C], f the VAE's downscaling factor (unscaled, as
        diffusers' `latents=` in NHWC; for Flux unpacked: diffusers' FluxPipeline takes it packed).
      guidance_scale: classifier-free guidance (<= 1 turns it off), or for guidance-distilled models
        (Flux.1-dev) the transformer's guidance input; None: the family's default, as diffusers' pipeline
        of the family (SD 7.5, SDXL 5.0, Flux.1-dev 3.5; Flux.1-schnell takes none).
      guidance_rescale: 0 (off) to 1.
      max_sequence_length: the T5 prompt length of Flux pipelines (default: dev 512, schnell 256; at most
        512).
      batch_size: images per compiled call (default: all at once); each call is padded to the device count.
      mesh: the device mesh (default: all devices, data parallel). A `parallel.train_mesh(fsdp=k)` shards
        the networks' params over groups of k devices (load with weights="host" so that no device holds a
        whole copy first); the examples split over every device either way.
      subject_params: optional {network name of `pipe.params` ('unet', 'text_encoder', ...): its params with a
        leading axis K on every leaf}: K parameter sets (e.g. K DreamBooth subjects) sampled in one program,
        the other networks shared. Set k's images are those of `pipe` with its params of each such network
        replaced by entry k of every leaf, from the same seeds.

    Returns:
      float32 images [N, H, W, 3] in [0, 1]; [K, N, H, W, 3] with `subject_params`.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise UsageError("no prompts given")
    # Some families zero the negative conditioning when no negative prompt is given (None; SDXL where the
    # pipeline's `force_zeros_for_empty_prompt` is set, as diffusers does); an explicit "" is encoded as any
    # prompt.
    zero_negative = negative_prompts is None
    if negative_prompts is None or isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts or ""] * len(prompts)
    if len(negative_prompts) != len(prompts):
        raise UsageError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    name = scheduler or scheduler_name_for(pipe.scheduler_config)
    if name not in SCHEDULER_NAMES:
        raise UsageError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    height, width = _check_size(pipe, height, width)
    max_length = _max_length(pipe.family, max_sequence_length)
    if num_inference_steps is None:
        num_inference_steps = pipe.family.num_inference_steps
    f, n = pipe.vae_scale_factor, len(prompts)
    shape = (height // f, width // f, pipe.vae.config.latent_channels)
    seeds = np.arange(seed, seed + n, dtype=np.int64).astype(np.uint32)
    if latents is None:
        latents = _noise(seeds, shape)
    latents = np.asarray(latents, np.float32)
    if latents.shape != (n, *shape):
        raise UsageError(f"latents must have shape {(n, *shape)} (N, H/{f}, W/{f}, C); got {latents.shape}")
    if subject_params is not None:
        _check_subject_params(pipe, subject_params)

    guidance_scale = pipe.family.guidance_scale if guidance_scale is None else guidance_scale
    cfg = pipe.family.guidance == "classifier_free" and guidance_scale > 1.0
    if not zero_negative and pipe.family.guidance != "classifier_free":
        log.warning("%s takes no negative prompt (no classifier-free guidance): ignored", pipe.family.name)
    tokens = pipe.family.tokenize(pipe.tokenizers, prompts, max_length)
    neg_tokens = (pipe.family.tokenize(pipe.tokenizers, negative_prompts, max_length) if cfg
                  else {k: np.zeros_like(v) for k, v in tokens.items()})
    empty = np.full(len(prompts), zero_negative)
    mesh = mesh or parallel.data_mesh()
    subject = dict(subject_params or {})
    patch = pipe.family.latent_patch
    image_seq_len = (shape[0] // patch) * (shape[1] // patch)  # the flow samplers' shift depends on it
    fn = _compiled(pipe, (name, num_inference_steps, eta, use_karras_sigmas, image_seq_len), cfg,
                   tuple(sorted(subject)), mesh)
    # Replicated (a no-op for arrays already placed so); the networks with a set axis are not shared.
    shared = {net: p for net, p in pipe.params.items() if net not in subject}
    if parallel.fsdp_size(mesh) > 1:  # host arrays (weights="host") move straight to their shards
        params = parallel.put_sharded(shared, _param_shardings(shared, mesh))
    else:
        params = parallel.put_replicated(shared, mesh)
    subject = parallel.put_replicated(subject, mesh)

    per_call = batch_size or n
    out = []
    chunks = range(0, n, per_call)
    if progress:
        chunks = tqdm(chunks, desc="generating", unit="batch")
    for start in chunks:
        stop = min(start + per_call, n)
        padded = parallel.pad_to_multiple(stop - start, mesh.size)
        # Pad with copies of the last example (dropped afterwards) so every device gets the same share.
        pad = lambda a: np.concatenate(  # noqa: E731,B023
            [a[start:stop], np.repeat(a[stop - 1 : stop], padded - (stop - start), 0)])  # noqa: B023
        args = ({k: pad(v) for k, v in tokens.items()}, {k: pad(v) for k, v in neg_tokens.items()},
                pad(empty), pad(latents), pad(seeds))
        with parallel.traced_on(mesh):  # the first call traces
            images = fn(params, subject, *parallel.put_batch(args, mesh), jnp.float32(guidance_scale),
                        jnp.float32(guidance_rescale))
        # the examples: axis -4, [[K,] B, H, W, 3]
        out.append(parallel.fetch(images)[..., : stop - start, :, :, :])
    return np.concatenate(out, axis=-4)


def sampling_memory(pipe, batch: int, *, height: int | None = None, width: int | None = None,
                    num_inference_steps: int | None = None, scheduler: str | None = None,
                    guidance_scale: float | None = None, max_sequence_length: int | None = None,
                    mesh=None) -> dict:
    """What one device holds while `generate` draws `batch` images per call, from the program compiled ahead
    of time for shapes alone: nothing is allocated, so a `load_pipeline(..., weights="none")` pipeline of a
    full-size model works on any machine (with simulated or compile-only devices as `mesh`).

    Returns {"devices", "mesh", "compiler", "per_device_bytes": {"params", "temp", "total"}, "compile_s"}:
    params from the shardings (exact on any backend), temporaries and total from XLA's `memory_analysis()`
    of the executable of the devices' own compiler (None where that backend gives none).
    """
    mesh = mesh or parallel.data_mesh()
    name = scheduler or scheduler_name_for(pipe.scheduler_config)
    height, width = _check_size(pipe, height, width)
    max_length = _max_length(pipe.family, max_sequence_length)
    if num_inference_steps is None:
        num_inference_steps = pipe.family.num_inference_steps
    f, patch = pipe.vae_scale_factor, pipe.family.latent_patch
    shape = (height // f, width // f, pipe.vae.config.latent_channels)
    guidance_scale = pipe.family.guidance_scale if guidance_scale is None else guidance_scale
    cfg = pipe.family.guidance == "classifier_free" and guidance_scale > 1.0
    rows = parallel.pad_to_multiple(batch, mesh.size)
    tokens = pipe.family.tokenize(pipe.tokenizers, [""], max_length)
    struct = jax.ShapeDtypeStruct
    token_structs = {k: struct((rows, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in tokens.items()}
    image_seq_len = (shape[0] // patch) * (shape[1] // patch)
    fn = _compiled(pipe, (name, num_inference_steps, 0.0, None, image_seq_len), cfg, (), mesh)
    params = jax.tree.map(lambda x: struct(np.shape(x), x.dtype), pipe.params)
    scalar = struct((), jnp.float32)
    args = (token_structs, token_structs, struct((rows,), jnp.bool_), struct((rows, *shape), jnp.float32),
            struct((rows,), jnp.uint32))
    t0 = time.perf_counter()
    with parallel.traced_on(mesh):
        compiled = fn.lower(params, {}, *args, scalar, scalar).compile()
    compile_s = time.perf_counter() - t0
    param_bytes = parallel.per_device_bytes(params, _param_shardings(pipe.params, mesh)
                                            if parallel.fsdp_size(mesh) > 1
                                            else jax.tree.map(lambda _: parallel.replicated(mesh), params))
    temp, total = parallel.compiled_memory(compiled) or (None, None)
    per_device = {"params": int(param_bytes), "temp": temp, "total": total}
    device = mesh.devices.flat[0]
    return {"devices": int(mesh.size), "mesh": {k: int(v) for k, v in mesh.shape.items()},
            "compiler": f"{device.platform} ({device.device_kind})", "batch": batch, "height": height,
            "width": width, "per_device_bytes": per_device, "compile_s": round(compile_s, 1)}
