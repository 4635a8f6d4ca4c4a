"""Train state: shapes first, then shardings from logical rules, then a directly sharded init.

The state is a plain dict ``{step, params, opt_state, objective_states, rng}``; objectives extend it
through ``objective_states[name]`` (queues, teachers) without the loop knowing what is inside.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clus_jax.objectives.registry import Objective
from clus_jax.parallel import partitioning

PyTree = Any


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, jax.Array]:
    size = int(config.model.image.image_size)
    return {
        "image": jnp.zeros((batch_size, size, size, 3), jnp.uint8),
        "text": jnp.ones((batch_size, int(config.model.text.context_length)), jnp.int32),
    }


def _boxed_init(model: nn.Module, objectives: Mapping[str, Objective], config: ml_collections.ConfigDict):
    """Returns f(rng) -> (boxed params, boxed objective states); traced by eval_shape and by jit."""

    def init(rng: jax.Array):
        batch = dummy_batch(config)
        params = model.init(rng, batch["image"], batch["text"])["params"]
        states = {name: obj.init_state(params, config) for name, obj in objectives.items()}
        return params, states

    return init


def create_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    objectives: Mapping[str, Objective],
    mesh: Mesh,
    rules,
    *,
    materialize: bool = True,
) -> tuple[PyTree, PyTree]:
    """(state or abstract state, state shardings). With ``materialize=False`` nothing is allocated."""
    boxed_init = _boxed_init(model, objectives, config)
    rng = jax.random.PRNGKey(int(config.seed))
    boxed_params, boxed_states = jax.eval_shape(boxed_init, rng)
    param_sh = partitioning.shardings_for(boxed_params, mesh, rules)
    state_sh = partitioning.shardings_for(boxed_states, mesh, rules)
    abstract_params = partitioning.unbox(boxed_params)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = NamedSharding(mesh, P())
    # Per-group states of optax.multi_transform (used for freezing) hold MaskedNode where a parameter
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
        params, states = boxed_init(rng)
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
