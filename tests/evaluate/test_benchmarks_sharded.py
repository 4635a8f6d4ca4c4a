"""Evaluation gives the same figures on one device, on 8 devices and on 2 processes of 4 devices, at batch sizes
that do not divide the sets' sizes: every streamed evaluator (zeroshot, retrieval, fewshot, knn, clusters) run
by ``registry.run`` with the trainer's encoders (tests/evaluate/multiprocess_eval.py), and a corrupt image
counted once (``decode_errors`` 1) however many processes read the folder it is in.

Equal means exactly equal, decode_errors and every accuracy, recall, few-shot mean and std, NMI, ARI and
purity. The embeddings themselves are not bitwise equal across meshes (one device against 8 differ by up to
~1e-7: the matmuls are blocked differently), but every figure is a ratio of counts of decisions (top-k hits,
neighbours' votes, the probe's and k-means' assignments), computed on the host from the gathered rows in
record order, and no decision on these sets is that close to a tie; a flipped one moves a figure by a whole
record (1/53 or more), never by rounding. The fast tier compares one device with 8 at another batch size; the slow tier
adds each change apart and 2 processes x 4 devices (the job a training run's evaluation runs in).
"""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import host_limits  # registered by tests/conftest.py
import local_processes  # registered by tests/conftest.py

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
_spec = importlib.util.spec_from_file_location("multiprocess_eval", os.path.join(HERE, "multiprocess_eval.py"))
multiprocess_eval = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(multiprocess_eval)

#: Global batches valid on every mesh here (a multiple of the data-parallel devices times the processes: 8 x 2)
#: that divide neither set (37, 53) nor the folder (10 files).
BATCHES = (16, 48)
FOLDER_IMAGES = {"blue": 5, "red": 4}  # and red/broken.png
FOLDER_ENTRIES = ("fzs", "fret", "fclu")
KINDS = {"zs": "zeroshot", "ret": "retrieval", "few": "fewshot", "knn": "knn", "clu": "cluster", "fzs": "zeroshot",
         "fret": "retrieval", "fclu": "cluster"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image folder of two classes, captioned, with one corrupt PNG in it."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    colours = {"blue": (40, 60, 220), "red": (220, 40, 40)}
    for name, count in FOLDER_IMAGES.items():
        (root / name).mkdir()
        for i in range(count):
            noise = rng.integers(-40, 40, (20, 20, 3))
            pixels = np.clip(np.asarray(colours[name]) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
            (root / name / f"{i}.txt").write_text(f"a {name} picture number {i}\n{name} noise {i}\n")
    (root / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    (root / "red" / "broken.txt").write_text("a caption of an image nobody can read\n")
    return str(root)


def comparable(metrics):
    """The figures, without the timings (``eval_speed/*``)."""
    return {k: v for k, v in metrics.items() if not k.startswith("eval_speed/")}


@pytest.fixture(scope="module")
def reference(folder):
    """The figures on one device at the first batch size."""
    batch, metrics = multiprocess_eval.figures({"data": 1}, jax.devices()[:1], BATCHES[0], folder)
    assert batch == BATCHES[0]
    return comparable(metrics)


def assert_same_figures(got, want, what):
    got = comparable(got)
    assert sorted(got) == sorted(want), what
    differ = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not differ, f"{what}: figures differ from one device at batch {BATCHES[0]} (got, want): {differ}"


def test_reference_scores_every_evaluator_and_counts_the_corrupt_image_once(reference):
    for entry, kind in KINDS.items():
        errors = reference[f"{kind}/{entry}/decode_errors"]
        assert errors == (1 if entry in FOLDER_ENTRIES else 0), (entry, errors)
    expected = ["zeroshot/zs/top1", "zeroshot/zs/top5", "zeroshot/zs/mean_per_class_recall", "retrieval/ret/i2t_r1",
                "retrieval/ret/t2i_r10", "fewshot/few/1shot", "fewshot/few/2shot_std", "knn/knn/top1",
                "cluster/clu/kmeans_nmi", "zeroshot/fzs/top1", "retrieval/fret/i2t_r1", "cluster/fclu/kmeans_purity"]
    assert not set(expected) - set(reference), sorted(set(expected) - set(reference))
    # Figures that tell settings apart: not all the same value (a broken gather would give a constant).
    assert len({round(reference[k], 6) for k in expected}) > 3, {k: reference[k] for k in expected}


@pytest.mark.parametrize("devices, batch", [
    (8, BATCHES[1]),  # the fast tier: devices and batch both changed
    pytest.param(8, BATCHES[0], marks=pytest.mark.slow),  # each apart
    pytest.param(1, BATCHES[1], marks=pytest.mark.slow)], ids=lambda v: str(v))
def test_one_process_gives_the_figures_of_one_device(reference, folder, devices, batch):
    got_batch, metrics = multiprocess_eval.figures({"data": devices}, jax.devices()[:devices], batch, folder)
    assert got_batch == batch
    assert_same_figures(metrics, reference, f"{devices} devices, batch {batch}")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_give_the_figures_of_one_device(reference, folder, tmp_path):
    port = local_processes.free_port()
    procs, logs = [], []
    try:
        for i in range(2):
            logs.append(open(tmp_path / f"p{i}.log", "w"))
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(HERE, "multiprocess_eval.py"), str(tmp_path / f"p{i}.json"), folder,
                 *map(str, BATCHES)],
                cwd=REPO, env=local_processes.process_env(port, 2, i, 4), stdout=logs[-1], stderr=subprocess.STDOUT))
        codes = [host_limits.wait(p, 300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    tails = "\n".join(f"--- p{i}.log ---\n" + "\n".join((tmp_path / f"p{i}.log").read_text().splitlines()[-30:])
                      for i in range(2))
    assert codes == [0, 0], tails
    for i in range(2):
        out = json.loads((tmp_path / f"p{i}.json").read_text())
        assert out["process"] == [i, 2] and out["devices"] == [4, 8], out
        for batch in BATCHES:
            run = out["runs"][str(batch)]
            assert run["batch_size"] == batch
            assert_same_figures(run["metrics"], reference, f"process {i} of 2 (4 devices each), batch {batch}")
