"""The command line (one error line for a directory that is not a run), and a finished tiny run (clip + swap,
evaluated at steps 2 and 4): the arrays its evaluations save, python -m clus_jax.report on it and a copy of it
overlaid (every PNG written, each an image, report.html shows each one and every logged key), and
python -m clus_jax.evaluate re-evaluating it from its checkpoint (the run's own figures and names). The
re-evaluation tests live here to share the one training run: it is most of the time."""
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
from clus_jax.report import __main__ as report_main
from clus_jax.report.figures import slug
from clus_jax.report.runs import run_names
from clus_jax.report.write import write_report
from clus_jax.train import loop
from clus_jax.train.metrics_writer import read_metrics

import train_helpers as helpers  # registered by tests/conftest.py

# The tests that read the module's finished run (one training run with two evaluations) are slow; the fast tier
# draws reports from hand-written metrics files (test_write.py).

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
    config.evals.run = "embedded"
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
    names = run_names([finished_run, copy])
    assert len(set(names)) == 2
    expected = {"loss.png", "learning_rate.png", "logit_scale.png", "train.png", "eval_data.png", "eval_eval.png",
                "objective_clip.png", "objective_swap.png",
                *(f"eval_{f}.png" for f in ("zeroshot", "retrieval", "probe", "cluster")),
                *(f"{kind}_{slug(n + '_' + s)}.png" for n in names for s in SETS for kind in ("confusion", "pca"))}
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
    drawn = set(re.findall(r"<code>([^<]+)</code>", " ".join(re.findall(r"<p class='keys'>(.*?)</p>", page))))
    logged = {k for r in read_metrics(finished_run) for k in r} - set(NOT_FIGURES)
    assert logged <= drawn  # every metric the run logged is named on the page, the swap heads' included
    assert {"train/swap/bank_1/used_clusters_text", "train/swap/bank_0/code_entropy"} <= logged


@pytest.mark.slow
def test_a_run_with_one_objective_and_no_arrays_still_reports(finished_run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    keep = ("train/loss", "train/clip/loss", "train/learning_rate", "zeroshot/easyvqa/top1")
    (bare / "metrics.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k in ("step", *keep)}) + "\n" for r in read_metrics(finished_run)))
    files = write_report([str(bare)], str(tmp_path / "out"))
    assert {os.path.basename(p) for p in files["png"]} == {"loss.png", "learning_rate.png", "eval_zeroshot.png"}
    assert "No saved evaluation arrays" in (tmp_path / "out" / "report.html").read_text()


def test_a_directory_that_is_not_a_run_is_one_error_line(tmp_path, capsys):
    report_args = [str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]
    for command, args in ((report.main, report_args), (report_main.main, report_args),
                          (evaluate_main.main, [str(tmp_path / "nothing")])):
        with pytest.raises(SystemExit) as e:
            command(args)
        assert e.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        assert "nothing" in err
        if command is not evaluate_main.main:
            assert err == f"error: {str(tmp_path / 'nothing')!r} holds no metrics.jsonl (is it a run's workdir?)"


def test_a_mistyped_command_is_one_error_line(tmp_path, capsys):
    for args in ([str(tmp_path)], ["--out", str(tmp_path)], [str(tmp_path), "--out", str(tmp_path), "--outt", "x"]):
        with pytest.raises(SystemExit) as e:
            report.main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err


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
