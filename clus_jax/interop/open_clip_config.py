"""open_clip model configs <-> clus_jax ``config.model``: which open_clip CLIP configs clus_jax expresses, and how.

An open_clip model config is the JSON of open_clip's ``model_configs/`` (``{"embed_dim", "vision_cfg",
"text_cfg", "quick_gelu", ...}``) or the ``open_clip_config.json`` of a Hugging Face hub / ``local-dir:``
folder (``{"model_cfg": {...}, "preprocess_cfg": {...}}``). Every ViT-* CLIP config with open_clip's own
towers maps onto clus_jax's (ViT-B-32, B-16, L-14, H-14, g-14, bigG-14 and their ``quickgelu`` variants,
layer scale, ``no_ln_pre``): pre-LN blocks with a fused QKV projection, a class token whose output is
pooled, a causal text tower pooled at the largest token id (CLIP's end-of-text), projections without bias,
a patch embedding without bias, LayerNorm eps 1e-5, and the pixel mean and std of ``preprocess_cfg``. Towers
from timm or Hugging Face, attentional pooling, custom attention blocks and other tokenizers are refused
with the key that asks for them (``UnsupportedConfig``).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_FILE = "open_clip_config.json"  # the hub / local-dir layout: {"model_cfg": ..., "preprocess_cfg": ...}

# Keys whose every value clus_jax expresses (read below), and keys accepted only at these values (open_clip's
# defaults, or settings with no effect on the forward pass of an inference model).
_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
             "nonscalar_logit_scale", "custom_text"}
_VISION_KEYS = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "ls_init_value",
                "no_ln_pre", "final_ln_after_pool", "patch_dropout", "output_tokens"}
_VISION_FIXED = {"attentional_pool": False, "pos_embed_type": "learnable", "pool_type": "tok", "act_kwargs": None,
                 "norm_kwargs": None, "block_type": "default", "qk_norm": False, "scaled_cosine_attn": False,
                 "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
                 "timm_model_name": None}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value",
              "final_ln_after_pool", "output_tokens"}
_TEXT_FIXED = {"pad_id": 0, "pool_type": "argmax", "no_causal_mask": False, "proj_bias": False, "proj_type": "linear",
               "embed_cls": False, "act_kwargs": None, "norm_kwargs": None, "block_type": "default", "qk_norm": False,
               "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
               "scale_fc": False, "hf_model_name": None, "hf_tokenizer_name": None, "tokenizer_mode": None,
               "tokenizer_kwargs": None}
_PREPROCESS_FIXED = {"mode": "RGB", "resize_mode": "shortest"}
_PREPROCESS_KEYS = {"size", "mean", "std", "interpolation", "fill_color"}


class UnsupportedConfig(ValueError):
    """An open_clip config (or a clus_jax model) that the other side cannot express; names the key."""


def read(model_cfg: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_cfg, preprocess_cfg)`` from a model-config JSON, an ``open_clip_config.json``, a folder
    holding one, or the same as a dict. ``preprocess_cfg`` is ``{}`` when the source has none."""
    if isinstance(model_cfg, (str, os.PathLike)):
        path = os.fspath(model_cfg)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no open_clip model config at {os.fspath(model_cfg)!r}")
        with open(path) as f:
            model_cfg = json.load(f)
    if not isinstance(model_cfg, Mapping):
        raise UnsupportedConfig(f"an open_clip model config is a JSON object, got {type(model_cfg).__name__}")
    if "model_cfg" in model_cfg:
        return dict(model_cfg["model_cfg"]), dict(model_cfg.get("preprocess_cfg") or {})
    return dict(model_cfg), {}


def _check_keys(cfg: Mapping[str, Any], where: str, free: set[str], fixed: Mapping[str, Any]) -> None:
    for key, value in cfg.items():
        if key in free:
            continue
        if key in fixed and (value == fixed[key] or (value is None and key == "block_type")
                             or (key.endswith("_kwargs") and not value)):
            continue
        if key in fixed:
            raise UnsupportedConfig(f"{where}.{key}={value!r} is not supported (clus_jax expresses {fixed[key]!r})")
        if key.startswith(("timm_", "hf_")) and cfg.get("timm_model_name") is None and cfg.get("hf_model_name") is None:
            continue  # settings of an external tower that this config does not use
        raise UnsupportedConfig(f"{where}.{key} is not supported by clus_jax's towers")


def _square(value: Any, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise UnsupportedConfig(f"{key}={list(value)!r}: only square images and patches are supported")
        value = value[0]
    return int(value)


def _mlp_dim(width: int, ratio: float) -> int:
    return int(width * ratio)  # open_clip's ResidualAttentionBlock: mlp_width = int(d_model * mlp_ratio)


def to_model_config(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The clus_jax ``config.model`` entries (a nested dict) of an open_clip model config.

    Raises UnsupportedConfig naming the first key clus_jax cannot express.
    """
    _check_keys(model_cfg, "model_cfg", _TOP_KEYS, {})
    if model_cfg.get("nonscalar_logit_scale") not in (None, False, True):
        raise UnsupportedConfig(f"model_cfg.nonscalar_logit_scale={model_cfg['nonscalar_logit_scale']!r}")
    v, t = dict(model_cfg.get("vision_cfg") or {}), dict(model_cfg.get("text_cfg") or {})
    _check_keys(v, "vision_cfg", _VISION_KEYS, _VISION_FIXED)
    _check_keys(t, "text_cfg", _TEXT_KEYS, _TEXT_FIXED)
    pp = dict(preprocess_cfg or {})
    _check_keys(pp, "preprocess_cfg", _PREPROCESS_KEYS, _PREPROCESS_FIXED)
    if isinstance(v.get("layers", 12), (list, tuple)):
        raise UnsupportedConfig("vision_cfg.layers is a list (a ModifiedResNet image tower); only ViT towers are supported")
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    image_size = _square(v.get("image_size", 224), "vision_cfg.image_size")
    if "size" in pp and _square(pp["size"], "preprocess_cfg.size") != image_size:
        raise UnsupportedConfig(f"preprocess_cfg.size={pp['size']!r} differs from vision_cfg.image_size={image_size}")
    patch = _square(v.get("patch_size", 16), "vision_cfg.patch_size")
    v_width = int(v.get("width", 768))
    head_width = int(v.get("head_width", 64))
    t_width = int(t.get("width", 512))
    bias = model_cfg.get("init_logit_bias")
    return {
        "image": dict(
            image_size=image_size, patch_size=patch, pooling="cls", width=v_width, depth=int(v.get("layers", 12)),
            heads=v_width // head_width, mlp_dim=_mlp_dim(v_width, float(v.get("mlp_ratio", 4.0))), act=act,
            layer_scale_init=float(v.get("ls_init_value") or 0.0), patch_bias=False, ln_pre=not v.get("no_ln_pre", False),
            mean=tuple(float(x) for x in pp.get("mean", OPENAI_MEAN)), std=tuple(float(x) for x in pp.get("std", OPENAI_STD)),
            conv_stem=(),
        ),
        "text": dict(
            context_length=int(t.get("context_length", 77)), vocab_size=int(t.get("vocab_size", 49408)), width=t_width,
            depth=int(t.get("layers", 12)), heads=int(t.get("heads", 8)),
            mlp_dim=_mlp_dim(t_width, float(t.get("mlp_ratio", 4.0))), causal=True, pooling="argmax", act=act,
            layer_scale_init=float(t.get("ls_init_value") or 0.0),
        ),
        "embed_dim": int(model_cfg["embed_dim"]),
        "logit_scale_init": float(model_cfg.get("init_logit_scale", math.log(1 / 0.07))),
        "logit_bias_init": None if bias is None else float(bias),
    }


def apply(config, model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any] | None = None) -> None:
    """Sets ``config.model`` (and the tokenizer: CLIP's BPE) to the architecture of an open_clip model config."""
    from clus_jax.models import sizes

    values = to_model_config(model_cfg, preprocess_cfg)
    for tower, table in (("image", sizes.VIT_SIZES), ("text", sizes.TEXT_SIZES)):
        entries = dict(values[tower])
        dims = tuple(entries[k] for k in ("width", "depth", "heads", "mlp_dim"))
        named = [name for name, d in table.items() if d == dims]  # the named size when one matches
        if named:
            entries["size"] = named[0]
        config.model[tower].update(entries)
    config.model.embed_dim = values["embed_dim"]
    config.model.logit_scale_init = values["logit_scale_init"]
    config.model.logit_bias_init = values["logit_bias_init"]
    config.tokenizer.name = "clip"
    config.tokenizer.path = config.tokenizer.get("path") or ""


def _resolved(model) -> dict[str, dict[str, Any]]:
    """The architecture values of a clus_jax ``config.model`` (named sizes resolved), tower by tower."""
    from clus_jax.models import sizes

    isize = sizes.vit_size(model.image.size)
    image = dict(sizes.resolve(isize, model.image))
    image.update(image_size=int(model.image.image_size), patch_size=int(model.image.get("patch_size") or isize.patch_size),
                 pooling=model.image.get("pooling", "cls"), act=model.image.get("act", "gelu"),
                 layer_scale_init=float(model.image.get("layer_scale_init", 0.0)),
                 patch_bias=bool(model.image.get("patch_bias", True)), ln_pre=bool(model.image.get("ln_pre", True)),
                 mean=tuple(float(x) for x in model.image.get("mean", (0.5,) * 3)),
                 std=tuple(float(x) for x in model.image.get("std", (0.5,) * 3)),
                 conv_stem=tuple(int(c) for c in model.image.get("conv_stem", ())))
    text = dict(sizes.resolve(sizes.text_size(model.text.size), model.text))
    text.update(context_length=int(model.text.context_length), vocab_size=int(model.text.vocab_size),
                causal=bool(model.text.get("causal", True)), pooling=model.text.get("pooling", "eot"),
                act=model.text.get("act", "gelu"), layer_scale_init=float(model.text.get("layer_scale_init", 0.0)))
    return {"image": image, "text": text}


def mismatches(model, model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any] | None = None,
               towers: tuple[str, ...] = ("image", "text")) -> list[str]:
    """``config.model.<tower>.<key>=<value> (the open_clip config's: <value>)`` for every architecture value
    of ``towers`` in which a clus_jax ``config.model`` differs from an open_clip model config.

    The patch bias is left out: a clus_jax tower with one starts from the checkpoint with a zero bias."""
    want = to_model_config(model_cfg, preprocess_cfg)
    have = _resolved(model)
    out = []
    for tower in towers:
        for key, value in want[tower].items():
            if key == "patch_bias":
                continue
            got = have[tower][key]
            same = np.allclose(got, value, rtol=0, atol=1e-7) if key in ("mean", "std") else got == value
            if key == "pooling" and tower == "text" and got == "eot":
                same = True  # the same token as 'argmax' for CLIP's BPE, whose end-of-text id is the largest
            if not same:
                out.append(f"config.model.{tower}.{key}={got!r} (the open_clip config's: {value!r})")
    return out


def _ratio(width: int, mlp_dim: int) -> float:
    """An ``mlp_ratio`` for which open_clip's int(width * ratio) is ``mlp_dim``."""
    ratio = mlp_dim / width
    while int(width * ratio) < mlp_dim:
        ratio = float(np.nextafter(ratio, np.inf))
    return int(ratio) if float(ratio).is_integer() else ratio


def from_run_config(config) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_cfg, preprocess_cfg)`` of a clus_jax run's config; UnsupportedConfig naming the key that
    open_clip's CLIP cannot express (a patch bias is allowed: ``open_clip_weights.fold_patch_bias``)."""
    m = _resolved(config.model)
    image, text = m["image"], m["text"]
    tokenizer = config.get("tokenizer", {}).get("name", "clip")
    problems = [
        (bool(image["conv_stem"]), f"config.model.image.conv_stem={image['conv_stem']!r} (open_clip's ViT patchifies: ())"),
        (image["pooling"] != "cls", f"config.model.image.pooling={image['pooling']!r} (open_clip's ViT pools the class token: 'cls')"),
        (not text["causal"], "config.model.text.causal=False (open_clip's CLIP text tower is causal)"),
        (text["pooling"] not in ("eot", "argmax"), f"config.model.text.pooling={text['pooling']!r} (open_clip pools 'argmax')"),
        (tokenizer != "clip", f"config.tokenizer.name={tokenizer!r} (open_clip's CLIP configs use CLIP's BPE)"),
        (image["act"] != text["act"], f"config.model.image.act={image['act']!r} and config.model.text.act={text['act']!r} "
                                      "differ (open_clip's quick_gelu is one switch for both towers)"),
        (image["width"] % image["heads"] != 0, f"config.model.image: width {image['width']} is not divisible by heads"),
    ]
    for bad, message in problems:
        if bad:
            raise UnsupportedConfig(f"cannot export to open_clip: {message}")
    vision_cfg = dict(image_size=image["image_size"], layers=image["depth"], width=image["width"],
                      head_width=image["width"] // image["heads"], mlp_ratio=_ratio(image["width"], image["mlp_dim"]),
                      patch_size=image["patch_size"])
    if image["layer_scale_init"]:
        vision_cfg["ls_init_value"] = image["layer_scale_init"]
    if not image["ln_pre"]:
        vision_cfg["no_ln_pre"] = True
    text_cfg = dict(context_length=text["context_length"], vocab_size=text["vocab_size"], width=text["width"],
                    heads=text["heads"], layers=text["depth"], mlp_ratio=_ratio(text["width"], text["mlp_dim"]))
    if text["layer_scale_init"]:
        text_cfg["ls_init_value"] = text["layer_scale_init"]
    model_cfg: dict[str, Any] = dict(embed_dim=int(config.model.embed_dim), vision_cfg=vision_cfg, text_cfg=text_cfg)
    if image["act"] == "quick_gelu":
        model_cfg["quick_gelu"] = True
    bias = config.model.get("logit_bias_init")
    if bias is not None:
        model_cfg["init_logit_bias"] = float(bias)
    preprocess_cfg = dict(size=image["image_size"], mean=list(image["mean"]), std=list(image["std"]))
    return model_cfg, preprocess_cfg
