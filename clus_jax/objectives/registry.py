"""The seam every method plugs into: objectives registered by name and summed by weight.

An objective owns its knobs (``config.<name>``), its own parameters (``params[<name>]``: prototype banks,
class centres), any state that is not a parameter (queues, EMA teachers), the extra per-example batch
fields it needs, its parameter groups (learning-rate multipliers, freezing) and its share of the model
FLOPs, and what it adds to every evaluation (cluster heads, scalars). The train step and the evaluation call
these hooks for every objective in ``config.objectives`` and never ask which method is running.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from clus_jax.common.errors import ConfigError  # noqa: F401  (objectives raise it as registry.ConfigError)

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LossContext:
    """Everything an objective may read inside the jitted step.

    outputs: model outputs for the global batch ('image_emb' and/or 'text_emb' [B, D] L2-normalised
        float32, for the modalities the batch holds; 'logit_scale', optional 'logit_bias').
    params: all current parameters (after ``prepare_params``): the towers' entries and every objective's
        own subtree, e.g. ``params['swap']``.
    state: this objective's own state (from ``init_state``).
    batch: the global batch ('image', 'text' and any declared extra fields).
    apply_model: ``apply_model(model_params, batch) -> outputs`` runs the towers on the modalities in
        ``batch``; ``model_params`` are the towers' entries only (``model_params(params)``), so a
        teacher holding a copy of the towers runs it without borrowing anything.
    mesh / batch_axes: for shard_map islands; the batch is split over ``batch_axes``.
    """

    outputs: dict[str, jax.Array]
    params: PyTree
    state: PyTree
    step: jax.Array
    rng: jax.Array
    batch: dict[str, jax.Array]
    apply_model: Callable[[PyTree, dict[str, jax.Array]], dict[str, jax.Array]]
    mesh: Mesh
    batch_axes: tuple[str, ...]
    config: ml_collections.ConfigDict


class Objective:
    """Base class: subclasses set ``name`` and implement ``loss``; hooks default to no-ops."""

    name: str = ""
    #: Default knobs, merged under ``config.<name>`` by ``config.base.objective_knobs``.
    defaults: dict[str, Any] = {}

    def validate(self, config: ml_collections.ConfigDict) -> None:
        """Raises ConfigError naming the key when ``config`` cannot work with this objective."""

    def check_shapes(self, config: ml_collections.ConfigDict, param_shapes: PyTree) -> None:
        """Raises ConfigError when ``config`` cannot work with the run's parameter shapes (boxed
        ``jax.ShapeDtypeStruct`` leaves of the towers and every objective, traced once by ``train.experiment.build``),
        e.g. a teacher checkpoint saved for another model."""

    def init_params(self, rng: jax.Array, config: ml_collections.ConfigDict) -> PyTree:
        """This objective's own parameters, placed at ``params[<name>]``; {} for none.

        Leaves may be ``nn.LogicallyPartitioned`` boxes (``nn.with_logical_partitioning``) to choose their
        sharding from the logical-axis rules, like the towers' parameters.
        """
        return {}

    def init_state(self, params: PyTree, config: ml_collections.ConfigDict) -> PyTree:
        """Non-parameter state. Leaves may be ``nn.LogicallyPartitioned`` boxes to choose their sharding.

        ``params`` is the whole boxed initial parameter tree (towers and every objective's subtree).
        """
        return {}

    def modalities(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """Which towers this objective reads ('image', 'text'); a tower no objective reads does not run."""
        return ("image", "text")

    def batch_fields(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """Extra per-example batch fields, name -> ``clus_jax.data.fields.FieldSpec`` (e.g. cluster labels)."""
        return {}

    def param_groups(self, config: ml_collections.ConfigDict) -> list[tuple[str, dict[str, Any]]]:
        """(param-path regex, options) pairs, appended after ``config.param_groups`` (see train/optim.py)."""
        return []

    def forward_flops(self, config: ml_collections.ConfigDict, batch_size: int) -> float:
        """Matmul FLOPs of this objective's differentiated forward on a global batch (logits, scores); the
        train step counts them 3x, for the backward pass (for MFU; 0 when negligible)."""
        return 0.0

    def no_grad_flops(self, config: ml_collections.ConfigDict, batch_size: int) -> float:
        """Matmul FLOPs this objective runs without a gradient on a global batch (a teacher's or momentum
        towers' forward), counted once."""
        return 0.0

    def prepare_params(self, params: PyTree, config: ml_collections.ConfigDict) -> PyTree:
        """Rewrites parameters at the start of each step (e.g. re-normalising prototype rows)."""
        return params

    def loss(self, ctx: LossContext) -> tuple[jax.Array, dict[str, jax.Array], PyTree]:
        """Returns (scalar loss, metrics, new state)."""
        raise NotImplementedError

    def after_update(self, params: PyTree, state: PyTree, step: jax.Array, config: ml_collections.ConfigDict) -> PyTree:
        """Updates state from the new parameters after the optimizer step (e.g. an EMA teacher)."""
        return state

    def eval_heads(self, params: PyTree, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
        """Named cluster heads [K, D] that every evaluation scores as clusterings (each embedding's arg-max row),
        e.g. prototype banks; names are shared by all objectives (``cluster/<set>/<head>_{nmi,ari,purity}``).

        ``params`` is this objective's own subtree ``params[<name>]`` as host NumPy arrays ({} when it has none),
        from the train state or from a checkpoint (``python -m clus_jax.evaluate``).
        """
        return {}

    def eval_metrics(self, params: PyTree, config: ml_collections.ConfigDict) -> dict[str, float]:
        """Scalars reported at every evaluation, logged as ``objectives/<name>/<metric>``; ``params`` as in
        ``eval_heads``."""
        return {}


def implements(objective: Objective, *hooks: str) -> bool:
    """Whether ``objective`` overrides any of these optional hooks, so a caller skips work (a shape trace,
    fetching parameters to the host) that no objective of the run reads."""
    return any(getattr(type(objective), h) is not getattr(Objective, h) for h in hooks)


_REGISTRY: dict[str, Objective] = {}


def register(objective_cls: type[Objective]) -> type[Objective]:
    """Class decorator: makes an objective available as ``config.objectives[name]``."""
    instance = objective_cls()
    if not instance.name:
        raise ValueError(f"{objective_cls.__name__} has no name")
    _REGISTRY[instance.name] = instance
    return objective_cls


def get(name: str) -> Objective:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"config.objectives: unknown objective {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def model_params(params: PyTree) -> PyTree:
    """The towers' entries of a parameter tree: every top-level entry that is not an objective's own."""
    owned = set(names())
    return {k: v for k, v in params.items() if k not in owned}


def _load_builtin() -> None:
    # Importing the modules registers their objectives; kept lazy to avoid import cycles.
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(module)


BUILTIN_MODULES = ["clus_jax.objectives.contrastive", "clus_jax.objectives.swap", "clus_jax.objectives.moco",
                   "clus_jax.objectives.mlcd"]
