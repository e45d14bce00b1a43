"""Score generated images with the DreamBooth paper's metrics: DINO, CLIP-I and CLIP-T.

    python -m dreambooth_jax.evaluate --images samples/ --dataset dreambooth:dog6
    python -m dreambooth_jax.evaluate --images samples/ --real_images photos/

The prompt of each generated image comes from `prompts.jsonl` in --images (written by
`python -m dreambooth_jax.sample`), or else from each PNG's metadata. Writes metrics.json (mean and std per
prompt and overall, and every image's scores) and metrics.md beside the images, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dreambooth_jax.cli import setup_logging
from dreambooth_jax.errors import MissingFileError, UsageError
from dreambooth_jax.evaluation import metrics as evaluation
from dreambooth_jax.evaluation.metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL
from dreambooth_jax.fileio import write_json
from dreambooth_jax.images import list_images, read_image, read_png_metadata


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreambooth_jax.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True,
                   help="folder of generated PNGs (with prompts.jsonl or metadata)")
    real = p.add_mutually_exclusive_group(required=True)
    real.add_argument("--real_images", help="folder of the subject's real photos")
    real.add_argument("--dataset",
                      help="the real photos of a DreamBooth dataset subject, e.g. dreambooth:dog6")
    p.add_argument("--dataset_dir", default=None,
                   help="TFDS data_dir of --dataset (default: ~/tensorflow_datasets)")
    p.add_argument("--dataset_manual_dir", default=None,
                   help="local copy of the DreamBooth dataset to build --dataset from offline")
    p.add_argument("--dino_model", default=DEFAULT_DINO_MODEL,
                   help="DINO ViT: Hub id or local folder (default: %(default)s)")
    p.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL,
                   help="CLIP model: Hub id or local folder (default: %(default)s)")
    p.add_argument("--unique_token", default="sks",
                   help="removed from the prompts CLIP-T compares with; '' keeps them as generated "
                        "(default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="images per compiled call (default 16 per device)")
    p.add_argument("--output", default=None, help="JSON file to write (default: IMAGES/metrics.json)")
    return p


def read_generated(folder: str) -> tuple[list[str], list[str]]:
    """(file paths, prompts) of the generated images in `folder`: from prompts.jsonl, else PNG metadata."""
    if not os.path.isdir(folder):
        raise MissingFileError(f"--images {folder}: no such folder")
    jsonl = os.path.join(folder, "prompts.jsonl")
    entries = {}
    if os.path.isfile(jsonl):
        with open(jsonl, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    entries[row["file"]] = row["prompt"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise UsageError(f"{jsonl}:{n}: expected a JSON object with 'file' and 'prompt' "
                                     f"({e})") from e
        missing = [name for name in entries if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise MissingFileError(f"{jsonl} lists {len(missing)} missing image(s), e.g. {missing[0]}")
    else:
        for name in sorted(os.listdir(folder)):
            if name.lower().endswith(".png") and (prompt := read_png_metadata(os.path.join(folder, name))
                                                  .get("prompt")):
                entries[name] = prompt
    if not entries:
        raise UsageError(f"--images {folder}: no generated images with a prompt (no prompts.jsonl, and no "
                         "PNG with a 'prompt' in its metadata)")
    names = sorted(entries)
    return [os.path.join(folder, n) for n in names], [entries[n] for n in names]


def read_real(args) -> tuple[list, str]:
    """(uint8 images, a description) of the subject's real photos."""
    if args.real_images:
        return [read_image(p) for p in list_images(args.real_images)], args.real_images
    # heavy and optional: TFDS only for --dataset
    from dreambooth_jax.datasets import dreambooth as dreambooth_dataset

    subject = dreambooth_dataset.load_spec(args.dataset, args.dataset_dir, args.dataset_manual_dir)
    return subject.decoded_images(), args.dataset


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    # late: --help and usage errors answer before jax (and the models) load
    from dreambooth_jax.evaluation.encoders import Encoders
    from dreambooth_jax.parallel import is_main_process, maybe_initialize_distributed

    maybe_initialize_distributed()  # before anything touches a device
    files, prompts = read_generated(args.images)
    real, real_source = read_real(args)
    generated = [read_image(f) for f in files]
    print(f"scoring {len(generated)} generated image(s) ({len(set(prompts))} prompt(s)) against {len(real)} "
          f"real image(s) of {real_source}", file=sys.stderr)
    encoders = Encoders(args.dino_model, args.clip_model, batch_size=args.batch_size)
    result = evaluation.evaluate(encoders, generated, prompts, real,
                                 files=[os.path.basename(f) for f in files],
                                 unique_token=args.unique_token or None,
                                 info={"images_dir": args.images, "real_source": real_source})
    output = args.output or os.path.join(args.images, "metrics.json")
    table = evaluation.markdown_table(result)
    if is_main_process():
        write_json(output, result.to_json(), sort_keys=False)
        with open(os.path.splitext(output)[0] + ".md", "w", encoding="utf-8") as f:
            f.write(table)
        print(table)
        print(f"wrote {output} and {os.path.splitext(output)[0]}.md", file=sys.stderr)


if __name__ == "__main__":
    from dreambooth_jax import cli

    cli.run_main(main)
