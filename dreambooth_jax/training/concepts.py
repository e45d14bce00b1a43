"""What a run trains on: its concepts (--instance_data_dir and the class flags, or --concepts_list), the
subjects of a run of several (--subjects, --dataset dreambooth:a,b,c), and the shared dataset's subjects
(--dataset).

The functions take the run's `TrainConfig` (`training.config`) and return new ones with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass

from dreambooth_jax import parallel
from dreambooth_jax.errors import UsageError
from dreambooth_jax.training.data import Concept


def read_concepts(cfg):
    """The subjects of the run: those of --concepts_list, or the one given by the instance/class flags."""
    if not cfg.concepts_list:
        return [Concept(cfg.instance_data_dir, cfg.instance_prompt, cfg.class_data_dir, cfg.class_prompt)]
    with open(cfg.concepts_list, encoding="utf-8") as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            raise UsageError(f"--concepts_list {cfg.concepts_list}: not valid JSON ({e})") from e
    if not isinstance(items, list) or not items:
        raise UsageError(f"--concepts_list {cfg.concepts_list}: expected a non-empty JSON list of concepts")
    keys = {f.name for f in dataclasses.fields(Concept)}
    concepts = []
    for i, item in enumerate(items):
        unknown = sorted(set(item) - keys) if isinstance(item, dict) else ["(not an object)"]
        if unknown:
            raise UsageError(f"--concepts_list {cfg.concepts_list}: concept {i} has unknown keys {unknown}")
        concepts.append(Concept(**{k: item.get(k) for k in keys}))
    return concepts


# A subject of --subjects: its name, the concept fields, and what may differ between subjects of one run.
SUBJECT_KEYS = ("name", "instance_data_dir", "instance_prompt", "class_data_dir", "class_prompt", "dataset",
                "seed", "validation_prompt")
# What the subjects of one run share (one model, one step): a subject may restate them, not change them.
SHARED_KEYS = ("pretrained_model_name_or_path", "resolution")
_SUBJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_RESERVED_NAMES = ("checkpoints", "logs", "class_images", "validation")


@dataclass(frozen=True)
class SubjectRun:
    """One subject of a run of several: its name (its folder in --output_dir) and its own run's options."""

    name: str
    cfg: object  # its own run's TrainConfig


def many_subjects(cfg) -> bool:
    """Whether `cfg` trains several subjects, each its own model (--subjects, or --dataset naming several)."""
    return bool(cfg.subjects) or bool(cfg.dataset and "," in cfg.dataset)


def read_subjects(cfg) -> list[SubjectRun]:
    """The subjects of --subjects (or of --dataset dreambooth:a,b,c), each with its own TrainConfig: the
    run's, with the subject's fields, `output_dir/<name>` as its output folder and no --subjects. Checks the
    file's shape, the names (unique, usable as folder names) and that no subject changes what subjects
    share."""
    if cfg.subjects:
        where = f"--subjects {cfg.subjects}"
        try:
            with open(cfg.subjects, encoding="utf-8") as f:
                items = json.load(f)
        except OSError as e:
            raise UsageError(f"{where}: {e.strerror or e}") from e
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(items, list) or not items:
            raise UsageError(f"{where}: expected a non-empty JSON list of subjects")
    else:
        from dreambooth_jax.datasets import dreambooth as dreambooth_dataset  # TFDS, heavy: --dataset only

        where = f"--dataset {cfg.dataset}"
        prefix = cfg.dataset.partition(":")[0]
        names = [n.strip() for n in dreambooth_dataset.parse_spec(cfg.dataset).split(",")]
        items = [{"name": n, "dataset": f"{prefix}:{n}"} for n in names]
    subjects, seen = [], set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UsageError(f"{where}: subject {i} is not an object")
        name = item.get("name")
        if not isinstance(name, str) or not _SUBJECT_NAME.match(name) or name in _RESERVED_NAMES:
            raise UsageError(f"{where}: subject {i} needs a \"name\" usable as a folder name (letters, "
                             f"digits, '.', '_', '-'; not {', '.join(_RESERVED_NAMES)}); got {name!r}")
        if name.lower() in seen:  # (case-insensitive file systems)
            raise UsageError(f"{where}: two subjects are named {name!r}; names must be unique, whatever "
                             "their case (each is a folder)")
        seen.add(name.lower())
        unknown = sorted(set(item) - set(SUBJECT_KEYS) - set(SHARED_KEYS))
        if unknown:
            raise UsageError(f"{where}: subject {name!r} has unknown keys {unknown} (known: "
                             f"{', '.join(SUBJECT_KEYS + SHARED_KEYS)})")
        for key in SHARED_KEYS:
            if key in item and item[key] != getattr(cfg, key):
                raise UsageError(f"{where}: subject {name!r} has {key} {item[key]!r}, the run "
                                 f"{getattr(cfg, key)!r}: the subjects of one run share the model and the "
                                 "resolution; train the others in another run")
        seed = item.get("seed", cfg.seed)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise UsageError(f"{where}: subject {name!r}: seed must be an integer >= 0; got {seed!r}")
        own = {k: item[k] for k in SUBJECT_KEYS[1:] if k in item}
        # its prompts and class folder come from the dataset's subject, unless it names them
        if "dataset" in own:
            own = {"instance_prompt": None, "class_prompt": None, "class_data_dir": None, **own}
        subjects.append(SubjectRun(name, dataclasses.replace(
            cfg, **{**own, "seed": seed, "dataset": own.get("dataset"), "subjects": None,
                    "output_dir": os.path.join(cfg.output_dir, name)})))
    return subjects


def resolve_dataset(cfg, class_root: str | None = None):
    """With --dataset dreambooth:<subject>: the subject's images written to `output_dir/instance_images` and
    the instance/class options it implies filled in where not given (class images in
    `class_root/<class>`, default `output_dir/class_images/<class>`). Builds the dataset on first use."""
    if not cfg.dataset:
        return cfg
    from dreambooth_jax.datasets import dreambooth as dreambooth_dataset  # TFDS, heavy: --dataset only

    subject = dreambooth_dataset.load_spec(cfg.dataset, cfg.dataset_dir, cfg.dataset_manual_dir)
    folder = os.path.join(cfg.output_dir, "instance_images")
    if parallel.is_main_process():  # one process writes the folder, the others wait for it
        subject.write_images(folder)
    parallel.barrier("instance images")
    resolved = dataclasses.replace(
        cfg, instance_data_dir=folder, instance_prompt=cfg.instance_prompt or subject.instance_prompt(),
        class_prompt=cfg.class_prompt or f"a photo of {subject.class_name}",
        class_data_dir=cfg.class_data_dir or os.path.join(
            class_root or os.path.join(cfg.output_dir, "class_images"), subject.class_folder))
    logging.getLogger("dreambooth_jax.train").info(
        "--dataset %s: %d photos of a %s in %s; instance prompt %r, class prompt %r", cfg.dataset,
        len(subject.images), subject.class_name, folder, resolved.instance_prompt, resolved.class_prompt)
    return resolved


def resolve_subjects(subjects: list[SubjectRun], output_dir: str,
                     class_data_dir: str | None) -> list[SubjectRun]:
    """The subjects of a run writing to `output_dir` (its local twin): each one's output folder
    `output_dir/<name>`, and --dataset subjects' images and class folders (under `class_data_dir`, default
    `output_dir/class_images`, one per class: subjects of one class share it)."""
    class_root = class_data_dir or os.path.join(output_dir, "class_images")
    out = []
    for s in subjects:
        own = dataclasses.replace(s.cfg, output_dir=os.path.join(output_dir, s.name))
        out.append(dataclasses.replace(s, cfg=resolve_dataset(own, class_root)))
    return out
