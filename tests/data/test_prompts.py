"""CLIP_benchmark's prompt sets (installed package, cache, fetched wheel) and which names and templates an
evaluator uses."""
import hashlib
import json
import zipfile

import pytest

from clus_jax.common.cache import CACHE_ENV
from clus_jax.data import prompts as P

NAMES = {"mnist": [str(d) for d in range(10)], "pets": ["Abyssinian", "Bengal"]}
TEMPLATES = {"mnist": ['a photo of the number: "{c}".'], "cifar10": ["a photo of a {c}.", "a blurry photo of a {c}."],
             "pets": ["a photo of a {c}, a type of pet."]}
FILES = {P.CLASSNAMES_FILE: json.dumps(NAMES).encode(), P.TEMPLATES_FILE: json.dumps(TEMPLATES).encode()}


def _fake_wheel(path, files=FILES):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(P.WHEEL_FOLDER + name, data)
    return path


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """No installed clip_benchmark, an empty cache, the fake files' digests pinned; returns the downloads made."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(P, "package_dir", lambda name: None)
    monkeypatch.setattr(P, "CLIP_BENCHMARK_FILES", {f: hashlib.sha256(d).hexdigest() for f, d in FILES.items()})
    calls = []

    def download(dest):
        calls.append(dest)
        return _fake_wheel(dest / "clip_benchmark-1.6.2-py2.py3-none-any.whl")

    return download, calls


def test_fetched_once_then_from_the_cache(fake_index, tmp_path):
    download, calls = fake_index
    mnist = P.load_prompt_set("clip_benchmark:mnist", download=download)
    assert mnist == P.PromptSet(NAMES["mnist"], ['a photo of the number: "{}".'], "clip_benchmark:mnist")
    folder = tmp_path / "cache" / P.CLIP_BENCHMARK_CACHE
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)  # no temporary files left
    assert len(calls) == 1

    def no_download(dest):
        raise AssertionError("downloaded although cached")

    cifar = P.load_prompt_set("clip_benchmark:cifar10", download=no_download)
    assert cifar.classnames is None  # CLIP_benchmark takes CIFAR's names from torchvision
    assert cifar.templates == ["a photo of a {}.", "a blurry photo of a {}."]
    assert P.resolve(None, None, "clip_benchmark:mnist", ["d"], None, "config.evals.mnist") == (
        NAMES["mnist"], mnist.templates)  # a spec is loaded (here from the cache)


def test_wrong_content_refused(fake_index, tmp_path):
    download = lambda dest: _fake_wheel(dest / "w.whl", {**FILES, P.TEMPLATES_FILE: b'{"mnist": ["{c}"]}'})
    with pytest.raises(ValueError, match=f"sha256 mismatch for {P.WHEEL_FOLDER + P.TEMPLATES_FILE}"):
        P.load_prompt_set("clip_benchmark:mnist", download=download)
    assert not (tmp_path / "cache" / P.CLIP_BENCHMARK_CACHE / P.TEMPLATES_FILE).exists()


def test_installed_package_first(fake_index, tmp_path, monkeypatch):
    installed = tmp_path / "site" / "clip_benchmark"
    (installed / "datasets").mkdir(parents=True)
    for name, data in FILES.items():
        (installed / "datasets" / name).write_bytes(data.replace(b"Bengal", b"Birman"))
    monkeypatch.setattr(P, "package_dir", lambda name: installed if name == "clip_benchmark" else None)
    pets = P.load_prompt_set("clip_benchmark:pets", download=lambda dest: pytest.fail("downloaded"))
    assert pets.classnames == ["Abyssinian", "Birman"]
    assert not (tmp_path / "cache").exists()


def test_unknown_and_malformed_specs(fake_index):
    download, _ = fake_index
    with pytest.raises(ValueError, match=r"'clip_benchmark:mnits'.*known: cifar10, mnist, pets"):
        P.load_prompt_set("clip_benchmark:mnits", download=download)
    for spec in ("mnist", "clip_benchmark:", "openai:imagenet1k"):
        with pytest.raises(ValueError, match="must be SOURCE:DATASET"):
            P.load_prompt_set(spec, download=download)


# ------------------------------------------------------------------------------------------------ resolve
WHERE = "config.evals.mnist"
PROMPTS = P.PromptSet(["zero", "one"], ["a photo of the number {}."], "clip_benchmark:test")


def test_names_precedence(tmp_path):
    data_names, data_templates = ["d0", "d1"], ["data {c}"]
    assert P.resolve(None, None, None, data_names, None, WHERE) == (data_names, list(P.DEFAULT_TEMPLATES))
    assert P.resolve(None, None, None, data_names, data_templates, WHERE) == (data_names, ["data {}"])
    assert P.resolve(None, None, PROMPTS, data_names, data_templates, WHERE) == (PROMPTS.classnames,
                                                                                PROMPTS.templates)
    assert P.resolve(["a", "b"], ["x {c}", "y {}"], PROMPTS, data_names, data_templates, WHERE) == (
        ["a", "b"], ["x {}", "y {}"])
    names_file, templates_file = tmp_path / "names.txt", tmp_path / "templates.txt"
    names_file.write_text("snowy owl\n\n  red fox \n")
    templates_file.write_text("art of the {c}.\n")
    assert P.resolve(str(names_file), templates_file, PROMPTS, None, None, WHERE) == (
        ["snowy owl", "red fox"], ["art of the {}."])
    templates_only = P.PromptSet(None, ["itap of a {}."], "clip_benchmark:cifar10")
    assert P.resolve(None, None, templates_only, data_names, data_templates, WHERE) == (data_names,
                                                                                       ["itap of a {}."])


def test_resolve_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=rf"^{WHERE}\.classnames: no class names"):
        P.resolve(None, None, P.PromptSet(None, ["{}"], "x"), None, ["{}"], WHERE)
    with pytest.raises(ValueError, match=rf"^{WHERE}\.templates: every template needs"):
        P.resolve(["a"], ["a photo"], None, None, None, WHERE)
    with pytest.raises(ValueError, match=rf"^{WHERE}\.templates: every template needs"):
        P.resolve(None, None, None, ["a"], ["a photo of {c}", "no slot"], WHERE)
    with pytest.raises(ValueError, match=rf"^{WHERE}\.classnames: .*missing.txt' is not a file"):
        P.resolve(str(tmp_path / "missing.txt"), None, None, ["a"], None, WHERE)
    with pytest.raises(ValueError, match=rf"^{WHERE}\.prompts: prompt set 'openai:x' must be SOURCE:DATASET"):
        P.resolve(None, None, "openai:x", ["a"], None, WHERE)


# -------------------------------------------------------------------------------------- the real wheel
def test_real_clip_benchmark_lists(tmp_path, monkeypatch):
    """Fetched from the package index into an empty cache (network), with the pinned digests."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(P, "package_dir", lambda name: None)
    imagenet = P.load_prompt_set("clip_benchmark:imagenet1k")
    assert len(imagenet.classnames) == 1000 and len(imagenet.templates) == 80
    assert imagenet.classnames[:2] == ["tench", "goldfish"] and imagenet.templates[0] == "a bad photo of a {}."
    mnist = P.load_prompt_set("clip_benchmark:mnist")
    assert mnist.classnames == [str(d) for d in range(10)]
    assert mnist.templates == ['a photo of the number: "{}".']
    assert sorted(p.name for p in (tmp_path / "cache" / P.CLIP_BENCHMARK_CACHE).iterdir()) == sorted(FILES)
