"""``python -m clus_jax.train``'s flags: the config file runs once, overrides apply to it, --help exits 0."""
import os
import sys
import textwrap

import host_limits  # registered by tests/conftest.py

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_config_file_is_loaded_once(tmp_path):
    """The override check and absl's --config flag share one load of the file (a config file may be slow)."""
    counter = tmp_path / "loads"
    config_file = tmp_path / "counted.py"
    config_file.write_text(textwrap.dedent(f"""
        from clus_jax.config.base import base_config

        def get_config(arg=None):
            with open({str(counter)!r}, "a") as f:
                f.write("x")
            return base_config()
    """))
    argv = ["clus_jax.train", "--config", str(config_file), "--workdir", str(tmp_path / "w"),
            "--config.total_steps=3", "--config.optim.lr=0.5"]
    script = textwrap.dedent(f"""
        import sys
        from clus_jax.train import __main__ as main
        sys.argv = {argv!r}  # ml_collections reads the overrides from sys.argv
        main.parse_flags(sys.argv)
        config = main._CONFIG.value
        print(config.total_steps, config.optim.lr, config.is_locked)
    """)
    proc = host_limits.run([sys.executable, "-c", script], cwd=REPO, base_s=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["3", "0.5", "True"]
    assert counter.read_text() == "x"
