"""LoRA: the intercepted modules equal the merged weights, diffusers loads our files to the same outputs, both
file layouts round-trip exactly, kohya's SDXL files (LDM UNet names) merge as diffusers merges them, and
mismatched LoRAs fail with the layer's name."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file as reference_load_file
from safetensors.numpy import save_file as reference_save_file

from dreambooth_jax import lora
from dreambooth_jax.diffusion.generation import generate
from dreambooth_jax.errors import UsageError
from dreambooth_jax.models.unet import UNetConfig
from dreambooth_jax.pipeline import load_pipeline
from dreambooth_jax.weights.convert import params_to_state_dict

CONFIG = lora.LoraConfig(rank=4, alpha=8.0)  # alpha != rank: the scale (2) must survive every format
# fp32 on CPU; outputs are O(1). Measured: UNet ~1e-6 and text encoder ~1e-6 max abs error vs diffusers.
REL_TOL = 1e-5
IMAGE_TOL = 1e-4  # images in [0, 1] after 3 DDIM steps and the VAE decode
PROMPT = "a photo of sks dog"
IDS = np.array([[0, 5, 9, 3, 2] + [1] * 11])  # BOS, words, EOS, padding (the tiny tokenizer's ids)


@functools.cache
def _pipe(path):
    return load_pipeline(path)


def _random_lora(params, targets, seed):
    """A LoRA with nonzero B (as after some training)."""
    tree = lora.init_lora(params, targets, CONFIG, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return {k: {"A": v["A"], "B": jnp.asarray(0.1 * rng.standard_normal(v["B"].shape), jnp.float32)}
            for k, v in tree.items()}


def _unet_inputs(pipe):
    rng = np.random.default_rng(0)
    cross = pipe.unet.config.per_block("cross_attention_dim")[0]
    return (rng.standard_normal((1, 8, 8, 4)).astype(np.float32), jnp.asarray(500),
            rng.standard_normal((1, 16, cross)).astype(np.float32))


@functools.cache
def _lora_unet(path, remat: bool = False):
    """Jitted LoRA UNet (params, lora tree, scale, *inputs) -> output, compiled once per pipeline and
    remat."""
    unet = _pipe(path).unet.clone(remat=remat)
    return jax.jit(lambda p, tree, scale, *args: lora.apply(unet, p, tree, CONFIG, *args, scale=scale))


@functools.cache
def _plain(path, component: str):
    """Jitted `module.apply` (params, *inputs) -> output (a text encoder's last hidden state)."""
    module = getattr(_pipe(path), component)

    def fn(params, *args):
        out = module.apply({"params": params}, *args)
        return getattr(out, "last_hidden_state", out)

    return jax.jit(fn)


def _close(ours, ref, tol=REL_TOL):
    err = np.abs(np.asarray(ours) - np.asarray(ref)).max()
    assert err <= tol * np.abs(ref).max(), f"max abs error {err:.3g} vs output scale {np.abs(ref).max():.3g}"


@pytest.fixture(scope="module")
def sd1(tiny_pipelines):
    return tiny_pipelines["sd1"], _pipe(tiny_pipelines["sd1"])


@pytest.fixture(scope="module")
def loras(sd1):
    _, pipe = sd1
    return {"unet": _random_lora(pipe.params["unet"], lora.UNET_TARGETS, 0),
            "text_encoder": _random_lora(pipe.params["text_encoder"], lora.TEXT_ENCODER_TARGETS, 1)}


@pytest.fixture(scope="module")
def files(loras, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return {"diffusers": lora.save_diffusers(str(out / "diffusers"), loras, CONFIG),
            "kohya": lora.save_kohya(str(out / "kohya.safetensors"), loras, CONFIG)}


def test_targets_and_init(sd1):
    _, pipe = sd1
    paths = lora.target_paths(pipe.params["unet"], lora.UNET_TARGETS)
    assert {p[-1] for p in paths} == {"to_q", "to_k", "to_v", "to_out_0"}
    assert len(paths) % 4 == 0 and all(p[-2] in ("attn1", "attn2") for p in paths)
    assert len(lora.target_paths(pipe.params["text_encoder"], lora.TEXT_ENCODER_TARGETS)) == 4 * 3  # 3 layers
    tree = lora.init_lora(pipe.params["unet"], ["to_out.0"], CONFIG, jax.random.key(0))
    kernels = traverse_util.flatten_dict(pipe.params["unet"])
    assert tree and all(key.endswith("/to_out_0") for key in tree)
    for key, ab in tree.items():
        d_in, d_out = kernels[(*key.split("/"), "kernel")].shape
        assert ab["A"].shape == (d_in, 4) and ab["B"].shape == (4, d_out) and not ab["B"].any()
        assert ab["A"].dtype == ab["B"].dtype == jnp.float32 and np.abs(ab["A"]).max() <= 1 / np.sqrt(d_in)


@pytest.mark.parametrize("remat", [False, True])
def test_zero_b_is_exactly_the_base_model(sd1, remat):
    path, pipe = sd1
    params, args = pipe.params["unet"], _unet_inputs(pipe)
    tree = lora.init_lora(params, lora.UNET_TARGETS, CONFIG, jax.random.key(0))
    ours = _lora_unet(path, remat)(params, tree, 1.0, *args)
    assert np.array_equal(ours, _plain(path, "unet")(params, *args))


def test_unmerged_equals_merged(sd1, loras):
    path, pipe = sd1
    params, args = pipe.params["unet"], _unet_inputs(pipe)
    unmerged = _lora_unet(path)(params, loras["unet"], 1.0, *args)
    _close(unmerged, _plain(path, "unet")(lora.merge(params, loras["unet"], CONFIG), *args))
    # `scale` multiplies the update (merge's too); 0 is exactly the base model.
    _close(_lora_unet(path)(params, loras["unet"], 0.5, *args),
           _plain(path, "unet")(lora.merge(params, loras["unet"], CONFIG, scale=0.5), *args))
    assert np.array_equal(_lora_unet(path)(params, loras["unet"], 0.0, *args),
                          _plain(path, "unet")(params, *args))
    te, te_params = pipe.text_encoder, pipe.params["text_encoder"]
    unmerged = jax.jit(lambda p, t: lora.apply(te, p, t, CONFIG, IDS).last_hidden_state)(te_params,
                                                                                       loras["text_encoder"])
    _close(unmerged, _plain(path, "text_encoder")(lora.merge(te_params, loras["text_encoder"], CONFIG), IDS))


def test_gradients_reach_only_the_lora_tree_through_remat_and_dropout(sd1, loras):
    _, pipe = sd1
    unet, params, args = pipe.unet.clone(remat=True), pipe.params["unet"], _unet_inputs(pipe)
    config = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1)

    def loss(tree, rng):
        return jnp.mean(lora.apply(unet, params, tree, config, *args, dropout_rng=rng) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    value, grads = step(loras["unet"], jax.random.key(1))
    assert jax.tree.structure(grads) == jax.tree.structure(loras["unet"])
    for key, g in grads.items():
        for name in ("A", "B"):
            assert np.isfinite(g[name]).all() and np.abs(g[name]).max() > 0, f"{key}/{name}"
    # Dropout draws from the rng: the same rng gives the same loss, another rng another one.
    assert step(loras["unet"], jax.random.key(1))[0] == value != step(loras["unet"], jax.random.key(2))[0]


def _diffusers_with_lora(path, file):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(file)
    return pipe


def _diffusers_outputs(pipe, args):
    import torch

    x, t, ctx = args
    with torch.no_grad():
        unet = pipe.unet(torch.tensor(x.transpose(0, 3, 1, 2)), int(t), torch.tensor(ctx)).sample
        text = pipe.text_encoder(torch.tensor(IDS)).last_hidden_state
    return unet.numpy().transpose(0, 2, 3, 1), text.numpy()


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_diffusers_load_lora_weights_gives_our_outputs(sd1, loras, files, layout):
    path, pipe = sd1
    args = _unet_inputs(pipe)
    ref_unet, ref_text = _diffusers_outputs(_diffusers_with_lora(path, files[layout]), args)
    unet, text = _plain(path, "unet"), _plain(path, "text_encoder")
    base = np.asarray(unet(pipe.params["unet"], *args))
    assert np.abs(base - ref_unet).max() > 100 * REL_TOL * np.abs(ref_unet).max()  # the LoRA does something
    _close(unet(lora.merge(pipe.params["unet"], loras["unet"], CONFIG), *args), ref_unet)
    _close(text(lora.merge(pipe.params["text_encoder"], loras["text_encoder"], CONFIG), IDS), ref_text)
    loaded = load_pipeline(path, lora=files[layout])
    _close(unet(loaded.params["unet"], *args), ref_unet)
    _close(text(loaded.params["text_encoder"], IDS), ref_text)


def test_sdxl_second_text_encoder_and_unet_match_diffusers(tiny_pipelines, tmp_path):
    import diffusers
    import torch

    path = tiny_pipelines["sdxl"]
    pipe = _pipe(path)
    targets = {"unet": lora.UNET_TARGETS, "text_encoder_2": lora.TEXT_ENCODER_TARGETS}
    loras = {c: _random_lora(pipe.params[c], t, i) for i, (c, t) in enumerate(targets.items())}
    file = lora.save_diffusers(str(tmp_path), loras, CONFIG)
    ref_pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(path)
    ref_pipe.load_lora_weights(file)
    ours = load_pipeline(path, lora=file)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 16, 64)).astype(np.float32)
    added = {"text_embeds": rng.standard_normal((1, 32)).astype(np.float32),
             "time_ids": np.array([[64.0, 64, 0, 0, 64, 64]], np.float32)}
    with torch.no_grad():
        ref_text = ref_pipe.text_encoder_2(torch.tensor(IDS)).last_hidden_state.numpy()
        ref_unet = ref_pipe.unet(torch.tensor(x.transpose(0, 3, 1, 2)), 500, torch.tensor(ctx),
                                 added_cond_kwargs={
            k: torch.tensor(v) for k, v in added.items()}).sample.numpy().transpose(0, 2, 3, 1)
    _close(_plain(path, "text_encoder_2")(ours.params["text_encoder_2"], IDS), ref_text)
    _close(jax.jit(lambda p: ours.unet.apply({"params": p}, x, 500, ctx, **added))(ours.params["unet"]),
           ref_unet)


def test_images_match_diffusers_with_lora(sd1, files):
    import diffusers
    import torch

    path, _ = sd1
    latents = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    ref_pipe = _diffusers_with_lora(path, files["diffusers"])
    ref_pipe.scheduler = diffusers.DDIMScheduler.from_config(ref_pipe.scheduler.config)
    ref = ref_pipe(PROMPT, num_inference_steps=3, latents=torch.tensor(latents.transpose(0, 3, 1, 2)),
                   height=64, width=64, output_type="np").images
    ours = generate(load_pipeline(path, lora=files["diffusers"]), [PROMPT], num_inference_steps=3,
                    scheduler="ddim", latents=latents, height=64, width=64)
    assert ours.shape == ref.shape == (1, 64, 64, 3)
    assert np.abs(ours - ref).max() <= IMAGE_TOL


def test_file_keys(sd1, loras, files):
    _, pipe = sd1
    kohya = reference_load_file(files["kohya"])
    expected = {}
    for component, prefix, text in (("unet", "lora_unet_", ""), ("text_encoder", "lora_te_", "text_model_")):
        for key in loras[component]:
            path = tuple(key.split("/"))
            kernel = traverse_util.flatten_dict(pipe.params[component])[(*path, "kernel")]
            name = prefix + text + key.replace("/", "_")
            expected[f"{name}.lora_down.weight"] = (4, kernel.shape[0])
            expected[f"{name}.lora_up.weight"] = (kernel.shape[1], 4)
            expected[f"{name}.alpha"] = ()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in expected
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in expected
    assert {k: v.shape for k, v in kohya.items()} == expected
    assert len(kohya) == 3 * (len(loras["unet"]) + len(loras["text_encoder"]))
    assert all(v.dtype == np.float32 for v in kohya.values()) and float(next(
        v for k, v in kohya.items() if k.endswith(".alpha"))) == 8.0
    diffusers_keys = reference_load_file(files["diffusers"])
    assert ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight"
            in diffusers_keys)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in diffusers_keys
    assert len(diffusers_keys) == 2 * (len(loras["unet"]) + len(loras["text_encoder"]))


@pytest.mark.parametrize("alpha", [8.0, None, 3.0])
def test_round_trips_are_exact(loras, tmp_path, alpha):
    config = lora.LoraConfig(rank=4, alpha=alpha, dropout=0.1)
    for path in (lora.save_diffusers(str(tmp_path), loras, config),
                 lora.save_kohya(str(tmp_path), loras, config)):
        back, back_config = lora.load_lora_file(path)
        assert back_config == config
        assert jax.tree.structure(back) == jax.tree.structure(loras)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(loras)):
            assert a.dtype == np.float32
            if path.endswith(lora.WEIGHT_NAME) and config.scale == 0.75:
                # B * 0.75 was rounded to float32 in the diffusers file: dividing back can miss by an ulp.
                np.testing.assert_array_max_ulp(a, np.asarray(b), maxulp=1)
            else:
                assert np.array_equal(a, b)
    assert lora.load_lora_file(str(tmp_path))[1] == config  # a folder: its pytorch_lora_weights.safetensors


def test_kohya_names_of_every_dense_layer_of_sdxl_round_trip(tiny_pipelines, tmp_path):
    """Every Dense of the SDXL UNet and both text encoders (te1/te2 prefixes) survives kohya's '_' names."""
    pipe = _pipe(tiny_pipelines["sdxl"])
    loras = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        flat = traverse_util.flatten_dict(pipe.params[component])
        loras[component] = {"/".join(p[:-1]): {"A": np.ones((v.shape[0], 2), np.float32),
                                               "B": np.zeros((2, v.shape[1]), np.float32)}
                            for p, v in flat.items() if p[-1] == "kernel" and v.ndim == 2}
    assert any(k.endswith("ff/net_0/proj") for k in loras["unet"])
    assert "text_projection" in loras["text_encoder_2"]
    path = lora.save_kohya(str(tmp_path), loras, lora.LoraConfig(rank=2))
    assert any(k.startswith("lora_te2_text_model_") for k in reference_load_file(path))
    back, _ = lora.load_lora_file(path)
    assert {c: sorted(t) for c, t in back.items()} == {c: sorted(t) for c, t in loras.items()}
    lora.apply_file(pipe, path)  # every name resolves to a layer of the model


def test_errors(sd1, tiny_pipelines, loras, files, tmp_path):
    _, pipe = sd1
    with pytest.raises(ValueError, match=r"no Dense layer matches.*\['to_qq'\].*to_out\.0.*to_q"):
        lora.target_paths(pipe.params["unet"], ["to_qq"])
    with pytest.raises(ValueError, match="available layer names: .*q_proj"):
        lora.target_paths(pipe.params["text_encoder"], lora.UNET_TARGETS)
    # A LoRA made for another architecture: the layer's PyTorch name in the message.
    key = next(iter(loras["unet"]))
    bad = {key: {"A": loras["unet"][key]["A"][:-1], "B": loras["unet"][key]["B"]}}
    with pytest.raises(ValueError, match=rf"{lora.transform.torch_name(key)}.*does not fit"):
        lora.merge(pipe.params["unet"], bad, CONFIG)
    with pytest.raises(ValueError, match=r"unet: LoRA layer 'down_blocks\.0\..*another architecture"):
        load_pipeline(tiny_pipelines["sdxl"], lora=files["diffusers"])
    with pytest.raises(ValueError, match="not a LoRA file"):
        lora.load_lora_file(f"{tiny_pipelines['sd1']}/unet/diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError):
        lora.load_lora_file(str(tmp_path))


# kohya's SDXL names (LDM/SGM UNet) of the tiny SDXL UNet -> (component, PyTorch module), written out by hand
# from its config (layers_per_block=1; down: DownBlock2D, 2 x CrossAttn; up: 2 x CrossAttn, UpBlock2D):
# input_blocks_0 is conv_in, 1 = down 0 (resnet), 2 = its downsampler, 3 = down 1 (resnet, attention), 4 =
# downsampler, 5 = down 2; output_blocks 0-1 = up 0, 2-3 = up 1 (2 layers each), 4-5 = up 2 (no attention);
# time_embed and label_emb are the embedding MLPs. Text encoders: each has an out_proj because diffusers 0.42
# fails on a kohya text encoder LoRA without one ("Could not automatically infer state dict type"), and none
# has an mlp layer because next to one diffusers left an attention layer unloaded (reported as UNEXPECTED
# keys).
LDM_SDXL_NAMES = {
    "lora_unet_input_blocks_1_0_emb_layers_1": ("unet", "down_blocks.0.resnets.0.time_emb_proj"),
    "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q": (
        "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    "lora_unet_input_blocks_5_1_proj_in": ("unet", "down_blocks.2.attentions.0.proj_in"),
    "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k": (
        "unet", "down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k"),
    "lora_unet_middle_block_1_transformer_blocks_1_attn1_to_out_0": (
        "unet", "mid_block.attentions.0.transformer_blocks.1.attn1.to_out.0"),
    "lora_unet_middle_block_2_emb_layers_1": ("unet", "mid_block.resnets.1.time_emb_proj"),
    "lora_unet_output_blocks_1_1_transformer_blocks_0_ff_net_2": (
        "unet", "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2"),
    "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_v": (
        "unet", "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v"),
    "lora_unet_output_blocks_5_0_emb_layers_1": ("unet", "up_blocks.2.resnets.1.time_emb_proj"),
    "lora_unet_time_embed_0": ("unet", "time_embedding.linear_1"),
    "lora_unet_label_emb_0_2": ("unet", "add_embedding.linear_2"),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder",
                                                              "encoder.layers.0.self_attn.q_proj"),
    "lora_te1_text_model_encoder_layers_2_self_attn_out_proj": (
        "text_encoder", "encoder.layers.2.self_attn.out_proj"),
    "lora_te2_text_model_encoder_layers_0_self_attn_v_proj": ("text_encoder_2",
                                                              "encoder.layers.0.self_attn.v_proj"),
    "lora_te2_text_model_encoder_layers_1_self_attn_out_proj": (
        "text_encoder_2", "encoder.layers.1.self_attn.out_proj"),
}


def _write_kohya(path, shapes: dict, seed: int = 0) -> str:
    """A kohya file with random rank-4 factors for {name: (out, in)}: alpha 8 (scale 2), but 2 on the
    first."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for i, (name, (d_out, d_in)) in enumerate(shapes.items()):
        tensors[f"{name}.lora_down.weight"] = (0.1 * rng.standard_normal((4, d_in))).astype(np.float32)
        tensors[f"{name}.lora_up.weight"] = (0.1 * rng.standard_normal((d_out, 4))).astype(np.float32)
        tensors[f"{name}.alpha"] = np.array(2.0 if i == 0 else 8.0, np.float32)
    reference_save_file(tensors, str(path))
    return str(path)


def _no_text_model(state: dict) -> dict:
    """A copy (fusing a LoRA writes into torch's weights) without the 'text_model.' level, which transformers
    5's CLIPTextModel lacks (CLIPTextModelWithProjection has it)."""
    return {k.removeprefix("text_model."): np.array(v) for k, v in state.items()}


def test_kohya_sdxl_ldm_names_merge_as_in_diffusers(tiny_pipelines, tmp_path):
    import diffusers

    path, components = tiny_pipelines["sdxl"], ("unet", "text_encoder", "text_encoder_2")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(path)
    base = {c: _no_text_model(getattr(ref, c).state_dict()) for c in components}
    file = _write_kohya(tmp_path / "sdxl_ldm.safetensors",
                        {name: base[c][f"{module}.weight"].shape
                         for name, (c, module) in LDM_SDXL_NAMES.items()})
    ref.load_lora_weights(file)
    ref.fuse_lora(components=list(components))
    ref.unload_lora_weights()  # keeps the fused weights, under their plain names
    ours = load_pipeline(path, lora=file)
    for c in components:
        expected = _no_text_model(getattr(ref, c).state_dict())
        got = _no_text_model(params_to_state_dict(ours.params[c]))
        targets = {f"{module}.weight" for comp, module in LDM_SDXL_NAMES.values() if comp == c}
        assert got.keys() == expected.keys()
        # diffusers' merge
        assert {k for k in expected if not np.array_equal(expected[k], base[c][k])} == targets
        for k in expected:
            # Both add the same float32 update (W + alpha / rank * up @ down) to the same float32 W, |W| < 1
            # here; only the rounding of the rank-4 products may differ: a few ulps (6e-8 below 1). Measured:
            # 1.5e-8.
            np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=2.5e-7, err_msg=f"{c}: {k}")


def test_kohya_sdxl_ldm_names_of_the_full_size_unet(tmp_path):
    """SDXL's own numbering (layers_per_block=2, as in its LDM checkpoints), from its UNet config alone."""
    config = UNetConfig(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                        block_out_channels=(320, 640, 1280), layers_per_block=2)
    names = {"input_blocks_1_0_emb_layers_1": "down_blocks_0/resnets_0/time_emb_proj",
             "input_blocks_4_1_transformer_blocks_0_attn1_to_q":
                 "down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q",
             "input_blocks_8_1_proj_out": "down_blocks_2/attentions_1/proj_out",
             "middle_block_0_emb_layers_1": "mid_block/resnets_0/time_emb_proj",
             "output_blocks_0_1_transformer_blocks_9_ff_net_0_proj":
                 "up_blocks_0/attentions_0/transformer_blocks_9/ff/net_0/proj",
             "output_blocks_5_1_transformer_blocks_0_attn2_to_out_0":
                 "up_blocks_1/attentions_2/transformer_blocks_0/attn2/to_out_0",
             "output_blocks_8_0_emb_layers_1": "up_blocks_2/resnets_2/time_emb_proj"}
    file = _write_kohya(tmp_path / "ldm.safetensors", {f"lora_unet_{n}": (8, 8) for n in names})
    loras, _ = lora.load_lora_file(file, config)
    assert sorted(loras["unet"]) == sorted(names.values())


def test_kohya_sdxl_ldm_name_errors(tiny_pipelines, tmp_path):
    path = tiny_pipelines["sdxl"]
    file = _write_kohya(tmp_path / "ldm.safetensors", {"lora_unet_middle_block_1_proj_in": (32, 32)})
    with pytest.raises(UsageError, match=r"'lora_unet_middle_block_1_proj_in.*LDM/SGM UNet names.*needs the "
                                         r"UNet config.*unet_config="):
        lora.load_lora_file(file)
    # The tiny SDXL's first down block has no attention (and 2 is its downsampler): input_blocks_1_1 maps
    # nowhere.
    bad = _write_kohya(tmp_path / "bad.safetensors", {"lora_unet_input_blocks_1_1_proj_in": (16, 16)})
    with pytest.raises(UsageError, match=r"input_blocks_1_1_proj_in.*no LDM block 'input_blocks_1_1' "
                                         r"\(layers_per_block=1, .*another architecture"):
        load_pipeline(path, lora=bad)
