"""Per-example transforms: robust decoding to RGB uint8, training augmentation, eval resize and crop.

Decoding accepts encoded bytes (any format Pillow reads), PIL images of any mode and NumPy arrays, and
always returns RGB uint8. Transparent images are composited on white; 16-bit and float images are
rescaled to 8 bits. A record whose image cannot be decoded or whose caption is missing, empty,
whitespace-only or not valid UTF-8 is *marked invalid* (never raised) so the pipeline can skip and
count it.

Training randomness is a pure function of (seed, epoch, global index) so a resumed run draws exactly
the crops and flips an uninterrupted run would have drawn.
"""
from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

ImageLike = bytes | bytearray | memoryview | np.ndarray | Image.Image

_RESAMPLE = Image.Resampling.BICUBIC
_TRANSPARENT_MODES = ("RGBA", "LA", "PA")
_PREMULTIPLIED_MODES = ("RGBa", "La")

ImageFile.LOAD_TRUNCATED_IMAGES = False


class InvalidRecord(ValueError):
    """Raised by the decoding helpers when an image or caption is unusable."""


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Rescales integer, boolean or float pixel arrays to uint8."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        if (a.dtype.kind == "u" and a.dtype.itemsize == 2) or (a.size and a.max() > 255):
            return (np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.clip(a, 0, 255).astype(np.uint8)
    raise InvalidRecord(f"unsupported pixel dtype {a.dtype}")


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        return Image.fromarray(_to_uint8(a), "L")
    if a.ndim != 3 or a.shape[-1] not in (2, 3, 4):
        raise InvalidRecord(f"unsupported image array shape {a.shape}")
    a = np.ascontiguousarray(_to_uint8(a))
    mode = {2: "LA", 3: "RGB", 4: "RGBA"}[a.shape[-1]]
    return Image.fromarray(a, mode)


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img.copy() if "transparency" not in img.info else _composite_on_white(img)
    if mode in _PREMULTIPLIED_MODES:
        # Colour already multiplied by alpha: over white, out = colour + (255 - alpha).
        a = np.asarray(img).astype(np.int32)
        out = np.clip(a[..., :-1] + (255 - a[..., -1:]), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out, "RGB")
    if mode in _TRANSPARENT_MODES or "transparency" in img.info:
        return _composite_on_white(img)
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img)), "L").convert("RGB")
    if mode == "LAB":
        from PIL import ImageCms

        transform = ImageCms.buildTransformFromOpenProfiles(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(img, transform)
    return img.convert("RGB")


def to_rgb_image(image: ImageLike, *, min_size: int | None = None) -> Image.Image:
    """Decodes ``image`` to an RGB PIL image; raises InvalidRecord when that is impossible.

    ``min_size``, when given, lets JPEG decoding use DCT scaling (``Image.draft``) as long as both sides
    stay at least ``min_size`` pixels, which makes large photos much cheaper to decode.
    """
    try:
        if isinstance(image, (bytes, bytearray, memoryview)):
            if len(image) == 0:
                raise InvalidRecord("empty image bytes")
            img = Image.open(io.BytesIO(bytes(image)))
            if min_size and img.format == "JPEG":
                img.draft("RGB", (min_size, min_size))
            img.load()
            img = ImageOps.exif_transpose(img) or img
        elif isinstance(image, np.ndarray):
            img = _array_to_pil(image)
        elif isinstance(image, Image.Image):
            img = image
            img.load()
        else:
            raise InvalidRecord(f"unsupported image type {type(image).__name__}")
        rgb = _pil_to_rgb(img)
        if rgb.width < 1 or rgb.height < 1:
            raise InvalidRecord("image has zero size")
        return rgb
    except InvalidRecord:
        raise
    except Exception as e:  # Pillow raises many exception types on corrupt data.
        raise InvalidRecord(f"cannot decode image: {type(e).__name__}: {e}") from e


def decode_image(image: ImageLike) -> np.ndarray:
    """Decodes any supported image to a uint8 [H, W, 3] array (raises InvalidRecord)."""
    return np.asarray(to_rgb_image(image), dtype=np.uint8)


def clean_caption(caption: Any) -> str | None:
    """Returns the caption as a stripped, whitespace-normalized str, or None if it is unusable."""
    if isinstance(caption, np.ndarray):
        caption = caption.reshape(-1)[0] if caption.size else None
    if isinstance(caption, (list, tuple)):
        caption = caption[0] if caption else None
    if isinstance(caption, (bytes, bytearray, np.bytes_)):
        try:
            caption = bytes(caption).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(caption, str):
        return None
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return None
    caption = " ".join(caption.split())
    return caption or None


def _as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    return image if isinstance(image, Image.Image) else to_rgb_image(image)


def sample_crop_box(width: int, height: int, rng: np.random.Generator, *, min_scale: float = 0.35,
                    max_scale: float = 1.0,
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Inception-style crop box (left, top, right, bottom): area fraction in [min_scale, max_scale],
    aspect ratio (w / h) log-uniform in ``ratio``.

    Falls back to the largest central crop with a clamped aspect ratio after 10 rejected draws.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(min_scale, max_scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return x0, y0, x0 + w, y0 + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, min(height, int(round(width / ratio[0])))
    elif in_ratio > ratio[1]:
        w, h = min(width, int(round(height * ratio[1]))), height
    else:
        w, h = width, height
    x0, y0 = (width - w) // 2, (height - h) // 2
    return x0, y0, x0 + w, y0 + h


def random_resized_crop(image: Image.Image | np.ndarray, size: int, rng: np.random.Generator, *,
                        min_scale: float = 0.35, max_scale: float = 1.0,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = False) -> np.ndarray:
    """Random crop (``sample_crop_box``) resized to ``size`` x ``size``; with ``flip`` mirrored with
    probability 1/2. Returns uint8 [size, size, 3]."""
    img = _as_pil(image)
    box = sample_crop_box(img.width, img.height, rng, min_scale=min_scale, max_scale=max_scale, ratio=ratio)
    do_flip = rng.random() < 0.5
    out = img.resize((size, size), _RESAMPLE, box=box)
    if flip and do_flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def center_crop(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to ``size`` and takes the central square. Returns uint8 [size, size, 3]."""
    img = _as_pil(image)
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    out = img.resize((size, size), _RESAMPLE, box=(left, top, left + side, top + side))
    return np.asarray(out, dtype=np.uint8)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of one training example, a pure function of (seed, epoch, index)."""
    mask = (1 << 64) - 1
    return np.random.default_rng(np.random.SeedSequence([seed & mask, epoch & mask, index & mask]))


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """Decodes and augments one raw record ``{'image': ..., 'caption': ...}``.

    Returns ``{'image': uint8 [S, S, 3] or None, 'caption': str, 'valid': bool}``; invalid records
    carry no image and an empty caption.
    """

    image_size: int
    min_crop_scale: float = 0.35
    flip: bool = False
    seed: int = 0

    def __call__(self, record: Mapping[str, Any] | None, *, epoch: int, index: int) -> dict[str, Any]:
        invalid = {"image": None, "caption": "", "valid": False}
        if not isinstance(record, Mapping):
            return invalid
        caption = clean_caption(record.get("caption"))
        if caption is None:
            return invalid
        try:
            image = self.augment(record.get("image"), epoch=epoch, index=index)
        except InvalidRecord:
            return invalid
        return {"image": image, "caption": caption, "valid": True}

    def augment(self, image: ImageLike | None, *, epoch: int, index: int) -> np.ndarray:
        """The decoded, cropped (and flipped) image of one example; raises InvalidRecord when undecodable."""
        scale = min(max(float(self.min_crop_scale), 1e-3), 1.0)
        # Large enough that even the smallest crop (area ``scale``, aspect 3/4) is not upsampled.
        min_side = int(math.ceil(self.image_size / math.sqrt(scale * 3 / 4)))
        img = to_rgb_image(image, min_size=min_side)
        rng = example_rng(self.seed, epoch, index)
        return random_resized_crop(img, self.image_size, rng, min_scale=scale, flip=self.flip)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Decodes one record and resizes + centre-crops it; same output contract as TrainTransform."""

    image_size: int

    def __call__(self, record: Mapping[str, Any] | None, **unused: Any) -> dict[str, Any]:
        invalid = {"image": None, "caption": "", "valid": False}
        if not isinstance(record, Mapping):
            return invalid
        caption = clean_caption(record.get("caption"))
        if caption is None:
            return invalid
        try:
            img = to_rgb_image(record.get("image"), min_size=self.image_size)
        except InvalidRecord:
            return invalid
        return {"image": center_crop(img, self.image_size), "caption": caption, "valid": True}
