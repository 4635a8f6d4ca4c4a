"""Each evaluation entry on its own schedule: ``registry.due`` names the entries whose ``every`` divides a step
(``config.eval_every`` for an entry without one, all of them after the last step), and a tiny run with three
entries logs each one's metrics at its own steps in metrics.jsonl and TensorBoard, and the report draws them."""
import glob
import os
import struct

import ml_collections
import pytest
from tensorboardX.proto import event_pb2

from clus_jax import report
from clus_jax.evaluate import registry
from clus_jax.train import loop
from clus_jax.train.metrics_writer import read_metrics

import train_helpers as helpers  # registered by tests/conftest.py

# a: k-NN every 2 steps; b: clusters every 3; c: k-NN without its own 'every', so on config.eval_every = 4.
ENTRIES = {"a": dict(type="knn", data="synthetic:64", train_data="synthetic:128", k=5, every=2),
           "b": dict(type="clusters", data="synthetic:64", every=3),
           "c": dict(type="knn", data="synthetic:32", train_data="synthetic:64", k=3)}
TOTAL, EVAL_EVERY = 6, 4
# A metric of each entry and the steps it is logged at: its own multiples before the end, and the last step.
EXPECTED = {"knn/a/top1": [2, 4, 6], "cluster/b/kmeans_nmi": [3, 6], "knn/c/top1": [4, 6],
            "eval_speed/a/seconds": [2, 4, 6], "eval_speed/b/seconds": [3, 6], "eval_speed/c/seconds": [4, 6]}


def schedule_config(**entries):
    return ml_collections.ConfigDict({"eval_every": EVAL_EVERY, "evals": {"run": ",".join(entries), **entries}})


def test_each_entry_is_due_on_its_own_schedule():
    config = schedule_config(**ENTRIES)
    assert {s: registry.due(config, s) for s in range(1, 9)} == {
        1: [], 2: ["a"], 3: ["b"], 4: ["a", "c"], 5: [], 6: ["a", "b"], 7: [], 8: ["a", "c"]}
    assert registry.due(config, 5, last=True) == ["a", "b", "c"]
    config.eval_every = 0  # an entry without 'every' then runs after the last step only
    assert registry.due(config, 4) == ["a"] and registry.due(config, 7, last=True) == ["a", "b", "c"]
    config.evals.run = "none"
    assert registry.due(config, 6) == [] and registry.due(config, 6, last=True) == []


@pytest.fixture(scope="module")
def scheduled_run(tmp_path_factory):
    """6 steps of the tiny clip config with the entries a, b, c evaluated on their own schedules."""
    workdir = str(tmp_path_factory.mktemp("runs") / "scheduled")
    config = helpers.tiny_config("clip", total_steps=TOTAL, log_every=1, checkpoint_every=0, eval_every=EVAL_EVERY)
    config.data.synthetic_size = 64
    config.evals.update(ENTRIES)
    config.evals.run = ",".join(ENTRIES)
    config.evals.batch_size = 64
    loop.train_and_evaluate(config, workdir)
    return workdir


def tensorboard_steps(workdir: str) -> dict[str, list[int]]:
    """Every scalar tag of the run's TensorBoard event files with the steps it was written at (the TFRecord
    framing: length, its CRC, the serialized Event, its CRC)."""
    steps: dict[str, list[int]] = {}
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(int(event.step))
    return steps


def logged_steps(workdir: str) -> dict[str, list[int]]:
    steps: dict[str, list[int]] = {}
    for record in read_metrics(workdir):
        for key in record:
            if key != "step":
                steps.setdefault(key, []).append(record["step"])
    return steps


@pytest.mark.slow
def test_each_entry_is_logged_at_its_own_steps(scheduled_run):
    logged = logged_steps(scheduled_run)
    assert {k: logged.get(k) for k in EXPECTED} == EXPECTED
    # Every metric of an entry comes with its runs and no other: b's three scores and its decode errors too.
    assert {k: v for k, v in logged.items() if k.startswith("cluster/b/")} == {
        f"cluster/b/{m}": [3, 6] for m in ("kmeans_nmi", "kmeans_ari", "kmeans_purity", "decode_errors")}
    assert logged["eval/seconds"] == [2, 3, 4, 6]  # one evaluation per step where any entry is due
    assert all(0 <= r["knn/a/top1"] <= 1 for r in read_metrics(scheduled_run) if "knn/a/top1" in r)


@pytest.mark.slow
def test_tensorboard_holds_the_same_metrics_at_the_same_steps(scheduled_run):
    logged, board = logged_steps(scheduled_run), tensorboard_steps(scheduled_run)
    assert {k: board.get(k) for k in EXPECTED} == EXPECTED
    evaluated = [k for k in logged if k.split("/")[0] in ("knn", "cluster", "eval_speed", "eval")]
    assert {k: board.get(k) for k in evaluated} == {k: logged[k] for k in evaluated}


@pytest.mark.slow
def test_the_report_draws_each_entry(scheduled_run, tmp_path, capsys):
    out = tmp_path / "report"
    report.main([scheduled_run, "--out", str(out)])
    page = (out / "report.html").read_text()
    for png, keys in {"eval_knn.png": ["knn/a/top1", "knn/c/top1"], "eval_cluster.png": ["cluster/b/kmeans_nmi"],
                      "eval_eval_speed.png": ["eval_speed/a/seconds", "eval_speed/b/seconds"]}.items():
        assert (out / png).stat().st_size > 10_000, png
        (drawn,) = [p for p in page.split("<p class='keys'>") if p.startswith(f"<b>{png}</b> draws")]
        assert all(f"<code>{k}</code>" in drawn.split("</p>")[0] for k in keys), (png, drawn[:300])
