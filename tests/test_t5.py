"""The Flax T5 v1.1 encoder (Flux.1's text_encoder_2) against transformers' PyTorch `T5EncoderModel`.

CPU, fp32, random weights: tiny configs, T5-XXL's full width with two layers, and the whole T5-XXL by shapes
only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention as TorchT5Attention

from dreambooth_jax.families import components
from dreambooth_jax.models import t5
from dreambooth_jax.weights import convert

# fp32 parity: max |flax - torch| / max(1, max |torch|). Tiny: two layers of float32 matmuls (d <= 48) and RMS
# norms, ~1e-7 relative rounding per op and a few hundred ops per output: well below 1e-5. Full width: sums of
# 4096 and 10240 products, whose rounding grows as sqrt(K) * 6e-8 ~ 6e-6 per matmul, over six matmuls a layer.
FP32_TOL = 1e-5
FULL_WIDTH_TOL = 1e-4


def _tiny(feed_forward_proj="gated-gelu") -> transformers.T5Config:
    return transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                 feed_forward_proj=feed_forward_proj, dropout_rate=0.0,
                                 is_encoder_decoder=False, use_cache=False)


def _ours_from_torch(ref) -> tuple[t5.T5EncoderModel, dict]:
    config = t5.T5Config.from_diffusers_config(ref.config.to_dict())
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = convert.state_dict_to_params(convert.rename_keys(state, t5.TORCH_TO_FLAX),
                                          t5.abstract_params(config), ignore=t5.IGNORED_KEYS)
    return t5.T5EncoderModel(config), params


def _err(actual, expected) -> float:
    expected = np.asarray(expected, np.float32)
    return float(np.abs(np.asarray(actual, np.float32) - expected).max() / max(1.0, np.abs(expected).max()))


def test_relative_position_buckets_equal_transformers():
    """Every relative position of a 300-token sequence, past `max_distance` both ways."""
    rel = np.arange(-300, 301)
    theirs = TorchT5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=True, num_buckets=32,
                                                         max_distance=128).numpy()
    np.testing.assert_array_equal(np.asarray(t5.relative_position_bucket(jnp.asarray(rel), 32, 128)), theirs)


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_encoder_matches_transformers_fp32(feed_forward_proj):
    """Random weights; 150 tokens (beyond max_distance 128); with a padding mask and without (Flux's call)."""
    torch.manual_seed(0)
    ref = transformers.T5EncoderModel(_tiny(feed_forward_proj)).eval()
    model, params = _ours_from_torch(ref)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 97, (2, 150))
    mask = np.ones((2, 150), np.int64)
    mask[1, 90:] = 0
    for m in (None, mask):
        with torch.no_grad():
            theirs = ref(torch.tensor(ids), attention_mask=None if m is None else torch.tensor(m))
        ours = jax.jit(model.apply)({"params": params}, jnp.asarray(ids),
                                    None if m is None else jnp.asarray(m))
        err = _err(ours, theirs.last_hidden_state.numpy())
        assert err < FP32_TOL, (m is None, err)


def test_full_width_two_layers_match_transformers():
    """T5-XXL's width (d_model 4096, 64 heads of 64, d_ff 10240) with 2 layers, on Flux-dev's 512 tokens (a
    small vocabulary: the embedding's size is not what is tested)."""
    torch.manual_seed(2)
    config = transformers.T5Config(**{**t5.T5Config(num_layers=2, vocab_size=1000).to_diffusers_config(),
                                      "dropout_rate": 0.0})
    ref = transformers.T5EncoderModel(config).eval()
    model, params = _ours_from_torch(ref)
    ids = np.random.default_rng(2).integers(0, 1000, (1, 512))
    with torch.no_grad():
        theirs = ref(torch.tensor(ids)).last_hidden_state.numpy()
    del ref
    ours = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    assert _err(ours, theirs) < FULL_WIDTH_TOL


def test_folder_round_trip_through_transformers_is_bit_exact(tmp_path):
    """A `T5EncoderModel.save_pretrained` folder -> `components.load_folder` (the `t5` kind) -> `save_folder`
    -> `T5EncoderModel.from_pretrained`: the same tensors, and the loaded module computes transformers'
    output."""
    torch.manual_seed(1)
    ref = transformers.T5EncoderModel(_tiny()).eval()
    ref.save_pretrained(tmp_path / "theirs")
    module, params = components.load_folder(str(tmp_path / "theirs"), "t5")
    ids = np.random.default_rng(1).integers(0, 97, (1, 20))
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).last_hidden_state.numpy()
    assert _err(module.apply({"params": params}, jnp.asarray(ids)), expected) < FP32_TOL
    components.save_folder(str(tmp_path / "ours"), module, params)
    back = transformers.T5EncoderModel.from_pretrained(tmp_path / "ours").eval()
    for key, value in ref.state_dict().items():
        assert np.array_equal(back.state_dict()[key].numpy(), value.numpy()), key


def test_full_size_t5_xxl_by_shapes():
    """Flux.1's T5-XXL encoder: our tree's parameter count equals transformers' model built on the meta
    device (no memory), about 4.76B."""
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t5.abstract_params(t5.PRESETS["flux"])))
    config = transformers.T5Config(**t5.PRESETS["flux"].to_diffusers_config())
    with torch.device("meta"):
        ref = transformers.T5EncoderModel(config)
    theirs = sum(p.numel() for n, p in ref.named_parameters() if n != "encoder.embed_tokens.weight")
    assert ours == theirs
    assert round(ours / 1e9, 2) == 4.76
