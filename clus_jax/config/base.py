"""Shared defaults for every config: one place that lists every key the trainer reads.

Config files under ``configs/`` start from ``base_config()`` and change what their method needs. They
take one optional argument string, ``--config configs/clip.py:size=B/16,steps=1000``, parsed by
``parse_arg``. ``load_config`` loads a config file by path the way the CLI does (for tests and sweeps).
"""
from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from clus_jax.data import fields as fields_lib
from clus_jax.data.data_config import default_data_config
from clus_jax.objectives import registry
from clus_jax.parallel.partitioning import DEFAULT_RULES


def parse_value(text: str, like):
    """``text`` parsed as the type of ``like`` (bool: anything but '0', 'false', 'no'; None: kept a str)."""
    if isinstance(like, bool):
        return text.lower() not in ("0", "false", "no") if text else True
    if like is not None:
        return type(like)(text)
    return text


def parse_arg(arg: str | None, **defaults):
    """'a=1,b=x,flag' -> ConfigDict with typed values (types taken from the defaults)."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise KeyError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        try:
            values[key] = parse_value(value, defaults[key])
        except (TypeError, ValueError):
            raise ValueError(f"config argument {key}={value!r}: expected {type(defaults[key]).__name__} like "
                             f"{defaults[key]!r}") from None
    return ml_collections.ConfigDict(values)


def get_dotted(config, key: str):
    """config['a.b.c'], failing with the first missing part of the key."""
    node = config
    for i, part in enumerate(key.split(".")):
        if part not in node:
            raise KeyError(f"override --config.{key}: config has no key {'.'.join(key.split('.')[:i + 1])!r}")
        node = node[part]
    return node


def set_dotted(config, key: str, value) -> None:
    """config['a.b.c'] = value, failing on keys the config does not have or values of the wrong type."""
    parent, _, leaf = key.rpartition(".")
    node = get_dotted(config, parent) if parent else config
    if leaf not in node:
        raise KeyError(f"override {key!r}: config has no key {key!r}")
    node[leaf] = value


# Each tower with its projection, as parameter-path regexes (parameter groups, unused-tower freezing).
TOWER_PATTERNS = {fields_lib.IMAGE: r"^image(_proj)?/", fields_lib.TEXT: r"^text(_proj)?/"}


def objective_knobs(names: Iterable[str], given: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """``config.<name>`` of each named objective that has knobs: its registered defaults under the values
    ``given[name]`` sets (the defaults of a new config, the full knobs a run's config.json records)."""
    out = {}
    for name in names:
        defaults = dict(registry.get(name).defaults or {})
        if defaults:
            out[name] = {**defaults, **dict((given or {}).get(name) or {})}
    return out


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 128  # global, over all processes and devices
    # GradCache: the towers run this many micro-batches per step; the losses and the gradient are the
    # global batch's (clus_jax/train/gradcache.py). The global batch must divide by it x data-parallel size.
    c.microbatches = 1
    c.total_steps = 600
    c.log_every = 25
    c.eval_every = 0  # 0 = only at the end
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.max_consecutive_nonfinite = 10

    c.objectives = {"clip": 1.0}
    # Every registered objective's knobs live under config.<name>, so all of them show up (and can be
    # overridden from the command line) whichever objectives a config turns on.
    for name, knobs in objective_knobs(registry.names()).items():
        c[name] = ml_collections.ConfigDict(knobs)

    c.model = ml_collections.ConfigDict()
    # width/depth/heads/mlp_dim: 0 = from the size's name (clus_jax/models/sizes.py; 'nano' is the default
    # run's towers, an image MLP of 2x the width and two text blocks).
    c.model.image = ml_collections.ConfigDict(
        dict(size="nano", image_size=32, patch_size=4, pooling="cls", width=0, depth=0, heads=0, mlp_dim=0)
    )
    c.model.text = ml_collections.ConfigDict(
        dict(size="nano", context_length=16, vocab_size=49408, causal=True, pooling="eot", width=0, depth=0, heads=0, mlp_dim=0)
    )
    c.model.embed_dim = 128
    c.model.logit_scale_init = math.log(1 / 0.07)
    c.model.logit_bias_init = ml_collections.FieldReference(None, field_type=float)
    c.model.max_logit_scale = 100.0
    c.model.dtype = "float32"
    c.model.remat = False
    # The last block of a CLS- or EOT-pooled tower computes only the pooled token (the same values for
    # less work: every other token's output of that block is never read). False computes every token.
    c.model.pooled_last_block = True
    # Architecture options that make open_clip's ViT-* CLIP towers expressible (clus_jax/interop sets them
    # from an open_clip model config); the defaults are the original towers. model.text.pooling may also be
    # 'argmax' (open_clip's: the token with the largest id, CLIP's EOT).
    c.model.image.act = "gelu"  # MLP activation: 'gelu' (exact erf) or 'quick_gelu' (x * sigmoid(1.702 x))
    c.model.text.act = "gelu"
    c.model.image.layer_scale_init = 0.0  # > 0: learned per-channel scales on each residual branch, this init
    c.model.text.layer_scale_init = 0.0
    c.model.image.patch_bias = True  # the patch embedding's bias (open_clip has none)
    c.model.image.ln_pre = True  # LayerNorm after the patch and position embeddings
    c.model.image.mean = (0.5, 0.5, 0.5)  # uint8 RGB pixels become (x / 255 - mean) / std (OpenAI CLIP:
    c.model.image.std = (0.5, 0.5, 0.5)  # mean (0.48145466, 0.4578275, 0.40821073), std (0.26862954, 0.26130258, 0.27577711))
    # A convolutional stem: one 3x3 stride-2 convolution (+ act) per entry, then the patch embedding over
    # its output at patch_size / 2**len(conv_stem); the token grid stays image_size / patch_size. () = the
    # plain ViT patchify (open_clip's; required to export). See clus_jax/models/vit.py. The default, 8x8
    # tokens over a 32-pixel image from a (32, 64) stem, is what lets a nano tower tell easy-VQA's shapes
    # apart: trained on the labels in the default budget it reaches 0.94 top-1, against 0.53 with the
    # plain 8-pixel patches and 0.91 with 4-pixel ones (bench/supervised_ceiling.py).
    c.model.image.conv_stem = (32, 64)

    c.optim = ml_collections.ConfigDict(
        dict(lr=1e-3, warmup_steps=40, schedule="cosine", final_lr_fraction=0.0, b1=0.9, b2=0.98, eps=1e-6,
             weight_decay=0.1, grad_clip_norm=1.0,
             # Adam's first moment in 'bfloat16' halves its memory (big_vision); the second moment and the
             # master parameters always stay float32.
             mu_dtype="float32",
             # The schedule's length in steps (0 = total_steps): a run that stops before its schedule ends,
             # such as MoDE's seed (27 of 32 epochs), sets the full length.
             schedule_steps=0)
    )

    # Parameter groups, big_vision style: (regex over parameter paths, options), first match wins; each
    # objective appends its own after these. Options: lr_mult, decay (None/True/False), trainable_from,
    # trainable_until, frozen (the whole run: no gradient, no optimizer state). See clus_jax/train/optim.py.
    # LiT (a frozen image tower): c.param_groups = [(r"^image(_proj)?/", {"frozen": True})]
    # The default: the text tower learns at 0.03x the rate. Trained from scratch at one rate, it maps
    # captions that differ only in what the image tower cannot see yet to one embedding ("a red circle",
    # "a red rectangle": cosine 0.99) while colour is learned; each tower's gradient along that
    # difference is proportional to the other tower's, so neither recovers and easy-VQA zero-shot stays at
    # the colour (0.40 at 1x, 0.53 at 0.3x, 0.80 at 0.1x, 0.89 at 0.03x after 400 steps). Configs that
    # start from trained towers (lit.py, open_clip.py) set their own groups.
    c.param_groups = [(TOWER_PATTERNS[fields_lib.TEXT], {"lr_mult": 0.03})]
    # Start from another run's parameters (train/init_from.py): a workdir, checkpoint directory or open_clip
    # checkpoint; step -1 = newest; include/exclude: regexes over parameter paths ('' = all / none).
    # mode: 'params' (the parameters; a fresh optimizer and schedule) or 'resume' (a clus_jax run's parameters,
    # optimizer state and step: the schedule goes on from the source's step to total_steps; MetaCLIP's quick_init).
    c.init_from = ml_collections.ConfigDict(dict(path="", step=-1, include="", exclude="", open_clip_config="",
                                                 mode="params"))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.logical_axis_rules = [list(r) for r in DEFAULT_RULES]

    c.data = default_data_config()
    # No random crop on the embedded data: a crop of half the area cuts easy-VQA's 12-pixel shapes and
    # stretches them by up to 4:3 (zero-shot 0.90 with crops of area >= 0.5, 0.92 without).
    c.data.min_crop_scale = 1.0
    c.tokenizer = ml_collections.ConfigDict(dict(name="clip", path=""))

    # Evaluation (clus_jax/evaluate/registry.py): every dict-valued key is an entry {'type': <evaluator>, <its
    # settings>}; run = the entries to run, comma-separated ('' or 'none': no evaluation); batch_size: the encoders'.
    c.evals = ml_collections.ConfigDict(dict(run="embedded", batch_size=256, embedded=dict(type="embedded")))
    return c


def use_named_size(tower: ml_collections.ConfigDict, name: str) -> None:
    """A tower's dimensions (and an image size name's patch size, e.g. 'B/16') all from the size's name."""
    tower.update(size=name, width=0, depth=0, heads=0, mlp_dim=0)
    if "/" in name:
        tower.patch_size = 0


def apply_args(config: ml_collections.ConfigDict, a: ml_collections.ConfigDict) -> None:
    """Applies the shared config arguments (size, text_size, steps, batch, synthetic, image_size,
    text_lr_mult: the default text-tower group's learning-rate multiplier, 1 = one rate for both towers)."""
    if a.get("text_lr_mult"):
        config.param_groups = [(TOWER_PATTERNS[fields_lib.TEXT], {"lr_mult": float(a.text_lr_mult)})]
    if a.get("size"):
        use_named_size(config.model.image, a.size)
    if a.get("text_size"):
        use_named_size(config.model.text, a.text_size)
    if a.get("image_size"):
        config.model.image.image_size = a.image_size
    if a.get("steps"):
        config.total_steps = a.steps
        config.eval_every = 0
        config.checkpoint_every = max(a.steps // 2, 1)
        config.optim.warmup_steps = min(config.optim.warmup_steps, max(a.steps // 10, 1))
    if a.get("batch"):
        config.batch_size = a.batch
    if a.get("synthetic"):
        config.data.source = "synthetic"


def load_config_module(path: str):
    """Imports a config file by path (as ``--config`` does); FileNotFoundError naming it when absent."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """'configs/clip.py:steps=10' -> the ConfigDict that ``--config`` would give."""
    path, _, arg = spec.partition(":")
    module = load_config_module(path)
    return module.get_config(arg) if arg else module.get_config()
