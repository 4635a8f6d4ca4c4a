"""The one train step every objective shares: sum of weighted objective losses, AdamW, skip-if-non-finite.

It never asks which method runs: objectives are called through their hooks, the batch holds whatever fields
were declared, and parameters frozen for the run are left out of the gradient. With
``config.microbatches = M > 1`` the towers run M micro-batches at a time and the gradient is GradCache's
(``clus_jax.train.gradcache``): the losses still see the whole global batch, and the gradient equals the
single-batch one up to summation order.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clus_jax.data import fields
from clus_jax.objectives import registry
from clus_jax.objectives.registry import LossContext, Objective
from clus_jax.parallel import partitioning
from clus_jax.train import gradcache

PyTree = Any


def _keep_if(ok: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def make_apply_model(model: nn.Module):
    def apply_model(model_params: PyTree, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return model.apply({"params": model_params}, batch.get(fields.IMAGE), batch.get(fields.TEXT))

    return apply_model


def _split(tree: PyTree, frozen: list[bool]) -> tuple[list, list]:
    leaves = jax.tree.leaves(tree)
    return [x for x, f in zip(leaves, frozen) if not f], [x for x, f in zip(leaves, frozen) if f]


def _merge(treedef, frozen: list[bool], trainable: list, fixed: list) -> PyTree:
    it_t, it_f = iter(trainable), iter(fixed)
    return jax.tree.unflatten(treedef, [next(it_f) if f else next(it_t) for f in frozen])


def _gradcache_value_and_grad(objectives_loss: Callable, apply_model: Callable, params: PyTree,
                              batch: Mapping[str, jax.Array], frozen_leaves: list[bool], micro: gradcache.Microbatches):
    """((loss, aux), grads) of ``objectives_loss`` on the global batch, the towers run micro-batch by micro-batch.

    (a) the towers' outputs without activations; (b) the losses on those outputs and their gradient with
    respect to the outputs and to every trainable parameter the losses read directly (objectives' own
    parameters); (c) the towers' parameter gradient, a VJP of the output gradient per micro-batch. The
    objectives' own forwards (teachers, momentum towers) run micro-batched too.
    """
    treedef = jax.tree.structure(params)
    flags = frozen_leaves or [False] * treedef.num_leaves
    trainable, fixed = _split(params, flags)
    fixed = [lax.stop_gradient(x) for x in fixed]
    micro_apply = gradcache.micro_batched(apply_model, micro)

    towers = registry.model_params(params)
    outputs = gradcache.forward(apply_model, lax.stop_gradient(towers), batch, micro)
    (loss, aux), (direct, output_grads) = jax.value_and_grad(
        lambda t, o: objectives_loss(_merge(treedef, flags, t, fixed), o, micro_apply), argnums=(0, 1),
        has_aux=True)(trainable, outputs)

    tower_flags = jax.tree.leaves(registry.model_params(jax.tree.unflatten(treedef, flags)))
    tower_def = jax.tree.structure(towers)
    tower_train, tower_fixed = _split(towers, tower_flags)
    tower_fixed = [lax.stop_gradient(x) for x in tower_fixed]
    tower_grads = gradcache.tower_gradients(
        lambda t, mb: apply_model(_merge(tower_def, tower_flags, t, tower_fixed), mb), tower_train, batch,
        output_grads, micro)
    tower_grads = _merge(tower_def, tower_flags, tower_grads, [jnp.zeros_like(x) for x in tower_fixed])
    grads = _merge(treedef, flags, direct, [jnp.zeros_like(x) for x in fixed])
    grads = {k: jax.tree.map(jnp.add, g, tower_grads[k]) if k in tower_grads else g for k, g in grads.items()}
    return (loss, aux), grads


def build_train_step(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    objectives: Mapping[str, tuple[Objective, float]],
    mesh: Mesh,
    rules,
    state_shardings: PyTree,
    batch_shardings: Mapping[str, NamedSharding],
    frozen: PyTree | None = None,
):
    """Returns ``step(state, batch) -> (state, metrics)``, jitted with explicit shardings and donation.

    ``frozen`` (a tree of bools like the params, from ``optim.frozen_mask``) marks parameters frozen
    for the whole run: no gradient is computed for them, so a frozen tower's backward pass is never
    built, and they are carried over unchanged.
    """
    batch_axes = partitioning.batch_axes(mesh, rules)
    apply_model = make_apply_model(model)
    frozen_leaves = [bool(f) for f in jax.tree.leaves(frozen)] if frozen is not None else []

    num_micro = int(config.get("microbatches", 1) or 1)
    micro = None
    if num_micro > 1:
        shards = math.prod(mesh.shape[a] for a in batch_axes)
        micro = gradcache.Microbatches(num_micro, int(config.batch_size), shards, mesh, batch_axes)

    def train_step(state: PyTree, batch: dict[str, jax.Array]):
        step = state["step"]
        rng = jax.random.fold_in(state["rng"], step)
        params = state["params"]
        for obj, _ in objectives.values():
            params = obj.prepare_params(params, config)

        def objectives_loss(p, outputs, apply):
            """Sum of weight x loss over the objectives, on the global batch of tower ``outputs``."""
            total = jnp.zeros([], jnp.float32)
            metrics, new_states = {}, {}
            for i, (name, (obj, weight)) in enumerate(objectives.items()):
                ctx = LossContext(
                    outputs=outputs, params=p, state=state["objective_states"][name], step=step,
                    rng=jax.random.fold_in(rng, i), batch=batch, apply_model=apply,
                    mesh=mesh, batch_axes=batch_axes, config=config,
                )
                value, obj_metrics, new_states[name] = obj.loss(ctx)
                total = total + weight * value
                metrics[f"{name}/loss"] = value
                metrics.update({f"{name}/{k}": v for k, v in obj_metrics.items()})
            metrics["logit_scale"] = outputs["logit_scale"]
            if "logit_bias" in outputs:
                metrics["logit_bias"] = outputs["logit_bias"]
            return total, (metrics, new_states)

        def loss_fn(p):
            return objectives_loss(p, apply_model(registry.model_params(p), batch), apply_model)

        if micro is not None:
            (loss, (metrics, new_states)), grads = _gradcache_value_and_grad(
                objectives_loss, apply_model, params, batch, frozen_leaves, micro)
        elif any(frozen_leaves):
            treedef = jax.tree.structure(params)
            trainable, fixed = _split(params, frozen_leaves)
            fixed = [lax.stop_gradient(x) for x in fixed]
            (loss, (metrics, new_states)), train_grads = jax.value_and_grad(
                lambda t: loss_fn(_merge(treedef, frozen_leaves, t, fixed)), has_aux=True)(trainable)
            grads = _merge(treedef, frozen_leaves, train_grads, [jnp.zeros_like(x) for x in fixed])
        else:
            (loss, (metrics, new_states)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        if any(frozen_leaves):  # bit for bit what was loaded, whatever the optimizer's arithmetic
            new_params = _merge(jax.tree.structure(params), frozen_leaves, _split(new_params, frozen_leaves)[0],
                                _split(state["params"], frozen_leaves)[1])
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_params = _keep_if(ok, new_params, state["params"])
        new_opt = _keep_if(ok, new_opt, state["opt_state"])
        new_states = _keep_if(ok, new_states, state["objective_states"])
        for name, (obj, _) in objectives.items():
            updated = obj.after_update(new_params, new_states[name], step, config)
            new_states[name] = _keep_if(ok, updated, new_states[name])
        metrics.update(
            loss=loss,
            grad_norm=grad_norm,
            param_norm=optax.global_norm(new_params),
            learning_rate=schedule(step),
            nonfinite=jnp.logical_not(ok).astype(jnp.int32),
        )
        new_state = {
            "step": step + 1,
            "params": new_params,
            "opt_state": new_opt,
            "objective_states": new_states,
            "rng": state["rng"],
        }
        return new_state, metrics

    batch_sharding = dict(batch_shardings)
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnums=(0,),
    )

    def run(state, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch)

    run.jitted = jitted  # for AOT lowering (memory plans, benchmarks)
    run.batch_sharding = batch_sharding
    return run
