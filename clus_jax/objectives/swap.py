"""Clus cross-modal clustering swap prediction (``config.objectives = {'clip': 1.0, 'swap': 0.5}``).

Clus = CLIP (the reconstruction term) + λ·swap. Only the swap term comes from the paper's abstract; the CLIP term
beside it (objective ``clip``, weight 1) is this reconstruction's, as is λ = 0.5 (the best of configs/clus.py's
knob sweep, not a published value): the abstract names no contrastive loss, and methods.md lists ITC among the
losses not confirmed for Clus. It keeps the two towers aligned for zero-shot use; ``configs/clus.py:clip=0``
trains the swap term alone.

What the Clus paper (Sun, Ngo, Sek, Meng; Sci Rep 14, 2024) confirms, from its abstract only (the full
text and code are not public):
  * an image-text clustering embedding space learned by *clustering swap prediction* between image and
    text features, where "both text and image serve as ground truth";
  * an "open number of clusters" for web-scale alt-text data;
  * a *distillation learning* approach to train the two encoders efficiently.

What is inferred here (a reconstruction, not the paper's published method):
  * Swapped prediction follows SwAV (Caron et al. 2020): shared prototype banks C_i with unit rows,
    cosine scores S = Z C^T, Sinkhorn-Knopp equipartition codes Q (epsilon, 3 iterations, no gradient),
    predictions softmax(S / temperature). Across modalities, text codes supervise image predictions and
    image codes supervise text predictions:
        L_i = 1/2 [CE(Q^T, S^I) + CE(Q^I, S^T)] + w * 1/2 [CE(Q^I, S^I) + CE(Q^T, S^T)],
    the second (within-modality) term off by default (w = ``within_modality_weight`` = 0).
  * "Open number of clusters": K is a free size, several banks of different sizes train together and
    their losses are averaged; an optional SwAV feature queue lets K exceed the batch.
  * Distillation has two readings. CODIS (Duan et al. 2022): a momentum (EMA) teacher of the student's shape
    computes the codes and the teacher of one modality guides the student of the other (``teacher='ema'``).
    Or a frozen pretrained teacher distilled into the student (``teacher='checkpoint'``): a finished clus_jax
    run or an open_clip checkpoint (``teacher_checkpoint``), whose towers may differ from the student's
    (``teacher_model``: its config.model; empty = the student's). It runs forward without gradient in the
    student's step, on the student's batch (images resized to its image size, the student's tokens), and
    produces codes with its own banks of the student's sizes K at its own embedding width: a Clus run's
    learned banks (``teacher_prototypes='teacher'``) or, for a source without banks (a CLIP run, open_clip),
    banks initialised from the run's seed and kept frozen (``'random'``). No source says how a frozen
    teacher's prototypes are made. Frozen keeps the targets fixed, as a frozen teacher's are meant to be
    (learning them would need a loss of their own that no source describes); Sinkhorn's equipartition still
    spreads the codes over all K cells of the teacher's space, as DeepCluster-v2's fixed prototypes do.
    ``'student'`` scores the teacher with the student's banks (same embedding width). With
    ``teacher='none'`` the student's own codes are used, as in SwAV.
The banks are the objective's own parameters (``params['swap']['bank_<i>']``, sizes from
``config.swap.num_prototypes``); they learn to predict the codes. A teacher holds its own copy of the towers
and the banks in the objective's state, never in the parameters, so it gets no gradient or update.
SwAV practice kept: prototype rows re-normalised at the start of every step by rewriting the parameters,
prototypes frozen through optimizer masking for the first ``freeze_prototypes_steps``, queue rows
re-scored with the current prototypes and used only once full, codes kept for the current batch only.

Sharding: every bank's math runs in one ``shard_map`` island with rows split over the batch axes and
the K prototypes split over the mesh axis that the 'prototypes' logical rule gives that bank (when it
divides K), so a bank of a million rows is a config value. Scores are [B_local, K_local] per device.
"""
from __future__ import annotations

import numbers
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from clus_jax.objectives import feature_queue, prototypes, registry, teachers
from clus_jax.objectives.sinkhorn import sinkhorn_knopp
from clus_jax.parallel.collectives import AxisName, axis_size, global_sum, join_axis_names, shard_map_island, shard_offset
from clus_jax.objectives.swap_math import cross_entropy_with_codes, swapped_prediction_loss

PyTree = Any
TEACHERS = ("none", "ema", "checkpoint")
TEACHER_PROTOTYPES = ("teacher", "student", "random")


def used_clusters(codes: jax.Array, *, batch_axis_name: AxisName = None, proto_axis_name: AxisName = None) -> jax.Array:
    """Number of prototypes that are the arg-max code of at least one sample of the global batch.

    Ties go to the lowest prototype index, also across prototype shards, so the count does not depend
    on the mesh.
    """
    k_local = codes.shape[-1]
    offset = shard_offset(k_local, proto_axis_name)
    local_max = jnp.max(codes, axis=-1)
    local_arg = jnp.argmax(codes, axis=-1).astype(jnp.int32) + offset
    if proto_axis_name is None:
        winner = local_arg
    else:
        global_max = lax.pmax(local_max, proto_axis_name)
        candidate = jnp.where(local_max == global_max, local_arg, jnp.iinfo(jnp.int32).max)
        winner = lax.pmin(candidate, proto_axis_name)
    hits = jax.nn.one_hot(winner - offset, k_local, dtype=jnp.float32)  # zero rows for other shards' winners
    counts = global_sum(hits, 0, batch_axis_name)
    return global_sum((counts > 0).astype(jnp.float32), None, proto_axis_name).reshape(())


def code_entropy(codes: jax.Array, *, batch_axis_name: AxisName = None, proto_axis_name: AxisName = None) -> jax.Array:
    """Mean per-sample entropy (nats) of the codes: near log K when assignments are uninformative."""
    q = codes.astype(jnp.float32)
    plogp = jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0)
    per_sample = global_sum(plogp, -1, proto_axis_name)
    total = global_sum(per_sample, None, batch_axis_name)
    return -total.reshape(()) / (codes.shape[0] * axis_size(batch_axis_name))


def bank_loss(
    args: dict[str, jax.Array],
    *,
    temperature: float,
    epsilon: float,
    num_iters: int,
    within_weight: float,
    batch_axis_name: AxisName = None,
    proto_axis_name: AxisName = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Swap loss of one bank on local blocks; runs as-is on one device or inside ``shard_map``.

    ``args``: 'image', 'text' student embeddings [b, D]; 'bank' [k, D] unit prototype rows; optionally
    'code_image', 'code_text' (teacher embeddings) and 'code_bank' (the prototypes that score them, by
    default the detached student bank); optionally 'queue_image', 'queue_text' [slots, b, D] with
    'use_queue' (scalar bool). Returns (loss, metrics), identical on every shard.
    """
    axes = dict(batch_axis_name=batch_axis_name, proto_axis_name=proto_axis_name)
    bank = args["bank"]
    code_bank = args.get("code_bank", lax.stop_gradient(bank))
    student = {m: prototypes.scores(args[m], bank) for m in ("image", "text")}

    def codes_for(m: str) -> jax.Array:
        key = f"code_{m}"
        code_scores = prototypes.scores(args[key], code_bank) if key in args else lax.stop_gradient(student[m])
        sinkhorn = partial(sinkhorn_knopp, epsilon=epsilon, num_iters=num_iters, **axes)
        queue = args.get(f"queue_{m}")
        if queue is None:
            return sinkhorn(code_scores)

        def with_queue():
            queue_scores = prototypes.scores(queue.reshape(-1, queue.shape[-1]), code_bank)
            return sinkhorn(jnp.concatenate([queue_scores, code_scores], axis=0))[-code_scores.shape[0]:]

        return lax.cond(args["use_queue"], with_queue, lambda: sinkhorn(code_scores))

    codes = {m: codes_for(m) for m in ("image", "text")}
    # swapped_prediction_loss pairs codes_a with scores_b: image codes -> text predictions and back.
    cross = swapped_prediction_loss(
        student["image"], student["text"], temperature, codes_a=codes["image"], codes_b=codes["text"], **axes
    )
    metrics = {"cross_modal": cross}
    loss = cross
    if within_weight:
        within = 0.5 * sum(cross_entropy_with_codes(codes[m], student[m], temperature, **axes) for m in ("image", "text"))
        metrics["within_modality"] = within
        loss = cross + within_weight * within
    metrics["loss"] = loss
    metrics["code_entropy"] = 0.5 * (code_entropy(codes["image"], **axes) + code_entropy(codes["text"], **axes))
    for m in ("image", "text"):
        metrics[f"used_clusters_{m}"] = used_clusters(codes[m], **axes)
    return loss, metrics


def _bank_on_mesh(args: dict[str, jax.Array], ctx: registry.LossContext, proto_axis, **knobs):
    """Runs ``bank_loss`` in a shard_map island: rows over the batch axes, prototypes over ``proto_axis``."""
    batch = join_axis_names(ctx.batch_axes)
    specs = {}
    for key in args:
        if key in ("bank", "code_bank"):
            specs[key] = P(proto_axis)
        elif key.startswith("queue_"):
            specs[key] = P(None, batch)
        elif key == "use_queue":
            specs[key] = P()
        else:
            specs[key] = P(batch)
    return shard_map_island(partial(bank_loss, proto_axis_name=proto_axis, **knobs), ctx.mesh, ctx.batch_axes, args,
                            in_specs=(specs,), axis_name_arg="batch_axis_name")


def _teacher_outputs(ctx: registry.LossContext) -> tuple[dict[str, jax.Array], dict[str, jax.Array] | None]:
    """Teacher embeddings and teacher prototype banks (None: score with the student's banks)."""
    teacher = lax.stop_gradient(ctx.state["teacher"])
    if _own_towers(ctx.config):
        outputs = teachers.apply_towers(ctx.config.swap.teacher_model, teacher["towers"], ctx.batch)
    else:
        outputs = ctx.apply_model(teacher["towers"], ctx.batch)
    embeddings = {m: lax.stop_gradient(outputs[f"{m}_emb"]) for m in ("image", "text")}
    own_banks = "banks" in teacher and ctx.config.swap.teacher_prototypes != "student"
    banks = {n: prototypes.normalize_rows(b) for n, b in teacher["banks"].items()} if own_banks else None
    return embeddings, banks


def _teacher_source(params: PyTree) -> dict[str, PyTree]:
    """What the EMA teacher copies of the student and tracks: the towers and the banks."""
    return {"towers": registry.model_params(params), "banks": params[prototypes.PARAMS_KEY]}


def _own_towers(config: ml_collections.ConfigDict) -> bool:
    """Whether the teacher has towers of its own (``config.swap.teacher_model``) rather than the student's."""
    return bool(config.swap.get("teacher_model"))


def _teacher_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return config.swap.teacher_model if _own_towers(config) else config.model


def _checkpoint_teacher(params: PyTree, config: ml_collections.ConfigDict) -> dict[str, PyTree]:
    """The boxed teacher a checkpoint is loaded into: its towers (the student's shapes or ``teacher_model``'s) and,
    unless the student's banks score it, banks of the student's sizes at the teacher's embedding width,
    initialised from the run's seed (kept when ``teacher_prototypes='random'``, else replaced by the saved ones)."""
    cfg = config.swap
    towers = (teachers.init_towers(cfg.teacher_model, jax.random.PRNGKey(0)) if _own_towers(config)
              else registry.model_params(params))  # placeholders: the loaded values replace them
    teacher = {"towers": towers}
    if cfg.teacher_prototypes != "student":
        key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0x7EAC)
        teacher["banks"] = prototypes.init_banks(key, prototypes.bank_sizes(cfg), int(_teacher_model(config).embed_dim))
    return teacher


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys, lists as tuples (to compare a saved model config with a given one)."""
    if hasattr(tree, "items"):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tuple(tree) if isinstance(tree, list) else tree}


def _check_teacher_model(config: ml_collections.ConfigDict) -> None:
    """``config.swap.teacher_model`` is a config.model that can read the student's batch."""
    cfg, where = config.swap, "config.swap.teacher_model"
    if cfg.teacher != "checkpoint":
        raise registry.ConfigError(f"{where} is set but config.swap.teacher={cfg.teacher!r}: only a frozen "
                                   "teacher (teacher='checkpoint') may have other towers than the student")
    teacher = cfg.teacher_model
    for key in ("image", "text", "embed_dim"):
        if key not in teacher:
            raise registry.ConfigError(f"{where} has no {key!r}: it is the teacher's config.model "
                                       "(configs/clus.py:teacher=PATH sets it from the teacher)")
    text, student = teacher.text, config.model.text
    if int(text.get("vocab_size", 0)) != int(student.vocab_size):
        raise registry.ConfigError(
            f"{where}.text.vocab_size={text.get('vocab_size')!r} differs from config.model.text.vocab_size="
            f"{student.vocab_size!r}: the teacher reads the student's tokens, so the student needs its tokenizer")
    if int(text.get("context_length", 0)) < int(student.context_length):
        raise registry.ConfigError(
            f"{where}.text.context_length={text.get('context_length')!r} is shorter than "
            f"config.model.text.context_length={student.context_length!r}: the teacher reads the student's tokens")
    if cfg.teacher_prototypes == "student" and int(teacher.embed_dim) != int(config.model.embed_dim):
        raise registry.ConfigError(
            f"config.swap.teacher_prototypes='student' needs {where}.embed_dim={teacher.embed_dim!r} equal to "
            f"config.model.embed_dim={config.model.embed_dim!r} (the student's banks score the teacher)")


def _as_saved(source: dict[str, PyTree]) -> PyTree:
    """A teacher source laid out as a saved student's parameters (towers' entries, banks under 'swap')."""
    return {**source["towers"], **({prototypes.PARAMS_KEY: source["banks"]} if "banks" in source else {})}


def _number(config: ml_collections.ConfigDict, key: str, *, minimum: float = 0, strict: bool = False,
            integer: bool = False, maximum: float | None = None) -> None:
    value = config.swap[key]
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool)
    ok = ok and (value > minimum if strict else value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        bound = f"{'>' if strict else '>='} {minimum}" + ("" if maximum is None else f" and <= {maximum}")
        raise registry.ConfigError(f"config.swap.{key}={value!r} must be {'an integer' if integer else 'a number'} {bound}")


@registry.register
class Swap(registry.Objective):
    """Cross-modal swapped prediction over shared prototype banks, optionally with a queue and a teacher."""

    name = "swap"
    defaults = {
        "num_prototypes": (3000,),  # one bank per size (several sizes = several clusterings); SwAV uses 3000
        "temperature": 0.1,  # softmax temperature of the predictions (SwAV)
        "epsilon": 0.05,  # Sinkhorn entropic regularisation; SwAV suggests 0.03 against collapse
        "sinkhorn_iters": 3,
        "freeze_prototypes_steps": 0,  # SwAV freezes for one epoch
        "queue_length": 0,  # per modality, a multiple of the global batch; 0 = no queue
        "queue_start_step": 0,  # writing starts here; the queue is used once every slot is written
        "within_modality_weight": 0.0,  # weight of CE(q_image, s_image) + CE(q_text, s_text), averaged
        "teacher": "none",  # 'none' (own codes), 'ema' or 'checkpoint'
        "teacher_momentum": 0.996,  # EMA momentum at step 0 ...
        "teacher_momentum_final": 1.0,  # ... cosine-scheduled to this at total_steps
        "teacher_checkpoint": "",  # a finished run (workdir or checkpoint) or an open_clip checkpoint (teacher='checkpoint')
        "teacher_checkpoint_step": -1,  # -1 = newest
        "teacher_open_clip_config": "",  # the open_clip model config of a teacher_checkpoint weights file
        "teacher_model": {},  # the checkpoint teacher's config.model when its towers differ; {} = the student's
        # Banks that score the teacher: its own ('teacher': saved with it; 'random': initialised, frozen) or the student's
        "teacher_prototypes": "teacher",
    }

    def validate(self, config: ml_collections.ConfigDict) -> None:
        sizes = config.swap.get("num_prototypes")
        sizes = [sizes] if isinstance(sizes, numbers.Integral) else sizes
        if not sizes or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) and k > 0 for k in sizes):
            raise registry.ConfigError(
                f"config.swap.num_prototypes={config.swap.get('num_prototypes')!r}: objective 'swap' needs one or "
                "more prototype banks, e.g. 3000 or [3000, 10000]"
            )
        _number(config, "temperature", strict=True)
        _number(config, "epsilon", strict=True)
        _number(config, "sinkhorn_iters", integer=True)
        _number(config, "freeze_prototypes_steps", integer=True)
        _number(config, "queue_length", integer=True)
        _number(config, "queue_start_step", integer=True)
        _number(config, "within_modality_weight")
        _number(config, "teacher_momentum", maximum=1.0)
        _number(config, "teacher_momentum_final", maximum=1.0)
        queue, batch = int(config.swap.queue_length), int(config.batch_size)
        if queue % batch:
            raise registry.ConfigError(
                f"config.swap.queue_length={queue} must be a multiple of the global batch config.batch_size={batch} "
                f"(e.g. {max(queue // batch, 1) * batch})"
            )
        if config.swap.teacher not in TEACHERS:
            raise registry.ConfigError(f"config.swap.teacher={config.swap.teacher!r} must be one of {list(TEACHERS)}")
        if config.swap.teacher_prototypes not in TEACHER_PROTOTYPES:
            raise registry.ConfigError(f"config.swap.teacher_prototypes={config.swap.teacher_prototypes!r} must be "
                                       f"one of {list(TEACHER_PROTOTYPES)}")
        if config.swap.teacher == "checkpoint" and not config.swap.teacher_checkpoint:
            raise registry.ConfigError("config.swap.teacher_checkpoint must name a workdir, checkpoint directory or "
                                       "open_clip checkpoint when config.swap.teacher='checkpoint'")
        if config.swap.teacher_prototypes == "random" and config.swap.teacher != "checkpoint":
            raise registry.ConfigError("config.swap.teacher_prototypes='random' (frozen banks of their own) is for a "
                                       f"frozen teacher, not config.swap.teacher={config.swap.teacher!r}")
        if _own_towers(config):
            _check_teacher_model(config)

    def check_shapes(self, config: ml_collections.ConfigDict, param_shapes: PyTree) -> None:
        """A checkpoint teacher must hold the towers it is given (the student's, or ``teacher_model``'s) and, when
        its own saved banks score it, banks of the student's sizes at its embedding width."""
        cfg = config.swap
        if cfg.teacher != "checkpoint":
            return
        path, model = cfg.teacher_checkpoint, "config.swap.teacher_model" if _own_towers(config) else "config.model"
        reader = teachers.reader_for(path)
        if reader is not None:
            self._check_read_source(config, reader)
            return
        try:
            saved = teachers.saved_param_shapes(path, _checkpoint_step(config))
        except (FileNotFoundError, ValueError) as e:
            raise registry.ConfigError(f"config.swap.teacher_checkpoint={path!r}: {e}") from None
        towers = (teachers.tower_shapes(cfg.teacher_model) if _own_towers(config)
                  else teachers.unboxed(registry.model_params(param_shapes)))
        expected = {**towers}
        if cfg.teacher_prototypes == "teacher":
            dim = int(_teacher_model(config).embed_dim)
            expected[prototypes.PARAMS_KEY] = {name: jax.ShapeDtypeStruct((k, dim), jnp.float32) for name, k in
                                               zip(prototypes.bank_names(len(prototypes.bank_sizes(cfg))),
                                                   prototypes.bank_sizes(cfg))}
        problems = teachers.shape_mismatches(expected, {k: v for k, v in dict(saved).items() if k in expected})
        if problems:
            raise registry.ConfigError(
                f"config.swap.teacher_checkpoint={path!r} does not match {model}: " + "; ".join(problems[:5])
                + ("" if not any(p.startswith(f"['{prototypes.PARAMS_KEY}']") for p in problems) else
                   " (set config.swap.teacher_prototypes='student' to use a teacher saved without these banks, or "
                   "'random' to give it banks of its own, initialised and frozen)")
            )

    @staticmethod
    def _check_read_source(config: ml_collections.ConfigDict, reader: teachers.Reader) -> None:
        """A source read by a reader (open_clip) has no banks, and its towers are ``teacher_model``: every value its
        own model config gives."""
        cfg, path = config.swap, config.swap.teacher_checkpoint
        if cfg.teacher_prototypes == "teacher":
            raise registry.ConfigError(
                f"config.swap.teacher_checkpoint={path!r} holds no prototype banks: set config.swap.teacher_prototypes="
                "'random' (banks of its own, initialised and frozen) or 'student'")
        if not _own_towers(config):
            raise registry.ConfigError(f"config.swap.teacher_model must be the model of config.swap.teacher_checkpoint="
                                       f"{path!r} (configs/clus.py:teacher=PATH sets it)")
        try:
            source = _flat(reader.model_config(path, cfg.teacher_open_clip_config))
        except (FileNotFoundError, ValueError) as e:
            raise registry.ConfigError(f"config.swap.teacher_checkpoint={path!r}: {e}") from None
        given = _flat(cfg.teacher_model)
        differ = [f"config.swap.teacher_model.{k}={given.get(k)!r}, the checkpoint's {v!r}" for k, v in source.items()
                  if given.get(k) != v]
        if differ:
            raise registry.ConfigError(f"config.swap.teacher_checkpoint={path!r} is not config.swap.teacher_model: "
                                       + "; ".join(differ[:5]))

    def init_params(self, rng: jax.Array, config: ml_collections.ConfigDict) -> PyTree:
        return prototypes.init_banks(rng, prototypes.bank_sizes(config.swap), int(config.model.embed_dim))

    def init_state(self, params: PyTree, config: ml_collections.ConfigDict) -> PyTree:
        cfg, state = config.swap, {}
        if int(cfg.queue_length):
            # The queue keeps the rows the codes come from: the teacher's embeddings when it has one.
            dim = int(_teacher_model(config).embed_dim)
            state["queue"] = feature_queue.init(int(cfg.queue_length), int(config.batch_size), dim)
        if cfg.teacher == "ema":
            state["teacher"] = _teacher_source(params)  # boxed student leaves: sharded like the student
        elif cfg.teacher == "checkpoint":
            teacher = _checkpoint_teacher(params, config)
            loads_banks = cfg.teacher_prototypes == "teacher"
            like = _as_saved(teacher if loads_banks else {"towers": teacher["towers"]})
            saved = teachers.restore_in_init(cfg.teacher_checkpoint, _checkpoint_step(config), like,
                                             model_file=cfg.teacher_open_clip_config)
            state["teacher"] = {**teacher, "towers": {k: saved[k] for k in teacher["towers"]}}
            if loads_banks:
                state["teacher"]["banks"] = saved[prototypes.PARAMS_KEY]
        return state

    def param_groups(self, config: ml_collections.ConfigDict) -> list[tuple[str, dict[str, Any]]]:
        steps = int(config.swap.freeze_prototypes_steps)
        return [(prototypes.PARAM_PATTERN, {"trainable_from": steps})] if steps > 0 else []

    def forward_flops(self, config: ml_collections.ConfigDict, batch_size: int) -> float:
        """[B, K] prototype scores of both modalities, for every bank."""
        d = int(config.model.embed_dim)
        return 2.0 * 2.0 * batch_size * d * sum(prototypes.bank_sizes(config.swap))

    def no_grad_flops(self, config: ml_collections.ConfigDict, batch_size: int) -> float:
        """A teacher's forward of both towers (the EMA or checkpoint teacher computes the codes); a teacher with
        towers of its own runs at its image size on the student's tokens."""
        from clus_jax.models.flops import towers_forward_flops

        if config.swap.teacher == "none":
            return 0.0
        if not _own_towers(config):
            return towers_forward_flops(config, batch_size)
        model = config.swap.teacher_model.copy_and_resolve_references()
        model.text.context_length = int(config.model.text.context_length)
        return towers_forward_flops({"model": model}, batch_size)

    def prepare_params(self, params: PyTree, config: ml_collections.ConfigDict) -> PyTree:
        return prototypes.normalize_banks(params)

    def loss(self, ctx: registry.LossContext) -> tuple[jax.Array, dict[str, jax.Array], PyTree]:
        cfg = ctx.config.swap
        banks = ctx.params[prototypes.PARAMS_KEY]
        state = dict(ctx.state)
        student = {m: ctx.outputs[f"{m}_emb"] for m in ("image", "text")}
        if "teacher" in state:
            code_rows, code_banks = _teacher_outputs(ctx)
        else:
            code_rows, code_banks = {m: lax.stop_gradient(e) for m, e in student.items()}, None
        queue = state.get("queue")
        use_queue = feature_queue.is_full(queue) if queue is not None else None
        knobs = dict(temperature=float(cfg.temperature), epsilon=float(cfg.epsilon), num_iters=int(cfg.sinkhorn_iters),
                     within_weight=float(cfg.within_modality_weight))

        losses, metrics = [], {}
        for name in prototypes.bank_names(len(banks)):
            args = {"image": student["image"], "text": student["text"], "bank": banks[name]}
            if "teacher" in state:
                args.update(code_image=code_rows["image"], code_text=code_rows["text"])
            if code_banks is not None:
                args["code_bank"] = code_banks[name]
            if queue is not None:
                args.update(queue_image=queue["image"], queue_text=queue["text"], use_queue=use_queue)
            axis = prototypes.mesh_axis(banks[name].shape[0], ctx.config, ctx.mesh, ctx.batch_axes)
            value, bank_metrics = _bank_on_mesh(args, ctx, axis, **knobs)
            losses.append(value)
            metrics.update({f"{name}/{k}": v for k, v in bank_metrics.items()})
        loss = sum(losses) / len(losses)

        if queue is not None:
            metrics["queue_in_use"] = use_queue.astype(jnp.float32)
            state["queue"] = feature_queue.push(queue, code_rows, ctx.step >= int(cfg.queue_start_step))
        return loss, metrics, state

    def after_update(self, params: PyTree, state: PyTree, step: jax.Array, config: ml_collections.ConfigDict) -> PyTree:
        cfg = config.swap
        if cfg.teacher != "ema":
            return state  # a checkpoint teacher stays frozen
        m = teachers.momentum(step, float(cfg.teacher_momentum), float(cfg.teacher_momentum_final), int(config.total_steps))
        return {**state, "teacher": teachers.ema_update(state["teacher"], _teacher_source(params), m)}

    def eval_heads(self, params: PyTree, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
        """The banks ``{'bank_<i>': [K_i, D]}`` in bank order: the clusterings the run learned."""
        return {name: np.asarray(params[name]) for name in prototypes.bank_names(len(params))}


def _checkpoint_step(config: ml_collections.ConfigDict) -> int | None:
    step = int(config.swap.teacher_checkpoint_step)
    return None if step < 0 else step
