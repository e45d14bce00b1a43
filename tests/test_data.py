"""dreambooth_jax.images and dreambooth_jax.training.data: decoding odd image files, captions, and batches as
pure functions of (seed, step)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image, ImageOps

from dreambooth_jax.images import ImageError, count_images, list_images, load_image
from dreambooth_jax.training.data import Concept, DreamBoothData, caption_for

R = 16


def _solid(folder, name, value, size=(24, 16)):
    """A solid-grey RGB PNG of `size` (w, h) whose value identifies it."""
    folder.mkdir(exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(folder / name)


def _gradient(folder, name, size=(40, 24)):
    """An RGB PNG whose pixels encode their own (x, y), to tell crops and flips apart."""
    folder.mkdir(exist_ok=True)
    w, h = size
    y, x = np.mgrid[:h, :w]
    Image.fromarray(np.stack([x * 6, y * 10, np.zeros_like(x)], -1).astype(np.uint8)).save(folder / name)


def _load(im: Image.Image, path, resolution=R, **save_kwargs) -> np.ndarray:
    im.save(path, **save_kwargs)
    return load_image(str(path), resolution)


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (R, R), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, R, R // 2))  # top half fully transparent
    out = _load(rgba, tmp_path / "rgba.png")
    assert out.dtype == np.uint8 and out.shape == (R, R, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[-1, -1], [255, 0, 0])

    la = Image.new("LA", (R, R), (0, 128))  # black at half opacity
    np.testing.assert_allclose(_load(la, tmp_path / "la.png")[0, 0], [127, 127, 127], atol=1)

    p = Image.new("P", (R, R), 1)
    p.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    p.paste(0, (0, 0, R, R // 2))
    out = _load(p, tmp_path / "p.png", transparency=0)
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[-1, -1], [0, 0, 0])


def test_modes_are_converted(tmp_path):
    cmyk = Image.new("CMYK", (R, R), (0, 255, 255, 0))  # red
    np.testing.assert_allclose(_load(cmyk, tmp_path / "cmyk.jpg").astype(int)[4, 4], [255, 0, 0], atol=4)

    grey = _load(Image.new("L", (R, R), 77), tmp_path / "grey.png")
    np.testing.assert_array_equal(grey[0, 0], [77, 77, 77])

    values = np.array([[0, 257 * 100, 65535, 300]], np.uint16).repeat(R, 0).repeat(R // 4, 1)
    im16 = Image.fromarray(values)
    assert im16.mode == "I;16"
    out = _load(im16, tmp_path / "i16.png")
    np.testing.assert_array_equal(out[0, [0, R // 4, R // 2, 3 * R // 4 + 1], 0], [0, 100, 255, 1])

    i32 = _load(Image.fromarray(values.astype(np.int32)), tmp_path / "i32.tif")  # PNG can't hold mode 'I' now
    np.testing.assert_array_equal(i32, out)

    for ext in ("webp", "bmp"):
        out = _load(Image.new("RGB", (R, 2 * R), (10, 200, 30)), tmp_path / f"x.{ext}", lossless=True)
        assert out.shape == (2 * R, R, 3)
        np.testing.assert_allclose(out[5, 5].astype(int), [10, 200, 30], atol=2)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    out = _load(im, tmp_path / "rotated.jpg", exif=exif, quality=95)
    assert out.shape == (32, 16, 3)  # w/h swapped, shorter side at R
    assert out[4, 8, 0] > 200 and out[4, 8, 2] < 50  # the red half is now on top
    assert out[-4, 8, 2] > 200 and out[-4, 8, 0] < 50


def test_resize_small_and_bad_files(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dreambooth_jax.images"):
        out = _load(Image.new("RGB", (8, 12), (1, 2, 3)), tmp_path / "small.png")
    assert out.shape == (24, 16, 3)
    assert "small.png" in caplog.text and "upscal" in caplog.text

    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(ImageError, match="bad.png"):
        load_image(str(tmp_path / "bad.png"), R)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "whole.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:300])
    with pytest.raises(ImageError, match="truncated.jpg"):
        load_image(str(tmp_path / "truncated.jpg"), R)


def test_list_and_count_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        list_images(str(tmp_path / "empty"))
    assert count_images(str(tmp_path / "missing")) == 0

    folder = tmp_path / "imgs"
    for name in ("b.PNG", "a.jpg", "c.webp"):
        _solid(folder, name, 5)
    (folder / "._a.jpg").write_bytes(b"macOS resource fork")
    (folder / "d.png").write_bytes(b"junk")
    assert [p.rsplit("/", 1)[1] for p in list_images(str(folder))] == ["a.jpg", "b.PNG", "c.webp", "d.png"]
    assert count_images(str(folder)) == 3


def test_captions(tmp_path):
    folder = tmp_path / "dog"
    _solid(folder, "0.png", 10)
    _solid(folder, "1.png", 20)
    (folder / "1.txt").write_text("\ufeffa sks dog on a beach\n", encoding="utf-8")
    assert caption_for(str(folder / "0.png"), "a sks dog") == "a sks dog"
    assert caption_for(str(folder / "1.png"), "a sks dog") == "a sks dog on a beach"
    data = DreamBoothData([Concept(str(folder), "a sks dog")], resolution=R, center_crop=True)
    assert data.prompts() == ["a sks dog", "a sks dog on a beach"]
    prompts = {p: img[0, 0, 0] for p, img in zip(*_instances(data.batch(0, 2)))}
    assert prompts == {
        "a sks dog": pytest.approx(10 / 127.5 - 1),
        "a sks dog on a beach": pytest.approx(20 / 127.5 - 1),
    }


def _instances(batch):
    return batch["instance_prompts"], batch["instance_images"]


def test_bad_instance_image_fails_early_or_is_skipped(tmp_path, caplog):
    folder = tmp_path / "inst"
    _solid(folder, "good.png", 10)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ImageError, match="broken.jpg"):
        DreamBoothData([Concept(str(folder), "p")], resolution=R)
    with caplog.at_level(logging.WARNING, logger="dreambooth_jax.training.data"):
        data = DreamBoothData([Concept(str(folder), "p")], resolution=R, skip_bad_images=True)
    assert "broken.jpg" in caplog.text
    assert data.num_instance_images == 1 and data.skipped == [str(folder / "broken.jpg")]


def _two_concepts(tmp_path, **kwargs) -> DreamBoothData:
    """Concept 0: 4 instance images (values 10..13), 3 class images (100..102); concept 1: 2 instance
    (20, 21) and 5 class images (200..204). Images are 24x16, so random crops have 9 horizontal offsets."""
    for c, (n_inst, n_class) in enumerate([(4, 3), (2, 5)]):
        for i in range(n_inst):
            _solid(tmp_path / f"inst{c}", f"{i}.png", 10 * (c + 1) + i)
        for i in range(n_class):
            _solid(tmp_path / f"class{c}", f"{i}.png", 100 * (c + 1) + i)
    concepts = [
        Concept(str(tmp_path / f"inst{c}"), f"sks{c}", str(tmp_path / f"class{c}"), f"cls{c}") for c in (0, 1)
    ]
    return DreamBoothData(concepts, resolution=R, **kwargs)


def _values(images):
    """The grey value identifying each image of a [n, R, R, 3] batch."""
    return [int(round((v + 1) * 127.5)) for v in images[:, 0, 0, 0]]


def test_batches_are_pure_functions_of_seed_and_step(tmp_path):
    data = _two_concepts(tmp_path, with_prior_preservation=True, random_flip=True, seed=3)
    a, b = data.batch(7, 6), data.batch(7, 6)
    kinds = ("instance", "class")
    assert a.keys() == {f"{k}_{v}" for k in kinds for v in ("images", "prompts", "indices", "crops", "flips")}
    assert a["instance_indices"].dtype == np.int64 and a["class_flips"].dtype == bool
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    for key in ("instance_images", "class_images"):
        assert a[key].dtype == np.float32 and a[key].shape == (6, R, R, 3)
        assert a[key].min() >= -1 and a[key].max() <= 1
    # A host's slice equals the same rows of the full batch (the rows' images, crops and flips).
    part = data.batch(7, 6, start=2, stop=5)
    for key in a:
        np.testing.assert_array_equal(np.asarray(part[key]), np.asarray(a[key])[2:5])
    # A fresh object with the same seed reproduces it; another step or seed differs.
    again = _two_concepts(tmp_path, with_prior_preservation=True, random_flip=True, seed=3).batch(7, 6)
    np.testing.assert_array_equal(again["class_images"], a["class_images"])
    assert not np.array_equal(data.batch(8, 6)["instance_images"], a["instance_images"])
    other_seed = _two_concepts(tmp_path, with_prior_preservation=True, random_flip=True, seed=4)
    assert not np.array_equal(other_seed.batch(7, 6)["instance_images"], a["instance_images"])


def test_epochs_cover_every_instance_image_once(tmp_path):
    data = _two_concepts(tmp_path)
    assert (data.num_instance_images, data.num_class_images) == (6, 0)
    for epoch in range(3):
        seen = sorted(
            v for step in (2 * epoch, 2 * epoch + 1) for v in _values(data.batch(step, 3)["instance_images"])
        )
        assert seen == [10, 11, 12, 13, 20, 21]
    orders = {tuple(_values(data.batch(step, 6)["instance_images"])) for step in range(4)}
    assert len(orders) > 1  # each epoch has its own permutation


def test_prior_preservation_pairs_concepts(tmp_path):
    data = _two_concepts(tmp_path, with_prior_preservation=True)
    assert (data.num_instance_images, data.num_class_images) == (6, 8)
    assert data.prompts() == ["sks0", "sks1", "cls0", "cls1"]
    class_seen = {0: [], 1: []}
    for step in range(30):
        batch = data.batch(step, 2)
        for inst, cls, ip, cp in zip(
            _values(batch["instance_images"]),
            _values(batch["class_images"]),
            batch["instance_prompts"],
            batch["class_prompts"],
        ):
            concept = inst // 10 - 1
            assert cls // 100 - 1 == concept and (ip, cp) == (f"sks{concept}", f"cls{concept}")
            class_seen[concept].append(cls)
    # Each concept cycles through its own class images epoch by epoch: every full cycle holds each once.
    for concept, n in ((0, 3), (1, 5)):
        seen = class_seen[concept]
        for i in range(0, len(seen) - n + 1, n):
            assert sorted(seen[i : i + n]) == [100 * (concept + 1) + j for j in range(n)]


def test_crops_and_flips(tmp_path):
    _gradient(tmp_path / "g", "g.png")  # 40x24 -> resized to 26x16
    concept = [Concept(str(tmp_path / "g"), "p")]
    centered = DreamBoothData(concept, resolution=R, center_crop=True)
    expected = load_image(str(tmp_path / "g" / "g.png"), R)[:, 5 : 5 + R].astype(np.float32) / 127.5 - 1
    for step in range(3):
        np.testing.assert_array_equal(centered.batch(step, 1)["instance_images"][0], expected)
    np.testing.assert_array_equal(centered.fixed_view("instance", 0), expected)
    np.testing.assert_array_equal(centered.fixed_view("instance", 0, flip=True), expected[:, ::-1])

    random = DreamBoothData(concept, resolution=R, random_flip=True)
    plans = [random.batch_plan(step, 4) for step in range(10)]
    lefts = {int(left) for plan in plans for left in plan["instance_crops"][:, 1]}
    flips = {bool(f) for plan in plans for f in plan["instance_flips"]}
    assert len(lefts) > 3 and flips == {True, False}
    assert all(plan["instance_crops"][:, 0].max() == 0 for plan in plans)  # height is exactly R
    plan, images = plans[5], random.batch(5, 4)["instance_images"]
    for (top, left), flip, image in zip(plan["instance_crops"], plan["instance_flips"], images):
        crop = load_image(str(tmp_path / "g" / "g.png"), R)[top : top + R, left : left + R]
        crop = crop[:, ::-1] if flip else crop
        np.testing.assert_array_equal(image, crop.astype(np.float32) / 127.5 - 1)


def test_bad_arguments(tmp_path):
    data = _two_concepts(tmp_path)
    with pytest.raises(ValueError):
        data.batch(0, 4, start=3, stop=5)
    with pytest.raises(ValueError, match="kind"):
        data.fixed_view("other", 0)
    with pytest.raises(ValueError, match="class_data_dir"):
        DreamBoothData([Concept(str(tmp_path / "inst0"), "p")], resolution=R, with_prior_preservation=True)


def test_batch_rows_match_fixed_views(tmp_path):
    """With center crops, a trainer caching latents of fixed_view(kind, index, flip) sees the batch's
    images."""
    data = _two_concepts(tmp_path, with_prior_preservation=True, center_crop=True, random_flip=True)
    batch = data.batch(3, 8)
    for kind in ("instance", "class"):
        for i, flip, image in zip(batch[f"{kind}_indices"], batch[f"{kind}_flips"], batch[f"{kind}_images"]):
            np.testing.assert_array_equal(image, data.fixed_view(kind, int(i), flip=bool(flip)))


def test_class_images_rotated_or_small(tmp_path, caplog):
    """Class images are sized from their headers (for crop offsets) before decoding: EXIF rotation counts."""
    _solid(tmp_path / "inst", "0.png", 10)
    (tmp_path / "cls").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 16), (100, 0, 0)).save(tmp_path / "cls" / "rotated.jpg", exif=exif)
    Image.new("RGB", (8, 8), (100, 0, 0)).save(tmp_path / "cls" / "small.png")
    concept = [Concept(str(tmp_path / "inst"), "sks", str(tmp_path / "cls"), "cls")]
    with caplog.at_level(logging.WARNING, logger="dreambooth_jax"):
        data = DreamBoothData(concept, resolution=R, with_prior_preservation=True)
    assert "small.png" in caplog.text and "rotated.jpg" not in caplog.text
    for step in range(12):
        batch = data.batch(step, 2)
        assert batch["class_images"].shape == (2, R, R, 3)
        assert batch["class_crops"][:, 1].max() == 0  # the rotated image is 16 wide, 64 high
    assert count_images(str(tmp_path / "cls")) == 2


def _diffusers_sdxl_view(path, resolution, flip, top, left) -> np.ndarray:
    """What diffusers' `train_dreambooth_lora_sdxl.py` feeds the VAE for an image conditioned on crop corner
    (top, left): EXIF-transposed RGB, shorter side resized (torchvision's `Resize` on PIL: bilinear, the
    longer side rounded down), flipped, *then* cropped at (top, left) of the flipped image."""
    im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = im.size
    size = (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h), resolution)
    im = im.resize(size, Image.Resampling.BILINEAR)
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(im)[top : top + resolution, left : left + resolution]


@pytest.mark.parametrize("center_crop", [False, True])
def test_sdxl_time_ids_are_what_diffusers_computes_for_the_same_view(tmp_path, center_crop):
    """time_ids = (original h, w, crop top, crop left, R, R) for every row of many steps (random or centre
    crops, flips both ways), instance and class images of their own sizes (one stored with an EXIF rotation):
    the original size is the file's as displayed, and diffusers' pipeline cropping its flipped image at the
    (top, left) we report yields exactly the pixels we train on."""
    for i, size in enumerate([(40, 24), (24, 37), (31, 31)]):
        _gradient(tmp_path / "inst", f"{i}.png", size)
    for i, size in enumerate([(50, 20), (19, 45)]):
        _gradient(tmp_path / "cls", f"{i}.png", size)
    rotated = Image.open(tmp_path / "cls" / "1.png")
    exif = rotated.getexif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 45 x 19
    rotated.save(tmp_path / "cls" / "2.jpg", exif=exif, quality=95)
    data = DreamBoothData([Concept(str(tmp_path / "inst"), "a", str(tmp_path / "cls"), "b")], resolution=R,
                          center_crop=center_crop, random_flip=True, with_prior_preservation=True, seed=3)
    seen = set()
    for step in range(12):
        plan = data.batch_plan(step, 2)
        for kind in ("instance", "class"):
            paths = data.instance_paths if kind == "instance" else data.class_paths
            for index, crop, flip in zip(plan[f"{kind}_indices"], plan[f"{kind}_crops"],
                                         plan[f"{kind}_flips"]):
                index, crop, flip = int(index), tuple(int(c) for c in crop), bool(flip)
                ids = data.geometry(kind, index, crop, flip)
                with Image.open(paths[index]) as im:
                    im = im.transpose(Image.Transpose.ROTATE_270) if paths[index].endswith(".jpg") else im
                    assert tuple(ids[:2]) == (im.height, im.width)
                assert tuple(ids[4:]) == (R, R) and ids.dtype == np.float32
                top, left = int(ids[2]), int(ids[3])
                ours = np.round((data.view(kind, index, crop, flip) + 1) * 127.5).astype(np.uint8)
                np.testing.assert_array_equal(ours, _diffusers_sdxl_view(paths[index], R, flip, top, left))
                seen.add((kind, flip, left != crop[1]))
    assert {("instance", True), ("class", True), ("instance", False)} <= {(k, f) for k, f, _ in seen}
    assert any(mirrored for _, _, mirrored in seen)  # some flipped crop's corner moved
