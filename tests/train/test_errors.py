"""User mistakes give one readable error naming the problem, not a stack trace from inside a library."""
import os
import sys

import host_limits  # registered by tests/conftest.py
import pytest

from clus_jax.common.errors import ConfigError, UsageError
from clus_jax.train import loop

import train_helpers as helpers  # registered by tests/conftest.py
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_missing_data_path(tmp_path):
    config = helpers.tiny_config("clip", **{"data.source": "array_record", "data.path": str(tmp_path / "nope-*.array_record")})
    with pytest.raises(FileNotFoundError, match="nope-"):
        loop.train_and_evaluate(config, str(tmp_path / "w"))


def test_missing_vocabulary_file(tmp_path):
    config = helpers.tiny_config("clip", **{"tokenizer.path": str(tmp_path / "missing_vocab.txt.gz")})
    with pytest.raises(FileNotFoundError, match="missing_vocab.txt.gz"):
        loop.train_and_evaluate(config, str(tmp_path / "w"))


def test_text_table_smaller_than_the_vocabulary(tmp_path):
    """Checked with the rest of the config, before the workdir is made or anything compiles."""
    config = helpers.tiny_config("clip", **{"model.text.vocab_size": 1000})
    with pytest.raises(ConfigError, match=r"config\.model\.text\.vocab_size=1000 is smaller than the vocabulary"):
        loop.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="is not writable"):
        loop.train_and_evaluate(helpers.tiny_config("clip"), str(blocker / "workdir"))


def test_checkpoint_from_an_incompatible_config(tmp_path):
    workdir = str(tmp_path / "w")
    config = helpers.tiny_config("clip", total_steps=2, checkpoint_every=0)
    loop.train_and_evaluate(config, workdir)
    other = helpers.tiny_config("clip", total_steps=4, **{"model.embed_dim": 48})
    # Refused before anything is written, naming the key (tests/train/test_workdir.py: the files stay as they were).
    with pytest.raises(UsageError, match=r"holds another run's checkpoints \(config\.json differs in model\.embed_dim"):
        loop.train_and_evaluate(other, workdir)


@pytest.mark.slow
def test_cli_prints_one_line_for_a_missing_path(tmp_path):
    cmd = [sys.executable, "-m", "clus_jax.train", "--config", "configs/clip.py:steps=2,batch=8", "--workdir",
           str(tmp_path / "w"), "--config.data.source=tar", f"--config.data.path={tmp_path}/missing-*.tar",
           "--config.evals.run=none"]
    proc = host_limits.run(cmd, cwd=REPO, capture_output=True, text=True, base_s=300,
                           env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: FileNotFoundError" in proc.stderr and "missing-" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, named", [
    (["--config", "configs/clip.py", "--config.optim.lrr=1e-3"], ["--config.optim.lrr=1e-3", "'optim.lrr'", "did you mean 'optim.lr'?"]),
    (["--config", "configs/nope.py"], ["configs/nope.py", "does not exist"]),
    (["--config", "configs/clip.py:stepz=5"], ["configs/clip.py:stepz=5", "'stepz'", "'steps'"]),
    (["--config=configs/clip.py", "--config.optim.lr=abc"], ["--config.optim.lr=abc", "'abc'"]),
], ids=["mistyped-key", "missing-file", "mistyped-argument", "unparsable-value"])
def test_cli_prints_one_line_for_a_mistyped_command(args, named, tmp_path):
    workdir = tmp_path / "w"
    proc = host_limits.run([sys.executable, "-m", "clus_jax.train", *args, "--workdir", str(workdir)], cwd=REPO,
                           capture_output=True, text=True, base_s=120,
                           env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for name in named:
        assert name in lines[0]
    assert not workdir.exists()  # nothing started
