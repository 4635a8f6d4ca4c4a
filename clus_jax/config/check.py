"""Validates a config before anything compiles; every message names the offending key."""
from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import jax.numpy as jnp
import ml_collections

from clus_jax.evaluate import registry as evaluators
from clus_jax.models import sizes, towers
from clus_jax.models.layers import ACTIVATIONS
from clus_jax.objectives import registry
from clus_jax.common.errors import ConfigError
from clus_jax.parallel import mesh as mesh_lib

if TYPE_CHECKING:
    from clus_jax.data.tokenizers import TextTokenizer


#: config.optim.mu_dtype: the dtype of Adam's first moment, by name.
MOMENT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _positive_int(config: ml_collections.ConfigDict, key: str, allow_zero: bool = False) -> int:
    value = config[key]
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise ConfigError(f"config.{key}={value!r} must be an integer {'>= 0' if allow_zero else '> 0'}")
    return int(value)


def _check_architecture_options(m: ml_collections.ConfigDict) -> None:
    """The open_clip architecture options of config.model (activation, layer scale, pixel mean and std)."""
    for tower in ("image", "text"):
        act = m[tower].get("act", "gelu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"config.model.{tower}.act={act!r} must be one of {sorted(ACTIVATIONS)}")
        scale = m[tower].get("layer_scale_init", 0.0)
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or scale < 0:
            raise ConfigError(f"config.model.{tower}.layer_scale_init={scale!r} must be a number >= 0 (0 = none)")
    for key in ("mean", "std"):
        value = m.image.get(key, (0.5,) * 3)
        if (not isinstance(value, (tuple, list)) or len(value) != 3
                or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"config.model.image.{key}={value!r} must be three numbers (R, G, B)")
    if not all(v > 0 for v in m.image.get("std", (0.5,) * 3)):
        raise ConfigError(f"config.model.image.std={m.image.std!r} must be > 0")


def check_vocabulary(config: ml_collections.ConfigDict, tokenizer: TextTokenizer) -> None:
    """config.model.text.vocab_size holds every id of the run's tokenizer (ids past the table embed as NaN)."""
    if tokenizer.vocab_size > int(config.model.text.vocab_size):
        raise ConfigError(
            f"config.model.text.vocab_size={config.model.text.vocab_size} is smaller than the vocabulary of "
            f"config.tokenizer.name={config.tokenizer.name!r} ({tokenizer.vocab_size} ids)")


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1,
             tokenizer: TextTokenizer | None = None) -> dict[str, int]:
    """Raises ConfigError on the first problem; returns the resolved mesh shape.

    ``tokenizer``: the run's tokenizer, when it is built already (the trainer's), for ``check_vocabulary``.
    """
    batch = _positive_int(config, "batch_size")
    _positive_int(config, "total_steps")
    for key in ("log_every", "eval_every", "checkpoint_every"):
        _positive_int(config, key, allow_zero=True)

    try:
        mesh_shape = mesh_lib.resolve_mesh_shape(dict(config.mesh), num_devices)
    except mesh_lib.MeshError as e:
        raise ConfigError(str(e)) from None
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    if batch % dp:
        raise ConfigError(
            f"config.batch_size={batch} is not divisible by the data-parallel size {dp} "
            f"(config.mesh.data={mesh_shape['data']} x config.mesh.fsdp={mesh_shape['fsdp']})"
        )
    if batch % process_count:
        raise ConfigError(f"config.batch_size={batch} is not divisible by the process count {process_count}")
    micro = _positive_int(config, "microbatches") if "microbatches" in config else 1
    if batch % (micro * dp):
        raise ConfigError(
            f"config.microbatches={micro}: config.batch_size={batch} is not divisible by config.microbatches x the "
            f"data-parallel size {dp} (config.mesh.data={mesh_shape['data']} x config.mesh.fsdp={mesh_shape['fsdp']})"
        )

    m = config.model
    if m.dtype not in towers.DTYPES:
        raise ConfigError(f"config.model.dtype={m.dtype!r} must be one of {sorted(towers.DTYPES)}")
    try:
        isize = sizes.vit_size(m.image.size)
    except KeyError as e:
        raise ConfigError(f"config.model.image.size: {e.args[0]}") from None
    try:
        tsize = sizes.text_size(m.text.size)
    except KeyError as e:
        raise ConfigError(f"config.model.text.size: {e.args[0]}") from None
    patch = m.image.get("patch_size") or isize.patch_size
    if not patch:
        raise ConfigError(f"config.model.image.patch_size is required for size {m.image.size!r} (or use e.g. 'B/16')")
    if m.image.image_size % patch:
        raise ConfigError(f"config.model.image.image_size={m.image.image_size} is not divisible by patch_size={patch}")
    stem = m.image.get("conv_stem", ())
    if (not isinstance(stem, (tuple, list))
            or not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and c > 0 for c in stem)):
        raise ConfigError(f"config.model.image.conv_stem={stem!r} must be a tuple of channel counts > 0 (() = none)")
    if patch % 2 ** len(stem):
        raise ConfigError(f"config.model.image.conv_stem has {len(stem)} stride-2 convolutions, so patch_size={patch} "
                          f"must be divisible by {2 ** len(stem)}")
    for tower, size in (("image", isize), ("text", tsize)):
        width = m[tower].get("width") or size.width
        heads = m[tower].get("heads") or size.heads
        if width % heads:
            raise ConfigError(f"config.model.{tower}: width {width} is not divisible by heads {heads}")
    if m.image.get("pooling", "cls") not in ("cls", "gap", "map"):
        raise ConfigError(f"config.model.image.pooling={m.image.pooling!r} must be 'cls', 'gap' or 'map'")
    if m.text.get("pooling", "eot") not in ("eot", "argmax", "mean"):
        raise ConfigError(f"config.model.text.pooling={m.text.pooling!r} must be 'eot', 'argmax' or 'mean'")
    _check_architecture_options(m)

    if not config.objectives:
        raise ConfigError("config.objectives is empty; e.g. {'clip': 1.0}")
    for name, weight in dict(config.objectives).items():
        objective = registry.get(name)
        if not isinstance(weight, numbers.Real) or weight < 0:
            raise ConfigError(f"config.objectives.{name}={weight!r} must be a weight >= 0")
        objective.validate(config)

    o = config.optim
    if not o.lr > 0:
        raise ConfigError(f"config.optim.lr={o.lr!r} must be > 0")
    if o.get("mu_dtype", "float32") not in MOMENT_DTYPES:
        raise ConfigError(f"config.optim.mu_dtype={o.mu_dtype!r} must be one of {sorted(MOMENT_DTYPES)}")
    if o.warmup_steps < 0:
        raise ConfigError(f"config.optim.warmup_steps={o.warmup_steps!r} must be >= 0")
    if o.get("schedule", "cosine") not in ("cosine", "constant"):
        raise ConfigError(f"config.optim.schedule={o.schedule!r} must be 'cosine' or 'constant'")
    length = o.get("schedule_steps", 0)
    if (not isinstance(length, numbers.Integral) or isinstance(length, bool)
            or not (length == 0 or length >= config.total_steps)):
        raise ConfigError(f"config.optim.schedule_steps={length!r} must be 0 (= total_steps) or at least "
                          f"config.total_steps={config.total_steps}")
    check_init_from(config)
    from clus_jax.data.data_config import resolve_data_config

    try:
        resolve_data_config(config.data)
    except ValueError as e:
        raise ConfigError(f"config.data: {e}") from None
    check_evals(config)
    if tokenizer is not None:
        check_vocabulary(config, tokenizer)
    return mesh_shape


#: config.init_from.mode: what is taken from the source (clus_jax/train/init_from.py).
INIT_FROM_MODES = ("params", "resume")


def check_init_from(config: ml_collections.ConfigDict) -> None:
    """config.init_from's own keys (the source itself is read in train/init_from.py): a known mode, and in
    'resume' mode every parameter (the optimizer state restored is the whole run's)."""
    cfg = config.get("init_from")
    if not cfg or not cfg.get("path"):
        return
    mode = cfg.get("mode", "params")
    if mode not in INIT_FROM_MODES:
        raise ConfigError(f"config.init_from.mode={mode!r} must be one of {list(INIT_FROM_MODES)}")
    if mode == "resume":
        for key in ("include", "exclude"):
            if cfg.get(key):
                raise ConfigError(f"config.init_from.{key}={cfg[key]!r}: mode 'resume' restores every parameter with "
                                  "its optimizer state; select parameters with mode 'params'")


def check_evals(config: ml_collections.ConfigDict) -> None:
    """config.evals: every entry ``config.evals.run`` names exists, every entry's ``type`` is a registered evaluator
    and has only its settings, and each evaluator that runs accepts its settings (``Evaluator.validate``)."""
    evals = config.evals
    entries = evaluators.entries(config)
    for key in evals:
        if key not in entries and key not in evaluators.SHARED:
            raise ConfigError(f"config.evals.{key}={evals[key]!r} is neither a shared setting {list(evaluators.SHARED)} "
                              "nor an entry (a dict with a 'type')")
    size = evals.get("batch_size")
    if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"config.evals.batch_size={size!r} must be an integer > 0")
    if not isinstance(evals.get("run", ""), str):
        raise ConfigError(f"config.evals.run={evals.run!r} must be entry names, comma-separated ('none': no evaluation)")
    unknown = [n for n in evaluators.run_names(config) if n not in entries]
    if unknown:
        raise ConfigError(f"config.evals.run={evals.run!r}: no entry config.evals.<name> for {unknown}; "
                          f"entries: {sorted(entries)}")
    known = evaluators.names()
    for entry, own in entries.items():
        kind = own.get("type")
        if kind not in known:
            raise ConfigError(f"config.evals.{entry}.type={kind!r} is not an evaluator; known: {known}")
        defaults = evaluators.get(kind).defaults
        step_gap = own.get("every", 0)
        if not isinstance(step_gap, numbers.Integral) or isinstance(step_gap, bool) or step_gap < 0:
            raise ConfigError(f"config.evals.{entry}.every={step_gap!r} must be an integer >= 0 (steps between its "
                              "runs; 0: config.eval_every)")
        for key in own:
            if key not in ("type", "every") and key not in defaults:
                raise ConfigError(f"config.evals.{entry}.{key} is not a setting of evaluator {kind!r}; "
                                  f"its settings: {sorted(defaults)}")
    for entry in evaluators.run_names(config):
        settings = evaluators.settings(config, entry)
        evaluators.get(settings.type).validate(settings, config)
