"""A user's mistake, command by command: the command ends with one ``error: ...`` line that names the flag, key,
file or argument (exit 2 for a mistyped command, 1 for an input that cannot be used), no traceback, and it
leaves the user's files as they were: the output folder absent (or byte for byte unchanged when it existed),
the inputs untouched.

Each row runs the command as a process (``python -m clus_jax.<command>``, the way a user meets it). The inputs
are small and made by hand: embeddings as a side file, a clustering's files, a run's ``config.json`` with a
checkpoint cut short. The rows that need a trained run's real checkpoint share one 2-step run (slow tier).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from typing import NamedTuple

import host_limits  # registered by tests/conftest.py
import numpy as np
import pytest
from snapshots import snapshot  # registered by tests/conftest.py

from clus_jax.config.run_config import save_run_config
from clus_jax.data.side_fields import write_side_file

import train_helpers as helpers  # registered by tests/conftest.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
       "CLUS_JAX_DEBUG": "0"}
POINTS, DIM = 200, 8
PROCESS_BASE_S = 120  # one command that starts JAX and stops at its first check, on the reference host


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
        "logged_run", "empty", "missing", "other_emb")}
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
    os.makedirs(paths["other_emb"])  # embeddings of another run: a spec that --workdir run_cut does not match
    with open(os.path.join(paths["other_emb"], "embed.json"), "w") as f:
        f.write('{"workdir": "/elsewhere/run", "step": 7, "modality": ["image"]}\n')
    return paths


class Row(NamedTuple):
    command: str  # the module under clus_jax
    args: list[str]  # {name} is a path of ``inputs`` or {out}, {workdir}: folders of the test, absent before
    code: int
    first_line: str  # regex, matched at the start of stderr's one line
    unchanged: tuple[str, ...] = ("out",)  # what must be as it was (absent stays absent)
    slow: bool = False  # starts JAX and the row was one line before: the slow tier keeps the fast one short


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


def check_row(row: Row, paths: dict[str, str]) -> str:
    """Runs ``row``; asserts its exit code, its one stderr line and that ``row.unchanged`` stayed as it was;
    returns the line."""
    before = {k: snapshot(paths[k]) for k in row.unchanged}
    proc = run_row(row, paths)
    lines = proc.stderr.splitlines()
    assert proc.returncode == row.code and len(lines) == 1, \
        f"exit {proc.returncode} (expected {row.code}), stderr:\n{proc.stderr[-3000:]}"
    assert re.match(row.first_line, lines[0]), f"{lines[0]!r} does not match {row.first_line!r}"
    changed = [k for k in row.unchanged if snapshot(paths[k]) != before[k]]
    assert not changed, f"the failed command changed {[paths[k] for k in changed]}"
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


@pytest.fixture(scope="module")
def trained_cut(tmp_path_factory) -> dict[str, str]:
    """A 2-step CLIP run's workdir whose checkpoint data files were cut short, as a copy that stopped does."""
    from clus_jax.train import loop

    run = str(tmp_path_factory.mktemp("trained") / "run")
    loop.train_and_evaluate(helpers.tiny_config("clip", total_steps=2, checkpoint_every=0), run)
    cut = os.path.join(os.path.dirname(run), "trained_cut")
    shutil.copytree(run, cut)
    state = os.path.join(cut, "checkpoints", "2", "state")
    for root, _, files in os.walk(state):
        if os.path.basename(root) == "d":
            for name in files:
                cut_short(os.path.join(root, name))
    return {"trained_cut": cut}


@pytest.mark.slow
@pytest.mark.parametrize("row", [
    Row("evaluate", ["{trained_cut}", "--no-append"], 1,
        r"error: checkpoint '\S+trained_cut/checkpoints/2/state' cannot be read: ValueError: \S+: ",
        ("trained_cut",)),
    Row("embed", ["--workdir", "{trained_cut}", "--out", "{out}"], 1,
        r"error: --workdir \S+trained_cut: checkpoint '\S+' cannot be read: ValueError: ", ("out", "trained_cut")),
], ids=["evaluate", "embed"])
def test_a_checkpoint_cut_short_is_one_error_line(row, trained_cut, tmp_path):
    line = check_row(row, {**trained_cut, "out": str(tmp_path / "out")})
    assert "tensorstore_spec" not in line, line  # the line names the file, without the store's spec
