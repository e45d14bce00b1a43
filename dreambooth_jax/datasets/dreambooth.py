"""The DreamBooth paper's evaluation dataset (30 subjects, 15 classes) as a TensorFlow Datasets builder.

    builder = load_builder(manual_dir="../shared/datasets/dreambooth")   # offline; omit to download
    subject = load_subject(builder, "dog6")   # class_name 'dog', live, 25 prompts, 5 JPEG images

One split per subject (`dog6`, `backpack`, ...; `split="dog6+cat"` combines them), one record per image:
`subject`, `class_name`, `live` (dogs and cats get the "live subject" prompts), `image`, `file_name`, and
the 25 evaluation `prompts` of the subject's kind (with the paper's unique token `sks` and the class) and
their `prompt_templates` (`{unique_token}` / `{class_token}` placeholders). The dataset is written as
ArrayRecord files and read with `as_data_source`, so TensorFlow is never needed.

Sources: the paper authors' GitHub repository (google/dreambooth, `dataset/`) when online, or a local copy
in the same layout given as `manual_dir`: `<subject>/NN.jpg` folders and `prompts_and_classes.txt`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from dreambooth_jax import parallel
from dreambooth_jax.errors import DownloadError, MissingFileError, UsageError
from dreambooth_jax.images import list_images, read_image

log = logging.getLogger(__name__)

NAME = "dreambooth"
UNIQUE_TOKEN = "sks"  # the rare token of the paper's prompts ("a sks dog")
LIVE_CLASSES = ("cat", "dog")  # the paper's live subjects; every other class is an object
SOURCE_URL = "https://github.com/google/dreambooth/archive/refs/heads/main.zip"
HOMEPAGE = "https://github.com/google/dreambooth"
INDEX_FILE = "prompts_and_classes.txt"
CITATION = """@inproceedings{ruiz2023dreambooth,
  title={DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven Generation},
  author={Ruiz, Nataniel and Li, Yuanzhen and Jampani, Varun and Pritch, Yael and Rubinstein, Michael and
          Aberman, Kfir},
  booktitle={CVPR}, year={2023}}"""


@dataclasses.dataclass(frozen=True)
class SourceIndex:
    """What `prompts_and_classes.txt` says: subject -> class, and the two prompt template lists."""

    classes: dict[str, str]
    object_templates: tuple[str, ...]
    live_templates: tuple[str, ...]

    def templates(self, class_name: str) -> tuple[str, ...]:
        return self.live_templates if class_name in LIVE_CLASSES else self.object_templates


def format_prompts(templates, class_name: str, unique_token: str = UNIQUE_TOKEN) -> list[str]:
    """The templates with the subject's token and class filled in: 'a sks dog in the jungle'."""
    return [t.format(unique_token=unique_token, class_token=class_name) for t in templates]


def parse_index(text: str, source: str = INDEX_FILE) -> SourceIndex:
    """Parses the published `prompts_and_classes.txt` (a class table, then two Python prompt lists)."""
    classes, lists, current = {}, {}, None
    for line in text.splitlines():
        line = line.strip()
        if line in ("Object Prompts", "Live Subject Prompts"):
            current = lists.setdefault(line, [])
        elif (m := re.fullmatch(r"'(.*)'\.format\(unique_token, "
                                r"class_token\),?", line)) and current is not None:
            current.append(m.group(1).replace("{0}", "{unique_token}").replace("{1}", "{class_token}"))
        elif current is None and re.fullmatch(r"[\w-]+,[^,]+", line) and line != "subject_name,class":
            subject, class_name = line.split(",")
            classes[subject] = class_name.strip()
    missing = [k for k in ("Object Prompts", "Live Subject Prompts") if not lists.get(k)]
    if not classes or missing:
        raise UsageError(f"{source}: not the DreamBooth dataset index (no subject table or no "
                         f"{' / '.join(missing) or 'prompts'} list)")
    return SourceIndex(classes, tuple(lists["Object Prompts"]), tuple(lists["Live Subject Prompts"]))


def find_source_root(path: str) -> str | None:
    """The folder holding `prompts_and_classes.txt` at `path`, `path/dataset` or `path/*/dataset` (the
    extracted GitHub archive), or None."""
    candidates = [path, os.path.join(path, "dataset")]
    if os.path.isdir(path):
        candidates += [os.path.join(path, d, "dataset") for d in sorted(os.listdir(path))]
    return next((c for c in candidates if os.path.isfile(os.path.join(c, INDEX_FILE))), None)


class Dreambooth(tfds.core.GeneratorBasedBuilder):
    """The DreamBooth (Ruiz et al., CVPR 2023) subject dataset: one split per subject."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "The 30 subjects of google/dreambooth, one split per subject."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional. For offline builds, a copy of the `dataset/` folder of "
        "https://github.com/google/dreambooth (subject folders of images and prompts_and_classes.txt), e.g. "
        "resized; without it the builder downloads the repository.")

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="Subjects of the DreamBooth paper with their class and evaluation prompts.",
            features=tfds.features.FeaturesDict({
                "subject": text, "class_name": text, "live": tfds.features.Scalar(np.bool_),
                "image": tfds.features.Image(), "file_name": text,
                "prompts": tfds.features.Sequence(text), "prompt_templates": tfds.features.Sequence(text),
            }),
            homepage=HOMEPAGE, citation=CITATION, license="CC-BY-4.0",
        )

    def _source_root(self, dl_manager) -> str:
        try:
            manual = os.fspath(dl_manager.manual_dir)
        except AssertionError:  # no manual_dir given (or an empty one): download
            manual = None
        if manual is not None:
            root = find_source_root(manual)
            if root is None:
                raise MissingFileError(f"manual_dir {manual} holds no {INDEX_FILE} (expected the layout of "
                                        f"{HOMEPAGE}/tree/main/dataset)")
            return root
        try:
            extracted = os.fspath(dl_manager.download_and_extract(SOURCE_URL))
        except Exception as e:  # offline, blocked, rate-limited: say what to do instead
            raise DownloadError(f"cannot download {SOURCE_URL} ({type(e).__name__}: {e}); build offline from "
                                "a "
                                  "local copy with manual_dir (--dataset_manual_dir)") from e
        root = find_source_root(extracted)
        if root is None:
            raise MissingFileError(f"{SOURCE_URL}: no dataset/{INDEX_FILE} in the archive")
        return root

    def _split_generators(self, dl_manager):
        root = self._source_root(dl_manager)
        with open(os.path.join(root, INDEX_FILE), encoding="utf-8") as f:
            index = parse_index(f.read(), os.path.join(root, INDEX_FILE))
        missing = [s for s in index.classes if not os.path.isdir(os.path.join(root, s))]
        if missing:
            raise MissingFileError(f"{root}: no image folder for subject(s) {', '.join(missing)}")
        return {subject: self._generate_examples(root, index, subject) for subject in index.classes}

    def _generate_examples(self, root: str, index: SourceIndex, subject: str):
        class_name = index.classes[subject]
        templates = index.templates(class_name)
        for path in list_images(os.path.join(root, subject)):
            name = os.path.basename(path)
            yield f"{subject}/{name}", {
                "subject": subject, "class_name": class_name, "live": class_name in LIVE_CLASSES,
                "image": path, "file_name": name, "prompts": format_prompts(templates, class_name),
                "prompt_templates": list(templates),
            }


# --------------------------------------------------------------------------------------------- reading it
@dataclasses.dataclass(frozen=True)
class Subject:
    """One subject, as the trainer and the evaluation use it; `images` are (file name, encoded bytes)."""

    name: str
    class_name: str
    live: bool
    prompt_templates: tuple[str, ...]
    images: tuple[tuple[str, bytes], ...]

    def prompts(self, unique_token: str = UNIQUE_TOKEN) -> list[str]:
        return format_prompts(self.prompt_templates, self.class_name, unique_token)

    @property
    def class_folder(self) -> str:
        """A folder name for the subject's class images: 'stuffed animal' -> 'stuffed_animal'."""
        return re.sub(r"\W", "_", self.class_name)

    def instance_prompt(self, unique_token: str = UNIQUE_TOKEN) -> str:
        return f"a photo of {unique_token} {self.class_name}"

    def write_images(self, folder: str) -> str:
        """Makes `folder` hold exactly the subject's images (their original encoded bytes); returns it.
        Idempotent; other files there (e.g. another subject's, from an earlier run) are removed."""
        os.makedirs(folder, exist_ok=True)
        mine = {name for name, _ in self.images}
        for stale in set(os.listdir(folder)) - mine:
            if os.path.isfile(os.path.join(folder, stale)):
                os.remove(os.path.join(folder, stale))
        for name, data in self.images:
            path = os.path.join(folder, name)
            if not (os.path.isfile(path) and os.path.getsize(path) == len(data)):
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
        return folder

    def decoded_images(self) -> list[np.ndarray]:
        """uint8 [H, W, 3] arrays, decoded as the trainer's folder reader does."""
        return [read_image(io.BytesIO(data)) for _, data in self.images]


def parse_spec(spec: str) -> str:
    """'dreambooth:dog6' -> 'dog6'."""
    name, _, subject = spec.partition(":")
    if name != NAME or not subject:
        raise UsageError(f"--dataset {spec!r}: expected '{NAME}:<subject>', e.g. '{NAME}:dog6'")
    return subject


def load_spec(spec: str, data_dir: str | None = None, manual_dir: str | None = None) -> Subject:
    """The subject a `--dataset dreambooth:<subject>` option names, from the dataset (built on first use)."""
    return load_subject(load_builder(data_dir, manual_dir), parse_spec(spec))


def load_builder(data_dir: str | None = None, manual_dir: str | None = None) -> Dreambooth:
    """The builder, prepared: built once (from `manual_dir` if given, else downloaded) into `data_dir`
    (default: TFDS's, ~/tensorflow_datasets), then reused."""
    if manual_dir is not None and find_source_root(manual_dir) is None:
        raise MissingFileError(f"{manual_dir}: not a copy of the DreamBooth dataset (no {INDEX_FILE} in it "
                               "or in its dataset/ folder)")

    # On several hosts process 0 builds first (a shared data_dir must not be written by all at once); the
    # others then find it built, or build their own copy where data_dir is local to each host.
    if not parallel.is_main_process():
        parallel.barrier("dreambooth dataset")
    builder = _prepare(data_dir, manual_dir)
    if parallel.is_main_process():
        parallel.barrier("dreambooth dataset")
    return builder


_REPORTED: set[str] = set()  # data_dirs already said to be reused, once per process


def _prepare(data_dir: str | None, manual_dir: str | None) -> Dreambooth:
    absl = logging.getLogger("absl")
    level = absl.level
    # "Variant folder ... has no dataset_info.json": TFDS probing a fresh data_dir
    absl.setLevel(logging.ERROR)
    try:
        builder = Dreambooth(data_dir=data_dir, file_format="array_record")
        prepared = builder.is_prepared()
    finally:
        absl.setLevel(level)
    if prepared and manual_dir and os.fspath(builder.data_dir) not in _REPORTED:
        _REPORTED.add(os.fspath(builder.data_dir))
        log.info("using the %r dataset already built in %s (delete that folder to rebuild it from %s)", NAME,
                 builder.data_dir, manual_dir)
    if not prepared:
        log.info("building the TFDS dataset %r in %s from %s (once)", NAME, builder.data_dir,
                 manual_dir or SOURCE_URL)
        config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        # TFDS draws two bars per split: 60 of them for a few seconds of work
        tfds.display_progress_bar(False)
        try:
            builder.download_and_prepare(download_config=config)
        finally:
            tfds.display_progress_bar(True)
        log.info("built %d subjects", len(builder.info.splits))
        _REPORTED.add(os.fspath(builder.data_dir))
    return builder


def subject_names(builder: Dreambooth) -> list[str]:
    return sorted(builder.info.splits.keys())


def load_subject(builder: Dreambooth, subject: str) -> Subject:
    """A subject's records (images in file-name order) from the prepared dataset."""
    names = subject_names(builder)
    if subject not in names:
        raise UsageError(f"no subject {subject!r} in the {NAME} dataset (subjects: {', '.join(names)})")
    source = builder.as_data_source(split=subject, decoders={"image": tfds.decode.SkipDecoding()})
    records = sorted((source[i] for i in range(len(source))), key=lambda r: _text(r["file_name"]))
    first = records[0]
    return Subject(name=subject, class_name=_text(first["class_name"]), live=bool(first["live"]),
                   prompt_templates=tuple(_text(t) for t in first["prompt_templates"]),
                   images=tuple((_text(r["file_name"]), bytes(r["image"])) for r in records))


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
