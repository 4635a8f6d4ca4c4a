"""Train state: shapes first, then shardings from logical rules, then a directly sharded init.

The state is a plain dict ``{step, params, opt_state, objective_states, rng}``. ``params`` holds the
towers' entries and, at ``params[<objective name>]``, each objective's own parameters; objectives extend
the state through ``objective_states[name]`` (queues, teachers) without the loop knowing what is inside.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clus_jax.models.towers import init_inputs
from clus_jax.objectives.registry import Objective
from clus_jax.parallel import partitioning

PyTree = Any


def objective_rng(rng: jax.Array, name: str) -> jax.Array:
    """The init key of objective ``name``: depends on its name only, not on which other objectives run."""
    return jax.random.fold_in(rng, int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") >> 1)


def boxed_init(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    objectives: Mapping[str, Objective],
    load_params: Callable[[PyTree], PyTree] | None = None,
) -> Callable[[jax.Array], tuple[PyTree, PyTree]]:
    """Returns f(rng) -> (boxed params, boxed objective states); traced by eval_shape and by jit.

    ``load_params(boxed params) -> boxed params`` replaces some of them (``init_from``) before the
    objectives build their state, so a teacher copies the loaded weights.
    """

    def init(rng: jax.Array):
        inputs = init_inputs(config.model)
        params = dict(model.init(rng, inputs["image"], inputs["text"])["params"])
        for name, obj in objectives.items():
            own = obj.init_params(objective_rng(rng, name), config)
            if own:
                params[name] = own
        if load_params is not None:
            params = load_params(params)
        states = {name: obj.init_state(params, config) for name, obj in objectives.items()}
        return params, states

    return init


def create_train_state(
    config: ml_collections.ConfigDict,
    init_fn: Callable[[jax.Array], tuple[PyTree, PyTree]],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules,
    *,
    materialize: bool = True,
) -> tuple[PyTree, PyTree]:
    """(state or abstract state, state shardings). With ``materialize=False`` nothing is allocated."""
    rng = jax.random.PRNGKey(int(config.seed))
    boxed_params, boxed_states = jax.eval_shape(init_fn, rng)
    param_sh = partitioning.shardings_for(boxed_params, mesh, rules)
    state_sh = partitioning.shardings_for(boxed_states, mesh, rules)
    abstract_params = partitioning.unbox(boxed_params)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = NamedSharding(mesh, P())
    # Per-group states of optax.multi_transform (parameter groups) hold MaskedNode where a parameter
    # belongs to another group; those stay MaskedNode, everything else follows its parameter.
    opt_sh = optax.tree_map_params(
        tx, lambda leaf, sharding: leaf if isinstance(leaf, optax.MaskedNode) else sharding, abstract_opt, param_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)),
    )
    shardings = {
        "step": replicated,
        "params": param_sh,
        "opt_state": opt_sh,
        "objective_states": state_sh,
        "rng": replicated,
    }

    def init(rng):
        params, states = init_fn(rng)
        params, states = partitioning.unbox(params), partitioning.unbox(states)
        return {
            "step": jnp.zeros([], jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "objective_states": states,
            "rng": jax.random.fold_in(rng, 1),
        }

    if not materialize:
        abstract = jax.eval_shape(init, rng)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings), shardings
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings
