"""The trainer command line of the protocol's runs, trained one at a time (`reproduction`) or several as one
(`parallel_runs`): the options they share, each run's class image folder, and the trainer config of a line."""

from __future__ import annotations

import dataclasses
import logging
import os

from dreambooth_jax.training.config import parse_args

log = logging.getLogger("dreambooth_jax.reproduce")


def run_flags(args, trainer_out: str) -> list[str]:
    """The trainer options every run of `args` shares, and resumption where `trainer_out` has checkpoints."""
    out = ["--config", args.config]
    for flag in ("pretrained_model_name_or_path", "max_train_steps", "dataset_dir", "dataset_manual_dir"):
        if getattr(args, flag) is not None:
            out += [f"--{flag}", str(getattr(args, flag))]
    checkpoints = os.path.join(trainer_out, "checkpoints")
    if os.path.isdir(checkpoints) and any(d.isdigit() for d in os.listdir(checkpoints)):
        out += ["--resume_from_checkpoint", "latest"]
    return out


def class_folder(args, subject) -> str:
    return os.path.join(args.output_dir, "class_images", subject.class_folder)


def train_args(args, trainer_args: list[str], subject, seed: int, model_dir: str) -> list[str]:
    """The trainer command line of one (subject, seed) run."""
    out = ["--dataset", f"dreambooth:{subject.name}", "--output_dir", model_dir,
           "--class_data_dir", class_folder(args, subject),
           "--instance_prompt", subject.instance_prompt(args.unique_token), "--seed", str(seed)]
    return run_flags(args, model_dir) + out + trainer_args


def parse_train_args(argv: list[str]):
    """The trainer's config of `argv`; LoRA runs also export the merged pipeline (to sample from)."""
    cfg = parse_args(argv)
    if cfg.use_lora and not cfg.merge_lora:  # images are sampled from a full pipeline: export one
        log.info("--use_lora: adding --merge_lora, to sample from the pipeline with the adapters merged in")
        cfg = dataclasses.replace(cfg, merge_lora=True)
    return cfg
