"""One build of everything a run needs: ``build(config) -> Experiment``.

The trainer, the memory plan, the benchmarks and the tests all start here, so the setup exists once:

  config -> config_check -> mesh and rules -> model and objectives (with weights) -> batch fields
  (the towers' inputs the objectives read + the extra fields they declare) -> parameter groups
  (config.param_groups, then the objectives', then unused towers frozen) -> optimizer -> parameter and
  optimizer *shapes* -> shardings from the logical rules -> the jitted, donated train step.

Nothing is allocated by ``build``; ``Experiment.init_state()`` materialises the sharded initial state
(loading ``config.init_from`` inside the sharded init; with its mode 'resume' also the source's step and
optimizer state).
"""
from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from clus_jax.common.errors import ConfigError
from clus_jax.config import check as config_check
from clus_jax.train import flops as train_flops
from clus_jax.config.base import TOWER_PATTERNS
from clus_jax.data import fields as fields_lib
from clus_jax.data.fields import FieldSpec
from clus_jax.models.towers import TwoTower, build_model
from clus_jax.objectives import registry
from clus_jax.objectives.registry import Objective
from clus_jax.parallel import mesh as mesh_lib
from clus_jax.parallel import multihost, partitioning
from clus_jax.train import init_from, optim, teacher_sources
from clus_jax.train.state import boxed_init, create_train_state
from clus_jax.train.step import build_train_step

if TYPE_CHECKING:
    from clus_jax.data.tokenizers import TextTokenizer

PyTree = Any
Objectives = Mapping[str, tuple[Objective, float]]  # name -> (objective, weight), as ``objectives_of`` gives


def objectives_of(config: ml_collections.ConfigDict) -> dict[str, tuple[Objective, float]]:
    """``config.objectives`` as name -> (objective, weight), in config order."""
    return {name: (registry.get(name), float(w)) for name, w in dict(config.objectives).items()}


def modalities(config: ml_collections.ConfigDict, objectives: Objectives | None = None) -> tuple[str, ...]:
    """The towers some objective reads, in ('image', 'text') order (``objectives``: ``objectives_of(config)``,
    when the caller has it already)."""
    objectives = objectives_of(config) if objectives is None else objectives
    used = {m for obj, _ in objectives.values() for m in obj.modalities(config)}
    return tuple(m for m in fields_lib.MODALITIES if m in used)


def batch_fields(config: ml_collections.ConfigDict, objectives: Objectives | None = None) -> dict[str, FieldSpec]:
    """The one declaration of a training batch: towers' inputs in use plus every objective's fields."""
    objectives = objectives_of(config) if objectives is None else objectives
    used = modalities(config, objectives)
    out: dict[str, FieldSpec] = {}
    if fields_lib.IMAGE in used:
        out[fields_lib.IMAGE] = fields_lib.image_field(int(config.model.image.image_size))
    if fields_lib.TEXT in used:
        out[fields_lib.TEXT] = fields_lib.text_field(int(config.model.text.context_length))
    for name, (obj, _) in objectives.items():
        for field, spec in obj.batch_fields(config).items():
            if field in out and out[field] != spec:
                raise ConfigError(f"config.objectives.{name}: batch field {field!r} {spec} conflicts with {out[field]}")
            out[field] = spec
    return out


def param_groups(config: ml_collections.ConfigDict,
                 objectives: Objectives | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Unused towers frozen for the run, then ``config.param_groups``, then each objective's groups.

    A tower no objective reads gets no gradient; freezing it keeps weight decay from shrinking it.
    """
    objectives = objectives_of(config) if objectives is None else objectives
    used = modalities(config, objectives)
    groups = [(TOWER_PATTERNS[m], {"frozen": True}) for m in fields_lib.MODALITIES if m not in used]
    declared = [("config.param_groups", list(config.get("param_groups") or []))]
    declared += [(f"objective {name!r} param_groups", list(obj.param_groups(config)))
                 for name, (obj, _) in objectives.items()]
    for key, entries in declared:
        optim.check_param_groups(entries, key)  # each entry named by its own list's index
        groups += [(str(p), dict(o)) for p, o in entries]
    return groups


def abstract_params(config: ml_collections.ConfigDict, objectives: Objectives | None = None,
                    model: TwoTower | None = None) -> PyTree:
    """Boxed parameter shapes of the towers and every objective (nothing allocated, nothing loaded)."""
    objectives = objectives_of(config) if objectives is None else objectives
    model = build_model(config.model) if model is None else model
    own = {name: obj for name, (obj, _) in objectives.items()}
    return jax.eval_shape(boxed_init(config, model, own), jax.random.PRNGKey(0))[0]


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything but the loop. ``step(state, batch) -> (state, metrics)`` is jitted and donates ``state``."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    rules: list[tuple]
    model: TwoTower
    objectives: dict[str, tuple[Objective, float]]
    fields: dict[str, FieldSpec]
    param_groups: list[tuple[str, dict[str, Any]]]
    tx: Any
    schedule: Callable
    abstract_state: PyTree
    shardings: PyTree
    batch_shardings: dict[str, NamedSharding]
    step: Callable
    init_fn: Callable
    # state -> state with config.init_from's step and optimizer state (mode 'resume'), else None
    resume: Callable | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in fields_lib.MODALITIES if m in self.fields)

    def init_state(self) -> PyTree:
        """The initial train state, materialised directly in its shardings (``init_from`` applied)."""
        state, _ = create_train_state(self.config, self.init_fn, self.tx, self.mesh, self.rules)
        return state if self.resume is None else self.resume(state)

    def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes, dtypes and shardings of a global batch (for lowering without data)."""
        b = int(batch_size or self.config.batch_size)
        return {name: jax.ShapeDtypeStruct(*spec.batched(b), sharding=self.batch_shardings[name])
                for name, spec in self.fields.items()}

    def dummy_batch(self, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """A host batch of zeros with the declared fields (global, for one process)."""
        return fields_lib.zeros_batch(self.fields, int(batch_size or self.config.batch_size))

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's share of the batch -> the global, sharded batch (declared fields only)."""
        local = {name: local[name] for name in self.fields}
        return multihost.make_global_batch(local, lambda nd: partitioning.batch_sharding(self.mesh, self.rules, nd))

    def model_params(self, params: PyTree) -> PyTree:
        """The towers' entries of ``params`` (what ``model.apply`` takes)."""
        return registry.model_params(params)

    def frozen_towers(self) -> tuple[str, ...]:
        """The towers whose every parameter is frozen for the run (they run forward only)."""
        frozen = dict(jax.tree_util.tree_leaves_with_path(optim.frozen_mask(self.abstract_state["params"], self.param_groups)))
        frozen = {optim.path_str(p): f for p, f in frozen.items()}
        return tuple(m for m, pattern in TOWER_PATTERNS.items()
                     if all(f for p, f in frozen.items() if re.search(pattern, p)))

    def train_step_flops(self, batch_size: int | None = None, **kwargs) -> float:
        """Analytic model FLOPs of one step (towers in use, without the backward of frozen ones, and the
        objectives), for MFU."""
        return train_flops.train_step_flops(self.config, batch_size, modalities=self.modalities,
                                      frozen=self.frozen_towers(), **kwargs)


def build(config: ml_collections.ConfigDict, devices: list | None = None, *, resuming: bool = False,
          tokenizer: TextTokenizer | None = None) -> Experiment:
    """Validates ``config`` (ConfigError naming the key) and builds the experiment on ``devices``.

    ``resuming``: the run restores its own checkpoint, so ``config.init_from`` is neither checked nor read.
    ``tokenizer``: the run's tokenizer, checked against the text tower's vocabulary (the trainer's).
    """
    devices = list(devices) if devices is not None else jax.devices()
    config_check.validate(config, len(devices), jax.process_count(), tokenizer)
    mesh = mesh_lib.create_mesh(dict(config.mesh), devices)
    rules = [tuple(r) for r in config.logical_axis_rules]
    objectives = objectives_of(config)  # asked once; every helper below is given them
    model = build_model(config.model)
    fields = batch_fields(config, objectives)
    try:
        groups = param_groups(config, objectives)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tx, schedule = optim.build_optimizer(config.optim, int(config.total_steps), groups)

    obj_only = {name: obj for name, (obj, _) in objectives.items()}
    teacher_sources.install()  # a frozen teacher may be an open_clip checkpoint, read through interop
    loading = init_from.enabled(config) and not resuming
    checking = [obj for obj in obj_only.values() if registry.implements(obj, "check_shapes")]
    if checking or loading:  # traced once, and only for a check that reads the shapes
        shapes = abstract_params(config, objectives, model)
        for obj in checking:
            obj.check_shapes(config, shapes)
    load = None
    if loading:
        paths = init_from.check(config, shapes)
        load = init_from.loader(config, paths)
    init_fn = boxed_init(config, model, obj_only, load)
    abstract_state, shardings = create_train_state(config, init_fn, tx, mesh, rules, materialize=False)
    resume = None
    if loading and init_from.resuming(config):  # checked now: the saved optimizer state against this run's
        resume = init_from.resume_restorer(config, abstract_state, schedule)
    batch_shardings = {name: partitioning.batch_sharding(mesh, rules, 1 + len(spec.shape)) for name, spec in fields.items()}
    frozen = optim.frozen_mask(abstract_state["params"], groups) if groups else None
    step = build_train_step(config, model, tx, schedule, objectives, mesh, rules, shardings, batch_shardings, frozen)
    return Experiment(
        config=config, mesh=mesh, rules=rules, model=model, objectives=objectives, fields=fields, param_groups=groups,
        tx=tx, schedule=schedule, abstract_state=abstract_state, shardings=shardings, batch_shardings=batch_shardings,
        step=step, init_fn=init_fn, resume=resume,
    )
