"""Recipes: ordered stages with their own workdirs and references to earlier ones, run end to end, skipped
when done, stopped at a failed stage with its name and log, printed by --dry-run and as launcher commands."""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys

import host_limits  # registered by tests/conftest.py
import pytest

from clus_jax import recipe

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Three cheap stages: make writes numbers, pretty re-formats them with a module (json.tool), total sums
# them. Every stage appends its name to {recipe}/ran.txt, so the test sees which stages really ran.
RECIPE = '''
from clus_jax.config import base as common
from clus_jax.recipe import Stage

LOG = "import sys; open(sys.argv[1] + '/ran.txt', 'a').write(sys.argv[2] + chr(10))"

def get_config(arg=None):
    return common.base_config()

def get_recipe(arg=None):
    a = common.parse_arg(arg, fail=0, n=3, train=False)
    make = ("import json, sys; " + LOG + "; "
            "json.dump(list(range(1, int(sys.argv[3]) + 1)), open(sys.argv[4], 'w'))")
    total = ("import json, sys; " + LOG + "; "
             "open(sys.argv[4], 'w').write(str(sum(json.load(open(sys.argv[3])))))")
    return [
        Stage("make", command=["python", "-c", make, "{recipe}", "make", str(a.n), "{workdir}/numbers.json"],
              outputs={"numbers": "numbers.json"}),
        Stage("pretty", module="json.tool", args=["--indent", "2", "{make.numbers}", "{workdir}/pretty.json"],
              outputs={"json": "pretty.json"}),
        Stage("check", command=["python", "-c", "import sys; " + LOG + "; sys.exit(int(sys.argv[3]))",
                                "{recipe}", "check", str(a.fail)]),
        Stage("total", command=["python", "-c", total, "{recipe}", "total", "{pretty}/pretty.json", "{workdir}/sum.txt"],
              outputs={"sum": "sum.txt"}),
        Stage("train", train="configs/clip.py:steps=3,synthetic",
              overrides={"optim.lr": 1e-3, "init_from.path": "{total.sum}"}),
    ][:5 if a.train else 4]
'''


@pytest.fixture(autouse=True)
def in_repository(monkeypatch):
    monkeypatch.chdir(ROOT)  # train stages name configs/... relative to the repository, as on the command line


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "recipe_config.py"
    path.write_text(RECIPE)
    return str(path)


def _ran(workdir: pathlib.Path) -> list[str]:
    path = workdir / "ran.txt"
    return path.read_text().split() if path.exists() else []


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    code = recipe.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_recipe_runs_end_to_end_and_a_rerun_skips_done_stages(config, tmp_path, capsys):
    workdir = tmp_path / "r"
    code, out, err = _main(capsys, "--config", config, "--workdir", str(workdir))
    assert code == 0, err
    assert _ran(workdir) == ["make", "check", "total"]  # pretty ran json.tool, which writes no name
    assert json.loads((workdir / "pretty" / "pretty.json").read_text()) == [1, 2, 3]
    assert (workdir / "pretty" / "pretty.json").read_text().startswith("[\n  1")  # json.tool's --indent 2
    assert (workdir / "total" / "sum.txt").read_text() == "6"
    for name in ("make", "pretty", "check", "total"):
        marker = json.loads((workdir / name / recipe.DONE_FILE).read_text())
        assert marker["stage"] == name and (workdir / name / recipe.LOG_FILE).exists()
    assert "recipe: all 4 stages done" in out

    code, out, err = _main(capsys, "--config", config, "--workdir", str(workdir))
    assert code == 0 and _ran(workdir) == ["make", "check", "total"]  # nothing ran again
    assert out.count("already done, skipped") == 4

    # A stage whose marker is gone runs again; the others stay skipped.
    (workdir / "total" / recipe.DONE_FILE).unlink()
    code, out, err = _main(capsys, "--config", config, "--workdir", str(workdir))
    assert code == 0 and _ran(workdir) == ["make", "check", "total", "total"]
    assert out.count("already done, skipped") == 3


def test_a_failing_stage_stops_the_recipe_naming_it_and_its_log(config, tmp_path, capsys):
    workdir = tmp_path / "r"
    code, out, err = _main(capsys, "--config", config + ":fail=3", "--workdir", str(workdir))
    assert code == 1
    log = workdir / "check" / recipe.LOG_FILE
    assert f"error: recipe stage 'check' (3/4) failed with status 3; log: {log}" in err
    assert _ran(workdir) == ["make", "check"]  # total never started
    assert not (workdir / "total").exists() and not (workdir / "check" / recipe.DONE_FILE).exists()
    assert (workdir / "make" / recipe.DONE_FILE).exists() and (workdir / "pretty" / recipe.DONE_FILE).exists()
    assert log.read_text().startswith("$ ")  # the command that ran, then its output

    # Fixed, the recipe goes on from the failed stage.
    code, out, err = _main(capsys, "--config", config, "--workdir", str(workdir))
    assert code == 0, err
    assert _ran(workdir) == ["make", "check", "check", "total"]


def test_a_stage_that_misses_its_declared_output_fails(tmp_path, capsys):
    path = tmp_path / "c.py"
    path.write_text("from clus_jax.recipe import Stage\n"
                    "def get_recipe():\n"
                    "    return [Stage('a', command=['python', '-c', 'pass'], outputs={'x': 'x.npy'}),\n"
                    "            Stage('b', command=['python', '-c', 'pass'])]\n")
    code, out, err = _main(capsys, "--config", str(path), "--workdir", str(tmp_path / "r"))
    assert code == 1 and "recipe stage 'a' (1/2) failed with status 1" in err
    assert "did not write its outputs x" in (tmp_path / "r" / "a" / recipe.LOG_FILE).read_text()
    assert not (tmp_path / "r" / "b").exists()


def test_a_changed_stage_is_not_silently_skipped(config, tmp_path, capsys):
    workdir = tmp_path / "r"
    assert _main(capsys, "--config", config, "--workdir", str(workdir))[0] == 0
    code, out, err = _main(capsys, "--config", config + ":n=4", "--workdir", str(workdir))
    assert code == 1 and "recipe stage 'make' finished earlier with another command" in err
    assert str(workdir / "make" / recipe.DONE_FILE) in err
    assert _ran(workdir) == ["make", "check", "total"]


def test_dry_run_prints_every_stage_with_its_references_resolved(config, tmp_path, capsys):
    workdir = tmp_path / "r"
    code, out, err = _main(capsys, "--config", config + ":train", "--workdir", str(workdir), "--dry-run")
    assert code == 0, err
    assert not workdir.exists()  # printing creates nothing
    lines = out.splitlines()
    assert [line for line in lines if line.startswith("#")] == [
        f"# stage {i}/5: {name} (todo)" for i, name in enumerate(["make", "pretty", "check", "total", "train"], 1)]
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert len(commands) == 5
    assert commands[0][0] == sys.executable and commands[0][-1] == str(workdir / "make" / "numbers.json")
    assert commands[1] == [sys.executable, "-m", "json.tool", "--indent", "2", str(workdir / "make" / "numbers.json"),
                           str(workdir / "pretty" / "pretty.json")]
    assert commands[3][-2:] == [str(workdir / "pretty" / "pretty.json"), str(workdir / "total" / "sum.txt")]
    assert commands[4] == [sys.executable, "-m", "clus_jax.train", "--config", "configs/clip.py:steps=3,synthetic",
                           "--workdir", str(workdir / "train"), "--config.optim.lr=0.001",
                           f"--config.init_from.path={workdir / 'total' / 'sum.txt'}"]

    # After a run, the dry run marks what is done; with processes, train stages go through launch/local.sh.
    assert _main(capsys, "--config", config, "--workdir", str(workdir))[0] == 0
    code, out, _ = _main(capsys, "--config", config + ":train", "--workdir", str(workdir), "--dry-run",
                         "--processes", "2")
    assert "# stage 1/5: make (done)" in out and "# stage 5/5: train (todo)" in out
    train = shlex.split(out.splitlines()[-1])
    assert train[0].startswith("LOG_DIR=") and train[1:4] == ["bash", "launch/local.sh", "2"]


def test_launcher_commands(config, tmp_path, capsys):
    code, out, err = _main(capsys, "--config", config + ":train", "--workdir", "gs://b/rec", "--launcher", "tpu_pod")
    assert code == 0, err
    commands = [line for line in out.splitlines() if not line.startswith("#")]
    pretty = shlex.split(commands[1])
    env = dict(w.split("=", 1) for w in pretty[:-1])
    assert pretty[-1] == "launch/tpu_pod.sh" and env["MODULE"] == "json.tool" and env["RUN_NAME"] == "pretty"
    assert shlex.split(env["EXTRA_ARGS"]) == ["--indent", "2", "gs://b/rec/make/numbers.json",
                                              "gs://b/rec/pretty/pretty.json"]
    train = dict(w.split("=", 1) for w in shlex.split(commands[4])[:-1])
    assert train["CONFIG"] == "configs/clip.py:steps=3,synthetic" and train["WORKDIR"] == "gs://b/rec/train"
    assert train["EXTRA_ARGS"] == ("--config.optim.lr=0.001 "
                                   "--config.init_from.path=gs://b/rec/total/sum.txt")
    assert "runs where the recipe runs" in commands[0]
    code, out, _ = _main(capsys, "--config", config + ":train", "--workdir", "/s/rec", "--launcher", "gpu_slurm")
    assert "MODULE=json.tool WORKDIR=/s/rec/pretty" in out and "sbatch --job-name=pretty launch/gpu_slurm.sbatch" in out


BAD = {
    "later": ("[Stage('a', command=['python', '-c', '', '{b}']), Stage('b', command=['true'])]",
              "recipe stage 'a' command[3]: {b} refers to stage 'b', which runs later"),
    "unknown": ("[Stage('a', command=['true']), Stage('b', command=['{c}'])]",
                "recipe stage 'b' command[0]: {c} names no earlier stage (known: a, recipe, workdir)"),
    "output": ("[Stage('a', command=['true'], outputs={'x': 'x'}), Stage('b', command=['{a.y}'])]",
               "{a.y}: stage 'a' declares no output 'y' (its outputs: ['x'])"),
    "self": ("[Stage('a', command=['{a}'])]", "{a} is this stage; its own directory is {workdir}"),
    "twice": ("[Stage('a', command=['true']), Stage('a', command=['true'])]", "two stages are named 'a'"),
    "kind": ("[Stage('a', command=['true'], module='m')]", "give exactly one of train=, module= or command="),
    "name": ("[Stage('a b', command=['true'])]", "recipe stage 0 ('a b'): a stage name is"),
    "key": ("[Stage('t', train='configs/clip.py', overrides={'optim.lrr': 1})]",
            "recipe stage 't': overrides 'optim.lrr': config has no key 'optim.lrr'; did you mean 'optim.lr'?"),
    "config": ("[Stage('t', train='configs/nope.py')]", "recipe stage 't': --config configs/nope.py:"),
    "empty": ("[]", "returned no stages"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_recipe_that_cannot_run_fails_before_any_stage_with_one_line(case, tmp_path, capsys):
    stages, message = BAD[case]
    path = tmp_path / "c.py"
    path.write_text(f"from clus_jax.recipe import Stage\ndef get_recipe():\n    return {stages}\n")
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--config", str(path), "--workdir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert message in err
    assert not (tmp_path / "r").exists()


def test_a_config_without_a_recipe_is_named(capsys):
    with pytest.raises(SystemExit):
        recipe.main(["--config", str(ROOT / "configs" / "clip.py"), "--workdir", "/tmp/clus_jax/none"])
    assert "defines no get_recipe()" in capsys.readouterr().err


def test_printed_launcher_commands_run_the_stage_module(config, tmp_path, capsys):
    """The tpu_pod and gpu_slurm lines of a module stage, run with --dry-run, end in `python -m MODULE ARGS`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CLUS_JAX_", "TPU_", "SKIP_"))}
    env.update(TPU_NAME="t", ZONE="z")
    for launcher, replace in (("tpu_pod", ("launch/tpu_pod.sh", "bash launch/tpu_pod.sh --dry-run")),
                              ("gpu_slurm", ("sbatch --job-name=pretty launch/gpu_slurm.sbatch",
                                             "bash launch/gpu_slurm.sbatch --dry-run"))):
        code, out, _ = _main(capsys, "--config", config, "--workdir", "/s/rec", "--launcher", launcher)
        line = [x for x in out.splitlines() if "MODULE=json.tool" in x][0].replace(*replace)
        proc = host_limits.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, base_s=60)
        assert proc.returncode == 0, proc.stderr
        ran = next(c for c in reversed(proc.stdout.splitlines()) if "-m json.tool" in c)
        assert ran.rstrip("'").endswith("-m json.tool --indent 2 /s/rec/make/numbers.json /s/rec/pretty/pretty.json")
        assert "clus_jax.plan" not in proc.stdout  # no memory plan for a module that does not train


# --- configs/mlcd.py: the teacher labels the data, the student trains from random init -------------------------
OPEN_CLIP_TEACHER = str(ROOT / "tests" / "interop" / "vectors" / "options")  # a random open_clip model, 24 wide


def _mlcd(arg: str, workdir: pathlib.Path) -> dict[str, recipe.ResolvedStage]:
    return {s.name: s for s in recipe.resolve(recipe.recipe_stages(f"configs/mlcd.py:{arg}"), str(workdir))}


def _teacher_run(path: pathlib.Path, embed_dim: int) -> str:
    """A run's workdir as the recipe plans with it: its config.json (another size than the student's)."""
    from clus_jax.config.base import load_config
    from clus_jax.config.run_config import save_run_config

    config = load_config("configs/clip.py:size=mu,text_size=mu,image_size=16")
    config.model.embed_dim = embed_dim
    save_run_config(str(path), config)
    return str(path)


def _assert_student_from_random_init(stages: dict, cluster: str, mlcd: str, centres: bool) -> None:
    from clus_jax.config.base import load_config

    train = stages[mlcd]
    assert not load_config(train.train).init_from.path and not any("init_from" in k for k in train.overrides)
    assert train.overrides["data.side_fields.cluster_labels"] == stages[cluster].outputs["labels"]
    assert ("mlcd.init_centers" in train.overrides) == centres


def test_mlcd_default_teacher_is_clip_at_its_own_length_shared_by_the_seeds(tmp_path):
    """The default teacher stage is configs/clip.py at its own 600 steps of 64, with nothing of the student's
    (seed, steps, batch, sizes): seeds 1 and 2 in one DIR plan the same teacher and embed stages (one marker
    serves both) and their own cluster_sS, mlcd_sS and lit_sS. The mlcd stage has no init_from."""
    from clus_jax.config.base import load_config

    student = "steps=50,lit_steps=20,batch=32,image_size=48,k=64,labels=4"
    one, two = _mlcd(f"{student},seed=1", tmp_path), _mlcd(f"{student},seed=2", tmp_path)
    assert list(one) == ["teacher", "embed", "cluster_s1", "mlcd_s1", "lit_s1"]
    assert list(two) == ["teacher", "embed", "cluster_s2", "mlcd_s2", "lit_s2"]
    teacher = load_config(one["teacher"].train)
    assert one["teacher"].train == "configs/clip.py" and one["teacher"].overrides == {}
    assert (teacher.total_steps, teacher.batch_size, teacher.model.image.image_size) == (600, 64, 32)
    for name in ("teacher", "embed"):
        assert one[name].spec() == two[name].spec()
        os.makedirs(one[name].workdir)  # marked done as run_stage marks it
        recipe.atomic_write_json(os.path.join(one[name].workdir, recipe.DONE_FILE), {"spec": one[name].spec()})
        assert recipe.stage_status(two[name]) == "done"
    assert recipe.stage_status(two["cluster_s2"]) == "todo"
    embed = one["embed"].argv
    assert embed[embed.index("--workdir") + 1] == str(tmp_path / "teacher") and "--data.source=embedded" in embed
    cluster = one["cluster_s1"].argv
    assert [cluster[cluster.index(f) + 1] for f in ("--k", "--topk", "--seed")] == ["64", "4", "1"]
    _assert_student_from_random_init(one, "cluster_s1", "mlcd_s1", centres=True)
    student = load_config(one["mlcd_s1"].train)
    assert (student.total_steps, student.batch_size, student.model.image.image_size) == (50, 32, 48)
    assert one["mlcd_s1"].overrides["seed"] == "1" and one["lit_s1"].overrides == {"seed": "1"}
    assert one["lit_s1"].train.startswith(f"configs/lit.py:init={tmp_path / 'mlcd_s1'},steps=20")
    unseeded = _mlcd("", tmp_path)
    assert list(unseeded) == ["teacher", "embed", "cluster", "mlcd", "lit"]
    assert load_config(unseeded["mlcd"].train).total_steps == load_config("configs/clip.py").total_steps
    synthetic = _mlcd("synthetic,teacher_steps=30", tmp_path)
    assert synthetic["teacher"].train == "configs/clip.py:steps=30,synthetic"
    assert {"--data.source=synthetic", "--data.synthetic_size=10000"} <= set(synthetic["embed"].argv)


@pytest.mark.parametrize("kind", ["run", "open_clip"])
def test_mlcd_with_a_teacher_of_other_towers_embeds_with_it(kind, tmp_path):
    """teacher=DIR (a run of other towers, or an open_clip checkpoint folder) replaces the teacher stage: the
    embed stage reads it, the student's stages are planned as without it, from random init. Its k-means
    centres start the student's classifier only when the widths agree (init=0 otherwise)."""
    teacher = _teacher_run(tmp_path / "teacher_run", 32) if kind == "run" else OPEN_CLIP_TEACHER
    stages = _mlcd(f"teacher={teacher},init=0", tmp_path / "r")
    assert list(stages) == ["embed", "cluster", "mlcd", "lit"]
    embed = stages["embed"].argv
    assert embed[embed.index("--workdir") + 1] == teacher
    _assert_student_from_random_init(stages, "cluster", "mlcd", centres=False)
    assert stages["lit"].train == f"configs/lit.py:init={tmp_path / 'r' / 'mlcd'}"
    assert _mlcd(f"features={teacher},init=0", tmp_path / "r")["embed"].argv == embed  # the earlier name
    with pytest.raises(recipe.RecipeError, match=r"init=1 starts the student's centres .* (32|24) wide"):
        recipe.recipe_stages(f"configs/mlcd.py:teacher={teacher}")
    if kind == "run":  # the same width: the k-means centres start the classifier
        same = _mlcd(f"teacher={_teacher_run(tmp_path / 'wide', 128)}", tmp_path / "r")
        _assert_student_from_random_init(same, "cluster", "mlcd", centres=True)


@pytest.mark.parametrize("arg, message", [
    ("teacher={tmp}/nope", "neither a clus_jax run (no config.json there) nor an open_clip checkpoint folder"),
    ("teacher=" + OPEN_CLIP_TEACHER + "/open_clip_model.safetensors", "an open_clip weights file; give the folder"),
    ("teacher=" + OPEN_CLIP_TEACHER + ",init=0,teacher_steps=5", "teacher_steps=5 is for the recipe's own teacher"),
    ("teacher=" + OPEN_CLIP_TEACHER + ",features={tmp},init=0", "features= is teacher='s earlier name; give one"),
], ids=["missing", "weights-file", "teacher-steps", "both-names"])
def test_mlcd_teacher_mistakes_are_one_line_before_any_stage(arg, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--config", f"configs/mlcd.py:{arg.format(tmp=tmp_path)}", "--workdir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: --config configs/mlcd.py")
    assert message in err and not (tmp_path / "r").exists()
