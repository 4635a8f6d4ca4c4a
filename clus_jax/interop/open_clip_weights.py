"""open_clip state dicts <-> clus_jax parameters, tensor by tensor, and reading and writing the files.

Each open_clip tensor maps to one clus_jax parameter by a reshape or transpose, so the two directions are
exact inverses (import -> export -> import is bit-identical):

  visual.conv1.weight [W, 3, p, p]           image/patch_embed/kernel [p*p*3, W] (rows ordered (py, px, rgb))
  visual.class_embedding [W]                 image/cls [1, 1, W]
  visual.positional_embedding [T, W]         image/pos_embed [1, T, W]
  *.attn.in_proj_weight [3W, W] (out, in)    */attn/qkv_kernel [W, 3, heads, head_dim]
  *.attn.out_proj.weight [W, W] (out, in)    */attn/out_kernel [heads, head_dim, W]
  *.mlp.c_fc / c_proj .weight (out, in)      */mlp/fc1 / fc2 /kernel (in, out)
  *.ls_1 / ls_2 .gamma                       */ls1, */ls2
  visual.proj, text_projection [W, E]        image_proj/kernel, text_proj/kernel
  token_embedding.weight, positional_embedding, ln_*, logit_scale, logit_bias: as they are

with ``*`` = ``visual.transformer.resblocks.<i>`` / ``image/encoder/block_<i>`` (text: ``transformer.resblocks.<i>``
/ ``text/encoder/block_<i>``; ``text.`` in front for a ``custom_text`` model). Safetensors files are read and
written without torch; ``.pt`` / ``.bin`` / ``.pth`` files (torch pickles, TorchScript archives such as OpenAI's)
need torch installed. Every tensor becomes float32 (released checkpoints are often float16).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from clus_jax.interop import open_clip_config

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")
WEIGHTS_FILE = "open_clip_model.safetensors"  # the name open_clip's local-dir / hub loader prefers
# Non-parameter entries some state dicts carry (causal-mask buffers, TorchScript metadata).
_IGNORED = ("attn_mask", "visual.attn_mask", "text.attn_mask", "input_resolution", "context_length", "vocab_size")

Rule = tuple[str, tuple[str, ...], Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def rules(model_cfg: Mapping[str, Any]) -> list[Rule]:
    """(open_clip key, clus_jax parameter path, to clus_jax, to open_clip) for every tensor of the model."""
    m = open_clip_config.to_model_config(model_cfg)
    image, text = m["image"], m["text"]
    w, p = image["width"], image["patch_size"]
    table: list[Rule] = [
        ("visual.conv1.weight", ("image", "patch_embed", "kernel"),
         lambda x: x.transpose(2, 3, 1, 0).reshape(p * p * 3, w), lambda k: k.reshape(p, p, 3, w).transpose(3, 2, 0, 1)),
        ("visual.class_embedding", ("image", "cls"), lambda x: x.reshape(1, 1, w), lambda k: k.reshape(w)),
        ("visual.positional_embedding", ("image", "pos_embed"), lambda x: x[None], lambda k: k[0]),
        ("visual.ln_post.weight", ("image", "ln_post", "scale"), _same, _same),
        ("visual.ln_post.bias", ("image", "ln_post", "bias"), _same, _same),
        ("visual.proj", ("image_proj", "kernel"), _same, _same),
    ]
    if image["ln_pre"]:
        table += [("visual.ln_pre.weight", ("image", "ln_pre", "scale"), _same, _same),
                  ("visual.ln_pre.bias", ("image", "ln_pre", "bias"), _same, _same)]
    table += _block_rules("visual.transformer.resblocks", ("image", "encoder"), image)
    t = "text." if model_cfg.get("custom_text") else ""
    table += [
        (t + "token_embedding.weight", ("text", "token_embed"), _same, _same),
        (t + "positional_embedding", ("text", "pos_embed"), _same, _same),
        (t + "ln_final.weight", ("text", "ln_final", "scale"), _same, _same),
        (t + "ln_final.bias", ("text", "ln_final", "bias"), _same, _same),
        (t + "text_projection", ("text_proj", "kernel"), _same, _same),
    ]
    table += _block_rules(t + "transformer.resblocks", ("text", "encoder"), text)
    scale_shape = (1,) if model_cfg.get("nonscalar_logit_scale") else ()
    table.append(("logit_scale", ("logit_scale",), lambda x: x.reshape(()), lambda k: k.reshape(scale_shape)))
    if m["logit_bias_init"] is not None:
        table.append(("logit_bias", ("logit_bias",), lambda x: x.reshape(()), lambda k: k.reshape(scale_shape)))
    return table


def _block_rules(prefix: str, path: tuple[str, ...], tower: Mapping[str, Any]) -> list[Rule]:
    w, h = tower["width"], tower["heads"]
    table: list[Rule] = []
    for i in range(tower["depth"]):
        o, c = f"{prefix}.{i}.", path + (f"block_{i}",)
        table += [
            (o + "ln_1.weight", c + ("ln1", "scale"), _same, _same),
            (o + "ln_1.bias", c + ("ln1", "bias"), _same, _same),
            (o + "attn.in_proj_weight", c + ("attn", "qkv_kernel"),
             lambda x: x.T.reshape(w, 3, h, w // h), lambda k: k.reshape(w, 3 * w).T),
            (o + "attn.in_proj_bias", c + ("attn", "qkv_bias"), lambda x: x.reshape(3, h, w // h), lambda k: k.reshape(3 * w)),
            (o + "attn.out_proj.weight", c + ("attn", "out_kernel"),
             lambda x: x.T.reshape(h, w // h, w), lambda k: k.reshape(w, w).T),
            (o + "attn.out_proj.bias", c + ("attn", "out_bias"), _same, _same),
            (o + "ln_2.weight", c + ("ln2", "scale"), _same, _same),
            (o + "ln_2.bias", c + ("ln2", "bias"), _same, _same),
            (o + "mlp.c_fc.weight", c + ("mlp", "fc1", "kernel"), lambda x: x.T, lambda k: k.T),
            (o + "mlp.c_fc.bias", c + ("mlp", "fc1", "bias"), _same, _same),
            (o + "mlp.c_proj.weight", c + ("mlp", "fc2", "kernel"), lambda x: x.T, lambda k: k.T),
            (o + "mlp.c_proj.bias", c + ("mlp", "fc2", "bias"), _same, _same),
        ]
        if tower["layer_scale_init"]:
            table += [(o + "ls_1.gamma", c + ("ls1",), _same, _same), (o + "ls_2.gamma", c + ("ls2",), _same, _same)]
    return table


def to_params(state_dict: Mapping[str, np.ndarray], model_cfg: Mapping[str, Any],
              expected: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """The clus_jax parameters (nested dict of float32 NumPy arrays) of an open_clip state dict.

    ``expected``: the clus_jax model's parameter shapes by path (``image/cls``, ...), to check each tensor
    against. Raises ValueError naming the missing tensors, the ones this config does not have, or a tensor
    whose shape is not the one the config gives.
    """
    table = rules(model_cfg)
    known = {r[0] for r in table}
    missing = [r[0] for r in table if r[0] not in state_dict]
    extra = sorted(k for k in state_dict if k not in known and k not in _IGNORED)
    if missing or extra:
        raise ValueError("the state dict does not match the open_clip model config: "
                         + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "")
                         + ("; " if missing and extra else "")
                         + (f"not in the config {extra[:5]}{' ...' if len(extra) > 5 else ''}" if extra else ""))
    params: dict[str, Any] = {}
    for key, path, forward, backward in table:
        tensor = np.asarray(state_dict[key], np.float32)
        if expected is not None:
            want = jax.eval_shape(backward, jax.ShapeDtypeStruct(tuple(expected["/".join(path)]), np.float32)).shape
            if tensor.shape != want:
                raise ValueError(f"{key} has shape {tensor.shape}; the open_clip model config gives {want}")
        value = forward(tensor)
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.array(value, np.float32, order="C")  # (ascontiguousarray makes 0-d 1-d)
    return params


def from_params(params: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The open_clip state dict (float32, contiguous) of clus_jax parameters shaped for ``model_cfg``."""
    out = {}
    for key, path, _, backward in rules(model_cfg):
        node = params
        for name in path:
            if name not in node:
                raise ValueError(f"the parameters have no {'/'.join(path)}, which open_clip's {key} needs")
            node = node[name]
        out[key] = np.array(backward(np.asarray(node, np.float32)), order="C")
    return out


def fold_patch_bias(params: Mapping[str, Any]) -> dict[str, Any]:
    """The same function without a patch-embedding bias: the bias added to every patch token moves into
    the patch positions of ``pos_embed`` (open_clip's conv1 has no bias; the class token has no patch)."""
    image = dict(params["image"])
    patch = dict(image["patch_embed"])
    bias = np.asarray(patch.pop("bias"), np.float32)
    pos = np.array(image["pos_embed"], np.float32)
    pos[:, 1:] += bias
    image.update(patch_embed=patch, pos_embed=pos)
    return {**params, "image": image}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """An open_clip state dict from ``.safetensors`` (no torch needed) or a torch ``.pt``/``.bin``/``.pth``
    file (a state dict, a training checkpoint with ``state_dict``, or a TorchScript archive)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no open_clip weights file at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        state = load_file(path)
    else:
        state = _read_torch(path)
    if state and next(iter(state)).startswith("module."):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path!r} is a PyTorch file: reading it needs torch installed "
                          "(or convert it to .safetensors, which needs none)") from None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError:  # a TorchScript archive (OpenAI's released .pt files)
        checkpoint = torch.jit.load(path, map_location="cpu").state_dict()
    if not isinstance(checkpoint, Mapping) and hasattr(checkpoint, "state_dict"):  # torch.load gave a ScriptModule
        checkpoint = checkpoint.state_dict()
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    return {k: v.detach().float().numpy() for k, v in checkpoint.items() if hasattr(v, "detach")}


def write_safetensors(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.array(v, order="C") for k, v in state_dict.items()}, os.fspath(path))
