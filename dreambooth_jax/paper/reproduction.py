"""The paper's protocol (Ruiz et al. 2023, sec. 4.1) for one model: for each subject and seed, train, generate
the subject's 25 prompts x N images, score them (DINO, CLIP-I, CLIP-T); report per subject and averaged beside
the paper's Table 1. Behind `python -m dreambooth_jax.reproduce`; resumable (see `run_protocol`)."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time

import jax
import numpy as np
from PIL import Image

from dreambooth_jax import images as image_io
from dreambooth_jax.diffusion.generation import generate
from dreambooth_jax.diffusion.samplers import scheduler_name_for
from dreambooth_jax.errors import UsageError
from dreambooth_jax.evaluation import metrics as evaluation
from dreambooth_jax.evaluation.encoders import Encoders
from dreambooth_jax.fileio import read_json, write_json
from dreambooth_jax.images import contact_sheet, read_image, save_png
from dreambooth_jax.paper import parallel_runs
from dreambooth_jax.paper.trainer_flags import parse_train_args, train_args
from dreambooth_jax.parallel import is_main_process, maybe_initialize_distributed
from dreambooth_jax.pipeline import load_pipeline
from dreambooth_jax.training import trainer
from dreambooth_jax.training.config import load_preset

log = logging.getLogger("dreambooth_jax.reproduce")
METRICS = evaluation.METRICS


# ---------------------------------------------------------------------------------------------- one run
def train_subject(args, trainer_args, subject, seed: int, model_dir: str):
    """Trains unless an exported pipeline is already there; returns the trainer config."""
    argv = train_args(args, trainer_args, subject, seed, model_dir)
    cfg = parse_train_args(argv)
    if os.path.isfile(os.path.join(model_dir, "model_index.json")):
        log.info("%s seed %d: trained pipeline found in %s", subject.name, seed, model_dir)
        return cfg
    log.info("%s seed %d: training (python -m dreambooth_jax.train %s)", subject.name, seed,
             " ".join(argv))
    result = trainer.run(cfg)
    if not os.path.isfile(os.path.join(model_dir, "model_index.json")):
        raise UsageError(f"training of {subject.name} stopped at step {result.steps} (preempted?); "
                         "rerun the same command to resume")
    return cfg


def sample_subject(args, cfg, subject, seed: int, model_dir: str, samples_dir: str):
    """Generates the run's images into `samples_dir` (from scratch); returns (uint8 images, prompts, file
    names)."""
    pipe = load_pipeline(model_dir, dtype=cfg.compute_dtype, attention_impl=cfg.attention,
                         fused_norm=cfg.fused_norm)
    scheduler = args.scheduler or scheduler_name_for(pipe.scheduler_config)
    prompts = [p for p in subject.prompts(args.unique_token) for _ in range(args.num_images_per_prompt)]
    log.info("%s seed %d: generating %d images (%s, %d steps)", subject.name, seed, len(prompts), scheduler,
             args.num_inference_steps)
    images = generate(pipe, prompts, num_inference_steps=args.num_inference_steps,
                      guidance_scale=args.guidance_scale, scheduler=scheduler, seed=seed,
                      batch_size=args.sample_batch_size or 4 * jax.device_count(), progress=True)
    settings = {"negative_prompt": "", "steps": args.num_inference_steps, "scheduler": scheduler,
                "guidance_scale": args.guidance_scale, "model": model_dir, "subject": subject.name,
                "dtype": cfg.compute_dtype}
    if is_main_process():
        shutil.rmtree(samples_dir, ignore_errors=True)  # a partial set from an interrupted run
        os.makedirs(samples_dir)
        image_io.write_images(samples_dir, prompts, images, seed=seed, settings=settings,
                              columns=args.num_images_per_prompt)
    return image_io.to_uint8(images), prompts, [f"{k:05d}-seed{seed + k}.png" for k in range(len(prompts))]


def subject_sheet(real: list, generated: np.ndarray, columns: int, thumb: int = 128) -> np.ndarray:
    """A contact sheet: the real photos on the first row(s), then one row per prompt (thumbnails)."""
    def small(image):
        rgb = Image.fromarray(np.asarray(image)).convert("RGB")
        return np.asarray(rgb.resize((thumb, thumb), Image.Resampling.BICUBIC))

    columns = max(columns, 1)
    real_rows = [small(im) for im in real]
    real_rows += [np.full((thumb, thumb, 3), 255, np.uint8)] * (-len(real_rows) % columns)
    return contact_sheet(np.stack(real_rows + [small(im) for im in generated]), columns=columns)


# ------------------------------------------------------------------------------------------------ results
def summarize_runs(runs: dict) -> dict:
    """Per subject (all its runs' images pooled) and averaged over subjects (std across subjects)."""
    subjects = {}
    for name, by_seed in runs.items():
        first = next(iter(by_seed.values()))
        images = [row for metrics in by_seed.values() for row in metrics["images"]]
        subjects[name] = {"class": first["class_name"], "seeds": sorted(int(s) for s in by_seed),
                          **{m: evaluation.stats([row[m] for row in images]) for m in METRICS},
                          "real_images": first["real_images"]}
    average, real = {}, {}
    if subjects:
        average = {m: evaluation.stats([s[m]["mean"] for s in subjects.values()]) for m in METRICS}
        real = {m: evaluation.stats([s["real_images"][m]["mean"] for s in subjects.values()
                                     if s["real_images"][m]])
                for m in ("dino", "clip_i")}
    return {"subjects": subjects, "average": average, "real_images": real,
            "paper_table_1": {k: dict(zip(METRICS, v)) for k, v in evaluation.PAPER_TABLE_1.items()}}


def report_markdown(results: dict, settings: dict) -> str:
    cell = evaluation.format_stats
    names = " / ".join(evaluation.METRIC_NAMES[m] for m in METRICS)
    lines = ["# DreamBooth paper reproduction", "",
             f"Model `{settings['model']}`, preset `{settings['config']}`, seeds {settings['seeds']}, "
             f"{settings['num_images_per_prompt']} images per prompt, {settings['num_inference_steps']} "
             f"steps, guidance {settings['guidance_scale']}. Mean ± std over each subject's generated "
             "images.", "",
             "| subject | class | DINO | CLIP-I | CLIP-T | images |", "|---|---|---|---|---|---|"]
    for name, s in results["subjects"].items():
        lines.append(f"| {name} | {s['class']} | " + " | ".join(cell(s[m]) for m in METRICS)
                     + f" | {s['dino']['n']} |")
    n = len(results["subjects"])
    avg, real = results["average"], results["real_images"]
    lines += ["",
              f"## Beside the paper's Table 1 ({names}; this run: mean over {n} subject(s) ± std across "
              "them)", "", "| method | DINO | CLIP-I | CLIP-T |", "|---|---|---|---|",
              f"| **this run** (DreamBooth, {settings['model']}) | "
              + " | ".join(cell(avg.get(m)) for m in METRICS) + " |",
              f"| real images (these subjects) | {cell(real.get('dino'))} | {cell(real.get('clip_i'))} | - |"]
    for method, values in evaluation.PAPER_TABLE_1.items():
        lines.append(f"| paper: {method} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in values)
                     + " |")
    return "\n".join(lines) + "\n"


def write_results(output_dir: str, runs: dict, settings: dict) -> str:
    results = summarize_runs(runs)
    write_json(os.path.join(output_dir, "results.json"), {"settings": settings, **results}, sort_keys=False)
    path = os.path.join(output_dir, "results.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(report_markdown(results, settings))
    os.replace(path + ".tmp", path)
    return path


# ------------------------------------------------------------------------------------------------------ main
def run_settings(args, trainer_args) -> dict:
    """What a run's results depend on, recorded with them."""
    model = (args.pretrained_model_name_or_path
             or load_preset(args.config).get("pretrained_model_name_or_path"))
    return {"config": args.config, "model": model, "seeds": args.seeds,
            "max_train_steps": args.max_train_steps, "trainer_args": trainer_args,
            "unique_token": args.unique_token, "num_images_per_prompt": args.num_images_per_prompt,
            "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
            "scheduler": args.scheduler, "dino_model": args.dino_model, "clip_model": args.clip_model}


def check_run_settings(run_dir: str, settings: dict) -> None:
    """Records the settings of a run in `run_dir/settings.json`, or checks that they are those it was started
    with: a rerun into the same --output_dir with other settings must not mix old and new results."""
    path = os.path.join(run_dir, "settings.json")
    run = {k: v for k, v in settings.items() if k != "seeds"}
    if os.path.isfile(path):
        before = read_json(path)
        changed = sorted(k for k in set(before) | set(run) if before.get(k) != run.get(k))
        if changed:
            diff = ", ".join(f"{k}: {before.get(k)!r} -> {run.get(k)!r}" for k in changed)
            raise UsageError(f"{run_dir} was started with other settings ({diff}); use another --output_dir, "
                             f"or delete {run_dir} to redo it")
    elif is_main_process():
        os.makedirs(run_dir, exist_ok=True)
        write_json(path, run, sort_keys=False)


def run_one(args, trainer_args, subject, seed: int, real: list, encoders) -> dict:
    """Train, sample and score one (subject, seed); returns its metrics JSON."""
    run_dir = os.path.join(args.output_dir, subject.name, f"seed{seed}")
    model_dir, samples_dir = os.path.join(run_dir, "model"), os.path.join(run_dir, "samples")
    cfg = train_subject(args, trainer_args, subject, seed, model_dir)
    generated, prompts, files = sample_subject(args, cfg, subject, seed, model_dir, samples_dir)
    result = evaluation.evaluate(encoders, list(generated), prompts, real, unique_token=args.unique_token,
                                 files=files, info={"subject": subject.name, "class_name": subject.class_name,
                                                    "seed": seed})
    encoders.release()  # device memory back to the next subject's training
    metrics = result.to_json()
    if is_main_process():
        with open(os.path.join(run_dir, "metrics.md"), "w", encoding="utf-8") as f:
            f.write(evaluation.markdown_table(result))
        # last: the run is finished
        write_json(os.path.join(run_dir, "metrics.json"), metrics, sort_keys=False)
        if not args.keep_models:
            shutil.rmtree(model_dir, ignore_errors=True)
    return metrics


def write_contact_sheet(args, name: str, real: list) -> None:
    """`<subject>/contact_sheet.png` from the images on disk of the subject's first seed that has them."""
    for seed in args.seeds:
        samples = os.path.join(args.output_dir, name, f"seed{seed}", "samples")
        files = sorted(f for f in os.listdir(samples) if f[:5].isdigit()) if os.path.isdir(samples) else []
        if files:
            generated = [read_image(os.path.join(samples, f)) for f in files]
            save_png(subject_sheet(real, generated, args.num_images_per_prompt) / 255.0,
                     os.path.join(args.output_dir, name, "contact_sheet.png"),
                     {"subject": name, "rows": "real photos, then one row per prompt", "seed": seed})
            return


# ------------------------------------------------------------------------------------------------------- run
def run_protocol(args, trainer_args: list[str]) -> str | None:
    """Every (subject, seed) run of `args` (the CLI's options; trainer options in `trainer_args`) that is not
    scored yet; returns the path of `results.md` (on process 0; None elsewhere).

    On several hosts, every process runs this with the same arguments and a shared --output_dir."""
    # heavy and optional: TFDS loads only when the protocol runs
    from dreambooth_jax.datasets import dreambooth as dreambooth_dataset

    maybe_initialize_distributed()  # before anything touches a device
    builder = dreambooth_dataset.load_builder(args.dataset_dir, args.dataset_manual_dir)
    known = dreambooth_dataset.subject_names(builder)
    names = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else known
    unknown = [s for s in names if s not in known]
    if unknown or not names:
        raise UsageError(f"--subjects: unknown {', '.join(unknown) or '(none given)'}; known: "
                         f"{', '.join(known)}")
    os.makedirs(args.output_dir, exist_ok=True)
    settings = run_settings(args, trainer_args)
    run_dir = lambda name, seed: os.path.join(args.output_dir, name, f"seed{seed}")  # noqa: E731
    for name in names:
        for seed in args.seeds:
            check_run_settings(run_dir(name, seed), settings)
    pending = [(n, s) for n in names for s in args.seeds
               if not os.path.isfile(os.path.join(run_dir(n, s), "metrics.json"))]
    print(f"{len(names)} subject(s) x {len(args.seeds)} seed(s): {len(pending)} run(s) to do",
          file=sys.stderr)
    # Loaded first (on the host), so that a wrong --dino_model / --clip_model fails before hours of training.
    encoders = Encoders(args.dino_model, args.clip_model) if pending else None
    together = parallel_runs.Together(args, trainer_args, builder, pending)  # --parallel_subjects

    runs, path, t_start = {}, None, time.perf_counter()
    for i, name in enumerate(names):
        subject = dreambooth_dataset.load_subject(builder, name)
        real = subject.decoded_images()
        for seed in args.seeds:
            tag = f"[{i + 1}/{len(names)}] {name} seed {seed}"
            if (name, seed) not in pending:
                print(f"{tag}: done before, skipped", file=sys.stderr)
                runs.setdefault(name, {})[seed] = read_json(os.path.join(run_dir(name, seed), "metrics.json"))
                continue
            t0 = time.perf_counter()
            # (its group's models, when they train together and are not yet)
            together.train_group_of(name, seed)
            metrics = run_one(args, trainer_args, subject, seed, real, encoders)
            runs.setdefault(name, {})[seed] = metrics
            print(f"{tag}: " + ", ".join(f"{evaluation.METRIC_NAMES[m]} {metrics['overall'][m]['mean']:.3f}"
                                         for m in METRICS) + f" ({time.perf_counter() - t0:.0f}s)",
                  file=sys.stderr)
        if is_main_process():
            if not os.path.isfile(os.path.join(args.output_dir, name, "contact_sheet.png")) or any(
                    (name, seed) in pending for seed in args.seeds):
                write_contact_sheet(args, name, real)
            path = write_results(args.output_dir, runs, settings)
    log.info("%d subject(s) in %.0fs", len(names), time.perf_counter() - t_start)
    return path
