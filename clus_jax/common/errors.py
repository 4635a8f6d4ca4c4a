"""The two kinds of user mistake every layer reports: a config value and a command-line usage."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; raised before anything compiles, naming the key."""


class UsageError(ValueError):
    """A command-line mistake (a missing or malformed argument); the command prints it as one error line."""
