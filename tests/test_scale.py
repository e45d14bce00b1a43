"""Training at scale: the fsdp sharding rule, sharded runs equal to one device (8 simulated CPU devices,
through the CLI), checkpoints restored onto another device count, the memory preflight (`--dry_run`, a run too
large for the device), the background input thread, and the bad cases that must fail before any weight is
read."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from conftest import xla_flags_with
from etils import epath
from safetensors.numpy import load_file
from train_helpers import PROMPT, assert_same_weights, exported_weights, full_run_argv, run_argv, train_cfg

from dreambooth_jax import parallel, storage
from dreambooth_jax.errors import UsageError
from dreambooth_jax.pipeline import load_pipeline
from dreambooth_jax.train import main as train_main
from dreambooth_jax.training import preflight
from dreambooth_jax.training.data import Concept, DreamBoothData
from dreambooth_jax.training.inputs import Prefetcher, TrainInputs
from dreambooth_jax.training.specs import BatchSpec
from dreambooth_jax.training.trainer import configure_compilation_cache
from dreambooth_jax.weights import discovery

WELL_CONDITIONED = ["--adam_epsilon", "1.0", "--learning_rate", "1e-2"]  # see train_helpers.full_run_argv


def _lora(class_dir) -> list[str]:
    return ["--use_lora", "--rank", "4", "--with_prior_preservation", "--class_data_dir", class_dir,
            "--class_prompt", "a photo of toy", "--num_class_images", "4", "--train_text_encoder",
            *WELL_CONDITIONED]


def _run_devices(devices: int, runs: list[list[str]]) -> None:
    """The CLI, once per argv of `runs`, in one process with `devices` simulated CPU devices."""
    code = ("import sys, json, jax\n"
            f"assert jax.device_count() == {devices}\n"
            "from dreambooth_jax.train import main\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    main(argv)\n")
    env = {**os.environ, "XLA_FLAGS": xla_flags_with(f"--xla_force_host_platform_device_count={devices}"),
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(runs)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]


# --- the rule
# ---------------------------------------------------------------------------------------------------
def test_fsdp_rule_shards_the_largest_divisible_dimension():
    P = jax.sharding.PartitionSpec
    assert parallel.fsdp_spec((3, 3, 320, 640), 8) == P(None, None, None, "fsdp")
    assert parallel.fsdp_spec((1280, 320), 8) == P("fsdp")
    assert parallel.fsdp_spec((320, 320), 8) == P("fsdp")  # ties: the first
    assert parallel.fsdp_spec((77, 1024), 3) == P()  # nothing divisible
    assert parallel.fsdp_spec((1280,), 8) == P()  # small: whole on every device
    assert parallel.fsdp_spec((4096, 4096), 1) == P()  # fsdp 1: replication
    mesh = parallel.train_mesh(1)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
    with pytest.raises(UsageError, match="does not divide"):
        parallel.train_mesh(3)


# --- sharded runs through the CLI
# ----------------------------------------------------------------------------------
def test_sharded_runs_equal_one_device_and_checkpoints_move_between_device_counts(
        tiny_pipelines, instance_dir, class_dir, one_device_run, tmp_path):
    """On 8 devices: fsdp 8, fsdp 4 x data 2 and replication (fsdp 1) give the one-device weights (full
    fine-tuning with prior preservation, text encoder and EMA; and LoRA); so does fsdp 4 with the GroupNorm
    kernel (interpret mode, run per device on its share of the batch) against XLA's norm on one device. The
    fsdp 8 run's step-1 checkpoint resumes to the same weights, bit for bit on 8 devices and within rounding
    on 4 (fsdp 4, 2 rows per device)."""
    argv = lambda out, *extra: run_argv(tiny_pipelines, instance_dir, tmp_path / out, *extra)  # noqa: E731
    eight = {"fsdp8": argv("fsdp8", *full_run_argv(class_dir), "--fsdp", "8", "--checkpointing_steps", "1"),
             "fsdp4": argv("fsdp4", *full_run_argv(class_dir), "--fsdp", "4"),
             "replicated": argv("replicated", *full_run_argv(class_dir), "--fsdp", "1"),
             "fused_fsdp4": argv("fused_fsdp4", *full_run_argv(class_dir), "--fsdp", "4", "--fused_norm",
                                 "on"),
             "lora_fsdp8": argv("lora_fsdp8", *_lora(class_dir), "--fsdp", "8")}
    checkpoint = str(tmp_path / "fsdp8" / "checkpoints" / "1")
    resumed8 = argv("resumed8", *full_run_argv(class_dir), "--fsdp", "8", "--resume_from_checkpoint",
                    checkpoint)
    _run_devices(8, [*eight.values(), resumed8])
    _run_devices(4, [argv("resumed4", *full_run_argv(class_dir), "--fsdp", "4", "--train_batch_size", "2",
                          "--resume_from_checkpoint", checkpoint)])
    train_main(argv("lora_one", *_lora(class_dir), "--train_batch_size", "8"))

    one = exported_weights(one_device_run)
    initial = {f"unet/{k}": v for k, v in load_file(os.path.join(tiny_pipelines["sd1"], "unet",
                                                                  "diffusion_pytorch_model.safetensors")).items()}
    assert max(np.abs(one[k] - initial[k]).max() for k in initial) > 1e-4  # training did change the weights
    for name in ("fsdp8", "fsdp4", "replicated", "fused_fsdp4"):
        assert_same_weights(exported_weights(tmp_path / name), one)
    assert_same_weights(exported_weights(tmp_path / "lora_fsdp8"), exported_weights(tmp_path / "lora_one"))
    assert_same_weights(exported_weights(tmp_path / "resumed8"), exported_weights(tmp_path / "fsdp8"),
                        exact=True)
    assert_same_weights(exported_weights(tmp_path / "resumed4"), exported_weights(tmp_path / "fsdp8"))
    rows = [json.loads(line) for line in open(tmp_path / "fsdp8" / "logs" / "metrics.jsonl",
                                              encoding="utf-8")]
    assert [r["step"] for r in rows] == [1, 2] and all(r["input_wait_s"] >= 0 for r in rows)


# --- the preflight
# -------------------------------------------------------------------------------------------------
def _no_weights(monkeypatch):
    """Makes reading any weight file fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(discovery, "load_state_dict", refuse)


def test_dry_run_prints_the_memory_from_configs_alone(tiny_pipelines, instance_dir, class_dir, tmp_path,
                                                      capsys, monkeypatch):
    _no_weights(monkeypatch)
    out = tmp_path / "out"
    train_main(run_argv(tiny_pipelines, instance_dir, out, *full_run_argv(class_dir), "--dry_run"))
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not out.exists()  # a dry run writes nothing
    assert report["devices"] == 1 and report["mesh"] == {"data": 1, "fsdp": 1}
    # Independent count: the elements of the saved safetensors files, 4 bytes each (fp32 master weights).
    numel = {part: sum(v.size for v in load_file(os.path.join(tiny_pipelines["sd1"], part, file)).values())
             for part, file in (("unet", "diffusion_pytorch_model.safetensors"),
                                ("text_encoder", "model.safetensors"), ("vae",
                                                                        "diffusion_pytorch_model.safetensors"))}
    sizes = report["per_device_bytes"]
    trained = 4 * (numel["unet"] + numel["text_encoder"])
    assert sizes["params"] == trained and sizes["ema"] == trained
    # AdamW: mu and nu of each trained weight, plus int32 step counters (Adam's and the schedule's, per part).
    assert 0 < sizes["optimizer"] - 2 * trained <= 64
    assert sizes["frozen"] == 4 * numel["vae"]
    state = sum(sizes[k] for k in ("params", "optimizer", "ema", "frozen"))
    assert sizes["temp"] > 0 and sizes["total"] >= state
    assert report["device_memory_bytes"] is None and report["fits"] is None  # CPU: unknown


def test_batch_shapes_are_what_the_inputs_build(tiny_pipelines, instance_dir, class_dir):
    pipes = {kind: load_pipeline(tiny_pipelines[kind]) for kind in ("sd1", "sdxl")}
    base = train_cfg(tiny_pipelines, instance_dir, "unused", with_prior_preservation=True,
                     class_data_dir=class_dir, class_prompt="a photo of toy", gradient_accumulation_steps=2,
                     train_batch_size=2)
    for kind, options in (("sd1", {}), ("sd1", {"cache_latents": True, "pre_compute_text_embeddings": True}),
                          ("sd1", {"text_encoder_use_attention_mask": True,
                                   "with_prior_preservation": False}),
                          ("sdxl", {}), ("sdxl", {"cache_latents": True,
                                                  "pre_compute_text_embeddings": True})):
        cfg, pipe = dataclasses.replace(base, **options), pipes[kind]
        data = DreamBoothData([Concept(instance_dir, PROMPT, class_dir, "a photo of toy")], resolution=64,
                              with_prior_preservation=cfg.with_prior_preservation)
        batch = TrainInputs(BatchSpec.of(cfg), pipe, data, parallel.data_mesh()).host_batch(0)
        expected = preflight.batch_shapes(BatchSpec.of(cfg), pipe, jax.device_count())
        assert {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()} == \
            {k: (v.shape, np.dtype(v.dtype)) for k, v in expected.items()}, (kind, options)


def test_a_run_too_large_for_the_device_stops_before_placing_anything(tiny_pipelines, instance_dir,
                                                                       tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "device_memory", lambda devices=None: 2**20)  # a 1 MiB device

    def refuse(*args, **kwargs):
        raise AssertionError("weights were placed on the device")

    monkeypatch.setattr(parallel, "put_sharded", refuse)
    with pytest.raises(preflight.OutOfMemoryError) as info:
        train_main(run_argv(tiny_pipelines, instance_dir, tmp_path / "out"))
    message = str(info.value)
    for advice in ("--gradient_checkpointing", "--use_lora", "--optimizer adafactor", "GiB per device"):
        assert advice in message
    assert isinstance(info.value, UsageError)  # the CLI ends with one error line


@pytest.mark.parametrize("extra, message", [
    (["--fsdp", "2"], "--fsdp 2 does not divide the 1 devices"),
    (["--fsdp", "two"], "--fsdp must be 'auto' or a positive integer"),
    (["--output_dir", "foo://bucket/run"], "--output_dir foo://bucket/run: unknown scheme foo://"),
])
def test_bad_scale_options_fail_with_one_line_before_weights(tiny_pipelines, instance_dir, tmp_path,
                                                             monkeypatch, extra, message):
    _no_weights(monkeypatch)
    argv = [*run_argv(tiny_pipelines, instance_dir, tmp_path / "out"), *extra]
    code = ("import sys\nfrom dreambooth_jax import cli\nfrom dreambooth_jax.train import main\n"
            "from dreambooth_jax.weights import discovery\n"
            "def refuse(*a, **k):\n    raise AssertionError('weights were read')\n"
            "discovery.load_state_dict = refuse\n"
            "cli.run_main(lambda: main(sys.argv[1:]))\n")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last == f"error: {message}" or message in last
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


# --- input thread, compilation cache
# ------------------------------------------------------------------------------
def test_prefetcher_keeps_batches_ahead_and_raises_errors_at_their_step():
    made = []

    def make(step):
        made.append(step)
        if step == 5:
            raise ValueError("bad image at step 5")
        return step * 10

    batches = Prefetcher(make, 2, 8, depth=2)
    first, _ = batches.next()
    deadline = time.time() + 10
    # it runs ahead: steps 3 and 4 get made without being asked
    while len(made) < 4 and time.time() < deadline:
        time.sleep(0.01)
    assert first == 20 and made[:3] == [2, 3, 4]
    assert [batches.next()[0] for _ in range(2)] == [30, 40]
    with pytest.raises(ValueError, match="step 5"):
        batches.next()
    batches.close()
    assert not any(t.name == "train-inputs" and t.is_alive() for t in threading.enumerate())

    slow = Prefetcher(lambda step: time.sleep(0.2) or step, 0, 100)
    _, waited = slow.next()
    assert waited >= 0.1  # the consumer waited for the first batch, and the wait is measured
    slow.close()  # stops mid-run without hanging


def test_compilation_cache_option(tmp_path, monkeypatch):
    previous = jax.config.jax_compilation_cache_dir
    try:
        configure_compilation_cache(str(tmp_path / "xla"))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        configure_compilation_cache("none")
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        configure_compilation_cache(None)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache" / "dreambooth_jax" / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


# --- bucket paths
# ------------------------------------------------------------------------------------------------
def test_bucket_folders_for_model_data_output_and_checkpoints(tiny_pipelines, instance_dir, class_dir,
                                                              tmp_path, monkeypatch):
    """Every folder option given as a bucket URI. The bucket is a local folder behind a `fake://` scheme
    served by the same `etils.epath` calls that serve gs:// (a real bucket was not reachable here): the model
    and photos are mirrored into the cache, class images generated and uploaded, logs, validation images, the
    export and the Orbax checkpoints land in the bucket, and a resumed run continues the bucket's logs."""

    bucket = tmp_path / "bucket"
    # any importable package stands for the backend
    monkeypatch.setitem(storage.REMOTE_SCHEMES, "fake", "json")
    monkeypatch.setattr(storage, "remote_path", lambda uri: epath.Path(bucket / uri.partition("://")[2]))
    monkeypatch.setenv("DREAMBOOTH_JAX_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_pipelines["sd1"], bucket / "model")
    shutil.copytree(instance_dir, bucket / "photos")
    shutil.copytree(class_dir, bucket / "class")  # 4 images; 5 wanted: one is generated and uploaded
    argv = ["--pretrained_model_name_or_path", "fake://model", "--instance_data_dir", "fake://photos",
            "--instance_prompt", PROMPT, "--output_dir", "fake://run", "--resolution", "64", "--attention",
            "einsum", "--with_prior_preservation", "--class_data_dir", "fake://class", "--class_prompt",
            "a photo of toy", "--num_class_images", "5", "--validation_inference_steps", "2",
            "--validation_prompt", PROMPT, "--validation_steps", "2", "--num_validation_images", "1",
            "--checkpointing_steps", "1"]
    train_main([*argv, "--max_train_steps", "2"])
    run = bucket / "run"
    assert (run / "model_index.json").is_file()
    assert (run / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(os.listdir(run / "checkpoints")) == ["1", "2"]
    assert os.listdir(run / "validation") == ["step-000002.png"]
    assert len([n for n in os.listdir(bucket / "class") if n.endswith(".png")]) == 5
    # nothing written to a local "fake:"
    assert not (tmp_path / "fake:").exists() and not os.path.exists("fake:")
    train_main([*argv, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    rows = [json.loads(line) for line in open(run / "logs" / "metrics.jsonl", encoding="utf-8")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert sorted(os.listdir(run / "checkpoints")) == ["1", "2", "3"]
