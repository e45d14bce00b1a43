"""The trainer end to end on the tiny SD1/SD2 fixtures: loss vs reference, learning, data parallelism,
accumulation, resume and SIGTERM, class images, exports, bad inputs."""

from __future__ import annotations

import functools
import json
import os
import signal

import jax
import numpy as np
import pytest
from conftest import run_processes
from train_helpers import (
    PROMPT,
    assert_same_weights,
    draw_images,
    exported_weights,
    fixed_eval_loss,
    full_run_argv,
    run_argv,
    train_cfg,
)

from dreambooth_jax.families import components
from dreambooth_jax.pipeline import load_pipeline
from dreambooth_jax.training import checkpoints
from dreambooth_jax.training import step as train_step
from dreambooth_jax.training.class_images import ensure_class_images
from dreambooth_jax.training.config import parse_args
from dreambooth_jax.training.trainer import run

LOSS_TOL = 1e-5  # fp32 loss vs the PyTorch reference (measured ~1e-7)


# --- the loss ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, prior", [("sd1", True), ("sd1", False), ("sd2", True)])
def test_loss_equals_pytorch_reference(tiny_pipelines, kind, prior):
    """Our per-example loss + halves combination vs diffusers' UNet/DDPMScheduler and F.mse_loss."""
    import torch  # heavy (PyTorch models): only the references load them
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = tiny_pipelines[kind]
    pipe = load_pipeline(path)
    spec = train_step.StepSpec.of(pipe, prior_loss_weight=0.7)
    frozen = pipe.params  # nothing trained: per_example_loss reads every part from `frozen`
    rng = np.random.default_rng(0)
    b = 4
    latents = rng.standard_normal((b, 8, 8, 4)).astype(np.float32)
    noise = rng.standard_normal((b, 8, 8, 4)).astype(np.float32)
    t = np.array([3, 250, 600, 999])
    ids = pipe.tokenizer([PROMPT, PROMPT, "a photo of toy", "a photo of toy"], padding="max_length",
                         max_length=16, return_tensors="np").input_ids.astype(np.int32)
    is_prior = np.array([False, False, prior, prior])
    mse = train_step.per_example_loss(spec, {}, frozen, {"input_ids": ids}, latents, noise, t)
    loss, inst, pri = (float(x) for x in train_step.combine_losses(mse, is_prior, 0.7))

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()
    te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval()
    ddpm = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    with torch.no_grad():
        x0, eps, tt = (torch.tensor(latents.transpose(0, 3, 1, 2)), torch.tensor(noise.transpose(0, 3, 1, 2)),
                       torch.tensor(t))
        pred = unet(ddpm.add_noise(x0, eps, tt), tt, te(torch.tensor(ids, dtype=torch.long))[0]).sample
        target = eps if ddpm.config.prediction_type == "epsilon" else ddpm.get_velocity(x0, eps, tt)
        if prior:  # diffusers' train_dreambooth.py: chunk into halves, MSE each, prior weighted
            p_inst, p_prior = torch.chunk(pred, 2)
            t_inst, t_prior = torch.chunk(target, 2)
            ref_inst, ref_prior = F.mse_loss(p_inst, t_inst), F.mse_loss(p_prior, t_prior)
            ref = ref_inst + 0.7 * ref_prior
        else:
            ref = ref_inst = F.mse_loss(pred, target)
    assert abs(loss - float(ref)) <= LOSS_TOL and abs(inst - float(ref_inst)) <= LOSS_TOL
    if prior:
        assert abs(pri - float(ref_prior)) <= LOSS_TOL
    else:
        assert pri == 0.0


# --- training runs ----------------------------------------------------------------------------------------
def test_training_overfits_the_instance_images(tiny_pipelines, instance_dir, class_dir, tmp_path):
    cfg = train_cfg(tiny_pipelines, instance_dir, tmp_path / "out", max_train_steps=30,
                    with_prior_preservation=True,
               class_data_dir=class_dir, class_prompt="a photo of toy", num_class_images=4, center_crop=True,
               report_to="tensorboard")
    result = run(cfg)
    before = fixed_eval_loss(tiny_pipelines["sd1"], {}, instance_dir)
    after = fixed_eval_loss(tiny_pipelines["sd1"], jax.device_get(result.state.params), instance_dir)
    assert after < 0.6 * before, (before, after)
    logged = [json.loads(line) for line in open(tmp_path / "out" / "logs" / "metrics.jsonl")]
    assert [row["step"] for row in logged] == list(range(1, 31))
    for row in logged:  # the logged parts add up (prior_loss_weight 1), and the prior half is really there
        assert row["loss"] == pytest.approx(row["instance_loss"] + row["prior_loss"], rel=1e-6)
        assert row["prior_loss"] != row["instance_loss"] and np.isfinite(row["grad_norm"])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "out" / "logs"))
    # The export loads in diffusers and generates.
    import diffusers  # heavy (PyTorch)

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    images = pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def _unet_leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params["unet"]))]


def _initial_unet_leaves(tiny_pipelines):
    return [np.asarray(x) for x in jax.tree.leaves(load_pipeline(tiny_pipelines["sd1"]).params["unet"])]


# Adam's first updates are ~lr * sign(g): a float-rounding-sized change of a near-zero gradient can flip them.
# A large epsilon makes the update ~lr * g / eps, so equal gradients (up to summation order) give equal
# params.
WELL_CONDITIONED = dict(adam_epsilon=1.0, learning_rate=1e-2)


def test_gradient_accumulation_2x2_equals_batch_4(tiny_pipelines, instance_dir, tmp_path):
    a = run(train_cfg(tiny_pipelines, instance_dir, tmp_path / "a", train_batch_size=4, **WELL_CONDITIONED))
    b = run(train_cfg(tiny_pipelines, instance_dir, tmp_path / "b", train_batch_size=2,
                      gradient_accumulation_steps=2,
                 **WELL_CONDITIONED))
    moved = max(np.abs(x - y).max() for x, y in zip(_unet_leaves(a.state),
                                                    _initial_unet_leaves(tiny_pipelines)))
    assert moved > 1e-4  # the params did change
    for x, y in zip(_unet_leaves(a.state), _unet_leaves(b.state)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_one_device_equals_two_processes_of_four_devices(tiny_pipelines, instance_dir, class_dir,
                                                         one_device_run, tmp_path):
    """Two processes of 4 devices (JAX's multi-process runtime on CPU, gloo collectives), fsdp 4 x data 2: the
    data axis spans the hosts, each fsdp group is one host's devices. Per-host batch slices, sharded Orbax
    checkpoints written by both processes, the export gathered by both and written by process 0, the
    validation sampler's gather; the exported weights equal a one-device run of the same global batch."""
    multi = tmp_path / "multi"
    argv = run_argv(tiny_pipelines, instance_dir, multi, *full_run_argv(class_dir), "--fsdp", "4",
                    "--checkpointing_steps", "1", "--validation_prompt", PROMPT, "--validation_steps", "2",
                    "--num_validation_images", "2", "--validation_inference_steps", "2")
    code = ("import sys, jax\nfrom dreambooth_jax.train import main\n"
            "main(sys.argv[1:])\n"
            "assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4\n")
    run_processes(["-c", code, *argv], devices=4)
    assert_same_weights(exported_weights(multi), exported_weights(one_device_run))
    assert sorted(os.listdir(multi / "checkpoints")) == ["1", "2"]
    assert os.path.isfile(multi / "model_index.json")
    assert sorted(os.listdir(multi / "validation")) == ["step-000002.png"]


def test_sigterm_then_resume_is_bit_identical(tiny_pipelines, instance_dir, tmp_path, monkeypatch):
    straight = run(train_cfg(tiny_pipelines, instance_dir, tmp_path / "straight", max_train_steps=4))

    original = checkpoints.Checkpointer.save

    # a real SIGTERM, after step 2 was dispatched
    def preempt_after_step_2(self, state, meta, *, step, force=False):
        if step == 2 and not force:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, state, meta, step=step, force=force)

    monkeypatch.setattr(checkpoints.Checkpointer, "save", preempt_after_step_2)
    out = tmp_path / "resumed"
    stopped = run(train_cfg(tiny_pipelines, instance_dir, out, max_train_steps=4, checkpointing_steps=100))
    assert stopped.steps == 2  # the step in flight finishes, then a checkpoint, then exit
    assert os.listdir(out / "checkpoints") == ["2"] and not os.path.exists(out / "model_index.json")
    monkeypatch.setattr(checkpoints.Checkpointer, "save", original)
    resumed = run(train_cfg(tiny_pipelines, instance_dir, out, max_train_steps=4,
                            resume_from_checkpoint="latest"))
    assert resumed.steps == 4 and os.path.isfile(out / "model_index.json")
    for x, y in zip(_unet_leaves(straight.state), _unet_leaves(resumed.state)):
        np.testing.assert_array_equal(x, y)


def test_cached_latents_and_text_embeddings_give_the_uncached_loss(tiny_pipelines, instance_dir, tmp_path):
    """Same examples, flips and noise: caching (center crops) changes where z_0 and the context come from, not
    the loss."""
    kw = dict(max_train_steps=2, center_crop=True, random_flip=True, train_batch_size=2)
    plain = run(train_cfg(tiny_pipelines, instance_dir, tmp_path / "plain", **kw))
    cached = run(train_cfg(tiny_pipelines, instance_dir, tmp_path / "cached", cache_latents=True,
                      pre_compute_text_embeddings=True, **kw))
    for a, b in zip(plain.metrics, cached.metrics):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)


# --- class images, options and bad inputs -----------------------------------------------------------------
def test_class_images_fill_partial_folder(tiny_pipelines, tmp_path):
    folder = draw_images(tmp_path / "cls", 2, seed=3)
    before = {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)}
    pipe = load_pipeline(tiny_pipelines["sd1"])
    made = ensure_class_images(pipe, folder, "a photo of toy", 5, batch_size_per_device=2,
                               num_inference_steps=2, progress=False)
    assert made == 3 and len(os.listdir(folder)) == 5
    assert all(open(os.path.join(folder, f), "rb").read() == data for f, data in before.items())
    assert ensure_class_images(pipe, folder, "a photo of toy", 5, batch_size_per_device=2,
                               num_inference_steps=2, progress=False) == 0


def test_presets_and_cli_overrides(tiny_pipelines, instance_dir):
    cfg = parse_args(["--config", "sd15", "--instance_data_dir", instance_dir, "--instance_prompt", PROMPT,
                      "--class_data_dir", "/tmp/x", "--class_prompt", "a dog", "--learning_rate", "1e-6",
                      "--no-with_prior_preservation"])
    assert cfg.resolution == 512 and cfg.learning_rate == 1e-6 and not cfg.with_prior_preservation
    assert cfg.mixed_precision == "bf16"
    paper = parse_args(["--config", "paper", "--instance_data_dir", instance_dir, "--instance_prompt", PROMPT,
                        "--class_data_dir", "/tmp/x", "--class_prompt", "a dog"])
    assert (paper.learning_rate, paper.num_class_images, paper.prior_loss_weight) == (5e-6, 1000, 1.0)
    for preset, lora in (("sdxl", False), ("sdxl_lora", True)):
        sdxl = parse_args(["--config", preset, "--instance_data_dir", instance_dir, "--instance_prompt",
                           PROMPT, "--class_data_dir", "/tmp/x", "--class_prompt", "a dog"])
        assert (sdxl.resolution, sdxl.use_lora, sdxl.mixed_precision) == (1024, lora, "bf16")
        assert sdxl.pretrained_vae_model_name_or_path == "madebyollin/sdxl-vae-fp16-fix"
    assert (sdxl.rank, sdxl.learning_rate) == (16, 1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--with_prior_preservation"], "needs --class_prompt"),
    (["--mixed_precision", "fp16"], "use bf16"),
    (["--resolution", "100"], "multiple of 8"),
    (["--config", "nope"], "no preset 'nope'"),
    (["--lr_scheduler", "weird"], "invalid choice"),
])
def test_invalid_options_fail_before_loading(tiny_pipelines, instance_dir, capsys, argv, message):
    base = ["--pretrained_model_name_or_path", "/does/not/exist", "--instance_data_dir", instance_dir,
            "--instance_prompt", PROMPT]
    with pytest.raises(SystemExit):
        parse_args(base + argv)
    assert message in capsys.readouterr().err


def test_bad_inputs_clear_errors_and_no_partial_export(tiny_pipelines, instance_dir, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        run(train_cfg(tiny_pipelines, str(empty), tmp_path / "o1"))
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        run(train_cfg(tiny_pipelines, instance_dir, tmp_path / "o2",
                      pretrained_model_name_or_path=str(tmp_path / "no")))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="a.png"):
        run(train_cfg(tiny_pipelines, str(broken), tmp_path / "o3"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="output_dir"):
        run(train_cfg(tiny_pipelines, instance_dir, blocker / "out"))
    # A failure while exporting leaves no pipeline (and no temporary folder) behind.

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(components, "save_folder", functools.partial(fail))
    out = tmp_path / "o4"
    with pytest.raises(OSError, match="disk full"):
        run(train_cfg(tiny_pipelines, instance_dir, out, max_train_steps=1))
    assert sorted(os.listdir(out)) == ["checkpoints", "logs"]
