"""The streamed evaluators (``clus_jax.evaluate.benchmarks``) on one labelled, captioned set written three ways
(a local TFDS dataset, an image folder, CLIP_benchmark's WebDataset tar shards): identical figures, each equal
to an independent NumPy computation on the same embeddings."""
import zlib

import ml_collections
import numpy as np
import pytest

from clus_jax.common.errors import ConfigError
from clus_jax.config.check import check_evals
from clus_jax.data import eval_writers
from clus_jax.evaluate import registry

SIZE = 16  # the model's image size; images are written at 20 x 24 and centre-cropped
CLASSNAMES = ["red blob", "green blob", "blue blob", "grey blob"]
TEMPLATES = ["a photo of a {}.", "a {}"]
PER_CLASS_TEST, PER_CLASS_TRAIN = 9, 7
PROJECTION = np.random.default_rng(7).normal(size=(SIZE * SIZE * 3, 12)).astype(np.float32)


def encode_images(images: np.ndarray) -> np.ndarray:
    """A fixed random projection of the pixels: deterministic per image, whatever the batch."""
    return (np.asarray(images, np.float32).reshape(len(images), -1) / 255.0) @ PROJECTION


def encode_texts(texts) -> np.ndarray:
    """A vector per text from a generator seeded by its checksum, nudged toward its class's colour row."""
    out = []
    for t in texts:
        v = np.random.default_rng(zlib.crc32(t.encode())).normal(size=12)
        for c, name in enumerate(CLASSNAMES):
            if name.split()[0] in t:
                v += 3 * encode_images(_crop(_colour_images(c, 1, seed=99)))[0] / 40
        out.append(v)
    return np.asarray(out, np.float32)


def _colour_images(c: int, n: int, seed: int) -> np.ndarray:
    base = np.array([[200, 40, 40], [40, 180, 60], [40, 60, 200], [128, 128, 128]], np.float32)[c]
    noise = np.random.default_rng(seed).normal(0, 110, (n, 20, 24, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def labelled_split(per_class: int, seed: int):
    """Images sorted by label (an image folder reads class by class), two captions each."""
    images = np.concatenate([_colour_images(c, per_class, seed + c) for c in range(len(CLASSNAMES))])
    labels = np.repeat(np.arange(len(CLASSNAMES)), per_class)
    captions = [[f"a {CLASSNAMES[y]} number {i}", f"picture {i} of {CLASSNAMES[y].split()[0]}"]
                for i, y in enumerate(labels)]
    return images, labels, captions


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The test split (and a train split) in the three formats; the refs of each."""
    root = tmp_path_factory.mktemp("three_ways")
    test = labelled_split(PER_CLASS_TEST, 0)
    train = labelled_split(PER_CLASS_TRAIN, 100)
    refs = {}
    for split, (images, labels, captions) in (("test", test), ("train", train)):
        eval_writers.write_image_folder(root / f"folder_{split}", images, labels, classnames=CLASSNAMES,
                                        captions=captions, templates=TEMPLATES)
        eval_writers.write_wds(root / "wds", images, labels, captions=captions, classnames=CLASSNAMES,
                               templates=TEMPLATES, split=split, shard_size=10)
        eval_writers.write_tfds(root / "tfds", f"three_ways_{split}", images, labels, captions=captions,
                                classnames=CLASSNAMES, split=split)
    for kind in ("folder", "wds", "tfds"):
        refs[kind] = {s: {"folder": f"folder:{root}/folder_{s}", "wds": f"wds:{root}/wds:{s}",
                          "tfds": f"tfds:three_ways_{s}:{s}"}[kind] for s in ("test", "train")}
    return root, refs, test, train


def config_for(refs: dict, data_dir: str, batch_size: int = 5) -> ml_collections.ConfigDict:
    common = dict(data_dir=data_dir)
    return ml_collections.ConfigDict({"model": {"image": {"image_size": SIZE}}, "eval_every": 0, "evals": {
        "run": "zs,ret,few,nn", "batch_size": batch_size,
        "zs": dict(type="zeroshot", data=refs["test"], classnames=CLASSNAMES, templates=TEMPLATES, **common),
        "ret": dict(type="retrieval", data=refs["test"], **common),
        "few": dict(type="fewshot", data=refs["test"], train_data=refs["train"], shots=(1, 3), seeds=2, **common),
        "nn": dict(type="knn", data=refs["test"], train_data=refs["train"], k=4, temperature=0.1, **common)}})


def run(config: ml_collections.ConfigDict):
    check_evals(config)
    ctx = registry.EvalContext(encode_images, encode_texts, ("image", "text"), {}, config,
                               batch_size=int(config.evals.batch_size))
    return registry.run(config, ctx)


def figures(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("eval_speed/")}


# ---- an independent computation on the same embeddings -------------------------------------------------

def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _crop(images):
    from PIL import Image

    out = []
    for im in images:  # 20 x 24 -> central 20 x 20 -> 16 x 16, as the evaluation prepares images
        pil = Image.fromarray(im)
        out.append(np.asarray(pil.resize((SIZE, SIZE), Image.BICUBIC, box=(2, 0, 22, 20))))
    return np.stack(out)


def reference(test, train) -> dict:
    images, labels, captions = test
    x = _unit(encode_images(_crop(images)))
    out = {}
    # zero-shot: templates embedded, normalised, averaged, normalised; the class of the highest score
    w = np.stack([_unit(_unit(encode_texts([t.replace("{}", c) for t in TEMPLATES])).mean(0, keepdims=True))[0]
                  for c in CLASSNAMES])
    logits = x @ w.T
    order = np.argsort(-logits, axis=1, kind="stable")
    out["zeroshot/zs/top1"] = np.mean(order[:, 0] == labels)
    out["zeroshot/zs/top5"] = np.mean([y in o[:5] for y, o in zip(labels, order)])
    out["zeroshot/zs/mean_per_class_recall"] = np.mean([np.mean(order[labels == c, 0] == c)
                                                         for c in range(len(CLASSNAMES))])
    # retrieval: every caption of every image
    texts = [c for caps in captions for c in caps]
    owner = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
    t = _unit(encode_texts(texts))
    s = x @ t.T
    for k in (1, 5, 10):
        top_texts = np.argsort(-s, axis=1, kind="stable")[:, :k]
        out[f"retrieval/ret/i2t_r{k}"] = np.mean([np.any(owner[row] == i) for i, row in enumerate(top_texts)])
        top_images = np.argsort(-s.T, axis=1, kind="stable")[:, :k]
        out[f"retrieval/ret/t2i_r{k}"] = np.mean([owner[j] in row for j, row in enumerate(top_images)])
    # k-NN: the 4 nearest train images vote with exp(cos / 0.1)
    tr_images, tr_labels, _ = train
    xt = _unit(encode_images(_crop(tr_images)))
    sims = x @ xt.T
    votes = np.zeros((len(x), len(CLASSNAMES)))
    for i in range(len(x)):
        for j in np.argsort(-sims[i], kind="stable")[:4]:
            votes[i, tr_labels[j]] += np.exp(sims[i, j] / 0.1)
    out["knn/nn/top1"] = np.mean(votes.argmax(1) == labels)
    # few-shot: k per class drawn with each seed; ridge on standardised features + a bias column, the l2 picked
    # on a fifth of the draw held out, then refitted on all of it
    for shots in (1, 3):
        accs = []
        for seed in range(2):
            rng = np.random.default_rng(seed)
            pick = np.sort(np.concatenate([np.flatnonzero(tr_labels == c)[rng.permutation(PER_CLASS_TRAIN)[:shots]]
                                           for c in range(len(CLASSNAMES))]))
            accs.append(_ridge_probe(xt[pick], tr_labels[pick], x, labels, seed))
        out[f"fewshot/few/{shots}shot"] = np.mean(accs)
        out[f"fewshot/few/{shots}shot_std"] = np.std(accs)
    return out


def _ridge_fit(x, y, l2):
    mean, std = x.mean(0), x.std(0) + 1e-5
    design = np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])
    targets = np.where(np.arange(len(CLASSNAMES))[None, :] == y[:, None], 1.0, -1.0)
    weights = np.linalg.solve(design.T @ design + l2 * np.eye(design.shape[1]), design.T @ targets)
    return lambda z: np.hstack([(z - mean) / std, np.full((len(z), 1), 100.0)]) @ weights


def _ridge_probe(xtr, ytr, xte, yte, seed):
    grid = [2.0 ** p for p in range(-10, 11, 2)]
    order = np.random.default_rng(seed).permutation(len(ytr))
    n_val = int(round(0.2 * len(ytr)))
    l2 = grid[len(grid) // 2]
    if 0 < n_val < len(ytr):
        val, fit = order[:n_val], order[n_val:]
        accs = [np.mean(_ridge_fit(xtr[fit].astype(np.float64), ytr[fit], g)(xtr[val]).argmax(1) == ytr[val])
                for g in grid]
        l2 = grid[int(np.argmax(accs))]
    return np.mean(_ridge_fit(xtr.astype(np.float64), ytr, l2)(xte.astype(np.float64)).argmax(1) == yte)


# ---- tests -------------------------------------------------------------------------------------------------

def test_three_formats_give_identical_figures_equal_to_numpy(written):
    root, refs, test, train = written
    got = {kind: figures(run(config_for(refs[kind], str(root / "tfds"))).metrics) for kind in refs}
    assert got["folder"] == got["wds"] == got["tfds"]
    want = reference(test, train)
    for name, value in want.items():
        assert got["folder"][name] == pytest.approx(value, abs=1e-9), name
    assert 0.25 < want["zeroshot/zs/top1"] < 1 and 0 < want["knn/nn/top1"] < 1  # neither chance nor trivial
    assert all(got["folder"][f"{k}/decode_errors"] == 0 for k in ("zeroshot/zs", "retrieval/ret", "fewshot/few",
                                                                   "knn/nn"))


def test_batch_size_does_not_change_the_figures(written):
    root, refs, _, _ = written
    a = figures(run(config_for(refs["wds"], str(root / "tfds"), batch_size=3)).metrics)
    b = figures(run(config_for(refs["wds"], str(root / "tfds"), batch_size=64)).metrics)
    assert a == b


def test_reports_carry_clip_benchmark_names(written):
    root, refs, _, _ = written
    out = run(config_for(refs["folder"], str(root / "tfds")))
    assert out.reports["zs"]["task"] == "zeroshot_classification"
    assert set(out.reports["zs"]["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert out.reports["zs"]["metrics"]["acc1"] == out.metrics["zeroshot/zs/top1"]
    assert out.reports["ret"]["metrics"]["image_retrieval_recall@5"] == out.metrics["retrieval/ret/t2i_r5"]
    assert out.reports["ret"]["dataset"] == refs["folder"]["test"]


def test_a_corrupt_record_is_counted_and_left_out(tmp_path):
    images, labels, captions = labelled_split(3, 0)
    root = tmp_path / "set"
    eval_writers.write_image_folder(root, images, labels, classnames=CLASSNAMES)
    (root / "c00001" / "zz_broken.png").write_bytes(b"\x89PNG not really")
    config = ml_collections.ConfigDict({"model": {"image": {"image_size": SIZE}}, "eval_every": 0, "evals": {
        "run": "zs", "batch_size": 4, "zs": dict(type="zeroshot", data=f"folder:{root}", templates=TEMPLATES)}})
    clean = ml_collections.ConfigDict(config.to_dict())
    (root / "c00001" / "zz_broken.png").unlink()
    want = figures(run(clean).metrics)
    (root / "c00001" / "zz_broken.png").write_bytes(b"\x89PNG not really")
    got = figures(run(config).metrics)
    assert got.pop("zeroshot/zs/decode_errors") == 1 and want.pop("zeroshot/zs/decode_errors") == 0
    assert got == want


@pytest.mark.parametrize("entry, match", [
    (dict(type="zeroshot", data="imagenet"), r"config\.evals\.e\.data: .*KIND:PATH"),
    (dict(type="knn", data="synthetic:10", train_data="", k=3), r"config\.evals\.e\.train_data"),
    (dict(type="knn", data="synthetic:10", train_data="synthetic:10", k=0), r"config\.evals\.e\.k=0"),
    (dict(type="fewshot", data="synthetic:10", train_data="synthetic:10", shots=(0, 5)), r"config\.evals\.e\.shots"),
    (dict(type="retrieval", data="synthetic:10", limit=-1), r"config\.evals\.e\.limit=-1"),
    (dict(type="clusters", data="synthetic:10", every=-2), r"config\.evals\.e\.every=-2"),
    (dict(type="clusters", data="folder:/no/such/folder"), r"config\.evals\.e\.data: .*no folder"),
    (dict(type="clusters", data="tar:/no/such/*.tar"), r"config\.evals\.e\.data: .*no .* files"),
    (dict(type="clusters", data="synthetic:ten"), r"config\.evals\.e\.data: .*synthetic:N"),
])
def test_settings_are_checked_naming_the_key(entry, match):
    config = ml_collections.ConfigDict({"model": {"image": {"image_size": SIZE}}, "eval_every": 0,
                                       "evals": {"run": "e", "batch_size": 4, "e": entry}})
    with pytest.raises(ConfigError, match=match):
        check_evals(config)


def test_unlabelled_data_is_refused_by_a_labelled_evaluator(tmp_path):
    images, _, captions = labelled_split(2, 0)
    eval_writers.write_image_folder(tmp_path / "flat", images, None, captions=captions)
    config = ml_collections.ConfigDict({"model": {"image": {"image_size": SIZE}}, "eval_every": 0, "evals": {
        "run": "c", "batch_size": 4, "c": dict(type="clusters", data=f"folder:{tmp_path / 'flat'}")}})
    with pytest.raises(ValueError, match="have no label"):
        run(config)
    config.evals.run = "r"
    config.evals.r = dict(type="retrieval", data=f"folder:{tmp_path / 'flat'}")
    assert 0 <= run(config).metrics["retrieval/r/i2t_r1"] <= 1
