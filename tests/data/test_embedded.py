"""Embedded dataset: split hygiene (no leakage), evaluation sets, idempotent and concurrent builds."""
import hashlib
import os
import threading

import numpy as np
import pytest

from clus_jax.data import embedded, embedded_assets, embedded_build, embedded_eval, transforms
from clus_jax.data.eval_sets import ClassificationSet, ProbeSet, RetrievalSet


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    cache = str(tmp_path_factory.getbasetemp() / "clus_jax_cache")
    embedded.build_embedded_dataset(cache)
    return cache


@pytest.fixture(scope="session")
def splits(embedded_cache):
    path = embedded.dataset_dir(embedded_cache)
    out = {"train": embedded.read_split(path, "train")}
    for key in embedded_build.EVAL_FILES:
        out[key] = embedded.read_split(path, key)
    return out


def _pixel_hash(image_bytes: bytes) -> str:
    return hashlib.sha256(transforms.decode_image(image_bytes).tobytes()).hexdigest()


def test_build_is_idempotent(embedded_cache):
    path = embedded.build_embedded_dataset(embedded_cache)
    meta_file = os.path.join(path, embedded_build.META_FILE)
    before = os.stat(meta_file).st_mtime_ns
    assert embedded.build_embedded_dataset(embedded_cache) == path
    assert os.stat(meta_file).st_mtime_ns == before
    leftovers = [n for n in os.listdir(os.path.dirname(path)) if ".tmp-" in n or ".old-" in n]
    assert not leftovers
    assert os.stat(path).st_mode & 0o055 == 0o055 & ~_umask()  # readable by others unless the umask forbids


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_sizes_and_meta(embedded_cache, splits):
    meta = embedded.read_meta(embedded.dataset_dir(embedded_cache))
    for key, recs in splits.items():
        assert meta["counts"][key] == len(recs)
    assert len(splits["train"]) > 5000
    assert {r["style"] for r in splits["train"]} == {"twemoji", "easyvqa"}
    assert len(meta["categories"]) == 9 and "Component" not in meta["categories"]
    heldout_fraction = len(meta["heldout_concepts"]) / meta["num_concepts"]
    assert 0.10 <= heldout_fraction <= 0.15


def test_no_leakage_into_training(embedded_cache, splits):
    meta = embedded.read_meta(embedded.dataset_dir(embedded_cache))
    heldout = set(meta["heldout_concepts"])
    train = splits["train"]
    # By concept: no held-out concept, in any style or skin tone, is trained on.
    train_concepts = {r["concept"] for r in train if r["concept"]}
    assert train_concepts and not train_concepts & heldout
    assert {r["concept"] for r in splits["twemoji_heldout"]} <= heldout
    # By style: OpenMoji is never trained on; easy-VQA test images never are.
    assert all(r["style"] != "openmoji" and r["source"] != "easy-vqa/test" for r in train)
    # By content: no pixel-identical copy of any evaluation image is in training. The probe's
    # training half is made of training images on purpose, so only its test half is checked.
    train_hashes = {_pixel_hash(r["image"]) for r in train}
    for key in ("easyvqa_test", "twemoji_heldout", "openmoji"):
        eval_hashes = {_pixel_hash(r["image"]) for r in splits[key]}
        assert eval_hashes and not eval_hashes & train_hashes, key
    assert {r["easyvqa_id"] for r in splits["easyvqa_probe"]} <= {
        r["easyvqa_id"] for r in train if r["style"] == "easyvqa"}


def test_captions_and_labels(splits):
    for r in splits["train"][:50] + splits["train"][-50:]:
        assert transforms.clean_caption(r["caption"]) == r["caption"]
    for r in splits["easyvqa_test"]:
        assert r["caption"] == embedded_assets.EASYVQA_CLASSNAMES[r["label"]]
    assert len({r["label"] for r in splits["easyvqa_test"]}) == 24
    tones = [r for r in splits["train"] if r["variant"]]
    assert tones and all("skin tone" in r["caption"] for r in tones)


def test_openmoji_renders_span_the_canvas_like_twemoji(splits):
    """The drawing's longer side reaches the canvas edges (as Twemoji's does), centred within a pixel."""
    for r in splits["openmoji"][::40]:
        ink = np.nonzero((255 - transforms.decode_image(r["image"]).astype(int)).sum(-1) > 30)
        extents = [int(a.max() - a.min() + 1) for a in ink]
        assert max(extents) >= embedded_assets.EMOJI_SIZE - 2, (r["name"], extents)
        margins = [(int(a.min()), embedded_assets.EMOJI_SIZE - 1 - int(a.max())) for a in ink]
        assert all(abs(lo - hi) <= 2 for lo, hi in margins), (r["name"], margins)


def test_easyvqa_label_recovery_matches_pixels():
    """The recovered colour is the most common non-background colour of the image."""
    from PIL import Image

    rgb = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
           "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (139, 69, 19), "yellow": (255, 255, 0)}
    labels = embedded_assets.easyvqa_labels("test")
    folder = embedded_assets.package_dir("easy_vqa") / "data" / "test" / "images"
    checked = 0
    for image_id, (color, _) in sorted(labels.items())[:200]:
        if color is None:
            continue
        img = np.asarray(Image.open(folder / f"{image_id}.png").convert("RGB")).reshape(-1, 3).astype(int)
        background = np.median(img[[0, 63, -64, -1]], axis=0)
        fg = img[np.abs(img - background).sum(-1) > 60]
        if len(fg) < 150:  # tiny shapes are mostly anti-aliased edge pixels
            continue
        dists = {c: np.abs(fg - np.asarray(v)).sum(-1).mean() for c, v in rgb.items()}
        assert min(dists, key=dists.get) == color, image_id
        checked += 1
    assert checked >= 120


def test_eval_sets(embedded_cache):
    sets = embedded_eval.load_eval_sets(image_size=24, cache_dir=embedded_cache)
    by_name = {(type(s).__name__, s.name): s for s in sets}
    assert set(by_name) == {("ClassificationSet", "easyvqa"), ("ClassificationSet", "emoji_category"),
                            ("RetrievalSet", "emoji_heldout"), ("RetrievalSet", "emoji_openmoji"),
                            ("ProbeSet", "easyvqa")}
    for s in sets:
        images = [s.train_images, s.test_images] if isinstance(s, ProbeSet) else [s.images]
        for im in images:
            assert im.dtype == np.uint8 and im.shape[1:] == (24, 24, 3)
            assert 100 <= len(im) <= embedded_eval.MAX_EVAL_IMAGES
        if isinstance(s, ClassificationSet):
            assert len(s.labels) == len(s.images) and 0 <= s.labels.min() and s.labels.max() < len(s.classnames)
            assert all("{}" in t for t in s.templates)
        if isinstance(s, RetrievalSet):
            assert len(s.captions) == len(s.caption_to_image) >= len(s.images)
            assert set(s.caption_to_image.tolist()) == set(range(len(s.images)))
    easy = by_name[("ClassificationSet", "easyvqa")]
    assert len(easy.classnames) == 24 and "red circle" in easy.classnames
    probe = by_name[("ProbeSet", "easyvqa")]
    assert probe.num_classes == 24 and len(set(probe.train_labels.tolist())) == 24
    again = embedded_eval.load_eval_sets(image_size=24, cache_dir=embedded_cache)
    assert again[0].images is sets[0].images and not again[0].images.flags.writeable


def test_concurrent_builds_run_once_and_force_rebuilds(tmp_path, monkeypatch):
    calls = []

    def fake_build(out_dir):
        calls.append(out_dir)
        for name in [embedded_build.TRAIN_FILE, *embedded_build.EVAL_FILES.values()]:
            open(os.path.join(out_dir, name), "wb").close()
        with open(os.path.join(out_dir, embedded_build.META_FILE), "w") as f:
            f.write('{"version": "%s", "n": %d}' % (embedded_build.VERSION, len(calls)))

    monkeypatch.setattr(embedded_build, "write_dataset", fake_build)
    cache = str(tmp_path / "cache")
    results = []
    threads = [threading.Thread(target=lambda: results.append(embedded.build_embedded_dataset(cache)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    path = results[0]
    assert embedded.read_meta(path)["n"] == 1
    assert embedded.build_embedded_dataset(cache, force=True) == path
    assert len(calls) == 2 and embedded.read_meta(path)["n"] == 2
    assert sorted(os.listdir(os.path.dirname(path))) == sorted([embedded_build.VERSION, f".{embedded_build.VERSION}.lock"])


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_build(out_dir):
        open(os.path.join(out_dir, embedded_build.TRAIN_FILE), "wb").close()
        raise RuntimeError("boom")

    monkeypatch.setattr(embedded_build, "write_dataset", broken_build)
    cache = str(tmp_path / "cache")
    with pytest.raises(RuntimeError, match="boom"):
        embedded.build_embedded_dataset(cache)
    assert os.listdir(cache) == [f".{embedded_build.VERSION}.lock"]
