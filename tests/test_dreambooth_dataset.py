"""The TFDS `dreambooth` builder (offline, from a tiny local copy) and the trainer's `--dataset` option."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dreambooth_jax.datasets import dreambooth as dreambooth_dataset
from dreambooth_jax.testing import tiny
from dreambooth_jax.training.concepts import resolve_dataset
from dreambooth_jax.training.config import TrainConfig, parse_args, validate

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "dreambooth")
SUBJECTS = {"dog": "dog", "teapot": "teapot", "bear_plushie": "stuffed animal"}


@pytest.fixture(scope="module")
def copy_dir(tmp_path_factory) -> str:
    return tiny.make_tiny_dataset(str(tmp_path_factory.mktemp("dreambooth_copy")), SUBJECTS)


@pytest.fixture(scope="module")
def builder(copy_dir, tmp_path_factory):
    return dreambooth_dataset.load_builder(str(tmp_path_factory.mktemp("tfds")), manual_dir=copy_dir)


def test_builder_yields_every_subject_with_class_and_prompts(builder, copy_dir):
    assert dreambooth_dataset.subject_names(builder) == sorted(SUBJECTS)
    live = ["a sks dog in the snow", "a sks dog wearing a red hat"]
    for name, class_name in SUBJECTS.items():
        subject = dreambooth_dataset.load_subject(builder, name)
        assert subject.class_name == class_name and subject.live == (class_name == "dog")
        expected = live if subject.live else [f"a sks {class_name} in the jungle", f"a red sks {class_name}"]
        assert subject.prompts() == expected
        assert subject.prompts("zwx")[0] == expected[0].replace("sks", "zwx")
        assert subject.instance_prompt() == f"a photo of sks {class_name}"
        files = sorted(os.listdir(os.path.join(copy_dir, name)))
        assert [n for n, _ in subject.images] == files
        for file_name, data in subject.images:  # the original bytes, not a re-encode
            with open(os.path.join(copy_dir, name, file_name), "rb") as f:
                assert f.read() == data
        assert subject.decoded_images()[0].shape == (48, 48, 3)


def test_builder_records_through_tfds_data_source(builder):
    """Plain TFDS reading (decoded images, combined splits) works too, without TensorFlow."""
    source = builder.as_data_source(split="dog+teapot")
    records = [source[i] for i in range(len(source))]
    assert len(records) == 6
    assert {r["subject"].decode() if isinstance(r["subject"], bytes) else r["subject"] for r in records} == {
        "dog", "teapot"}
    assert all(r["image"].shape == (48, 48, 3) and r["image"].dtype == np.uint8 for r in records)
    assert builder.info.splits["bear_plushie"].num_examples == 3


def test_unknown_subject_and_bad_manual_dir(builder, tmp_path):
    with pytest.raises(ValueError, match="no subject 'dog6'.*bear_plushie, dog, teapot"):
        dreambooth_dataset.load_subject(builder, "dog6")
    with pytest.raises(FileNotFoundError, match="not a copy of the DreamBooth dataset"):
        dreambooth_dataset.load_builder(str(tmp_path / "tfds"), manual_dir=str(tmp_path))
    with pytest.raises(ValueError, match="expected 'dreambooth:<subject>'"):
        dreambooth_dataset.parse_spec("dog6")


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/datasets/dreambooth is not here")
def test_published_index_parses():
    with open(os.path.join(SHARED, "prompts_and_classes.txt"), encoding="utf-8") as f:
        index = dreambooth_dataset.parse_index(f.read())
    assert len(index.classes) == 30 and len(set(index.classes.values())) == 15
    assert len(index.object_templates) == 25 and len(index.live_templates) == 25
    assert sum(c in dreambooth_dataset.LIVE_CLASSES for c in index.classes.values()) == 9
    assert dreambooth_dataset.format_prompts(index.live_templates, "dog")[10] == "a sks dog wearing a red hat"


def test_trainer_dataset_option_fills_in_the_subject(builder, copy_dir, tmp_path):
    data_dir = os.path.dirname(os.path.dirname(builder.data_dir))  # .../tfds/dreambooth/1.0.0 -> .../tfds
    cfg = TrainConfig(pretrained_model_name_or_path="unused", dataset="dreambooth:teapot",
                      dataset_dir=data_dir, dataset_manual_dir=copy_dir, output_dir=str(tmp_path / "out"),
                      with_prior_preservation=True)
    assert validate(cfg) == []
    resolved = resolve_dataset(cfg)
    assert resolved.instance_prompt == "a photo of sks teapot"
    assert resolved.class_prompt == "a photo of teapot"
    assert resolved.class_data_dir == str(tmp_path / "out" / "class_images" / "teapot")
    assert sorted(os.listdir(resolved.instance_data_dir)) == ["00.jpg", "01.jpg", "02.jpg"]
    # Another subject into the same output folder: only its own photos are left there.
    (tmp_path / "out" / "instance_images" / "stale.jpg").write_bytes(b"x")
    dog = resolve_dataset(TrainConfig(**{**cfg.__dict__, "dataset": "dreambooth:bear_plushie"}))
    assert sorted(os.listdir(dog.instance_data_dir)) == ["00.jpg", "01.jpg", "02.jpg"]
    assert dog.class_data_dir.endswith(os.path.join("class_images", "stuffed_animal"))
    with open(os.path.join(dog.instance_data_dir, "00.jpg"), "rb") as f:
        assert f.read() == dreambooth_dataset.load_subject(builder, "bear_plushie").images[0][1]
    custom = resolve_dataset(TrainConfig(**{**cfg.__dict__, "instance_prompt": "a zwx teapot"}))
    assert custom.instance_prompt == "a zwx teapot"

    both = TrainConfig(**{**cfg.__dict__, "instance_data_dir": copy_dir})
    assert any("--dataset replaces --instance_data_dir" in e for e in validate(both))
    bad = TrainConfig(**{**cfg.__dict__, "dataset": "dreambooth"})
    assert any("expected 'dreambooth:<subject>'" in e for e in validate(bad))


def test_source_is_downloaded_without_manual_dir(copy_dir, tmp_path):
    """No manual_dir: the GitHub archive is fetched and its `dreambooth-main/dataset/` folder used."""
    archive = tmp_path / "extracted"
    shutil.copytree(copy_dir, archive / "dreambooth-main" / "dataset")

    class FakeDownloadManager:  # TFDS's DownloadManager, as seen by the builder, with no network
        urls = []

        @property
        def manual_dir(self):
            raise AssertionError("Manual directory not enabled.")

        def download_and_extract(self, url):
            self.urls.append(url)
            return archive

    builder = dreambooth_dataset.Dreambooth(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    manager = FakeDownloadManager()
    assert builder._source_root(manager) == str(archive / "dreambooth-main" / "dataset")
    assert manager.urls == [dreambooth_dataset.SOURCE_URL]
    assert sorted(builder._split_generators(manager)) == sorted(SUBJECTS)


def test_dataset_on_the_command_line_replaces_the_presets_subject(copy_dir):
    cfg = parse_args(["--config", "tiny_demo", "--dataset", "dreambooth:dog", "--dataset_manual_dir",
                      copy_dir])
    assert cfg.dataset == "dreambooth:dog" and cfg.resolution == 64  # the rest of the preset stays
    assert cfg.instance_data_dir is cfg.instance_prompt is cfg.class_prompt is cfg.class_data_dir is None


def test_failed_download_says_to_use_a_local_copy(tmp_path):
    class OfflineDownloadManager:
        @property
        def manual_dir(self):
            raise AssertionError("Manual directory not enabled.")

        def download_and_extract(self, url):
            raise OSError("Network is unreachable")

    builder = dreambooth_dataset.Dreambooth(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    with pytest.raises(ConnectionError,
                       match="cannot download .*Network is unreachable.*--dataset_manual_dir"):
        builder._source_root(OfflineDownloadManager())


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/datasets/dreambooth is not here")
def test_shared_copy_builds_all_30_subjects(tmp_path):
    builder = dreambooth_dataset.load_builder(str(tmp_path / "tfds"), manual_dir=SHARED)
    names = dreambooth_dataset.subject_names(builder)
    assert len(names) == 30 and sum(builder.info.splits[n].num_examples for n in names) == 158
    dog6 = dreambooth_dataset.load_subject(builder, "dog6")
    assert dog6.class_name == "dog" and dog6.live and len(dog6.prompts()) == 25 and len(dog6.images) == 5
    can = dreambooth_dataset.load_subject(builder, "can")
    assert not can.live and can.prompts()[-1] == "a cube shaped sks can"


def test_the_trainer_imports_without_tfds():
    """TFDS is heavy and only `--dataset` needs it: importing the trainer does not load it."""
    code = ("import sys, dreambooth_jax.training.config, dreambooth_jax.training.trainer\n"
            "print('tensorflow_datasets' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-1] == "False", "importing the trainer loads tensorflow_datasets"
