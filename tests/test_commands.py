"""Every command the README documents runs by the name the README gives it: ``python -m <module> --help``
exits 0 and prints a usage that names the command."""
import os
import re
import sys

import host_limits  # registered by tests/conftest.py
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python -m clus_jax.cluster --k 8`, `python -m clus_jax.train:` ... -> the module name, nothing after it
COMMAND = re.compile(r"python -m (clus_jax(?:\.[A-Za-z_]\w*)*)")
# The commands of the README's layout and sections; a rename that drops one from the README fails here too.
EXPECTED = ("train", "evaluate", "embed", "cluster", "experts", "recipe", "sweep", "plan", "report", "ensemble")


def readme_commands() -> list[str]:
    """The distinct modules of every ``python -m clus_jax...`` in README.md, in order of first mention."""
    with open(os.path.join(ROOT, "README.md")) as f:
        return list(dict.fromkeys(COMMAND.findall(f.read())))


def test_the_readme_documents_every_command():
    commands = readme_commands()
    assert commands, "README.md documents no `python -m clus_jax...` command"
    missing = [name for name in EXPECTED if f"clus_jax.{name}" not in commands]
    assert not missing, f"README.md documents no `python -m clus_jax.<name>` for {missing}; it has {commands}"


@pytest.mark.parametrize("module", readme_commands())
def test_the_documented_command_runs(module):
    proc = host_limits.run([sys.executable, "-m", module, "--help"], cwd=ROOT, base_s=60,
                           env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert proc.returncode == 0, f"python -m {module} --help exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    assert f"python -m {module}" in proc.stdout, f"the usage of python -m {module} does not name it:\n{proc.stdout}"
