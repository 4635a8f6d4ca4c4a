"""Test-wide setup: eight fake CPU devices so every sharded path runs on a laptop or CI, and the shared
training helpers (``tests/train/helpers.py``) importable as ``train_helpers`` from any test module."""
import importlib.util
import os
import sys

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _register_train_helpers() -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train", "helpers.py")
    spec = importlib.util.spec_from_file_location("train_helpers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_helpers"] = module
    spec.loader.exec_module(module)


_register_train_helpers()
