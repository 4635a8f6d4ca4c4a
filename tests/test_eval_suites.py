"""The README's ImageNet lines and ``configs/evals/imagenet.py``, run on tiny stand-ins: TFDS datasets written
under the real builder names (``imagenet2012``, ``imagenet_v2/matched-frequency``, read back by TFDS's own
builders) and COCO captions in CLIP_benchmark's WebDataset layout. Only the download is missing."""
import importlib.util
import os
import re
import zlib

import ml_collections
import numpy as np
import pytest

from clus_jax.config import base as config_base
from clus_jax.config.check import check_evals
from clus_jax.data import eval_writers
from clus_jax.evaluate import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = [0, 1, 2, 999, 500, 7]


def encode_images(images):
    return np.asarray(images, np.float32).reshape(len(images), -1)[:, :16] / 255.0 + 0.01


TEXT_TABLE = np.random.default_rng(1).normal(size=(65536, 16)).astype(np.float32)


def encode_texts(texts):
    """A row of a fixed random table per text, chosen by its checksum (80,000 prompts in well under a second)."""
    return TEXT_TABLE[[zlib.crc32(t.encode()) % len(TEXT_TABLE) for t in texts]]


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    images = np.random.default_rng(0).integers(0, 255, (6, 40, 48, 3), dtype=np.uint8)
    eval_writers.write_tfds(root / "tfds", "imagenet2012", images, LABELS, split="validation")
    eval_writers.write_tfds(root / "tfds", "imagenet_v2/matched-frequency", images, LABELS, split="test")
    eval_writers.write_wds(root / "coco", images, captions=[[f"a photo {i}", f"the picture {i}"] for i in range(6)])
    return root


def readme_lines() -> str:
    text = open(os.path.join(REPO, "README.md")).read()
    block = re.search(r"<!-- imagenet-evals -->\n```python\n(.*?)```", text, re.S)
    assert block, "README lost its ImageNet lines"
    return block.group(1)


def suite_module():
    spec = importlib.util.spec_from_file_location("imagenet_suite", os.path.join(REPO, "configs/evals/imagenet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(config):
    check_evals(config)
    config.model.image.image_size = 16
    ctx = registry.EvalContext(encode_images, encode_texts, ("image", "text"), {}, config, batch_size=4)
    return registry.run(config, ctx)


def check(metrics: dict) -> None:
    for entry in ("imagenet", "imagenet_v2"):
        assert metrics[f"zeroshot/{entry}/decode_errors"] == 0
        assert 0 <= metrics[f"zeroshot/{entry}/top1"] <= metrics[f"zeroshot/{entry}/top5"] <= 1
    assert metrics["retrieval/coco/decode_errors"] == 0 and 0 <= metrics["retrieval/coco/t2i_r5"] <= 1


def test_readme_imagenet_lines_run_in_a_training_config(standins):
    config = config_base.base_config()
    code = readme_lines().replace("/data/tfds", str(standins / "tfds")).replace(
        "/data/wds_mscoco_captions", str(standins / "coco"))
    exec(code, {"config": config})
    assert config.evals.run == "embedded,imagenet,imagenet_v2,coco"
    assert registry.every(config, "imagenet") == 5000
    config.evals.run = "imagenet,imagenet_v2,coco"
    out = run(config)
    check(out.metrics)
    assert out.reports["imagenet"]["task"] == "zeroshot_classification"
    assert out.reports["coco"]["dataset"] == f"wds:{standins / 'coco'}"


def test_the_suite_file_gives_the_same_entries(standins):
    config = config_base.base_config()
    exec(readme_lines(), {"config": config})
    module = suite_module()
    suite = module.get_config("data_dir=/data/tfds,coco=/data/wds_mscoco_captions")
    for name, entry in suite.items():
        readme = dict(config.evals[name])
        assert {k: v for k, v in dict(entry).items() if v not in ("", 0)} == readme, name
    with pytest.raises(ValueError, match="data_dir=, coco="):
        module.get_config("dir=/x")


def test_the_suite_scores_the_standins_with_imagenet_prompts(standins):
    module = suite_module()
    config = config_base.base_config()
    config.evals = ml_collections.ConfigDict(dict(run="imagenet,imagenet_v2,coco", batch_size=4, **module.entries(
        data_dir=str(standins / "tfds"), coco=str(standins / "coco"))))
    out = run(config)
    check(out.metrics)
    # the two TFDS stand-ins hold the same images and labels: the same figures
    assert out.metrics["zeroshot/imagenet/top5"] == out.metrics["zeroshot/imagenet_v2/top5"]
