"""cli.run_command, the body of every command: a user's mistake is one ``error:`` line and exit 2 (usage) or 1
(input), a bug keeps its traceback, ``CLUS_JAX_DEBUG=1`` shows the traceback of a mistake too."""
import json

import pytest

from clus_jax.common import cli
from clus_jax.common.errors import ConfigError


def _raise(error: BaseException):
    def run():
        raise error
    return run


@pytest.mark.parametrize("error, code, line", [
    (cli.UsageError("--k=0 must be at least 1"), 2, "error: --k=0 must be at least 1"),
    (ConfigError("config.batch_size=3 does not divide"), 2, "error: config.batch_size=3 does not divide"),
    (cli.InputError("--labels x.npy has 5 rows\nbut 200 records"), 1,
     "error: --labels x.npy has 5 rows but 200 records"),
    (FileNotFoundError("config file 'a.py' does not exist"), 1,
     "error: FileNotFoundError: config file 'a.py' does not exist"),
    (NotADirectoryError(20, "Not a directory", "out/x"), 1,
     "error: NotADirectoryError: [Errno 20] Not a directory: 'out/x'"),
    (KeyError("unknown config argument 'kk'"), None, None),  # not declared an input error: a bug
    (ValueError("OUT_OF_RANGE: byte range [tensorstore_spec='{\"driver\": \"zarr\"}']"), 1,
     "error: OUT_OF_RANGE: byte range"),
], ids=["usage", "config", "input", "missing-file", "path", "bug", "declared-input"])
def test_a_mistake_is_one_line_and_its_exit_code(error, code, line, capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    if code is None:
        with pytest.raises(KeyError):
            cli.run_command(_raise(error))
        return
    with pytest.raises(SystemExit) as e:
        cli.run_command(_raise(error), input_errors=(ValueError,))
    assert e.value.code == code
    assert capsys.readouterr().err.splitlines() == [line]


def test_a_config_error_declared_an_input_exits_1(capsys):
    with pytest.raises(SystemExit) as e:
        cli.run_command(_raise(ConfigError("config.json: bad")), input_errors=(ConfigError,))
    assert e.value.code == 1 and capsys.readouterr().err == "error: config.json: bad\n"


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        cli.run_command(lambda: 1 / 0, input_errors=(ValueError,))


def test_the_result_is_returned_and_printed_as_one_json_line(capsys):
    assert cli.run_command(lambda: {"k": 3}, print_json=True) == {"k": 3}
    assert json.loads(capsys.readouterr().out) == {"k": 3}
    assert cli.run_command(lambda: 0) == 0 and capsys.readouterr().out == ""


def test_debug_prints_the_traceback_and_the_error_it_was_made_from(capsys, monkeypatch):
    monkeypatch.setenv(cli.DEBUG_ENV, "1")

    def run():
        try:
            int("abc")
        except ValueError as e:
            raise cli.InputError(f"--labels x.txt: {e}") from None

    with pytest.raises(SystemExit) as e:
        cli.run_command(run)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback (most recent call last)" in err
    assert "invalid literal for int()" in err and 'int("abc")' in err  # the suppressed context is shown
    assert err.splitlines()[-1] == "error: --labels x.txt: invalid literal for int() with base 10: 'abc'"


def test_debug_prints_where_a_direct_fail_came_from(capsys, monkeypatch):
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(SystemExit):
        cli.fail("--k=0 must be at least 1")
    err = capsys.readouterr().err
    assert "test_debug_prints_where_a_direct_fail_came_from" in err
    assert err.endswith("error: --k=0 must be at least 1\n")


def test_check_out_dir(tmp_path):
    cli.check_out_dir("--out", str(tmp_path / "new"))
    cli.check_out_dir("--out", str(tmp_path))
    (tmp_path / "f").write_text("x")
    with pytest.raises(cli.UsageError, match=r"^--out .*f exists and is not a directory; pass a directory$"):
        cli.check_out_dir("--out", str(tmp_path / "f"))


def test_check_overrides_names_the_argument_and_the_closest_key():
    config = {"optim": {"lr": 1.0}, "seed": 0}
    cli.check_overrides(config, ["--config.optim.lr=2", "--workdir", "w", "--", "--config.nope=1"])
    with pytest.raises(cli.UsageError) as e:
        cli.check_overrides(config, ["--config.seed=1", "--config.optim.lrr=2"])
    assert str(e.value) == "--config.optim.lrr=2: config has no key 'optim.lrr'; did you mean 'optim.lr'?"
