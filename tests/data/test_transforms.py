"""Decoding of every image mode and format (shapes and pixel values), augmentation geometry, the eval
centre crop and invalid-record marking."""
import io
import struct
import zlib

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


@pytest.mark.parametrize("side", [64, 72])  # easy-VQA's and the emoji's square images
def test_min_crop_scale_one_keeps_the_whole_square_image(side):
    """config_base's data.min_crop_scale=1.0 (the embedded runs): every box is the whole image to within the
    one pixel that rounding a 3:4..4:3 aspect ratio of the full area can take, so no shape is cut."""
    boxes = [T.sample_crop_box(side, side, T.example_rng(0, 0, i), min_scale=1.0) for i in range(200)]
    assert all(x1 - x0 >= side - 1 and y1 - y0 >= side - 1 for x0, y0, x1, y1 in boxes), boxes
    # At the previous default (area >= 0.5), most boxes cut a sixth of a side or more.
    cut = [T.sample_crop_box(side, side, T.example_rng(0, 0, i), min_scale=0.5) for i in range(200)]
    assert np.mean([min(x1 - x0, y1 - y0) < 5 * side / 6 for x0, y0, x1, y1 in cut]) > 0.5


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


# ---------------------------------------------------------------------------------------------------------
# Pixel values: decoding must keep what the pixels say, not only produce the right shape.
# ---------------------------------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png16(pixels: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA."""
    height, width = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _smooth_rgb(height: int = 32, width: int = 48) -> np.ndarray:
    """Gradients (JPEG keeps them within a few levels, unlike noise)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)], -1).astype(np.uint8)


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """colour * a + white * (1 - a), rounded (the inputs below keep it integral up to float error)."""
    a = alpha.astype(np.float64)[..., None] / 255
    return np.rint(colour.astype(np.float64) * a + 255 * (1 - a)).astype(np.uint8)


def test_rgb_png_round_trip_is_exact():
    pixels = np.random.default_rng(2).integers(0, 256, (H, W, 3), dtype=np.uint8)
    np.testing.assert_array_equal(T.decode_image(_encode(Image.fromarray(pixels, "RGB"), "PNG")), pixels)
    np.testing.assert_array_equal(T.decode_image(pixels), pixels)


def test_rgb_jpeg_round_trip_is_close():
    pixels = _smooth_rgb()
    out = T.decode_image(_encode(Image.fromarray(pixels, "RGB"), "JPEG", quality=95)).astype(int)
    assert np.abs(out - pixels).mean() < 2 and np.abs(out - pixels).max() <= 16


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", None])
def test_grayscale_gives_three_equal_channels(fmt):
    gray = _smooth_rgb()[..., 0]
    img = Image.fromarray(gray, "L")
    out = T.decode_image(img if fmt is None else _encode(img, fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    if fmt == "JPEG":
        assert np.abs(out[..., 0].astype(int) - gray).max() <= 8
    else:
        np.testing.assert_array_equal(out[..., 0], gray)


def test_bilevel_gives_black_and_white():
    bits = np.zeros((4, 6), bool)
    bits[1:3, 2:5] = True
    out = T.decode_image(_encode(Image.fromarray(bits).convert("1"), "PNG"))
    np.testing.assert_array_equal(out, np.repeat(bits[..., None], 3, -1).astype(np.uint8) * 255)


def _palette_image():
    colours = np.array([[10, 20, 30], [200, 100, 50], [0, 255, 0], [250, 250, 5]], np.uint8)
    index = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 3, 3]], np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(colours.reshape(-1).tolist())
    return img, colours, index


def test_palette_pixels_are_looked_up():
    img, colours, index = _palette_image()
    np.testing.assert_array_equal(T.decode_image(img), colours[index])
    np.testing.assert_array_equal(T.decode_image(_encode(img, "PNG")), colours[index])
    np.testing.assert_array_equal(T.decode_image(_encode(img, "GIF")), colours[index])


def test_palette_transparency_is_composited_on_white():
    img, colours, index = _palette_image()
    alpha = np.array([0, 255, 51, 204], np.uint8)  # per palette entry; 51 and 204 keep the blend integral
    expected = _over_white(colours[index], alpha[index])
    np.testing.assert_array_equal(T.decode_image(_encode(img, "PNG", transparency=bytes(alpha))), expected)
    # One fully transparent entry (GIF-style): that entry is white, the others keep their colour.
    single = colours[index].copy()
    single[index == 2] = 255
    np.testing.assert_array_equal(T.decode_image(_encode(img, "PNG", transparency=2)), single)
    np.testing.assert_array_equal(T.decode_image(_encode(img, "GIF", transparency=2)), single)


def _alpha_grid():
    """Colours in steps of 50 and alphas in steps of 51 (0, 0.2, ..., 1): the blend over white is integral."""
    colour, alpha = np.meshgrid(np.array([0, 50, 100, 150, 200, 250]), np.array([0, 51, 102, 153, 204, 255]))
    rgb = np.stack([colour, 250 - colour, np.full_like(colour, 100)], -1).astype(np.uint8)
    return rgb, alpha.astype(np.uint8)


def test_rgba_and_la_are_composited_on_white_exactly():
    rgb, alpha = _alpha_grid()
    expected = _over_white(rgb, alpha)
    rgba = np.concatenate([rgb, alpha[..., None]], -1)
    np.testing.assert_array_equal(T.decode_image(rgba), expected)
    np.testing.assert_array_equal(T.decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG")), expected)
    la = np.stack([rgb[..., 0], alpha], -1)
    gray = np.repeat(_over_white(rgb[..., :1], alpha), 3, -1)
    np.testing.assert_array_equal(T.decode_image(la), gray)
    np.testing.assert_array_equal(T.decode_image(_encode(Image.fromarray(la, "LA"), "PNG")), gray)


def test_premultiplied_alpha_is_composited_on_white():
    rgb, alpha = _alpha_grid()
    premultiplied = np.rint(rgb.astype(np.float64) * alpha[..., None] / 255).astype(np.uint8)
    img = Image.frombytes("RGBa", (6, 6), np.concatenate([premultiplied, alpha[..., None]], -1).tobytes())
    np.testing.assert_array_equal(T.decode_image(img), _over_white(rgb, alpha))


def test_sixteen_bit_keeps_the_high_byte():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 65536, (5, 7)).astype(np.uint16)
    gray[0, :6] = [0, 255, 256, 511, 32768, 65535]
    rgb = rng.integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    opaque = np.full((5, 7, 1), 65535, np.uint16)
    np.testing.assert_array_equal(T.decode_image(_png16(gray, 0)), np.repeat((gray >> 8)[..., None], 3, -1))
    np.testing.assert_array_equal(T.decode_image(_encode(Image.fromarray(gray), "TIFF")), np.repeat((gray >> 8)[..., None], 3, -1))
    np.testing.assert_array_equal(T.decode_image(_png16(rgb, 2)), rgb >> 8)
    np.testing.assert_array_equal(T.decode_image(_png16(np.concatenate([rgb, opaque], -1), 6)), rgb >> 8)
    np.testing.assert_array_equal(T.decode_image(gray), np.repeat((gray >> 8)[..., None], 3, -1))
    np.testing.assert_array_equal(T.decode_image(rgb), rgb >> 8)
    dark = np.array([[0, 100, 255, 256]], np.uint16)  # a dark 16-bit image is not an 8-bit one
    np.testing.assert_array_equal(T.decode_image(_png16(dark, 0))[..., 0], dark >> 8)


def test_cmyk_is_converted_like_pillow():
    inks = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 255], [128, 0, 64, 128]]], np.uint8)
    expected = np.array([[[255, 255, 255], [0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0], [63, 127, 95]]])
    img = Image.fromarray(inks, "CMYK")
    np.testing.assert_array_equal(T.decode_image(img), np.asarray(img.convert("RGB")))
    assert np.abs(T.decode_image(img).astype(int) - expected).max() <= 1
    # Through a CMYK JPEG (blocks of 8x8 so each ink survives the compression nearly intact).
    blocks = img.resize((6 * 8, 8), Image.Resampling.NEAREST)
    out = T.decode_image(_encode(blocks, "JPEG", quality=95))
    assert np.abs(out[4, 4::8].astype(int) - expected[0]).max() <= 6
    assert np.abs(out.astype(int) - np.asarray(blocks.convert("RGB"), int)).max() <= 12


def test_ycbcr_and_hsv_are_converted_back_to_rgb():
    pixels = _smooth_rgb()
    for mode in ("YCbCr", "HSV"):  # both are 8-bit quantised: a few levels of error
        out = T.decode_image(Image.fromarray(pixels, "RGB").convert(mode))
        assert np.abs(out.astype(int) - pixels).max() <= 6, mode


def test_exif_orientation_is_applied():
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    out = T.decode_image(_encode(Image.fromarray(pixels, "RGB"), "JPEG", exif=exif, quality=95))
    assert out.shape == (32, 16, 3)
    assert out[:16].mean() > 240 and out[16:].mean() < 15  # the white half is now on top


def _marked(height: int, width: int) -> np.ndarray:
    """Blue outside the central square, grey inside it, a red mark at its centre."""
    a = np.zeros((height, width, 3), np.uint8)
    a[...] = (0, 0, 255)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    a[top : top + side, left : left + side] = (128, 128, 128)
    cy, cx, r = height // 2, width // 2, side // 8
    a[cy - r : cy + r, cx - r : cx + r] = (255, 0, 0)
    return a


@pytest.mark.parametrize("height,width", [(96, 160), (160, 96), (128, 128)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_eval_transform_resizes_and_takes_the_centre(height, width, fmt):
    size = 32
    encoded = _encode(Image.fromarray(_marked(height, width), "RGB"), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    out = T.EvalTransform(image_size=size)({"image": encoded, "caption": "x"})
    assert out["valid"] and out["image"].shape == (size, size, 3)
    image = out["image"].astype(int)
    # The crop is the central square, resized: no blue margin anywhere, the red mark in the middle.
    blue = image[..., 2] - np.maximum(image[..., 0], image[..., 1])
    assert blue.max() < 64
    centre = image[size // 2 - 2 : size // 2 + 2, size // 2 - 2 : size // 2 + 2]
    assert (np.abs(centre - (255, 0, 0)) <= 24).all()
    for corner in (image[:4, :4], image[:4, -4:], image[-4:, :4], image[-4:, -4:]):
        assert (np.abs(corner - 128) <= 12).all()
    red = (image[..., 0] > 200) & (image[..., 1] < 60)
    rows, cols = np.nonzero(red)
    assert abs(rows.mean() - (size - 1) / 2) <= 0.5 and abs(cols.mean() - (size - 1) / 2) <= 0.5
