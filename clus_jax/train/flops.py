"""Model FLOPs of a train step (the towers' from ``models.flops`` plus each objective's own), and MFU."""
from __future__ import annotations

from typing import Any, Mapping

from clus_jax.models.flops import config_value, towers_forward_flops
from clus_jax.objectives import registry


def train_step_flops(config: Mapping[str, Any], batch_size: int | None = None, *,
                     causal_attention_factor: float = 0.5, include_objectives: bool = True,
                     modalities: tuple[str, ...] = ("image", "text"), frozen: tuple[str, ...] = ()) -> float:
    """Model FLOPs of one train step on the global batch: 3 x (towers + objectives) forward, plus what
    runs without a gradient (a tower frozen for the run, a teacher's forward) once.

    Only the towers in ``modalities`` count (an image-only run never runs the text tower); those also in
    ``frozen`` have no backward pass. Each objective declares its own FLOPs (``Objective.forward_flops``,
    ``Objective.no_grad_flops``).
    """
    b = int(batch_size if batch_size is not None else config_value(config, "batch_size"))
    trained = tuple(m for m in modalities if m not in frozen)
    fwd = towers_forward_flops(config, b, trained, causal_attention_factor)
    no_grad = towers_forward_flops(config, b, tuple(m for m in modalities if m in frozen), causal_attention_factor)
    if include_objectives:
        used = [registry.get(name) for name, w in dict(config_value(config, "objectives", {})).items() if float(w)]
        fwd += sum(obj.forward_flops(config, b) for obj in used)
        no_grad += sum(obj.no_grad_flops(config, b) for obj in used)
    return 3.0 * fwd + no_grad


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak FLOP/s."""
    return flops_per_step / step_seconds / peak_flops_per_second
