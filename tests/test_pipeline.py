"""Whole-pipeline loading and saving: bit-exact round trips, diffusers loads what we save, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from safetensors.numpy import load_file as reference_load_file

from dreambooth_jax import families, storage
from dreambooth_jax.errors import MissingFileError
from dreambooth_jax.pipeline import load_component, load_pipeline, save_pipeline
from dreambooth_jax.weights import discovery as checkpoint_files
from dreambooth_jax.weights import hub, safetensors_io
from dreambooth_jax.weights.convert import ConversionError

WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
           "text_encoder_2": "model"}


@pytest.fixture(scope="module")
def round_trips(tiny_pipelines, tmp_path_factory) -> dict[str, str]:
    """Each tiny pipeline loaded and saved back (fp32)."""
    out = {}
    for kind, path in tiny_pipelines.items():
        out[kind] = save_pipeline(load_pipeline(path), str(tmp_path_factory.mktemp(f"rt_{kind}")))
    return out


def _components(path):
    return [c for c in WEIGHTS if os.path.isdir(os.path.join(path, c))]


def test_round_trip_is_bit_exact(tiny_pipelines, round_trips, tiny_kind):
    src, dst = tiny_pipelines[tiny_kind], round_trips[tiny_kind]
    assert _components(src) == _components(dst)
    for comp in _components(src):
        name = f"{comp}/{WEIGHTS[comp]}.safetensors"
        a, b = reference_load_file(os.path.join(src, name)), reference_load_file(os.path.join(dst, name))
        assert sorted(a) == sorted(b), f"{name}: key names differ"
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            assert a[key].tobytes() == b[key].tobytes(), f"{name}:{key} differs"


def test_saved_pipeline_runs_in_diffusers_with_same_unet_output(tiny_pipelines, round_trips, tiny_kind):
    import diffusers
    import torch

    cls = diffusers.StableDiffusionXLPipeline if tiny_kind == "sdxl" else diffusers.StableDiffusionPipeline
    original = cls.from_pretrained(tiny_pipelines[tiny_kind])
    reloaded = cls.from_pretrained(round_trips[tiny_kind])
    assert type(reloaded.scheduler) is type(original.scheduler)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    ctx = torch.randn(1, 16, original.unet.config.cross_attention_dim, generator=gen)
    kwargs = {}
    if tiny_kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=gen),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        a = original.unet(x, 500, ctx, **kwargs).sample
        b = reloaded.unet(x, 500, ctx, **kwargs).sample
    assert torch.equal(a, b)
    # And the whole pipeline runs (2 steps, 64 px) from the folder we wrote.
    images = reloaded("a photo of sks dog", num_inference_steps=2, height=64, width=64,
                      output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("dtype, np_dtype", [("fp16", "float16"), ("bf16", "bfloat16")])
def test_half_precision_save_and_exact_reload(tiny_pipelines, tmp_path, dtype, np_dtype):
    pipe = load_pipeline(tiny_pipelines["sd1"])
    half = save_pipeline(pipe, str(tmp_path / "half"), dtype=dtype)
    state = safetensors_io.load_file(os.path.join(half, "unet", "diffusion_pytorch_model.safetensors"))
    assert {v.dtype.name for v in state.values()} == {np_dtype}
    # half -> fp32 params -> half again reproduces the half file bit for bit
    again = save_pipeline(load_pipeline(half), str(tmp_path / "again"), dtype=dtype)
    for comp in ("unet", "vae", "text_encoder"):
        name = f"{comp}/{WEIGHTS[comp]}.safetensors"
        with open(os.path.join(half, name), "rb") as f1, open(os.path.join(again, name), "rb") as f2:
            assert f1.read() == f2.read()
    if dtype == "bf16":  # readable by the reference safetensors/torch reader
        import torch
        from safetensors.torch import load_file

        assert load_file(os.path.join(half, "vae", "diffusion_pytorch_model.safetensors"))[
            "encoder.conv_in.weight"].dtype == torch.bfloat16


def test_load_dtype_options(tiny_pipelines):
    pipe = load_pipeline(tiny_pipelines["sd1"], dtype="bf16", param_dtype="fp32")
    assert pipe.unet.dtype == jnp.bfloat16
    assert pipe.params["unet"]["conv_in"]["kernel"].dtype == jnp.float32
    pipe = load_pipeline(tiny_pipelines["sd1"], dtype="bf16")
    assert pipe.params["vae"]["encoder"]["conv_in"]["kernel"].dtype == jnp.bfloat16
    assert pipe.vae_scale_factor == 8 and pipe.family is families.SD
    with pytest.raises(ValueError, match="unknown dtype"):
        load_pipeline(tiny_pipelines["sd1"], dtype="int4")


def test_text_model_prefix_read_both_ways(tiny_pipelines, tmp_path):
    """transformers 4 checkpoints carry `text_model.`; transformers 5 `CLIPTextModel` ones do not."""
    src = os.path.join(tiny_pipelines["sd1"], "text_encoder")
    dst = tmp_path / "text_encoder"
    shutil.copytree(src, dst)
    state = safetensors_io.load_file(str(dst / "model.safetensors"))
    flipped = {(k[len("text_model."):] if k.startswith("text_model.") else "text_model." + k): np.array(v)
               for k, v in state.items()}
    # a transformers-4 buffer
    flipped["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    safetensors_io.save_file(flipped, str(dst / "model.safetensors"))
    _, a = load_component(src, "text_encoder")
    _, b = load_component(str(dst), "text_encoder")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_sharded_checkpoint_and_variant(tiny_pipelines, tmp_path):
    src = os.path.join(tiny_pipelines["sd1"], "unet")
    dst = tmp_path / "unet"
    dst.mkdir()
    shutil.copy(os.path.join(src, "config.json"), dst / "config.json")
    state = safetensors_io.load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    keys = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        safetensors_io.save_file({k: state[k] for k in part}, str(dst / name))
    index = {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}
    (dst / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    # An fp16 variant beside it, picked only when asked for.
    safetensors_io.save_file({k: v.astype(np.float16) for k, v in state.items()},
                             str(dst / "diffusion_pytorch_model.fp16.safetensors"))
    _, sharded = load_component(str(dst), "unet")
    _, whole = load_component(src, "unet")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(sharded), jax.tree.leaves(whole)))
    files = checkpoint_files.find_weight_files(str(dst), "diffusion_pytorch_model", "fp16")
    assert [os.path.basename(f) for f in files] == ["diffusion_pytorch_model.fp16.safetensors"]
    with pytest.raises(FileNotFoundError, match="no 'bf16' variant"):
        checkpoint_files.find_weight_files(str(dst), "diffusion_pytorch_model", "bf16")


@pytest.fixture
def broken_copy(tiny_pipelines, tmp_path):
    dst = tmp_path / "pipe"
    shutil.copytree(tiny_pipelines["sd1"], dst)
    return dst


def test_error_missing_unet_config(broken_copy):
    os.remove(broken_copy / "unet" / "config.json")
    with pytest.raises(FileNotFoundError, match=r"unet/config\.json"):
        load_pipeline(str(broken_copy))


def test_error_truncated_safetensors(broken_copy):
    path = broken_copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors: file is truncated"):
        load_pipeline(str(broken_copy))


def test_error_shape_mismatch(broken_copy):
    path = broken_copy / "vae" / "diffusion_pytorch_model.safetensors"
    state = {k: np.array(v) for k, v in safetensors_io.load_file(str(path)).items()}
    state["decoder.conv_out.weight"] = np.zeros((3, 8, 5, 5), np.float32)
    safetensors_io.save_file(state, str(path))
    with pytest.raises(ConversionError, match=r"decoder\.conv_out\.weight: checkpoint \(3, 8, 5, 5\)"):
        load_pipeline(str(broken_copy))


def test_error_architecture_key_not_in_config(broken_copy):
    """A tensor the config does not account for (e.g. a class embedding) is named, not silently dropped."""
    path = broken_copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = {k: np.array(v) for k, v in safetensors_io.load_file(str(path)).items()}
    state["class_embedding.weight"] = np.zeros((10, 64), np.float32)
    safetensors_io.save_file(state, str(path))
    with pytest.raises(ConversionError, match="unexpected tensors.*class_embedding.weight"):
        load_pipeline(str(broken_copy))
    cfg = json.loads((broken_copy / "unet" / "config.json").read_text())
    (broken_copy / "unet" / "config.json").write_text(json.dumps({**cfg, "class_embed_type": "timestep"}))
    with pytest.raises(ValueError, match=r"unet/config\.json: unet config: `class_embed_type='timestep'`"):
        load_pipeline(str(broken_copy))


def test_pytorch_bin_weights_load_without_torch(tiny_pipelines, broken_copy):
    """A component with only `pytorch_model.bin` (torch.save's zip format) loads as from safetensors."""
    import torch

    folder = broken_copy / "text_encoder"
    state = safetensors_io.load_file(str(folder / "model.safetensors"))
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, folder / "pytorch_model.bin")
    os.remove(folder / "model.safetensors")
    loaded, expected = load_pipeline(str(broken_copy)), load_pipeline(tiny_pipelines["sd1"])
    for a, b in zip(jax.tree.leaves(loaded.params["text_encoder"]),
                    jax.tree.leaves(expected.params["text_encoder"])):
        np.testing.assert_array_equal(a, b)
    (folder / "pytorch_model.bin").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: not a zip-format PyTorch checkpoint"):
        load_pipeline(str(broken_copy))


def test_error_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        load_pipeline(str(tmp_path / "nope"))


def test_hub_file_selection_fetches_only_what_is_read():
    files = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
             "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
             "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
             "text_encoder/pytorch_model.bin", "safety_checker/model.safetensors"]
    folders = families.weight_folders()
    assert hub.weight_patterns(files, None, folders) == ["unet/diffusion_pytorch_model.safetensors",
                                                         "vae/diffusion_pytorch_model.safetensors",
                                                         "text_encoder/model.safetensors"]
    assert hub.weight_patterns(files, "fp16", folders) == ["unet/diffusion_pytorch_model.fp16.safetensors",
                                                           "vae/diffusion_pytorch_model.fp16.safetensors",
                                                           "text_encoder/model.fp16.safetensors"]


def test_runtime_never_imports_torch(tiny_pipelines, tmp_path):
    code = (
        "import sys, dreambooth_jax\n"
        f"pipe = dreambooth_jax.load_pipeline({tiny_pipelines['sdxl']!r})\n"
        f"dreambooth_jax.save_pipeline(pipe, {str(tmp_path / 'out')!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_separate_vae_folder_pipeline_and_hub_repository(tiny_pipelines, tmp_path, monkeypatch):
    """`load_pipeline(vae=...)` (the trainer's --pretrained_vae_model_name_or_path): a model folder or another
    pipeline's vae/; from the Hub only diffusers' config and weights of that model are fetched."""
    other_vae = load_pipeline(tiny_pipelines["sd1"]).params["vae"]
    folder = shutil.copytree(os.path.join(tiny_pipelines["sd1"], "vae"), tmp_path / "my-vae")
    for source in (str(folder), tiny_pipelines["sd1"]):
        pipe = load_pipeline(tiny_pipelines["sdxl"], vae=source)
        for a, b in zip(jax.tree.leaves(pipe.params["vae"]), jax.tree.leaves(other_vae)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(MissingFileError, match="no config.json"):
        load_pipeline(tiny_pipelines["sdxl"], vae=str(tmp_path), weights="none")

    fetched = {}

    class Api:
        def list_repo_files(self, repo_id, **kwargs):
            return ["config.json", "diffusion_pytorch_model.safetensors",
                    "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin",
                    "sdxl_vae.safetensors", "README.md"]

    def snapshot_download(repo_id, allow_patterns, **kwargs):
        fetched[repo_id] = sorted(allow_patterns)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    load_pipeline(tiny_pipelines["sdxl"], vae="madebyollin/sdxl-vae-fp16-fix")
    assert fetched == {"madebyollin/sdxl-vae-fp16-fix": ["config.json",
                                                         "diffusion_pytorch_model.safetensors"]}


def test_separate_vae_from_a_bucket_fetches_only_that_model(tiny_pipelines, tmp_path, monkeypatch):
    """A bucket pipeline given as the VAE: only its vae/ config and diffusers weights are mirrored; the base
    pipeline in a bucket then skips its own VAE's weights (a bucket served from a local folder, as in
    test_scale)."""

    bucket = tmp_path / "bucket"
    monkeypatch.setitem(storage.REMOTE_SCHEMES, "fake", "json")
    monkeypatch.setattr(storage, "remote_path", lambda uri: epath.Path(bucket / uri.partition("://")[2]))
    monkeypatch.setenv("DREAMBOOTH_JAX_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_pipelines["sd1"], bucket / "other")
    (bucket / "other" / "vae" / "sdxl_vae.safetensors").write_bytes(b"another layout, never read")
    shutil.copytree(tiny_pipelines["sdxl"], bucket / "base")
    pipe = load_pipeline("fake://base", vae="fake://other")
    expected = load_pipeline(tiny_pipelines["sd1"]).params["vae"]
    for a, b in zip(jax.tree.leaves(pipe.params["vae"]), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    mirrored = {os.path.relpath(os.path.join(d, f), tmp_path / "cache")
                for d, _, fs in os.walk(tmp_path / "cache") for f in fs}
    other = {m for m in mirrored if "other" in m}
    assert {os.path.basename(m) for m in other} == {"config.json", "diffusion_pytorch_model.safetensors"}
    base = {m for m in mirrored if "base" in m}
    assert any(m.endswith("unet/diffusion_pytorch_model.safetensors") for m in base), base
    assert not any(m.endswith("vae/diffusion_pytorch_model.safetensors") for m in base), base


def test_hub_refusals_are_our_errors(monkeypatch):
    """A gated repository (FLUX.1-dev's licence not accepted), a missing one, a missing revision: one
    DownloadError naming the repository and what to do, not huggingface_hub's traceback."""
    import httpx2
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    from dreambooth_jax.errors import DownloadError

    response = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    for error, expected in ((GatedRepoError, "gated: accept its licence"),
                            (RepositoryNotFoundError, "does not exist or is private"),
                            (RevisionNotFoundError, "has no revision 'v9'")):
        class Api:
            def list_repo_files(self, repo_id, error=error, **kwargs):
                raise error("401 Client Error: access to this repo is restricted", response=response)

        monkeypatch.setattr(huggingface_hub, "HfApi", Api)
        with pytest.raises(DownloadError, match=expected):
            load_pipeline("black-forest-labs/FLUX.1-dev", revision="v9")


def test_tokenizer_folders_without_tokenizer_files_are_refused(tiny_flux_pipelines, tmp_path):
    """transformers builds a near-empty tokenizer from a folder without its files (an interrupted download):
    every prompt would be unknown tokens. Refused, before any weight loads; T5's `spiece.model` alone needs
    sentencepiece, which says so."""
    import importlib.util

    from dreambooth_jax.errors import MissingFileError, UsageError

    src = shutil.copytree(tiny_flux_pipelines["flux-schnell"], tmp_path / "pipe")
    os.remove(src / "tokenizer_2" / "tokenizer.json")
    with pytest.raises(MissingFileError, match=r"tokenizer_2: no tokenizer files \(tokenizer.json or spiece"):
        load_pipeline(str(src), weights="none")
    (src / "tokenizer_2" / "spiece.model").write_bytes(b"")
    if importlib.util.find_spec("sentencepiece") is None:
        with pytest.raises(UsageError, match="needs the `sentencepiece` package"):
            load_pipeline(str(src), weights="none")
