"""A finished tiny run (clip + swap, evaluated at steps 2 and 4): the arrays its evaluations save,
python -m clus_jax.report on it and a copy of it overlaid (every PNG written, each an image, report.html shows
each one), and python -m clus_jax.evaluate re-evaluating it from its checkpoint (the run's own figures and
names). The re-evaluation tests live here to share the one training run: it is most of the time."""
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from clus_jax import report
from clus_jax.evaluate import __main__ as evaluate_main
from clus_jax.evaluate import artifacts
from clus_jax.train import loop
from clus_jax.train.metrics_writer import read_metrics

import train_helpers as helpers  # registered by tests/conftest.py

# The tests that read the module's finished run (one training run with two evaluations) are slow; the fast tier
# draws a report from a hand-written metrics file.

SETS = ("easyvqa", "emoji_category")
NOT_FIGURES = ("step", "eval/seconds")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """4 steps of clip + swap (two banks) on synthetic data, evaluated on the embedded sets at steps 2 and 4,
    with checkpoints at both."""
    workdir = str(tmp_path_factory.mktemp("runs") / "clus_tiny")
    config = helpers.tiny_config("clip", total_steps=4, log_every=1, eval_every=2, checkpoint_every=2)
    config.objectives = {"clip": 1.0, "swap": 0.5}
    config.swap.num_prototypes = (8, 16)
    config.swap.queue_length = 0
    config.evals.sets = "embedded"
    config.evals.batch_size = 512
    loop.train_and_evaluate(config, workdir)
    return workdir


def eval_lines(workdir, step):
    return [r for r in read_metrics(workdir) if r["step"] == step and "zeroshot/easyvqa/top1" in r]


def figures(record):
    return {k: v for k, v in record.items() if k not in NOT_FIGURES}


@pytest.mark.slow
def test_every_evaluation_saves_its_arrays_and_figures(finished_run):
    assert artifacts.steps(finished_run) == [2, 4]
    arrays = artifacts.read(artifacts.step_dir(finished_run, 4))
    assert sorted(arrays) == sorted(SETS)
    easy = arrays["easyvqa"]
    assert easy.confusion.shape == (24, 24) and len(easy.classnames) == 24
    assert easy.confusion.sum() == len(easy.labels) == easy.projection.shape[0]
    (line,) = eval_lines(finished_run, 4)
    assert artifacts.read_metrics(artifacts.step_dir(finished_run, 4)) == figures(line)
    # float64 ratios of the same integer counts on both sides: default tolerances are far above their rounding.
    assert np.trace(easy.confusion) / easy.confusion.sum() == pytest.approx(line["zeroshot/easyvqa/top1"])
    np.testing.assert_allclose(np.nanmean(easy.per_class_accuracy), line["zeroshot/easyvqa/mean_per_class_top1"])
    assert {f"cluster/{s}/{src}_{score}" for s in SETS for src in ("kmeans", "bank_0", "bank_1")
            for score in ("nmi", "ari", "purity")} <= set(line)


@pytest.mark.slow
def test_report_writes_every_png_and_the_page_shows_them(finished_run, tmp_path, capsys):
    copy = str(tmp_path / "other" / "clus_tiny")  # same last name: the labels must still differ
    shutil.copytree(finished_run, copy)
    out = tmp_path / "report"
    report.main([finished_run, copy, "--out", str(out)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = report.run_names([finished_run, copy])
    assert len(set(names)) == 2
    expected = {"loss.png", "learning_rate.png", "logit_scale.png", "swap_banks.png",
                *(f"eval_{f}.png" for f in ("zeroshot", "retrieval", "probe", "cluster")),
                *(f"{kind}_{report._slug(n + '_' + s)}.png" for n in names for s in SETS for kind in ("confusion", "pca"))}
    written = {p.name for p in out.glob("*.png")}
    assert written == expected and printed["png"] == len(expected)
    for name in written:
        with Image.open(out / name) as im:
            im.verify()
            assert im.size[0] >= 300 and im.size[1] >= 200
    page = (out / "report.html").read_text()
    assert printed["report"] == str(out / "report.html")
    assert set(re.findall(r"<img src='([^']+)'", page)) == expected
    assert "cluster/easyvqa/kmeans_nmi" in page and "per-class zero-shot accuracy" in page


@pytest.mark.slow
def test_a_run_without_swap_or_arrays_still_reports(finished_run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    keep = ("train/loss", "train/clip/loss", "train/learning_rate", "zeroshot/easyvqa/top1")
    (bare / "metrics.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k in ("step", *keep)}) + "\n" for r in read_metrics(finished_run)))
    files = report.write_report([str(bare)], str(tmp_path / "out"))
    assert {os.path.basename(p) for p in files["png"]} == {"loss.png", "learning_rate.png", "eval_zeroshot.png"}
    assert "No run trained the swap objective" in (tmp_path / "out" / "report.html").read_text()


def test_a_hand_written_metrics_file_gives_its_curves(tmp_path):
    """Whatever a run logged is drawn: a metrics file written by hand (no training) gives the loss, learning
    rate and zero-shot curves, each a real image, and the page shows each one."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    with open(workdir / "metrics.jsonl", "w") as f:
        for step in (1, 2, 3, 4):
            f.write(json.dumps({"step": step, "train/loss": 4.0 / step, "train/clip/loss": 4.0 / step,
                                "train/learning_rate": 1e-3 * step, "train/logit_scale": 10.0 + step}) + "\n")
        f.write(json.dumps({"step": 4, "zeroshot/easyvqa/top1": 0.5, "retrieval/emoji_heldout/i2t_r1": 0.1}) + "\n")
    files = report.write_report([str(workdir)], str(tmp_path / "out"))
    names = sorted(os.path.basename(p) for p in files["png"])
    assert {"loss.png", "learning_rate.png", "logit_scale.png", "eval_zeroshot.png"} <= set(names), names
    page = open(files["report"][0]).read()
    for path in files["png"]:
        with Image.open(path) as image:
            assert image.size[0] > 100 and image.size[1] > 100
        assert os.path.basename(path) in page


def test_a_directory_that_is_not_a_run_is_one_error_line(tmp_path, capsys):
    for command in (report.main, evaluate_main.main):
        with pytest.raises(SystemExit) as e:
            command([str(tmp_path / "nothing"), "--out", str(tmp_path / "out")] if command is report.main
                    else [str(tmp_path / "nothing")])
        assert e.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err


@pytest.mark.slow
def test_reevaluation_of_a_step_gives_the_runs_own_figures_under_the_same_names(finished_run, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run, workdir)
    shutil.rmtree(artifacts.step_dir(workdir, 2))
    (trained,) = eval_lines(workdir, 2)
    evaluate_main.main([workdir, "--step", "2"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trained_again, again = eval_lines(workdir, 2)
    assert trained_again == trained and again == printed and again["step"] == 2
    assert list(again) == list(trained)  # the same names, in the same order
    assert figures(again) == figures(trained)  # banks read from the checkpoint: bank_* figures included
    assert artifacts.read_metrics(artifacts.step_dir(workdir, 2)) == figures(trained)
    np.testing.assert_array_equal(artifacts.read(artifacts.step_dir(workdir, 2))["easyvqa"].confusion,
                                  artifacts.read(artifacts.step_dir(finished_run, 2))["easyvqa"].confusion)
    evaluate_main.main([workdir, "--no-append"])  # the newest checkpoint; metrics.jsonl untouched
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4
    assert len(eval_lines(workdir, 4)) == 1
