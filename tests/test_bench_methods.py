"""bench/methods.py: every method gets the same budget, and the table is the mean ± sample std of the finished
runs' final metrics (hand-computed values; no training here)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import methods  # noqa: E402


def _write_run(workdir, name, step, metrics, wall=None):
    path = os.path.join(workdir, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": step // 2, "train/loss": 9.0}) + "\n")
        f.write(json.dumps({"step": step, "train/loss": 2.0, **metrics}) + "\n")
    if wall is not None:
        with open(os.path.join(path, methods.TIMING_FILE), "w") as f:
            json.dump({"wall_seconds": wall}, f)


def test_every_method_gets_the_same_budget(tmp_path):
    planned = methods.plan(str(tmp_path), list(methods.METHODS), range(3), steps=60, batch=48)
    assert len(planned) == 3 * len(methods.METHODS)
    assert {run.name for _, _, run, _ in planned} == {f"{m}_s{s}" for m in methods.METHODS for s in range(3)}
    for method, spec, run, overrides in planned:
        assert spec.startswith(methods.METHODS[method].partition(",")[0] + ":steps=60,batch=48")
        assert run.overrides == {"seed": int(run.name.rsplit("_s", 1)[1])} and run.total_steps == 60
        assert overrides == ([f"--config.brivl.queue_length={round(4096 / 48) * 48}"] if method == "brivl" else [])
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        methods.plan(str(tmp_path), ["nope"], range(1), steps=60, batch=48)


def test_table_is_mean_and_sample_std_of_finished_runs(tmp_path):
    wd = str(tmp_path)
    planned = methods.plan(wd, ["clip", "clus"], range(3), steps=10, batch=8)
    key = "zeroshot/easyvqa/top1"
    _write_run(wd, "clip_s0", 10, {key: 0.1, "cluster/easyvqa/kmeans_nmi": 0.5}, wall=30.0)
    _write_run(wd, "clip_s1", 10, {key: 0.2, "cluster/easyvqa/kmeans_nmi": 0.7}, wall=50.0)
    _write_run(wd, "clip_s2", 10, {key: 0.6, "cluster/easyvqa/kmeans_nmi": 0.6}, wall=40.0)
    _write_run(wd, "clus_s0", 10, {key: 0.2})
    _write_run(wd, "clus_s1", 10, {key: 0.4})
    _write_run(wd, "clus_s2", 6, {key: 0.9})  # unfinished: left out
    columns, table = methods.summarise(planned)
    assert columns == [key, "cluster/easyvqa/kmeans_nmi", "wall_seconds"]
    mean, std, n = table["clip"][key]
    assert (n, mean, std) == (3, pytest.approx(0.3), pytest.approx(0.26457513, rel=1e-6))  # sqrt(0.14 / 2)
    assert table["clip"]["wall_seconds"][:2] == (pytest.approx(40.0), pytest.approx(10.0))
    mean, std, n = table["clus"][key]
    assert (n, mean, std) == (2, pytest.approx(0.3), pytest.approx(0.14142136, rel=1e-6))  # sqrt(0.02)
    assert "cluster/easyvqa/kmeans_nmi" not in table["clus"]
    text = methods.write_table(wd, columns, table)
    assert "| clip | 3 | 0.300 ± 0.265 | 0.600 ± 0.100 | 40 ± 10 |" in text
    assert "| clus | 2 | 0.300 ± 0.141 |  |  |" in text
    assert open(os.path.join(wd, "methods.csv")).read().splitlines()[1].startswith("clip,3,0.3,0.264575,")


@pytest.mark.parametrize("steps", [400, 60])
@pytest.mark.parametrize("method", sorted(methods.RECIPES))
def test_recipe_methods_split_the_same_budget_over_their_train_stages(method, steps, monkeypatch, tmp_path):
    """MLCD's and MoDE's train stages add up to one CLIP run's steps at the same batch, and the seed reaches
    every train stage and the clustering. MLCD's teacher is outside the budget: the shared default CLIP run
    in DIR/clip_teacher at its own length, which every seed embeds with."""
    from clus_jax import recipe
    from clus_jax.config import base as config_base
    from clus_jax.config.run_config import save_run_config

    monkeypatch.chdir(methods.REPO_ROOT)
    planned = methods.plan(str(tmp_path), [method], [2], steps=steps, batch=48)
    (_, spec, run, overrides), = planned
    assert run.name == f"{method}_s2" and overrides == []
    if method in methods.TEACHERS:  # the recipe reads the teacher's config.json when it plans
        teacher = methods.teacher_run(method, str(tmp_path))
        assert (teacher.workdir, teacher.total_steps) == (str(tmp_path / "clip_teacher"), 600)
        save_run_config(teacher.workdir, config_base.load_config(methods.TEACHERS[method][1]))
        assert spec.endswith(f",teacher={teacher.workdir}")
    stages = recipe.resolve(recipe.recipe_stages(spec), run.workdir)
    trains = [s for s in stages if s.train is not None]
    configs = [config_base.load_config(s.train) for s in trains]
    # A stage that resumes another (MoDE's experts) trains from that stage's last step to its own total_steps.
    ends = {s.name: c.total_steps for s, c in zip(trains, configs)}
    start = [ends[os.path.basename(s.overrides["init_from.path"])] if s.overrides.get("init_from.mode") == "resume" else 0
             for s in trains]
    assert sum(c.total_steps - b for c, b in zip(configs, start)) == steps
    assert {c.batch_size for c in configs} == {48}
    assert all(s.overrides["seed"] == "2" for s in trains)
    cluster = next(s for s in stages if s.stage.module == "clus_jax.cluster")
    assert cluster.argv[cluster.argv.index("--seed") + 1] == "2"
    assert not any(s.name.startswith("dense") for s in stages)  # the clip row is MoDE's dense baseline
    if method in methods.TEACHERS:
        embed = next(s for s in stages if s.stage.module == "clus_jax.embed").argv
        assert embed[embed.index("--workdir") + 1] == teacher.workdir and stages[0].name == "embed"


def test_recipe_methods_are_read_from_their_result_stage(tmp_path):
    """MLCD's figures are its LiT stage's final metrics, MoDE's the ensemble row; unfinished runs are left out.
    MLCD's shared teacher is a row of its own, its wall time apart from MLCD's."""
    wd = str(tmp_path)
    planned = methods.plan(wd, ["mlcd", "mode"], range(2), steps=8, batch=8)
    key = "retrieval/emoji_heldout/i2t_r10"
    _write_run(wd, "mlcd_s0/mlcd_s0", 6, {key: 0.9})  # another stage's figures are not MLCD's
    _write_run(wd, "mlcd_s0/lit_s0", 2, {key: 0.2})
    _write_run(wd, "mlcd_s1/lit_s1", 1, {key: 0.9})  # unfinished
    _write_run(wd, "clip_teacher", 600, {key: 0.7}, wall=500.0)
    for seed, value in ((0, 0.2), (1, 0.4)):  # two seeds: a std over results without train/loss
        os.makedirs(os.path.join(wd, f"mode_s{seed}", "ensemble_2"))
        with open(os.path.join(wd, f"mode_s{seed}", "ensemble_2", "ensemble.json"), "w") as f:
            json.dump({"rows": {"expert_0": {key: 0.9}, "ensemble": {key: value}}}, f)
    columns, table = methods.summarise(planned)
    assert columns == [key, "wall_seconds"]
    assert table["mlcd"][key] == (pytest.approx(0.2), 0.0, 1) and "wall_seconds" not in table["mlcd"]
    assert table["clip_teacher"][key] == (pytest.approx(0.7), 0.0, 1)
    assert table["clip_teacher"]["wall_seconds"] == (pytest.approx(500.0), 0.0, 1)
    assert table["mode"][key] == (pytest.approx(0.3), pytest.approx(0.14142136, rel=1e-6), 2)
    assert "train/loss" not in table["mode"]


def test_config_overrides_are_refused_for_recipe_methods(capsys):
    with pytest.raises(SystemExit):
        methods.main(["--workdir", "/nonexistent", "--methods", "clip,mode", "--dry-run", "--config.optim.lr=1e-3"])
    assert "single-config methods only, not to mode" in capsys.readouterr().err


def test_clus_rows_measure_its_parts_and_share_one_teacher_with_mlcd(tmp_path):
    """``swap`` is Clus with CLIP's weight 0, ``clus_teacher`` Clus distilled from the shared frozen teacher, and
    that teacher (the one MLCD labels with) is trained once for both, and is one row."""
    wd = str(tmp_path)
    planned = methods.plan(wd, ["swap", "clus_teacher", "mlcd"], [0], steps=8, batch=8)
    specs = {m: spec for m, spec, _, _ in planned}
    assert specs["swap"] == "configs/clus.py:steps=8,batch=8,clip=0"
    teacher = str(tmp_path / "clip_teacher")
    assert specs["clus_teacher"] == f"configs/clus.py:steps=8,batch=8,teacher={teacher}"
    assert specs["mlcd"].endswith(f",teacher={teacher}")
    teachers = methods._teachers(planned)
    assert [(config, run.workdir) for _, config, run in teachers] == [("configs/clip.py", teacher)]
