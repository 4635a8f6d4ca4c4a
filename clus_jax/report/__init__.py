"""``python -m clus_jax.report``: PNG plots of whatever one or several runs logged, and a report.html.

``runs`` (a workdir's metrics as series and its newest evaluation arrays), ``figures`` (which curve figures and
panels, from the metric names alone), ``plots`` (matplotlib, imported lazily), ``html`` (the page), ``write``
(the whole report into a directory), ``__main__`` (the command line).
"""
from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """The command, callable as ``clus_jax.report.main([...])`` (imported here lazily, since ``python -m``
    runs ``__main__`` itself)."""
    from clus_jax.report.__main__ import main as command

    command(argv)
