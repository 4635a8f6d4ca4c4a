"""Distillation teachers kept in objective state: an EMA copy of the student, or frozen saved parameters.

EMA teacher: ``teacher <- m * teacher + (1 - m) * student`` after every optimizer step, with ``m``
following a cosine schedule from ``base`` to ``final`` over training (DINO, BYOL).

Checkpoint teacher: the ``params`` subtree of a train state saved by ``clus_jax.train.checkpoint``,
read with Orbax straight to host NumPy arrays (optimizer moments and objective states are never read).
It enters the train state inside the jitted init through ``jax.pure_callback``: tracing (``eval_shape``
for the abstract state, or before a restore) never touches the files; they are read once, on the host,
when the initial state is actually built. After that the teacher is ordinary state, saved and restored
with the run's own checkpoints. A checkpoint teacher may have towers of its own (``build_model`` of another
``config.model``): ``init_towers`` gives their boxed parameters to load into, ``apply_towers`` runs them on the
student's batch.

Sources other than a clus_jax checkpoint (an open_clip checkpoint) are read through a ``Reader`` that a layer
above the objectives adds (``add_reader``; ``clus_jax.train.teacher_sources`` adds open_clip's, through
``clus_jax.interop``, which the objectives may not import); ``reader_for(path)`` finds it.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from clus_jax.models.towers import build_model, init_inputs
from clus_jax.parallel.partitioning import is_box

PyTree = Any


def momentum(step: jax.Array, base: float, final: float, total_steps: int) -> jax.Array:
    """Cosine schedule ``final - (final - base) * (1 + cos(pi * step / total_steps)) / 2`` (``base`` at 0)."""
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(int(total_steps), 1), 0.0, 1.0)
    return jnp.float32(final) - jnp.float32(final - base) * 0.5 * (1.0 + jnp.cos(jnp.float32(math.pi) * frac))


def ema_update(teacher: PyTree, student: PyTree, m: jax.Array) -> PyTree:
    """``m * teacher + (1 - m) * student`` leaf by leaf, in each teacher leaf's dtype."""
    return jax.tree.map(lambda t, s: (m * t + (1.0 - m) * s).astype(t.dtype), teacher, student)


def resolve_checkpoint(path: str, step: int | None = None) -> str:
    """Directory of the saved train state for a workdir, its ``checkpoints`` folder, or one step's folder.

    Without ``step`` the newest finished step is used. Raises FileNotFoundError when nothing is there.
    """
    root = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(root, "checkpoints")):
        root = os.path.join(root, "checkpoints")
    if os.path.isdir(os.path.join(root, "state")):
        return os.path.join(root, "state")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no checkpoint directory at {path!r}")
    steps = sorted(int(n) for n in os.listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n, "state")))
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint step {step} under {path!r}; found {steps}")
        return os.path.join(root, str(step), "state")
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint under {path!r}")
    return os.path.join(root, str(steps[-1]), "state")


def saved_param_shapes(path: str, step: int | None = None) -> PyTree:
    """Shapes and dtypes (``jax.ShapeDtypeStruct``) of the saved ``params``, from metadata only."""
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(resolve_checkpoint(path, step))).tree
    if "params" not in tree:
        raise ValueError(f"the checkpoint at {path!r} holds no 'params' entry")
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), tree["params"])


def load_params(path: str, step: int | None = None, *, exclude: Sequence[str] = (),
                include: Sequence[str] | None = None) -> PyTree:
    """The ``params`` subtree of a saved clus_jax train state as host NumPy arrays.

    Args:
      path: a workdir, its ``checkpoints`` folder, or one step's folder.
      step: which step; the newest finished one when None.
      exclude: top-level parameter entries not to read (e.g. ``('swap',)``).
      include: if given, only these top-level entries are read (those the checkpoint has).
    """
    directory = resolve_checkpoint(path, step)
    shapes = {k: v for k, v in saved_param_shapes(path, step).items()
              if k not in exclude and (include is None or k in include)}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), shapes)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            directory,
            args=ocp.args.PyTreeRestore(item={"params": shapes}, restore_args={"params": restore_args}, partial_restore=True),
        )
    return restored["params"]


def shape_mismatches(expected: PyTree, got: PyTree) -> list[str]:
    """Human-readable differences in structure, shape or dtype between two trees of arrays/shapes."""
    exp = {jax.tree_util.keystr(p): (tuple(x.shape), np.dtype(x.dtype)) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    have = {jax.tree_util.keystr(p): (tuple(x.shape), np.dtype(x.dtype)) for p, x in jax.tree_util.tree_leaves_with_path(got)}
    problems = [f"{k}: missing" for k in exp if k not in have]
    problems += [f"{k}: unexpected" for k in have if k not in exp]
    problems += [f"{k}: saved {have[k]}, expected {exp[k]}" for k in exp if k in have and have[k] != exp[k]]
    return problems


def unboxed(tree: PyTree) -> PyTree:
    """Values of the logical-axis boxes in ``tree`` (works on abstract trees too; applies no constraint)."""
    return jax.tree.map(lambda b: b.value if is_box(b) else b, tree, is_leaf=is_box)


@dataclasses.dataclass(frozen=True)
class Reader:
    """A kind of teacher source that is not a clus_jax checkpoint, read by a layer above the objectives.

    is_source(path): whether ``path`` is of this kind. model_config(path, model_file): its ``config.model``.
    read_params(path, model_file): its parameters as host arrays, nested like the towers' parameters.
    ``model_file`` is the source's own model description when the path alone lacks it ('' otherwise).
    """

    is_source: Callable[[str], bool]
    model_config: Callable[[str, str], ml_collections.ConfigDict]
    read_params: Callable[[str, str], PyTree]


_READERS: dict[str, Reader] = {}


def add_reader(name: str, reader: Reader) -> None:
    """Lets teachers be read from another kind of source (the same ``name`` again replaces it)."""
    _READERS[name] = reader


def reader_for(path: str) -> Reader | None:
    """The added reader that claims ``path``; None for a clus_jax workdir or checkpoint."""
    return next((r for r in _READERS.values() if r.is_source(path)), None)


def restore_in_init(path: str, step: int | None, like: PyTree, *, model_file: str = "") -> PyTree:
    """Saved params shaped like the boxed tree ``like``, as traced values inside an init function.

    Only ``like``'s top-level entries are read, from a clus_jax checkpoint or through the reader that claims
    ``path`` (with ``model_file``). The result keeps the logical-axis boxes of ``like`` so the loaded
    parameters are placed like the ones they stand for.
    """
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), unboxed(like))
    reader = reader_for(path)

    def load() -> PyTree:
        if reader is None:
            loaded = load_params(path, step, include=tuple(shapes))
        else:
            loaded = {k: v for k, v in dict(reader.read_params(path, model_file)).items() if k in shapes}
        problems = shape_mismatches(shapes, loaded)
        if problems:
            raise ValueError(f"checkpoint {path!r} does not match the model: " + "; ".join(problems[:10]))
        return jax.tree.map(lambda s, x: np.asarray(x, s.dtype), shapes, loaded)

    loaded = jax.pure_callback(load, shapes)
    return jax.tree.map(lambda b, x: b.replace_boxed(x) if is_box(b) else x, like, loaded, is_leaf=is_box)


def init_towers(model_config: ml_collections.ConfigDict, rng: jax.Array) -> PyTree:
    """Boxed parameters of the towers ``model_config`` (config.model's keys) describes, freshly initialised."""
    inputs = init_inputs(model_config)
    return dict(build_model(model_config).init(rng, inputs["image"], inputs["text"])["params"])


def tower_shapes(model_config: ml_collections.ConfigDict) -> PyTree:
    """Shapes and dtypes of those towers' parameters (nothing allocated)."""
    return unboxed(jax.eval_shape(lambda: init_towers(model_config, jax.random.PRNGKey(0))))


def resize_images(images: jax.Array, size: int) -> jax.Array:
    """NHWC images at ``size`` x ``size`` (antialiased bilinear), uint8 kept uint8 so that a tower normalises them
    with its own mean and std; unchanged when already that size."""
    if images.shape[1:3] == (size, size):
        return images
    x = jax.image.resize(images.astype(jnp.float32), (images.shape[0], size, size, images.shape[3]), "linear")
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8) if images.dtype == jnp.uint8 else x.astype(images.dtype)


def apply_towers(model_config: ml_collections.ConfigDict, params: PyTree,
                 batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The towers of ``model_config`` on the student's batch: images resized to its image size, the student's
    tokens as they are (its vocabulary, a context at least as long: ``Swap.validate`` checks both)."""
    images = batch.get("image")
    if images is not None:
        images = resize_images(images, int(model_config.image.image_size))
    return build_model(model_config).apply({"params": params}, images, batch.get("text"))
