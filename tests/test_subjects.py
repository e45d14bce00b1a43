"""Many subjects in one run (`--subjects`): K independent models trained by one program export what each
subject trained alone exports; a stopped run resumes; bad subject files fail before anything is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest
from conftest import xla_flags_with
from safetensors.numpy import load_file
from train_helpers import assert_same_weights, draw_images, exported_weights

from dreambooth_jax import parallel
from dreambooth_jax.training.concepts import read_subjects
from dreambooth_jax.training.config import parse_args
from dreambooth_jax.training.trainer import run

# Each subject's batch spans its device group: 4 subjects on 8 devices -> groups of 2, so a subject alone is
# trained on 2 devices for the same global batch (2 instance + 2 class images per step).
SUBJECTS, DEVICES, ALONE_DEVICES = 4, 8, 2
WELL_CONDITIONED = ["--adam_epsilon", "1.0", "--learning_rate", "1e-2"]  # see train_helpers.RTOL


def _base(tiny_pipelines) -> list[str]:
    return ["--pretrained_model_name_or_path", tiny_pipelines["sd1"], "--resolution", "64", "--attention",
            "einsum", "--max_train_steps", "2", "--num_class_images", "4", "--checkpointing_steps", "100",
            *WELL_CONDITIONED]


FULL = ["--with_prior_preservation", "--use_ema"]
LORA = ["--use_lora", "--rank", "4", "--train_text_encoder"]


@pytest.fixture(scope="module")
def subjects(tmp_path_factory, class_dir) -> tuple[str, list[dict]]:
    """4 subjects of 3 or 4 photos, own seeds; two share a class folder (already full: nothing to
    generate)."""
    root = tmp_path_factory.mktemp("subjects")
    other_class = draw_images(root / "class_b", 4, seed=99)
    items = [{"name": f"toy{k}", "instance_data_dir": draw_images(root / f"toy{k}", 3 + k % 2, seed=10 + k),
              "instance_prompt": f"a photo of sks toy{k}", "seed": k,
              "class_data_dir": class_dir if k % 2 == 0 else other_class,
              "class_prompt": "a photo of toy" if k % 2 == 0 else "a photo of ball"} for k in range(SUBJECTS)]
    path = root / "subjects.json"
    path.write_text(json.dumps(items))
    return str(path), items


_RUNNER = """
import json, os, signal, sys
import jax
from dreambooth_jax.train import main
from dreambooth_jax.training import checkpoints
assert jax.device_count() == int(sys.argv[2])
original = checkpoints.Checkpointer.save
# a real SIGTERM after step 1 was dispatched
def preempt_after_step_1(self, state, meta, *, step, force=False):
    if step == 1 and not force:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, state, meta, step=step, force=force)
for argv, preempt in json.loads(sys.argv[1]):
    checkpoints.Checkpointer.save = preempt_after_step_1 if preempt else original
    main(argv)
"""


def _run_cli(devices: int, runs: list[tuple[list[str], bool]]) -> None:
    """The CLI, once per (argv, preempt after step 1) of `runs`, in one process with `devices` CPU devices."""
    env = {**os.environ, "XLA_FLAGS": xla_flags_with(f"--xla_force_host_platform_device_count={devices}"),
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(runs), str(devices)], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]


def test_subjects_trained_together_equal_each_alone(tiny_pipelines, subjects, tmp_path):
    """Full fine-tuning with prior preservation and EMA (stopped by SIGTERM after step 1, resumed; the fused
    GroupNorm kernel, against XLA's norm alone), and LoRA of the UNet and text encoder: each subject's export
    equals its run alone with its seed (rtol 1e-5: only the order of fp32 sums differs, see
    train_helpers.RTOL)."""
    path, items = subjects
    base = _base(tiny_pipelines)
    full, lora = tmp_path / "full", tmp_path / "lora"
    fused = ["--fused_norm", "on"]  # the kernel per device on its share of a subject's batch (interpret mode)
    _run_cli(DEVICES, [(["--subjects", path, "--output_dir", str(full), *base, *FULL, *fused], True),
                       (["--subjects", path, "--output_dir", str(full), *base, *FULL, *fused,
                         "--resume_from_checkpoint", "latest"], False),
                       (["--subjects", path, "--output_dir", str(lora), *base, *LORA], False)])

    def alone(item, out, extra):
        return (["--instance_data_dir", item["instance_data_dir"], "--instance_prompt",
                 item["instance_prompt"], "--class_data_dir", item["class_data_dir"], "--class_prompt",
                 item["class_prompt"],
                 "--seed", str(item["seed"]), "--output_dir", str(out / item["name"]), *base, *extra], False)

    _run_cli(ALONE_DEVICES, [alone(item, tmp_path / kind, extra) for kind, extra in (("full_alone", FULL),
                                                                                      ("lora_alone", LORA))
                             for item in items])
    assert sorted(os.listdir(full / "checkpoints")) == ["1", "2"]  # stopped at 1, resumed to 2
    for item in items:
        name = item["name"]
        assert os.path.isfile(full / name / "model_index.json")
        assert len((full / name / "logs" / "metrics.jsonl").read_text().splitlines()) == 2
        assert_same_weights(exported_weights(full / name), exported_weights(tmp_path / "full_alone" / name))
        assert_same_weights(exported_weights(lora / name), exported_weights(tmp_path / "lora_alone" / name))
    # The subjects did train apart: their exports differ.
    a, b = exported_weights(lora / "toy0"), exported_weights(lora / "toy1")
    assert max(float(abs(a[k] - b[k]).max()) for k in a) > 1e-4


def test_subject_groups_and_batch_layout():
    """One group per subject where there are devices enough (the fewest that split them evenly), padded."""
    assert parallel.subject_groups(4, 8) == 4 and parallel.subject_groups(8, 1) == 1
    assert parallel.subject_groups(30, 64) == 32 and parallel.subject_slots(30, 64) == 32  # 2 chips each
    assert parallel.subject_groups(3, 8) == 4 and parallel.subject_slots(3, 8) == 4
    assert parallel.subject_groups(16, 8) == 8 and parallel.subject_slots(12, 8) == 16
    mesh = parallel.train_mesh(1, subject_groups=1)
    assert dict(mesh.shape) == {"subject": 1, "data": 1, "fsdp": 1}
    P = jax.sharding.PartitionSpec
    assert parallel.batch_sharding(mesh, batch_axis=2).spec == P("subject", None, ("data", "fsdp"))
    assert parallel.batch_sharding(parallel.train_mesh(1), batch_axis=1).spec == P(None, ("data", "fsdp"))


def _write(tmp_path, items) -> str:
    path = tmp_path / "subjects.json"
    path.write_text(json.dumps(items))
    return str(path)


@pytest.mark.parametrize("change, message", [
    (lambda items: [*items, dict(items[0])], "two subjects are named 'toy0'"),
    (lambda items: [{**items[0], "name": "../x"}, *items[1:]], "usable as a folder name"),
    (lambda items: [{**items[0], "resolution": 128}, *items[1:]], "share the model and the resolution"),
    (lambda items: [{**items[0], "pretrained_model_name_or_path": "other"}, *items[1:]], "share the model"),
    (lambda items: [{**items[0], "colour": "red"}, *items[1:]], "unknown keys"),
    # case-insensitive FS
    (lambda items: [*items, {**items[0], "name": "TOY0"}], "two subjects are named 'TOY0'"),
    (lambda items: [{**items[0], "seed": True}, *items[1:]], "seed must be an integer"),
    (lambda items: [{**items[0], "instance_data_dir": "EMPTY"}, *items[1:]], "no images"),
    (lambda items: [{k: v for k, v in items[0].items() if k != "instance_prompt"}, *items[1:]],
     "instance_prompt is required"),
])
def test_bad_subjects_fail_before_loading(tiny_pipelines, subjects, tmp_path, capsys, change, message):
    """One `error:` line from the option parser: nothing is loaded (not even the model's configs)."""
    _, items = subjects
    empty = tmp_path / "empty"
    empty.mkdir()
    changed = [{k: (str(empty) if v == "EMPTY" else v) for k, v in item.items()} for item in change(items)]
    with pytest.raises(SystemExit):
        parse_args(["--subjects", _write(tmp_path, changed), *_base(tiny_pipelines),
                    "--with_prior_preservation"])
    assert message in capsys.readouterr().err


def test_subjects_options(tiny_pipelines, subjects, tmp_path, capsys):
    path, items = subjects
    cfg = parse_args(["--subjects", path, *_base(tiny_pipelines), "--output_dir", str(tmp_path / "out"),
                      "--validation_prompt", "a sks toy on a beach"])
    got = read_subjects(cfg)
    assert [s.name for s in got] == [i["name"] for i in items]
    assert [s.cfg.seed for s in got] == [0, 1, 2, 3]
    assert got[1].cfg.output_dir == str(tmp_path / "out" / "toy1")
    assert got[1].cfg.instance_prompt == "a photo of sks toy1" and got[1].cfg.subjects is None
    assert got[1].cfg.validation_prompt == "a sks toy on a beach"  # the run's, where a subject has none
    # --dataset naming several subjects is a run of several subjects
    cfg = parse_args(["--dataset", "dreambooth:dog6,cat", *_base(tiny_pipelines)])
    assert [(s.name, s.cfg.dataset) for s in read_subjects(cfg)] == [("dog6", "dreambooth:dog6"),
                                                                    ("cat", "dreambooth:cat")]
    with pytest.raises(SystemExit):
        parse_args(["--subjects", path, "--instance_data_dir", items[0]["instance_data_dir"],
                    *_base(tiny_pipelines)])
    assert "replaces --instance_data_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one prompt for every subject of the dataset: refused
        parse_args(["--dataset", "dreambooth:dog6,cat", "--instance_prompt", "a sks dog",
                    *_base(tiny_pipelines)])
    assert "would name every subject alike" in capsys.readouterr().err


@pytest.mark.parametrize("kind, extra", [
    ("sd1", ["--train_text_encoder", "--stop_text_encoder_training", "1",
             "--gradient_accumulation_steps", "2", "--cache_latents", "--use_ema"]),
    ("sdxl", ["--use_lora", "--rank", "4", "--pre_compute_text_embeddings", "--merge_lora"]),
])
def test_more_options_together_equal_alone(tiny_pipelines, subjects, tmp_path, kind, extra):
    """On one device (the subjects vmapped, not split): the text encoder stopped mid-run, accumulation, cached
    latents and EMA (SD 1); SDXL LoRA with precomputed text embeddings and the merged export. Two subjects
    together export what each exports alone (train_helpers.RTOL)."""
    path, items = subjects
    base = _base(tiny_pipelines)
    base[base.index("--pretrained_model_name_or_path") + 1] = tiny_pipelines[kind]
    two = tmp_path / "two.json"
    two.write_text(json.dumps(items[:2]))
    run(parse_args(["--subjects", str(two), "--output_dir", str(tmp_path / "together"), *base, *extra]))
    for item in items[:2]:
        run(parse_args(["--instance_data_dir", item["instance_data_dir"], "--instance_prompt",
                        item["instance_prompt"], "--class_data_dir", item["class_data_dir"], "--class_prompt",
                        item["class_prompt"], "--seed", str(item["seed"]), "--output_dir",
                        str(tmp_path / item["name"]), *base, *extra]))
        together = tmp_path / "together" / item["name"]
        assert_same_weights(exported_weights(together), exported_weights(tmp_path / item["name"]))
        if "--merge_lora" in extra:  # the merged pipelines too
            for part in ("unet", "text_encoder_2"):
                file = "diffusion_pytorch_model.safetensors" if part == "unet" else "model.safetensors"
                a = load_file(os.path.join(together, part, file))
                b = load_file(os.path.join(tmp_path, item["name"], part, "diffusion_pytorch_model.safetensors"
                                           if part == "unet" else "model.safetensors"))
                assert_same_weights(a, b)
