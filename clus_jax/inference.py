"""Using a trained model: ``clus_jax.load(workdir)`` gives its image and text encoders on NumPy arrays.

    model = clus_jax.load("runs/clip")              # a workdir, its checkpoints folder or one step's folder
    image_emb = model.encode_image(images)          # uint8 [N, H, W, 3] of any size, PIL images or file paths
    text_emb = model.encode_text(["a red circle"])  # both [N, D] float32, L2-normalised

The run's config comes from ``<workdir>/config.json`` (``clus_jax.config.run_config``). Only the model's own
parameters are read from the checkpoint: the entries that ``build_model(config.model)`` initialises, found
from shapes alone, restored partially by ``objectives.teachers.load_params``; optimizer moments,
objectives' own parameters and states are never read. Images are prepared as the evaluation prepares them
(decoded to RGB, shorter side resized to the model's image size, centre square), and both encoders are the
evaluation's own (``evaluate.encoders.make_encoders``): jitted fixed-size batches sharded over the current
devices, the padded tail dropped. So figures computed from these embeddings equal the run's evaluation.
In a multi-process JAX job every process must call the encoders with the same inputs, as the evaluation does.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from clus_jax.data import transforms

PyTree = Any
ImageInput = np.ndarray | Image.Image | str | os.PathLike | bytes


def eval_image(image: ImageInput, size: int) -> np.ndarray:
    """One image (array, PIL image, encoded bytes or a file path) prepared as the evaluation prepares it.

    Returns uint8 [size, size, 3]: decoded to RGB (``transforms.to_rgb_image``), then the shorter side
    resized to ``size`` and the central square kept (``transforms.center_crop``). Raises
    ``transforms.InvalidRecord`` for an undecodable image.
    """
    if isinstance(image, (str, os.PathLike)):
        image = epath.Path(image).read_bytes()
    return transforms.center_crop(transforms.to_rgb_image(image, min_size=size), size)


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A trained two-tower model with NumPy in and out (built by ``load``)."""

    config: ml_collections.ConfigDict  # the run's config (config.json)
    params: PyTree  # the model's parameters, placed on the current devices
    module: Any  # the flax module (``models.towers.TwoTower``)
    tokenizer: Callable[[list[str]], np.ndarray]
    step: int | None  # the checkpoint's step
    checkpoint: str  # the directory the parameters were read from
    _encode_images: Callable[[np.ndarray], np.ndarray] = dataclasses.field(repr=False)
    _encode_texts: Callable[[list[str]], np.ndarray] = dataclasses.field(repr=False)
    #: The evaluation's encoders (``evaluate.encoders.Encoders``), streamed evaluators included.
    encoders: Any = dataclasses.field(default=None, repr=False)

    @property
    def image_size(self) -> int:
        return int(self.config.model.image.image_size)

    @property
    def embed_dim(self) -> int:
        return int(self.config.model.embed_dim)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids int32 [N, context_length] with the run's tokenizer."""
        return np.asarray(self.tokenizer(_text_list(texts)))

    def prepare_images(self, images: np.ndarray | Sequence[ImageInput]) -> np.ndarray:
        """uint8 [N, S, S, 3] at the model's image size, each image prepared by ``eval_image``.

        An array that is already uint8 [N, S, S, 3] is returned as it is (``eval_image`` would not change it).
        """
        size = self.image_size
        if isinstance(images, (str, os.PathLike, bytes, Image.Image)):
            raise TypeError("encode_image takes a batch: a uint8 [N, H, W, 3] array or a list of images or paths; "
                            "wrap a single image in a list")
        if isinstance(images, np.ndarray):
            if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
                raise ValueError(f"images must be [N, H, W, 3], got an array of shape {images.shape}")
            if images.dtype == np.uint8 and images.shape[1:] == (size, size, 3):
                return images
        items = list(images)
        out = np.empty((len(items), size, size, 3), np.uint8)
        for i, item in enumerate(items):
            try:
                out[i] = eval_image(item, size)
            except transforms.InvalidRecord as e:
                raise ValueError(f"image {i}: {e}") from None
        return out

    def encode_image(self, images: np.ndarray | Sequence[ImageInput]) -> np.ndarray:
        """L2-normalised image embeddings float32 [N, D] (any N, including 0)."""
        prepared = self.prepare_images(images)
        if len(prepared) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.asarray(self._encode_images(prepared), np.float32)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings float32 [N, D] (any N, including 0)."""
        texts = _text_list(texts)
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.asarray(self._encode_texts(texts), np.float32)


def _text_list(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("encode_text takes a list of texts; wrap a single text in a list")
    return [str(t) for t in texts]


def _step_of(checkpoint: str) -> int | None:
    name = os.path.basename(os.path.dirname(checkpoint))
    return int(name) if name.isdigit() else None


def model_shapes(config: ml_collections.ConfigDict) -> tuple[Any, PyTree, dict[str, Any]]:
    """``(module, boxed, shapes)`` of ``config.model``: the flax module, its parameters as boxed
    ``jax.ShapeDtypeStruct`` (logical-axis boxes kept) and the same tree unboxed; nothing allocated. What
    every reader of a model's checkpoint or weights file checks the parameters against."""
    from clus_jax.models.towers import build_model, init_inputs
    from clus_jax.objectives import teachers

    module = build_model(config.model)
    inputs = init_inputs(config.model)
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), inputs["image"], inputs["text"])["params"]
    return module, boxed, teachers.unboxed(boxed)


def _read(checkpoint: str, read: Callable[[], Any]) -> Any:
    """``read()`` of a checkpoint's files; a file cut short or damaged is a ValueError that names the checkpoint
    (orbax and tensorstore name only the file inside it, if anything)."""
    try:
        return read()
    except ValueError as e:
        raise ValueError(f"checkpoint {checkpoint!r} cannot be read: {type(e).__name__}: {e}") from e


def load(workdir_or_checkpoint: str, step: int | None = None, *, batch_size: int | None = None) -> Model:
    """The model of a run, from its workdir, its ``checkpoints`` folder or one step's folder.

    Args:
      workdir_or_checkpoint: where the run is; its ``config.json`` says how to build the model.
      step: the checkpoint step; the newest finished one when None.
      batch_size: encoder batch (rounded to the data-parallel size); ``config.evals.batch_size`` when None.
    """
    from clus_jax.objectives import teachers
    from clus_jax.config.run_config import load_run_config

    path = str(workdir_or_checkpoint)
    config = load_run_config(path)
    checkpoint = teachers.resolve_checkpoint(path, step)
    saved = _read(checkpoint, lambda: teachers.saved_param_shapes(path, step))  # before tracing the model
    _, _, shapes = model_shapes(config)
    missing = sorted(set(shapes) - set(saved))
    if missing:
        raise ValueError(f"checkpoint {checkpoint!r} holds no {missing} of the model that config.json describes "
                         f"(it has {sorted(saved)})")
    params = _read(checkpoint, lambda: teachers.load_params(path, step, include=tuple(shapes)))
    problems = teachers.shape_mismatches(shapes, params)
    if problems:
        raise ValueError(f"checkpoint {checkpoint!r} does not match config.json's model: " + "; ".join(problems[:10]))
    return model_from_params(config, params, checkpoint=checkpoint, step=_step_of(checkpoint), batch_size=batch_size)


def model_from_params(config: ml_collections.ConfigDict, params: PyTree, *, checkpoint: str, step: int | None = None,
                      batch_size: int | None = None) -> Model:
    """The ``Model`` of ``config.model`` with these host parameters (shapes already checked), placed on the
    current devices; ``checkpoint`` says where they came from (``clus_jax.interop`` builds its models here)."""
    from clus_jax.data.tokenizers import create_tokenizer
    from clus_jax.parallel import mesh as mesh_lib
    from clus_jax.parallel import partitioning
    from clus_jax.evaluate.encoders import make_encoders

    module, boxed, shapes = model_shapes(config)
    mesh = mesh_lib.create_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices())
    rules = [tuple(r) for r in config.logical_axis_rules]
    shardings = partitioning.shardings_for(boxed, mesh, rules)
    params = jax.device_put(jax.tree.map(lambda s, x: np.asarray(x, s.dtype), shapes, params), shardings)
    tokenizer = create_tokenizer(config.tokenizer.name, int(config.model.text.context_length),
                                 config.tokenizer.get("path") or None)
    bind = make_encoders(module, mesh, rules, shardings, tokenizer, int(batch_size or config.evals.batch_size))
    encoders = bind(params)
    return Model(config=config, params=params, module=module, tokenizer=tokenizer, step=step,
                 checkpoint=checkpoint, _encode_images=encoders.images, _encode_texts=encoders.texts,
                 encoders=encoders)
