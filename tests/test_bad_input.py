"""A user's mistake, command by command: the command ends with one ``error: ...`` line that names the flag, key,
file or argument (exit 2 for a mistyped command, 1 for an input that cannot be used), no traceback, and it
leaves the user's files as they were: the output folder absent (or byte for byte unchanged when it existed),
the inputs untouched. An input a command can still use in part (a ``metrics.jsonl`` whose last line was cut, a
run whose newest checkpoint is damaged) is a success (exit 0) with one warning line naming the file, and the
command keeps the rest; the one change it may make by design (the damaged step moved aside) is checked as such.

Each row runs the command as a process (``python -m clus_jax.<command>``, the way a user meets it). The inputs
are small and made by hand: embeddings as a side file, a clustering's files, a run's ``config.json`` with a
checkpoint cut short. The rows that need a trained run's real checkpoint share one 2-step run (slow tier).

The library's metric functions have their own table: each call on input that used to be scored silently wrong
(a NaN embedding that scored 1.0, a label -1 that indexed the last class, k < 1, an empty train set) raises
ValueError naming the problem, or, where a convention gives a value (the adjusted Rand index of fewer than two
points, MLCD's padding rows), returns it.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import host_limits  # registered by tests/conftest.py
import jax
import numpy as np
import pytest
from snapshots import moved, snapshot  # registered by tests/conftest.py

from clus_jax.clustering import quality
from clus_jax.common import cli
from clus_jax.config import base as config_base
from clus_jax.config.run_config import save_run_config
from clus_jax.data.side_fields import write_side_file
from clus_jax.evaluate import cluster_eval
from clus_jax.evaluate import metrics as M
from clus_jax.objectives.mlcd_math import mlcd_loss
from clus_jax.objectives.partial_fc import partial_fc_loss

import train_helpers as helpers  # registered by tests/conftest.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
       "CLUS_JAX_DEBUG": "0"}
POINTS, DIM = 200, 8
PROCESS_BASE_S = 120  # one command that starts JAX and stops at its first check, on the reference host
# A metrics.jsonl whose last line was cut by a killed writer: three complete records, then line 4 cut.
METRICS_CUT = ('{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/loss": 2.5}\n{"step": 2, "zeroshot/toy/top1": 0.5}\n'
               '{"step": 3, "train/lo')
# The trained rows' run (tests/train/test_workdir.py's): a config file with this spec and overrides, as the train
# command's flags and as the same config in process; checkpoints of steps 1 and 2.
SMALL_RUN = ":steps=2,batch=16,synthetic"
SMALL_OVERRIDES = {"model.image.size": "mu", "model.text.size": "mu", "model.image.image_size": 16,
                   "model.text.context_length": 8, "evals.run": "none", "data.synthetic_size": 32, "log_every": 1,
                   "checkpoint_every": 1}
SMALL_FLAGS = [f"--config.{k}={v}" for k, v in SMALL_OVERRIDES.items()]


def cut_short(path: str) -> None:
    """Truncates a file to half its bytes, as a copy or a write that stopped does."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Every input a row names, made without training: paths by name."""
    root = tmp_path_factory.mktemp("inputs")
    paths = {name: str(root / name) for name in (
        "emb", "emb_cut", "labels_txt", "labels_short", "labels_ok", "a_file", "clusters", "run_config", "run_cut",
        "logged_run", "empty", "missing", "other_emb", "logged_cut", "sweep_cut")}
    paths["sweep_cut_run"] = os.path.join(paths["sweep_cut"], "0_a")
    x = np.random.default_rng(0).normal(size=(POINTS, DIM)).astype(np.float32)
    for name in ("emb", "emb_cut"):
        write_side_file(paths[name], {"image_emb": x, "index": np.arange(POINTS), "valid": np.ones(POINTS, bool)},
                        shard_size=POINTS // 2)
    cut_short(os.path.join(paths["emb_cut"], "image_emb-00001.npy"))
    with open(paths["labels_txt"], "w") as f:
        f.write("0\n1\n")
    np.save(paths["labels_short"], np.arange(5))
    np.save(paths["labels_ok"], np.arange(POINTS) % 3)
    with open(paths["a_file"], "w") as f:
        f.write("not a folder\n")
    os.makedirs(paths["clusters"])  # a two-level clustering of 16-wide points: the wrong width for emb
    np.save(os.path.join(paths["clusters"], "centers.npy"), np.zeros((6, 16), np.float32))
    np.save(os.path.join(paths["clusters"], "fine_to_coarse.npy"), np.asarray([0, 0, 0, 1, 1, 1], np.int32))
    np.save(os.path.join(paths["clusters"], "coarse_centers.npy"), np.zeros((2, 16), np.float32))
    config = helpers.tiny_config("clip")
    save_run_config(paths["run_config"], config)
    save_run_config(paths["run_cut"], config)  # and a checkpoint whose metadata file was cut short
    state = os.path.join(paths["run_cut"], "checkpoints", "2", "state")
    os.makedirs(state)
    with open(os.path.join(state, "_METADATA"), "w") as f:
        f.write('{"tree_metadata": {"(\'params\',": ')
    os.makedirs(paths["logged_run"])
    with open(os.path.join(paths["logged_run"], "metrics.jsonl"), "w") as f:
        f.write('{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/loss": 2.5}\n')
    os.makedirs(paths["empty"])
    for run in ("logged_cut", "sweep_cut_run"):  # a run's log, and a sweep's one run of two steps, cut short
        os.makedirs(paths[run])
        with open(os.path.join(paths[run], "metrics.jsonl"), "w") as f:
            f.write(METRICS_CUT)
    with open(os.path.join(paths["sweep_cut"], "sweep.json"), "w") as f:
        json.dump({"config": "configs/clip.py", "common_overrides": [], "runs": [
            {"index": 0, "name": "a", "overrides": {}, "workdir": paths["sweep_cut_run"], "total_steps": 2}]}, f)
    os.makedirs(paths["other_emb"])  # embeddings of another run: a spec that --workdir run_cut does not match
    with open(os.path.join(paths["other_emb"], "embed.json"), "w") as f:
        f.write('{"workdir": "/elsewhere/run", "step": 7, "modality": ["image"]}\n')
    return paths


class ByDesign(NamedTuple):
    """The one change a row that succeeds makes to a folder of the user's: ``folder`` (relative to it) moved to
    ``to``, the ``appended`` files written on after their old bytes, new files added; every other file as it was."""
    path: str  # a name of the row's paths
    folder: str
    to: str
    appended: tuple[str, ...] = ()


class Row(NamedTuple):
    command: str  # the module under clus_jax
    args: list[str]  # {name} is a path of ``inputs`` or {out}, {workdir}: folders of the test, absent before
    code: int
    first_line: str  # regex, matched at the start of stderr's one line: the error, or a success's warning
    unchanged: tuple[str, ...] = ("out",)  # what must be as it was (absent stays absent)
    slow: bool = False  # starts JAX and the row was one line before: the slow tier keeps the fast one short
    stdout: str = ""  # regex searched in stdout: what a row that succeeds still gives
    by_design: ByDesign | None = None


ROWS = {
    # --- the mistakes a user found -------------------------------------------------------------------------
    "cluster-features-shard-cut-short": Row(
        "cluster", ["--features", "{emb_cut}", "--k", "4", "--out", "{out}"], 1,
        r"error: --features \S+emb_cut: cannot read side file shard '\S+image_emb-00001\.npy'", ("out", "emb_cut")),
    "cluster-labels-not-npy": Row(
        "cluster", ["--features", "{emb}", "--k", "4", "--out", "{out}", "--labels", "{labels_txt}"], 1,
        r"error: --labels \S+labels_txt: side file '\S+labels_txt' must be a \.npy file", ("out", "emb")),
    "cluster-labels-too-short": Row(
        "cluster", ["--features", "{emb}", "--k", "4", "--out", "{out}", "--labels", "{labels_short}.npy"], 1,
        r"error: --labels \S+labels_short\.npy has 5 rows but the embeddings reach record 199$"),
    "plan-config-file-missing": Row(
        "plan", ["--config", "configs/clipp.py"], 2,
        r"error: --config configs/clipp\.py: config file 'configs/clipp\.py' does not exist$", ()),
    "plan-config-key-mistyped": Row(
        "plan", ["--config", "configs/clip.py", "--config.model.image.sise=B/16"], 2,
        r"error: --config\.model\.image\.sise=B/16: config has no key 'model\.image\.sise'; "
        r"did you mean 'model\.image\.size'\?$", ()),
    "recipe-config-argument-value": Row(
        "recipe", ["--config", "configs/mlcd.py:k=abc", "--workdir", "{workdir}"], 2,
        r"error: --config configs/mlcd\.py:k=abc: config argument k='abc': expected int", ("workdir",)),
    "report-out-is-a-file": Row(
        "report", ["{logged_run}", "--out", "{a_file}"], 2,
        r"error: --out \S+a_file exists and is not a directory", ("a_file", "logged_run")),
    "evaluate-checkpoint-cut-short": Row(
        "evaluate", ["{run_cut}"], 1,
        r"error: checkpoint '\S+run_cut/checkpoints/2/state' cannot be read: JSONDecodeError", ("run_cut",)),
    "embed-checkpoint-cut-short": Row(
        "embed", ["--workdir", "{run_cut}", "--out", "{out}"], 1,
        r"error: --workdir \S+run_cut: checkpoint '\S+' cannot be read: JSONDecodeError", ("out", "run_cut")),
    "embed-out-holds-other-embeddings": Row(  # refused before the (cut short) checkpoint is read
        "embed", ["--workdir", "{run_cut}", "--out", "{other_emb}"], 2,
        r"error: --out \S+other_emb holds embeddings of something else \(different data, modality, num_records, "
        r"shard_size, workdir in embed\.json\)", ("other_emb", "run_cut")),
    "sweep-collect-empty-folder": Row(
        "sweep", ["--collect", "--workdir", "{empty}"], 1,
        r"error: --workdir \S+empty holds no run of the sweep", ("empty",)),
    "sweep-collect-config-empty-folder": Row(
        "sweep", ["--collect", "--config", "configs/clip.py", "--workdir", "{empty}"], 1,
        r"error: --workdir \S+empty holds no run of the sweep", ("empty",)),
    # --- inputs usable in part: exit 0, one warning naming the file and line, every complete record kept -----
    "report-metrics-last-line-cut": Row(
        "report", ["{logged_cut}", "--out", "{out}"], 0,
        r"(WARNING:[\w.]+:)?\S+/logged_cut/metrics\.jsonl:4: skipped a malformed line", ("logged_cut",),
        stdout=r'"png": 2\}'),  # the train loss and the zero-shot figure
    "sweep-collect-metrics-last-line-cut": Row(
        "sweep", ["--collect", "--workdir", "{sweep_cut}"], 0,
        r"\S+/sweep_cut/0_a/metrics\.jsonl:4: skipped a malformed line", ("sweep_cut_run",),
        stdout=r"\| a \| +\| finished \| 2 \| 2\.5000 \| 0\.5000 \|"),
    # --- mistakes that were already one line -----------------------------------------------------------------
    "train-config-key-mistyped": Row(
        "train", ["--config", "configs/clip.py", "--config.optim.lrr=1e-3", "--workdir", "{workdir}"], 2,
        r"error: --config\.optim\.lrr=1e-3: config has no key 'optim\.lrr'; did you mean 'optim\.lr'\?$",
        ("workdir",), slow=True),
    "train-config-file-missing": Row(
        "train", ["--config", "configs/nope.py", "--workdir", "{workdir}"], 2,
        r"error: --config configs/nope\.py: config file 'configs/nope\.py' does not exist$", ("workdir",), slow=True),
    "evaluate-evals-unknown": Row(
        "evaluate", ["{run_config}", "--evals", "embedded,nope"], 1,
        r"error: config\.evals\.run='embedded,nope': no entry config\.evals\.<name> for \['nope'\]",
        ("run_config",), slow=True),
    "evaluate-workdir-missing": Row(
        "evaluate", ["{missing}"], 1, r"error: no config\.json for '\S+missing'", ("missing",), slow=True),
    "embed-data-key-mistyped": Row(
        "embed", ["--workdir", "{run_config}", "--out", "{out}", "--data.sourse=synthetic"], 2,
        r"error: --data\.sourse: the data config has no key 'sourse'; did you mean 'source'\?$",
        ("out", "run_config"), slow=True),
    "cluster-flag-mistyped": Row(
        "cluster", ["--features", "{emb}", "--kk", "4", "--out", "{out}"], 2,
        r"error: unrecognized arguments: --kk 4$"),
    "cluster-features-missing": Row(
        "cluster", ["--features", "{missing}", "--k", "4", "--out", "{out}"], 1,
        r"error: --features \S+missing: side file directory '\S+missing' has no manifest\.json", slow=True),
    "cluster-k-above-points": Row(
        "cluster", ["--features", "{emb}", "--k", "500", "--out", "{out}"], 2,
        r"error: --k=500 exceeds the 200 embedded points of \S+emb$", slow=True),
    "report-workdir-missing": Row(
        "report", ["{missing}", "--out", "{out}"], 1, r"error: '\S+missing' holds no metrics\.jsonl", slow=True),
    "recipe-without-recipe": Row(
        "recipe", ["--config", "configs/clip.py", "--workdir", "{workdir}"], 2,
        r"error: --config configs/clip\.py defines no get_recipe\(\)$", ("workdir",), slow=True),
    "recipe-config-argument-unknown": Row(
        "recipe", ["--config", "configs/mlcd.py:kk=3", "--workdir", "{workdir}"], 2,
        r"error: --config configs/mlcd\.py:kk=3: unknown config argument 'kk'", ("workdir",), slow=True),
    "sweep-config-key-mistyped": Row(
        "sweep", ["--config", "configs/clip.py", "--workdir", "{workdir}", "--dry-run", "--config.optim.lrr=1"], 2,
        r"error: --config configs/clip\.py: override --config\.optim\.lrr: config has no key 'optim\.lrr'",
        ("workdir",), slow=True),
    "plan-value-unparsable": Row(
        "plan", ["--config", "configs/clip.py", "--config.batch_size=abc"], 2,
        r"error: flag --config\.batch_size=abc: invalid literal for int\(\)", (), slow=True),
    "experts-clusters-missing": Row(
        "experts", ["--features", "{emb}", "--clusters", "{missing}", "--out", "{out}"], 1,
        r"error: --clusters \S+missing has no centers\.npy", slow=True),
    "experts-width-differs": Row(
        "experts", ["--features", "{emb}", "--clusters", "{clusters}", "--out", "{out}", "--field", "image_emb"], 1,
        r"error: --features \S+emb field image_emb is 8 wide but the fine centres of --clusters \S+ are 16 wide$",
        ("out", "clusters"), slow=True),
    "experts-ooc-ratio": Row(
        "experts", ["--features", "{emb}", "--clusters", "{clusters}", "--out", "{out}", "--ooc-ratio", "2"], 2,
        r"error: --ooc-ratio=2\.0 must lie in \[0, 1\]$", slow=True),
    "ensemble-clusters-missing": Row(
        "ensemble", ["--experts", "{run_config}", "--clusters", "{missing}", "--captions", "{emb}", "--out", "{out}"],
        1, r"error: --clusters \S+missing has no centers\.npy", ("out", "run_config"), slow=True),
    "ensemble-expert-ids": Row(
        "ensemble", ["--experts", "{run_config}", "--expert-ids", "x", "--clusters", "{clusters}", "--captions",
                     "{emb}"], 2, r"error: --expert-ids='x': expected comma-separated integers$", (), slow=True),
}


def run_row(row: Row, paths: dict[str, str], env: dict[str, str] = ENV):
    args = [a.format(**paths) for a in row.args]
    return host_limits.run([sys.executable, "-m", f"clus_jax.{row.command}", *args], cwd=REPO, env=env,
                           base_s=PROCESS_BASE_S)


def row_paths(inputs: dict[str, str], tmp_path) -> dict[str, str]:
    return {**inputs, "out": str(tmp_path / "out"), "workdir": str(tmp_path / "workdir")}


INFO_LINE = re.compile(r"I\d{4} |INFO:")  # absl's and logging's: a row that succeeds may say what it did


def check_row(row: Row, paths: dict[str, str]) -> str:
    """Runs ``row``; asserts its exit code, its one stderr line (besides the INFO lines of a row that succeeds),
    its stdout, that ``row.unchanged`` stayed as it was and that ``row.by_design`` is the only other change;
    returns the line."""
    before = {k: snapshot(paths[k]) for k in row.unchanged}
    design = row.by_design
    if design:
        root = paths[design.path]
        before_design = snapshot(root)
        old_bytes = {name: pathlib.Path(root, name).read_bytes() for name in design.appended}
    proc = run_row(row, paths)
    lines = [line for line in proc.stderr.splitlines() if row.code or not INFO_LINE.match(line)]
    assert proc.returncode == row.code and len(lines) == 1, \
        f"exit {proc.returncode} (expected {row.code}), stderr:\n{proc.stderr[-3000:]}"
    assert re.match(row.first_line, lines[0]), f"{lines[0]!r} does not match {row.first_line!r}"
    assert re.search(row.stdout, proc.stdout), f"stdout does not hold {row.stdout!r}:\n{proc.stdout[-3000:]}"
    changed = [k for k in row.unchanged if snapshot(paths[k]) != before[k]]
    assert not changed, f"the command changed {[paths[k] for k in changed]}"
    if design:
        after = snapshot(root)
        lost = [path for path, digest in moved(before_design, design.folder, design.to).items()
                if path not in design.appended and after.get(path) != digest]
        assert not lost, f"besides moving {design.folder} to {design.to}, the command changed or removed {lost}"
        for name, old in old_bytes.items():
            assert pathlib.Path(root, name).read_bytes().startswith(old), f"{name} was rewritten, not appended to"
    return lines[0]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if r.slow else n for n, r in ROWS.items()])
def test_a_mistake_is_one_error_line_and_changes_nothing(name, inputs, tmp_path):
    check_row(ROWS[name], row_paths(inputs, tmp_path))


@pytest.mark.slow
def test_debug_shows_the_traceback_of_a_mistake(inputs, tmp_path):
    row = ROWS["cluster-labels-not-npy"]
    proc = run_row(row, row_paths(inputs, tmp_path), env={**ENV, "CLUS_JAX_DEBUG": "1"})
    assert proc.returncode == row.code, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and "read_labels" in proc.stderr
    assert re.match(row.first_line, proc.stderr.splitlines()[-1]), proc.stderr[-3000:]


@pytest.mark.slow
def test_a_rerun_with_the_labels_corrected_clusters(inputs, tmp_path):
    """The failed run left no spec in --out, so the corrected command is not refused as another clustering."""
    paths = row_paths(inputs, tmp_path)
    assert run_row(ROWS["cluster-labels-not-npy"], paths).returncode == 1
    fixed = Row("cluster", ["--features", "{emb}", "--k", "4", "--iters", "2", "--out", "{out}", "--labels",
                            "{labels_ok}.npy"], 0, "")
    proc = run_row(fixed, paths)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(os.path.join(paths["out"], "summary.json"))


def cut_arrays(step_dir: str) -> None:
    """Cuts short every array data file of a checkpoint step (the ``d`` folders), as a copy that stopped does."""
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) == "d":
            for name in files:
                cut_short(os.path.join(root, name))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, str]:
    """A finished 2-step CLIP run (checkpoints of steps 1 and 2) and what the rows make of it: ``clip_run`` as it
    is, ``trained_cut`` with only step 2, its array files cut short, ``damaged_run`` with step 2's cut short."""
    from clus_jax.train import loop

    root = tmp_path_factory.mktemp("trained")
    config = config_base.load_config("configs/clip.py" + SMALL_RUN)
    for key, value in SMALL_OVERRIDES.items():
        config_base.set_dotted(config, key, value)
    paths = {name: str(root / name) for name in ("clip_run", "trained_cut", "damaged_run")}
    loop.train_and_evaluate(config, paths["clip_run"])
    for name in ("trained_cut", "damaged_run"):
        shutil.copytree(paths["clip_run"], paths[name])
        cut_arrays(os.path.join(paths[name], "checkpoints", "2"))
    shutil.rmtree(os.path.join(paths["trained_cut"], "checkpoints", "1"))
    return paths


TRAINED_ROWS = {
    "evaluate-checkpoint-arrays-cut-short": Row(
        "evaluate", ["{trained_cut}", "--no-append"], 1,
        r"error: checkpoint '\S+trained_cut/checkpoints/2/state' cannot be read: ValueError: \S+: ",
        ("trained_cut",)),
    "embed-checkpoint-arrays-cut-short": Row(
        "embed", ["--workdir", "{trained_cut}", "--out", "{out}"], 1,
        r"error: --workdir \S+trained_cut: checkpoint '\S+' cannot be read: ValueError: ", ("out", "trained_cut")),
    "train-another-config-in-a-finished-run": Row(
        "train", ["--config", "configs/siglip.py" + SMALL_RUN, *SMALL_FLAGS, "--workdir", "{clip_run}"], 2,
        r"error: --workdir \S+/clip_run holds another run's checkpoints \(config\.json differs in objectives "
        r"\(\[\"clip\"\] -> \[\"siglip\"\]\), model\.logit_bias_init \(null -> -10\.0\)", ("clip_run",)),
    "train-newest-checkpoint-damaged": Row(  # step 2 moved aside, trained again from step 1
        "train", ["--config", "configs/clip.py" + SMALL_RUN, *SMALL_FLAGS, "--workdir", "{damaged_run}"], 0,
        r"W\d{4} [\d:.]+ +\d+ checkpoint\.py:\d+\] checkpoint step 2 in \S+/damaged_run/checkpoints could not be "
        r"restored \(ValueError: .*\); moved it to \S+/damaged_run/checkpoints/damaged-2; resuming from step 1$", (),
        stdout=r"\Astep 2/2 ",
        by_design=ByDesign("damaged_run", os.path.join("checkpoints", "2"), os.path.join("checkpoints", "damaged-2"),
                           appended=("metrics.jsonl",))),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED_ROWS)
def test_a_trained_run_given_to_a_command(name, trained, tmp_path):
    """Rows on a trained run's real checkpoints: each on its own copy of the folders it names."""
    row = TRAINED_ROWS[name]
    paths = {"out": str(tmp_path / "out")}
    for key, path in trained.items():
        if "{%s}" % key in row.args:
            paths[key] = shutil.copytree(path, str(tmp_path / key))
    line = check_row(row, paths)
    assert "tensorstore_spec" not in line, line  # the line names the file, without the store's spec


class _ReadAfterTheLoopClosed:
    """What an orbax restore that failed leaves behind: a read of another array finishing after orbax closed its
    event loop, which tensorstore reports as an unraisable error."""

    def __del__(self):
        raise RuntimeError("Event loop is closed")


def test_the_late_reads_of_a_failed_restore_add_no_line(monkeypatch, capsys, caplog):
    """The rows above meet these only when the reads finish before the process exits (a race): here they come
    for sure, an unraisable 'Event loop is closed' per array and asyncio's log of each read nobody awaited.
    Neither adds a line; another unraisable error still goes to the hook that was there."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(str(unraisable.exc_value)))

    class _Other:
        def __del__(self):
            raise ValueError("not a closed loop")

    def restore():
        for _ in range(3):
            _ReadAfterTheLoopClosed()  # collected at once: its __del__ raises into sys.unraisablehook
            logging.getLogger("asyncio").error("Future exception was never retrieved\nfuture: <Future finished>")
        _Other()
        raise cli.InputError("checkpoint 'x' cannot be read: ValueError: cut short")

    with pytest.raises(SystemExit) as exited:
        cli.run_command(restore)
    assert exited.value.code == 1
    assert capsys.readouterr().err.splitlines() == ["error: checkpoint 'x' cannot be read: ValueError: cut short"]
    assert seen == ["not a closed loop"]
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


# ----------------------------------------------------------------------------------------------------------------
# The metric functions: a call on input that used to be scored silently wrong.
# ----------------------------------------------------------------------------------------------------------------

RNG = np.random.default_rng(0)
X = RNG.normal(size=(6, 4)).astype(np.float32)
Y = np.array([0, 1, 2, 0, 1, 2])
CLASSIFIER = RNG.normal(size=(3, 4)).astype(np.float32)
NAN_ROW = np.where(np.arange(6)[:, None] == 0, np.nan, X)  # one row with a NaN, as a diverged encoder gives
ALL_NAN = np.full_like(X, np.nan)
MINUS_ONE = np.where(np.arange(6) == 2, -1, Y)  # a label -1 would index the last class
EMPTY_X, EMPTY_Y = X[:0], Y[:0]


def mlcd_padding_rows(holding: float) -> dict[str, Any]:
    """Partial FC's loss on 6 classes padded to 8 centre rows that hold ``holding`` (NaN: whatever a padding row
    holds): whether the loss and both gradients are finite, and the largest gradient on a padding row."""
    rng = np.random.default_rng(1)
    e, centers = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(8, 8)).astype(np.float32)
    centers[6:] = holding
    labels = np.array([[0, 1], [2, -1], [3, 4], [5, -1]], np.int32)

    def loss(e, centers):
        return partial_fc_loss(e, labels, centers, jax.random.PRNGKey(0), num_classes=6, sample_rate=1.0,
                               scale=32.0, margin=0.3, batch_axis_name=None, class_axis_name=None)[0]

    value, (g_e, g_c) = jax.value_and_grad(loss, (0, 1))(e, centers)
    finite = bool(np.isfinite(value) and np.all(np.isfinite(g_e)) and np.all(np.isfinite(g_c)))
    return {"finite": finite, "padding_gradient": float(np.abs(g_c[6:]).max())}


def mlcd_zero_centre() -> dict[str, Any]:
    """MLCD's loss with a zero centre row masked out of the negatives (the norm of a zero row): whether both
    gradients are finite, and the largest gradient on that row."""
    rng = np.random.default_rng(2)
    e, centers = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)
    centers[5] = 0.0
    labels = np.array([[0, 1], [2, -1], [3, 4], [1, -1]], np.int32)
    mask = np.arange(6) != 5
    g_e, g_c = jax.grad(lambda e, c: mlcd_loss(e, labels, c, negative_mask=mask), (0, 1))(e, centers)
    finite = bool(np.all(np.isfinite(g_e)) and np.all(np.isfinite(g_c)))
    return {"finite": finite, "padding_gradient": float(np.abs(g_c[5]).max())}


class Call(NamedTuple):
    """A library call on bad input: the ValueError (or other ``raises``) whose message ``expect`` (a regex) is
    searched in, or, with ``raises=None``, the value it returns (the convention where there is one)."""
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict[str, Any] = {}
    raises: type[Exception] | None = ValueError
    expect: Any = ""


NOT_FINITE = r"are not finite \(NaN or inf\)"
CALLS = {
    # --- a NaN embedding scored 1.0: refused, naming the set and the count; or scored wrong, never right ------
    "zeroshot-nan-image": Call(M.zeroshot_accuracy, (NAN_ROW, Y, CLASSIFIER),
                               expect=r"^1 of 6 image embeddings " + NOT_FINITE),
    "zeroshot-nan-class": Call(M.zeroshot_accuracy, (X, Y, ALL_NAN[:3]),
                               expect=r"^3 of 3 classifier rows " + NOT_FINITE),
    "zeroshot-nan-scored-wrong": Call(M.zeroshot_accuracy, (ALL_NAN, Y, CLASSIFIER), {"ks": (1, 3),
                                      "nonfinite": "wrong"}, None, {"top1": 0.0, "top3": 0.0}),
    "zeroshot-predictions-nan": Call(M.zeroshot_predictions, (NAN_ROW, CLASSIFIER),
                                     expect=r"^1 of 6 image embeddings " + NOT_FINITE),
    "retrieval-nan-text": Call(M.retrieval_recall, (X, NAN_ROW, np.arange(6)),
                               expect=r"^1 of 6 text embeddings " + NOT_FINITE),
    "retrieval-nan-scored-wrong": Call(M.retrieval_recall, (ALL_NAN, X, np.arange(6)), {"ks": (1, 6),
                                       "nonfinite": "wrong"}, None,
                                       {"i2t_r1": 0.0, "i2t_r6": 0.0, "t2i_r1": 0.0, "t2i_r6": 0.0}),
    "knn-nan-train": Call(M.knn_accuracy, (NAN_ROW, Y, X, Y), {"k": 3},
                          expect=r"^1 of 6 train embeddings " + NOT_FINITE),
    "knn-nan-scored-wrong": Call(M.knn_accuracy, (X, Y, ALL_NAN, Y), {"k": 3, "nonfinite": "wrong"}, None, 0.0),
    "linear-probe-nan-test": Call(M.linear_probe_accuracy, (X, Y, NAN_ROW, Y, 3),
                                  expect=r"^1 of 6 test embeddings " + NOT_FINITE),
    "linear-probe-nan-scored-wrong": Call(M.linear_probe_accuracy, (X, Y, ALL_NAN, Y, 3), {"nonfinite": "wrong"},
                                          None, 0.0),
    "logistic-probe-nan-train": Call(M.logistic_probe_accuracy, (NAN_ROW, Y, X, Y, 3),
                                     expect=r"^1 of 6 train embeddings " + NOT_FINITE),
    "cluster-metrics-nan": Call(cluster_eval.cluster_metrics, ("toy", NAN_ROW, Y, 3),
                                expect=r"^set 'toy': 1 of 6 image embeddings " + NOT_FINITE),
    # --- a label -1 indexed the last class: refused, naming the value and the range --------------------------
    "zeroshot-label-minus-one": Call(M.zeroshot_accuracy, (X, MINUS_ONE, CLASSIFIER),
                                     expect=r"^labels must lie in \[0, 3\), got -1 \(1 of 6 outside\)"),
    "zeroshot-label-past-classes": Call(M.zeroshot_accuracy, (X, np.where(Y == 2, 3, Y), CLASSIFIER),
                                        expect=r"^labels must lie in \[0, 3\), got 3 \(2 of 6 outside\)"),
    "confusion-label-minus-one": Call(M.confusion_matrix, (MINUS_ONE, Y, 3), expect=r"^labels must lie in \[0, 3\)"),
    "confusion-prediction-minus-one": Call(M.confusion_matrix, (Y, MINUS_ONE, 3),
                                           expect=r"^predictions must lie in \[0, 3\), got -1"),
    "retrieval-caption-minus-one": Call(M.retrieval_recall, (X, X, MINUS_ONE),
                                        expect=r"^caption_to_image must index 6 images, got range \[-1, 2\]"),
    "knn-train-label-minus-one": Call(M.knn_accuracy, (X, MINUS_ONE, X, Y), {"k": 3},
                                      expect=r"^train labels must lie in \[0, 3\), got -1"),
    "linear-probe-test-label-minus-one": Call(M.linear_probe_accuracy, (X, Y, X, MINUS_ONE, 3),
                                              expect=r"^test labels must lie in \[0, 3\), got -1"),
    "cluster-metrics-label-minus-one": Call(cluster_eval.cluster_metrics, ("toy", X, MINUS_ONE, 3),
                                            expect=r"^set 'toy': labels must lie in \[0, 3\), got -1"),
    # --- k < 1 took no neighbour (k=0) or all but the last five (k=-5) ----------------------------------------
    "knn-k-zero": Call(M.knn_accuracy, (X, Y, X, Y), {"k": 0}, expect=r"^k must be an integer >= 1, got 0$"),
    "knn-k-minus-five": Call(M.knn_accuracy, (X, Y, X, Y), {"k": -5}, expect=r"^k must be an integer >= 1, got -5$"),
    "knn-k-fraction": Call(M.knn_accuracy, (X, Y, X, Y), {"k": 2.5}, expect=r"^k must be an integer >= 1, got 2\.5$"),
    "zeroshot-ks-zero": Call(M.zeroshot_accuracy, (X, Y, CLASSIFIER), {"ks": (1, 0)},
                             expect=r"^ks must be an integer >= 1, got 0$"),
    "retrieval-ks-minus-five": Call(M.retrieval_recall, (X, X, np.arange(6)), {"ks": (-5,)},
                                    expect=r"^ks must be an integer >= 1, got -5$"),
    # --- an empty set has no score (a probe trained on nothing scored by its bias) ----------------------------
    "linear-probe-empty-train": Call(M.linear_probe_accuracy, (EMPTY_X, EMPTY_Y, X, Y, 3),
                                     expect=r"^no train examples: an empty set has no score$"),
    "logistic-probe-empty-train": Call(M.logistic_probe_accuracy, (EMPTY_X, EMPTY_Y, X, Y, 3),
                                       expect=r"^no train examples: an empty set has no score$"),
    "knn-empty-train": Call(M.knn_accuracy, (EMPTY_X, EMPTY_Y, X, Y), {"k": 3},
                            expect=r"^no train examples: an empty set has no score$"),
    "linear-probe-empty-test": Call(M.linear_probe_accuracy, (X, Y, EMPTY_X, EMPTY_Y, 3),
                                    expect=r"^no test examples: an empty set has no score$"),
    "zeroshot-empty": Call(M.zeroshot_accuracy, (EMPTY_X, EMPTY_Y, CLASSIFIER),
                           expect=r"^no image embeddings: an empty set has no score$"),
    # --- the adjusted Rand index of fewer than two points: 1.0, scikit-learn's adjusted_rand_score ------------
    "ari-no-point": Call(quality.adjusted_rand_index, ([], []), raises=None, expect=1.0),
    "ari-one-point": Call(quality.adjusted_rand_index, ([0], [5]), raises=None, expect=1.0),
    # --- MLCD's padding rows: a NaN or zero there never reaches the loss or its gradient ----------------------
    "mlcd-padding-rows-hold-nan": Call(mlcd_padding_rows, (np.nan,), raises=None,
                                       expect={"finite": True, "padding_gradient": 0.0}),
    "mlcd-zero-centre-masked": Call(mlcd_zero_centre, (), raises=None,
                                    expect={"finite": True, "padding_gradient": 0.0}),
}


@pytest.mark.parametrize("name", CALLS)
def test_a_metric_on_bad_input_raises_or_gives_the_convention(name):
    call = CALLS[name]
    if call.raises is None:
        assert call.fn(*call.args, **call.kwargs) == call.expect
    else:
        with pytest.raises(call.raises, match=call.expect):
            call.fn(*call.args, **call.kwargs)
