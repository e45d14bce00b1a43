"""Reproduce Table 1 of the DreamBooth paper for your own run: `python -m dreambooth_jax.reproduce`.

For each subject of the DreamBooth dataset (default: all 30) and each seed: train with the `paper` preset
(`--dataset dreambooth:<subject>`; class images shared per class, generated once), generate
--num_images_per_prompt images for each of the subject's 25 prompts, and score them with DINO, CLIP-I and
CLIP-T. Writes `results.md` / `results.json` (per subject, averaged, beside the paper's Table 1) and a
contact sheet per subject, updated after every subject.

Rerunning the same command resumes: scored runs are skipped, a finished training is not redone, and an
interrupted one continues from its last checkpoint. Trainer options go after `--`:

    python -m dreambooth_jax.reproduce --subjects dog6,cat --output_dir paper_run -- --learning_rate 2e-6
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from dreambooth_jax.cli import setup_logging
from dreambooth_jax.diffusion.samplers import SCHEDULER_NAMES
from dreambooth_jax.evaluation.metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreambooth_jax.reproduce",
                                description=__doc__.splitlines()[0],
                                epilog="Options after `--` go to the trainer (python -m "
                                       "dreambooth_jax.train).")
    p.add_argument("--output_dir", default="paper_reproduction",
                   help="everything goes here; rerun to resume (default: %(default)s)")
    p.add_argument("--subjects", default=None, help="comma-separated subjects (default: all 30)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each (subject, seed) is one run: the "
                                                "training seed, and image k of the run has seed SEED + k "
                                                "(default: %(default)s)")
    p.add_argument("--config", default="paper",
                   help="trainer preset name or JSON path (default: %(default)s)")
    p.add_argument("--pretrained_model_name_or_path", default=None, help="base model (default: the preset's)")
    p.add_argument("--max_train_steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--unique_token", default="sks",
                   help="the subject's token in the prompts; removed for CLIP-T "
                                  "(default: %(default)s)")
    p.add_argument("--num_images_per_prompt", type=int, default=4, help="the paper: 4 (default: %(default)s)")
    p.add_argument("--num_inference_steps", type=int, default=50,
                   help="denoising steps per image (default: %(default)s)")
    p.add_argument("--guidance_scale", type=float, default=7.5,
                   help="classifier-free guidance (default: %(default)s)")
    p.add_argument("--scheduler", default=None, choices=SCHEDULER_NAMES,
                   help="sampler (default: the pipeline's own)")
    p.add_argument("--sample_batch_size", type=int, default=None, help="images per compiled call "
                                                                       "(default: 4 per device)")
    p.add_argument("--dataset_dir", default=None, help="TFDS data_dir (default: ~/tensorflow_datasets)")
    p.add_argument("--dataset_manual_dir", default=None,
                   help="local copy of the dataset to build from offline")
    p.add_argument("--dino_model", default=DEFAULT_DINO_MODEL,
                   help="DINO ViT: Hub id or local folder (default: %(default)s)")
    p.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL,
                   help="CLIP model: Hub id or local folder (default: %(default)s)")
    p.add_argument("--parallel_subjects", type=int, default=None,
                   help="train this many (subject, seed) runs at once, as one run of several subjects (train "
                        "--subjects); each run's results are those it gets alone with the same batch per "
                        "subject (default: as many as the devices and their memory allow, from the memory "
                        "preflight)")
    p.add_argument("--keep_models", action="store_true",
                   help="keep each trained pipeline (default: deleted once its images are made, to save "
                        "disk)")
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:split])
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if args.parallel_subjects is not None and args.parallel_subjects < 1:
        parser.error("--parallel_subjects must be >= 1")
    if not args.seeds or args.num_images_per_prompt < 1 or args.num_inference_steps < 1:
        parser.error("--seeds, --num_images_per_prompt and --num_inference_steps need at least one / >= 1")
    return args, argv[split + 1 :]


def main(argv=None) -> None:
    args, trainer_args = parse_args(argv)
    setup_logging()
    t0 = time.perf_counter()
    # late: --help and usage errors answer before the models (flax, transformers) load
    from dreambooth_jax.paper import reproduction

    path = reproduction.run_protocol(args, trainer_args)
    if path is not None:
        with open(path, encoding="utf-8") as f:
            print(f.read())
        print(f"done in {time.perf_counter() - t0:.0f}s; results in {path} and "
              f"{os.path.join(args.output_dir, 'results.json')}", file=sys.stderr)


if __name__ == "__main__":
    from dreambooth_jax import cli

    cli.run_main(main)
