"""Decoding of every image mode and format, augmentation geometry and invalid-record marking."""
import io

import numpy as np
import pytest
from PIL import Image

from clus_jax.data import transforms as T

H, W = 30, 40


def _base() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), "RGB")


def _image_in_mode(mode: str) -> Image.Image:
    base = _base()
    if mode == "I;16":
        return Image.fromarray(np.random.default_rng(1).integers(0, 65536, (H, W)).astype(np.uint16))
    if mode == "PA":
        return base.convert("P").convert("PA")
    if mode == "LAB":
        return Image.new("LAB", (W, H), (50, 10, 10))
    if mode == "P+transparency":
        img = base.convert("P")
        img.info["transparency"] = 0
        return img
    return base.convert(mode)


MODES = ["1", "L", "P", "P+transparency", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F",
         "I;16", "RGBa", "La"]


@pytest.mark.parametrize("mode", MODES)
def test_decode_every_pil_mode_gives_rgb_uint8(mode):
    out = T.decode_image(_image_in_mode(mode))
    assert out.shape == (H, W, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_decode_encoded_bytes(mode):
    written = 0
    for fmt in ["PNG", "JPEG", "WEBP", "TIFF", "GIF", "BMP"]:
        buf = io.BytesIO()
        try:
            _image_in_mode(mode).save(buf, fmt)
        except (OSError, ValueError, KeyError):
            continue  # Pillow cannot write this mode in this format
        written += 1
        out = T.decode_image(buf.getvalue())
        assert out.shape == (H, W, 3) and out.dtype == np.uint8, fmt
    assert written >= 2


def test_transparency_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    assert (T.decode_image(rgba) == 255).all()
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    assert (T.decode_image(buf.getvalue()) == 255).all()


def test_sixteen_bit_is_rescaled():
    img = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert (T.decode_image(buf.getvalue()) == 255).all()
    assert (T.decode_image(np.full((4, 4), 32768, np.uint16)) == 128).all()


@pytest.mark.parametrize("array", [
    np.zeros((5, 6), np.uint8), np.zeros((5, 6, 1), np.uint8), np.ones((5, 6, 3), np.float32),
    np.zeros((5, 6, 4), np.uint16), np.ones((5, 6), bool), np.zeros((5, 6, 2), np.uint8),
])
def test_decode_arrays(array):
    out = T.decode_image(array)
    assert out.shape == (5, 6, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("bad", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, None, 3,
                                 np.zeros((2, 3, 5), np.uint8)])
def test_undecodable_raises_invalid_record(bad):
    with pytest.raises(T.InvalidRecord):
        T.decode_image(bad)


def test_truncated_jpeg_is_invalid():
    buf = io.BytesIO()
    _base().resize((200, 200)).save(buf, "JPEG")
    with pytest.raises(T.InvalidRecord):
        T.decode_image(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.mark.parametrize("caption,expected", [
    ("a cat", "a cat"), ("  a\n cat\t ", "a cat"), (b"a dog", "a dog"), (["first", "second"], "first"),
    (np.array(b"np bytes"), "np bytes"), ("", None), ("   \n\t", None), (b"\xff\xfe bad", None),
    (None, None), (5, None), ("\ud800 lone surrogate", None), ([], None),
])
def test_clean_caption(caption, expected):
    assert T.clean_caption(caption) == expected


def test_crop_box_respects_scale_and_aspect():
    rng = np.random.default_rng(0)
    for _ in range(500):
        width, height = (int(v) for v in rng.integers(20, 400, size=2))
        x0, y0, x1, y1 = T.sample_crop_box(width, height, rng, min_scale=0.3)
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    hits = 0
    for _ in range(500):
        x0, y0, x1, y1 = T.sample_crop_box(300, 300, rng, min_scale=0.3)
        w, h = x1 - x0, y1 - y0
        hits += 1
        assert 0.3 - 0.02 <= w * h / 300**2 <= 1.0
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    assert hits == 500


def test_random_resized_crop_shape_and_determinism():
    img = T.to_rgb_image(_base())
    a = T.random_resized_crop(img, 16, T.example_rng(1, 2, 3), min_scale=0.5)
    b = T.random_resized_crop(img, 16, T.example_rng(1, 2, 3), min_scale=0.5)
    c = T.random_resized_crop(img, 16, T.example_rng(1, 3, 3), min_scale=0.5)
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_flip_mirrors_the_unflipped_crop():
    img = T.to_rgb_image(_base())
    flipped = 0
    for i in range(20):
        plain = T.random_resized_crop(img, 16, T.example_rng(0, 0, i), flip=False)
        maybe = T.random_resized_crop(img, 16, T.example_rng(0, 0, i), flip=True)
        if np.array_equal(maybe, plain[:, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(maybe, plain)
    assert 0 < flipped < 20


def test_center_crop_takes_the_middle():
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, 20:40] = 255  # the central square is white, the sides black
    out = T.center_crop(a, 10)
    assert out.shape == (10, 10, 3)
    assert out[:, 1:-1].min() >= 250 and out.mean() > 245


def test_train_transform_marks_invalid_records():
    tf = T.TrainTransform(image_size=8, min_crop_scale=0.5, seed=0)
    good = {"image": np.zeros((12, 12, 3), np.uint8), "caption": "ok"}
    out = tf(good, epoch=0, index=0)
    assert out["valid"] and out["image"].shape == (8, 8, 3) and out["caption"] == "ok"
    for bad in [{"image": b"junk", "caption": "ok"}, {"image": good["image"], "caption": " "},
                {"image": good["image"], "caption": b"\xff"}, {"image": None, "caption": "ok"},
                {"caption": "ok"}, None, "not a mapping"]:
        out = tf(bad, epoch=0, index=0)
        assert out["valid"] is False and out["image"] is None


def test_eval_transform():
    out = T.EvalTransform(image_size=8)({"image": np.zeros((12, 20, 3), np.uint8), "caption": "x"})
    assert out["valid"] and out["image"].shape == (8, 8, 3)
