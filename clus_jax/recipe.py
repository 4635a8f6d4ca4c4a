"""Multi-stage recipes: a config's ``get_recipe()`` -> ordered stages, each a command with its own workdir.

    python -m clus_jax.recipe --config configs/NAME.py[:ARGS] --workdir DIR [--dry-run]
        [--launcher local|tpu_pod|gpu_slurm] [--processes N]

A method that starts with an offline step (embed the data, cluster it, label every record, then train on
the labels) is one recipe. A config file defines ``get_recipe()`` (or ``get_recipe(arg)``, given the same
``:ARGS`` string as ``get_config``) returning a list of ``Stage``; stage ``name`` runs in ``DIR/<name>``.
A stage is one of three kinds of command:

- ``Stage(name, train=SPEC, overrides={KEY: VALUE})``: ``python -m clus_jax.train --config SPEC
  --workdir <its workdir> --config.KEY=VALUE ...`` (keys are checked against the config before anything runs);
- ``Stage(name, module=MODULE, args=[...])``: ``python -m MODULE ARGS`` (``clus_jax.embed``,
  ``clus_jax.cluster``, ...; the arguments name the stage's workdir themselves, e.g. ``--out {workdir}``);
- ``Stage(name, command=[...])``: any command (a leading ``python`` is this interpreter).

Strings of a stage (the config spec, override values, arguments) may refer to directories:
``{workdir}`` (this stage's), ``{recipe}`` (``DIR``), ``{NAME}`` (an earlier stage's workdir) and
``{NAME.OUTPUT}`` (a path that stage declared in ``outputs={OUTPUT: path relative to its workdir}``).
``{{`` and ``}}`` are literal braces. A reference to a later or unknown stage is an error before anything
runs. An MLCD-style recipe::

    from clus_jax.recipe import Stage

    def get_recipe(arg=None):
        return [
            Stage("pretrain", train="configs/clip.py:size=B/16"),
            Stage("embed", module="clus_jax.embed",
                  args=["--workdir", "{pretrain}", "--out", "{workdir}", "--modality", "image"]),
            Stage("cluster", module="clus_jax.cluster", outputs={"labels": "labels"},
                  args=["--features", "{embed}", "--k", "1000000", "--metric", "cosine",
                        "--topk", "8", "--assign-to", "{workdir}/labels", "--out", "{workdir}"]),
            Stage("mlcd", train="configs/mlcd.py",
                  overrides={"data.side_fields.cluster_labels": "{cluster.labels}"}),
            Stage("lit", train="configs/lit.py:init={mlcd}"),
        ]

(MoDE: embed captions -> ``--levels m,n --balanced`` clustering -> one subset file per expert (a command or
module stage) -> a seed run -> one train stage per expert with ``init_from`` the seed run and
``data.subset`` its subset -> an evaluation stage; the stages are written out in a loop.)

A stage's output goes to ``DIR/<name>/stage.log`` (and here, prefixed ``[name]``). After it exits with
status 0 and every declared output exists, ``DIR/<name>/stage_done.json`` is written; a re-run skips the
stages that have it (and refuses one whose command has changed since, naming the marker to remove). A
failed stage stops the recipe: the error line names the stage, its status and its log, and the later
stages do not run. ``--dry-run`` prints every stage's command (marking the finished ones) and runs
nothing; ``--launcher tpu_pod|gpu_slurm`` prints each stage as a launcher command instead, in order
(module stages through the launchers' ``MODULE`` variable; plain commands as they are).
``--processes N`` runs train stages (and stages with ``processes=N``) through ``launch/local.sh N``.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from clus_jax.common import cli
from clus_jax.common.files import atomic_write_json

LAUNCHERS = ("local", "tpu_pod", "gpu_slurm")
LOG_FILE = "stage.log"
DONE_FILE = "stage_done.json"
RECIPE_FILE = "recipe.json"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_RESERVED = ("workdir", "recipe")
# {{, }}, {name} or {name.output}
_REFERENCE = re.compile(r"\{\{|\}\}|\{([A-Za-z][A-Za-z0-9_-]*)(?:\.([A-Za-z0-9_-]+))?\}")


class RecipeError(cli.UsageError):
    """A recipe that cannot run as written; the message names the stage."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a recipe: exactly one of ``train``, ``module`` or ``command`` (see the module docstring)."""

    name: str
    train: str | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    module: str | None = None
    args: Sequence[str] = ()
    command: Sequence[str] | None = None
    outputs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    processes: int | None = None

    @property
    def kind(self) -> str:
        return "train" if self.train is not None else "module" if self.module is not None else "command"


@dataclasses.dataclass(frozen=True)
class ResolvedStage:
    """A stage with its references replaced: what runs, where, and what it leaves behind."""

    index: int
    stage: Stage
    workdir: str
    train: str | None
    overrides: dict[str, str]
    argv: list[str]  # module args or the command, references resolved
    outputs: dict[str, str]  # absolute paths

    @property
    def name(self) -> str:
        return self.stage.name

    def spec(self) -> dict[str, Any]:
        """What the completion marker records and a re-run compares."""
        return {"kind": self.stage.kind, "train": self.train, "overrides": self.overrides,
                "module": self.stage.module, "argv": self.argv, "outputs": self.outputs}


def _join(workdir: str, *parts: str) -> str:
    return (posixpath.join if "://" in workdir else os.path.join)(workdir, *parts)


def recipe_stages(config_spec: str) -> list[Stage]:
    """The stages of ``config_spec``'s ``get_recipe()``; a RecipeError when it has none or they are malformed."""
    from clus_jax.config.base import load_config_module

    path, _, arg = config_spec.partition(":")
    try:
        module = load_config_module(path)
    except (FileNotFoundError, SyntaxError, ImportError) as e:
        raise RecipeError(f"--config {config_spec}: {cli.exception_text(e)}") from None
    fn = getattr(module, "get_recipe", None)
    if fn is None:
        raise RecipeError(f"--config {path} defines no get_recipe()")
    try:
        stages = list(fn(arg) if arg and inspect.signature(fn).parameters else fn())
    except (KeyError, TypeError, ValueError) as e:  # a mistyped argument: get_recipe's message names it
        raise RecipeError(f"--config {config_spec}: {cli.exception_text(e)}") from None
    if not stages:
        raise RecipeError(f"get_recipe() of {path} returned no stages")
    seen: set[str] = set()
    for i, stage in enumerate(stages):
        if not isinstance(stage, Stage):
            raise RecipeError(f"get_recipe() item {i} is {type(stage).__name__}, expected clus_jax.recipe.Stage")
        where = f"recipe stage {i} ({stage.name!r})"
        if not isinstance(stage.name, str) or not _NAME.match(stage.name) or stage.name in _RESERVED:
            raise RecipeError(f"{where}: a stage name is letters, digits, '_' and '-', starting with a letter, "
                              f"and not {' or '.join(_RESERVED)}")
        if stage.name in seen:
            raise RecipeError(f"{where}: two stages are named {stage.name!r}")
        seen.add(stage.name)
        given = [k for k in ("train", "module", "command") if getattr(stage, k) is not None]
        if len(given) != 1:
            raise RecipeError(f"{where}: give exactly one of train=, module= or command= (got {given or 'none'})")
        if stage.overrides and stage.kind != "train":
            raise RecipeError(f"{where}: overrides= is for train stages; a {stage.kind} stage takes its arguments")
        if stage.args and stage.kind != "module":
            raise RecipeError(f"{where}: args= is for module stages")
        if stage.command is not None and (isinstance(stage.command, str) or not stage.command):
            raise RecipeError(f"{where}: command= is a non-empty list of arguments")
        if stage.processes is not None and (not isinstance(stage.processes, int) or stage.processes < 1):
            raise RecipeError(f"{where}: processes={stage.processes!r} must be a positive integer")
    return stages


def _substitute(text: Any, where: str, refs: Mapping[str, str], later: Sequence[str]) -> str:
    """``text`` with ``{name}`` / ``{name.output}`` replaced from ``refs``; RecipeError naming a bad one."""

    def replace(match: re.Match) -> str:
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        key = match.group(0)[1:-1]
        if key in refs:
            return refs[key]
        name = match.group(1)
        if name == later[-1]:
            raise RecipeError(f"{where}: {match.group(0)} is this stage; its own directory is {{workdir}}")
        if name in later:
            raise RecipeError(f"{where}: {match.group(0)} refers to stage {name!r}, which runs later")
        if match.group(2) is not None and name in refs:
            outputs = sorted(k.split(".", 1)[1] for k in refs if k.startswith(name + "."))
            raise RecipeError(f"{where}: {match.group(0)}: stage {name!r} declares no output "
                              f"{match.group(2)!r} (its outputs: {outputs or 'none'})")
        known = sorted(k for k in refs if "." not in k)
        raise RecipeError(f"{where}: {match.group(0)} names no earlier stage (known: {', '.join(known)})")

    return _REFERENCE.sub(replace, str(text))


def resolve(stages: Sequence[Stage], workdir: str) -> list[ResolvedStage]:
    """Every stage's workdir and references resolved, and train overrides checked against their configs."""
    from clus_jax.config.base import load_config

    refs = {"recipe": workdir}
    names = [s.name for s in stages]
    resolved = []
    for index, stage in enumerate(stages):
        own = _join(workdir, stage.name)
        local = {**refs, "workdir": own}
        later = names[index + 1:] + [stage.name]
        where = f"recipe stage {stage.name!r}"
        outputs = {k: _join(own, _substitute(v, f"{where} outputs.{k}", local, later))
                   for k, v in stage.outputs.items()}
        train, overrides, argv = None, {}, []
        if stage.kind == "train":
            train = _substitute(stage.train, f"{where} train", local, later)
            overrides = {str(k): _substitute(format_value(v), f"{where} overrides.{k}", local, later)
                         for k, v in stage.overrides.items()}
            try:
                config = load_config(train)
            except (FileNotFoundError, KeyError, ValueError, SyntaxError) as e:
                raise RecipeError(f"{where}: --config {train}: {cli.exception_text(e)}") from None
            for key in overrides:
                problem = cli.unknown_key(config, key)
                if problem:
                    raise RecipeError(f"{where}: overrides {key!r}: {problem}")
        else:
            words = stage.args if stage.kind == "module" else stage.command
            argv = [_substitute(a, f"{where} {'args' if stage.kind == 'module' else 'command'}[{i}]", local, later)
                    for i, a in enumerate(words)]
        resolved.append(ResolvedStage(index, stage, own, train, overrides, argv, outputs))
        refs[stage.name] = own
        refs.update({f"{stage.name}.{k}": v for k, v in outputs.items()})
    return resolved


def format_value(value: Any) -> str:
    """An override value as ``--config.KEY=VALUE`` text (the sweep's formatting)."""
    from clus_jax.sweep import format_value as sweep_format

    return sweep_format(value)


def _local_sh() -> str:
    return os.path.relpath(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch",
                                        "local.sh"))


def stage_processes(stage: ResolvedStage, processes: int) -> int:
    """Processes a stage runs on locally: its own ``processes``, else ``processes`` for train stages, else 1."""
    if stage.stage.processes is not None:
        return stage.stage.processes
    return processes if stage.stage.kind == "train" else 1


def local_command(stage: ResolvedStage, processes: int = 1) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that run ``stage`` on this machine."""
    n = stage_processes(stage, processes)
    if stage.stage.kind == "command":
        argv = list(stage.argv)
        return ([sys.executable, *argv[1:]] if argv[0] == "python" else argv), {}
    if stage.stage.kind == "train":
        module = "clus_jax.train"
        args = ["--config", stage.train, "--workdir", stage.workdir,
                *(f"--config.{k}={v}" for k, v in stage.overrides.items())]
    else:
        module, args = stage.stage.module, list(stage.argv)
    if n > 1:
        env = {"LOG_DIR": _join(stage.workdir, "logs")}
        if module != "clus_jax.train":
            env["MODULE"] = module
        return ["bash", _local_sh(), str(n), *args], env
    return [sys.executable, "-m", module, *args], {}


def launcher_command(launcher: str, stage: ResolvedStage) -> str:
    """The shell command that runs ``stage`` through ``launch/tpu_pod.sh`` or ``launch/gpu_slurm.sbatch``."""
    from clus_jax import sweep

    if stage.stage.kind == "train":
        run = sweep.Run(stage.index, stage.name, dict(stage.overrides), stage.workdir)
        return sweep.launcher_command(launcher, stage.train, run, [])
    if stage.stage.kind == "command":
        return f"{shlex.join(stage.argv)}  # stage {stage.name}: runs where the recipe runs"
    env = (f"MODULE={shlex.quote(stage.stage.module)} WORKDIR={shlex.quote(stage.workdir)} "
           f"EXTRA_ARGS={shlex.quote(' '.join(shlex.quote(a) for a in stage.argv))}")
    if launcher == "tpu_pod":
        return f"{env} RUN_NAME={shlex.quote(stage.name)} launch/tpu_pod.sh"
    if launcher == "gpu_slurm":
        return f"{env} sbatch --job-name={shlex.quote(stage.name)} launch/gpu_slurm.sbatch"
    raise ValueError(f"unknown launcher {launcher!r}; choose from {LAUNCHERS}")


def stage_status(stage: ResolvedStage) -> str:
    """'done' (marker present, same command), 'changed' (marker of another command) or 'todo'."""
    path = _join(stage.workdir, DONE_FILE)
    if not os.path.exists(path):
        return "todo"
    try:
        with open(path) as f:
            recorded = json.load(f).get("spec")
    except (OSError, ValueError):
        return "todo"  # a marker cut short is no marker
    return "done" if recorded == json.loads(json.dumps(stage.spec())) else "changed"


def _tail(path: str, lines: int = 5) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in f.readlines()[-lines:]]
    except OSError:
        return []


def run_stage(stage: ResolvedStage, processes: int = 1) -> int:
    """Runs one stage, its output to ``<workdir>/stage.log`` and here; writes the marker on success.

    Returns the exit status (a missing declared output counts as a failure, status 1).
    """
    os.makedirs(stage.workdir, exist_ok=True)
    argv, extra_env = local_command(stage, processes)
    log_path = _join(stage.workdir, LOG_FILE)
    print(f"recipe: stage {stage.name}: {shlex.join(argv)}", flush=True)
    start = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **extra_env})  # lines as they come
        except OSError as e:
            log.write(f"cannot start: {e}\n")
            return 127
        for line in proc.stdout:
            log.write(line)
            sys.stdout.write(f"[{stage.name}] {line}")
        returncode = proc.wait()
        if returncode == 0:
            missing = [f"{k} ({p})" for k, p in stage.outputs.items() if not os.path.exists(p)]
            if missing:
                log.write(f"recipe: the stage exited 0 but did not write its outputs {', '.join(missing)}\n")
                returncode = 1
    if returncode == 0:
        marker = {"stage": stage.name, "spec": stage.spec(), "command": argv, "seconds": round(time.time() - start, 1),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_json(_join(stage.workdir, DONE_FILE), marker)
    return returncode


def run_recipe(stages: Sequence[ResolvedStage], processes: int = 1) -> int:
    """Runs the unfinished stages in order; returns 0, or 1 after the first failed stage (named on stderr)."""
    for stage in stages:
        status = stage_status(stage)
        position = f"{stage.index + 1}/{len(stages)}"
        if status == "done":
            print(f"recipe: stage {stage.name} ({position}): already done, skipped", flush=True)
            continue
        if status == "changed":
            print(f"error: recipe stage {stage.name!r} finished earlier with another command; remove "
                  f"{_join(stage.workdir, DONE_FILE)} (and what depends on it) to run it again", file=sys.stderr)
            return 1
        print(f"recipe: stage {stage.name} ({position}): running", flush=True)
        returncode = run_stage(stage, processes)
        if returncode != 0:
            log_path = _join(stage.workdir, LOG_FILE)
            tail = _tail(log_path)
            if tail:
                print("\n".join(f"  | {line}" for line in tail), file=sys.stderr)
            print(f"error: recipe stage {stage.name!r} ({position}) failed with status {returncode}; "
                  f"log: {log_path}", file=sys.stderr, flush=True)
            return 1
    print(f"recipe: all {len(stages)} stages done", flush=True)
    return 0


def _save_recipe(workdir: str, config_spec: str, stages: Sequence[ResolvedStage]) -> None:
    os.makedirs(workdir, exist_ok=True)
    atomic_write_json(_join(workdir, RECIPE_FILE), {
        "config": config_spec, "stages": [{"name": s.name, "workdir": s.workdir, **s.spec()} for s in stages]})


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; returns the exit status (1 when a stage failed, 2 for a recipe that cannot run)."""
    parser = cli.ArgumentParser(prog="python -m clus_jax.recipe", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    parser.add_argument("--config", required=True, help="config file with get_recipe(), optionally :ARGS")
    parser.add_argument("--workdir", required=True, help="recipe directory; stage NAME runs in WORKDIR/NAME")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local")
    parser.add_argument("--processes", type=int, default=1, help="local processes per train stage (launch/local.sh)")
    parser.add_argument("--dry-run", action="store_true", help="print the stages' commands, run nothing")
    args = parser.parse_args(argv)
    if args.processes < 1:
        cli.fail(f"--processes={args.processes} must be at least 1")
    return cli.run_command(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    """The recipe of ``args``: printed (a launcher, --dry-run) or run; a recipe that cannot run raises RecipeError."""
    cli.check_out_dir("--workdir", args.workdir)
    stages = resolve(recipe_stages(args.config), args.workdir)
    if args.launcher != "local":
        for stage in stages:
            print(f"# stage {stage.index + 1}/{len(stages)}: {stage.name}")
            print(launcher_command(args.launcher, stage))
        return 0
    if args.dry_run:
        for stage in stages:
            status = stage_status(stage) if os.path.isdir(stage.workdir) else "todo"
            argv, env = local_command(stage, args.processes)
            prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
            print(f"# stage {stage.index + 1}/{len(stages)}: {stage.name} ({status})")
            print(f"{prefix + ' ' if prefix else ''}{shlex.join(argv)}")
        return 0
    _save_recipe(args.workdir, args.config, stages)
    return run_recipe(stages, args.processes)


if __name__ == "__main__":
    # The module's own copy, so a config's ``from clus_jax.recipe import Stage`` is the class checked here
    # (run as ``-m`` this file is ``__main__``, a second module with another ``Stage``).
    from clus_jax import recipe as _recipe

    sys.exit(_recipe.main())
