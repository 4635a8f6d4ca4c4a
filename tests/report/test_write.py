"""A whole report from hand-written run directories (no training): whatever a run logged is drawn, a made-up
objective's and a made-up evaluator's metrics included, each named on the page next to its figure."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from clus_jax.evaluate import artifacts
from clus_jax.evaluate.runner import ClassArrays, Evaluation
from clus_jax.report.write import write_report

pytest.importorskip("matplotlib")

TOY = {"train/toyobj/loss": "loss.png", "train/toyobj/spread": "objective_toyobj.png",
       "objectives/toyobj/norm": "eval_objectives.png", "toyeval/set/score": "eval_toyeval.png"}


def write_metrics(workdir, lines) -> str:
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(workdir)


def figure_keys(page: str) -> dict[str, list[str]]:
    """Each PNG the page shows -> the metric keys the page says it draws."""
    return {png: re.findall(r"<code>([^<]+)</code>", keys)
            for png, keys in re.findall(r"<p class='keys'><b>([^<]+)</b> draws (.*?)</p>", page)}


def test_a_made_up_objective_and_evaluator_are_drawn_and_named(tmp_path):
    lines = []
    for step in range(1, 9):
        lines.append({"step": step, "train/loss": 3.0 / step, "train/toyobj/loss": 3.0 / step,
                      "train/toyobj/spread": np.sin(step), "train/learning_rate": 1e-3})
        if step % 4 == 0:
            lines.append({"step": step, "objectives/toyobj/norm": 1.0 + step, "toyeval/set/score": -0.1 * step,
                          "toyeval/set/never": None, "eval/seconds": 2.0})
    workdir = write_metrics(tmp_path / "toy", lines)
    files = write_report([workdir], str(tmp_path / "out"))
    page = open(files["report"][0]).read()
    drawn = figure_keys(page)
    for key, png in TOY.items():
        assert key in drawn[png], (key, png, drawn)
        with Image.open(tmp_path / "out" / png) as im:
            assert im.size[0] >= 600 and im.size[1] >= 400
    logged = {k for r in lines for k in r if k != "step"}
    assert {k for keys in drawn.values() for k in keys} == logged - {"toyeval/set/never", "eval/seconds"}
    assert "<li><code>toyeval/set/never</code>: no finite number logged</li>" in page
    assert "<li><code>eval/seconds</code>: bookkeeping</li>" in page
    assert "<td><code>toyeval/set/score</code></td><td>-0.8000</td>" in page  # final values: the newest


def test_a_hand_written_metrics_file_gives_its_curves(tmp_path):
    """A metrics file written by hand gives the loss, learning rate and zero-shot curves, each a real image,
    and the page shows each one; a second run overlaid, with saved arrays, adds its confusion and PCA."""
    lines = [{"step": s, "train/loss": 4.0 / s, "train/clip/loss": 4.0 / s, "train/learning_rate": 1e-3 * s,
              "train/logit_scale": 10.0 + s} for s in (1, 2, 3, 4)]
    lines.append({"step": 4, "zeroshot/easyvqa/top1": 0.5, "retrieval/emoji_heldout/i2t_r1": 0.1})
    first = write_metrics(tmp_path / "a" / "run", lines)
    second = write_metrics(tmp_path / "b" / "run", lines[:2])
    arrays = ClassArrays(classnames=["x", "y"], confusion=np.array([[2, 1], [0, 3]]),
                         per_class_accuracy=np.array([2 / 3, 1.0]), projection=np.eye(6, 2, dtype=np.float32),
                         explained_variance=np.array([0.6, 0.3]), labels=np.array([0, 0, 0, 1, 1, 1]))
    artifacts.write(Evaluation(metrics={}, arrays={"easyvqa": arrays}), artifacts.step_dir(second, 2))
    files = write_report([first, second], str(tmp_path / "out"))
    names = {os.path.basename(p) for p in files["png"]}
    assert names == {"loss.png", "learning_rate.png", "logit_scale.png", "eval_zeroshot.png", "eval_retrieval.png",
                     "confusion_b_run_easyvqa.png", "pca_b_run_easyvqa.png"}
    page = open(files["report"][0]).read()
    assert set(re.findall(r"<img src='([^']+)'", page)) == names
    assert "b/run: confusion matrices and PCA at step 2" in page and "per-class zero-shot accuracy" in page
    assert "No saved evaluation arrays" in page  # the first run has none
    for path in files["png"]:
        with Image.open(path) as image:
            assert image.size[0] > 100 and image.size[1] > 100


def test_a_distribution_logged_as_quantiles_gets_a_histogram_per_run(tmp_path):
    """A run that logged CLIP+Reg's margin quantiles (both directions) gets one histogram image with both, named on
    the page with the keys it draws; a run without them gets none."""
    quantiles = ["min", *(f"p{q}" for q in range(10, 100, 10)), "max", "mean"]
    lines = [{"step": s, "train/loss": 1.0 / s, **{f"train/clip_reg/margin/{d}/{q}": (i - 5) / 10 + s / 100
                                                  for d in ("i2t", "t2i") for i, q in enumerate(quantiles)}}
             for s in (5, 10)]
    with_margins = write_metrics(tmp_path / "reg", lines)
    without = write_metrics(tmp_path / "plain", [{"step": 5, "train/loss": 1.0}])
    files = write_report([with_margins, without], str(tmp_path / "out"))
    hists = [os.path.basename(p) for p in files["png"] if os.path.basename(p).startswith("hist_")]
    assert hists == ["hist_train_clip_reg_margin_reg.png"]
    drawn = figure_keys(open(files["report"][0]).read())[hists[0]]
    assert drawn == [f"train/clip_reg/margin/{d}/{q}" for d in ("i2t", "t2i") for q in quantiles[:-1]]
    with Image.open(tmp_path / "out" / hists[0]) as im:
        assert im.size[0] >= 800 and im.size[1] >= 350
        pixels = np.asarray(im.convert("RGB")).astype(int)
    blue = (pixels[..., 2] - pixels[..., 0] > 60)  # the filled bars
    assert blue[:, : im.size[0] // 2].mean() > 0.02 and blue[:, im.size[0] // 2:].mean() > 0.02
