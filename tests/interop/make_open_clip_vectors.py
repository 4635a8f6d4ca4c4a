"""Makes the open_clip test vectors of tests/test_interop.py: random-weight open_clip models, their files and
their outputs, computed by open_clip itself in PyTorch.

Runs in a separate environment with PyTorch and open_clip (never clus_jax's)::

  python -m venv /tmp/ocvenv
  /tmp/ocvenv/bin/pip install torch==2.13.0 ftfy regex numpy safetensors
  /tmp/ocvenv/bin/pip install --no-deps open-clip-torch==3.3.0
  /tmp/ocvenv/bin/python tests/interop/make_open_clip_vectors.py            # rewrites tests/interop/vectors/

Each case folder holds the weights (``open_clip_model.safetensors``), the open_clip model config, and
``io.npz``: the inputs (uint8 images at the model resolution; strings, or token ids) and open_clip's
outputs (``encode_image`` / ``encode_text`` with ``normalize=True``, ``logit_scale``), all float32. The
cases together cover every option of ``clus_jax.interop.open_clip_config`` (see ``CASES``); every
parameter is perturbed away from its initial value so that a swapped or mistransposed tensor shows. Kept
small (about 1.8 MB): the full-vocabulary case has a 12-wide text tower and float16 weights.

Other modes (used by the live test, tests/test_interop.py::test_live_*):
  --case ViT-B-32 --out DIR     the same for one of open_clip's own model configs (float32 weights)
  --check-export DIR            loads DIR (written by clus_jax.interop.save_open_clip) into open_clip's CLIP
                                strictly and writes its embeddings of DIR/inputs.npz to DIR/open_clip_out.npz

open_clip's package ``__init__`` imports torchvision (transforms only), which the CPU torch wheel does not
bring; the model, tokenizer and config modules are imported without it (as bench/vs_open_clip.py does).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.join(HERE, "vectors")
TEXTS = ["a red circle", "a photo of a dog!", "It’s   <b>two</b> cats", "",
         "a very long caption that goes on and on well past the sixteen tokens of this context length"]

CASES = {
    # QuickGELU in both towers, layer scale in the image tower, head_width, the full CLIP vocabulary (strings
    # through the real tokenizer, one cut at the context length), float16 weights, a model_configs/-style JSON.
    "quickgelu": dict(
        model_cfg={"embed_dim": 16, "quick_gelu": True,
                   "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8,
                                  "ls_init_value": 0.1},
                   "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 12, "heads": 2, "layers": 2}},
        preprocess_cfg=None, dtype="float16", texts=TEXTS, seed=0),
    # Exact GELU, no ln_pre, LayerNorm after pooling, mlp_ratio 3.5 / 2.5, text layer scale, a custom_text
    # model (text tower under 'text.'), a [1]-shaped logit scale and a logit bias, SigLIP-style pixel mean and
    # std from preprocess_cfg (the open_clip_config.json layout), float32 weights, and token ids whose
    # largest id is not always the last non-padding token (argmax pooling: the first largest).
    "options": dict(
        model_cfg={"embed_dim": 24, "init_logit_bias": -10.0, "nonscalar_logit_scale": True, "custom_text": True,
                   "vision_cfg": {"image_size": 24, "layers": 3, "width": 48, "head_width": 12, "mlp_ratio": 3.5,
                                  "patch_size": 6, "no_ln_pre": True, "final_ln_after_pool": True},
                   "text_cfg": {"context_length": 12, "vocab_size": 1000, "width": 32, "heads": 4, "layers": 2,
                                "mlp_ratio": 2.5, "ls_init_value": 0.5}},
        preprocess_cfg={"size": 24, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                        "resize_mode": "shortest"},
        dtype="float32", texts=None, seed=1),
}


def import_open_clip():
    """open_clip's model, tokenizer and constants modules without its package ``__init__`` (torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise SystemExit("open_clip is not installed in this environment (see the module docstring)")
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        tv, ops, misc = (types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc"))

        class FrozenBatchNorm2d:  # referenced by open_clip.utils, used only by ResNet towers
            def __init__(self, *args, **kwargs):
                raise NotImplementedError("torchvision is not available")

        misc.FrozenBatchNorm2d = FrozenBatchNorm2d
        tv.ops, ops.misc = ops, misc
        sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc})
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["open_clip"] = package
    import open_clip.constants
    import open_clip.model
    import open_clip.tokenizer

    return open_clip


def build(open_clip, model_cfg):
    cfg = dict(model_cfg)
    cls = open_clip.model.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.model.CLIP
    return cls(**cfg).eval()


def perturb(model, seed: int) -> None:
    """Every parameter moved off its initial value (LayerNorm scales off 1, biases off 0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            spread = 0.1 if p.ndim == 1 or name.endswith(("embedding", "logit_scale", "logit_bias")) else 0.02
            p.add_(spread * torch.randn(p.shape, generator=gen))


def encode(open_clip, model, images: np.ndarray, tokens: np.ndarray, mean, std) -> dict[str, np.ndarray]:
    """open_clip's normalised embeddings: pixels as ToTensor + Normalize give them, tokens as they are."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        image_emb = model.encode_image(x, normalize=True)
        text_emb = model.encode_text(torch.from_numpy(tokens).long(), normalize=True)
    return {"image_emb": image_emb.numpy().astype(np.float32), "text_emb": text_emb.numpy().astype(np.float32),
            "logit_scale": model.logit_scale.detach().numpy().astype(np.float32)}


def token_ids(rng: np.random.Generator, vocab: int, context: int) -> np.ndarray:
    """Rows of ids in [0, vocab - 2] with the largest id (vocab - 1) as end token, zero padding after it;
    row 1 has a 0 inside its text, row 2 fills the context, row 3 has the largest id twice."""
    rows = np.zeros((5, context), np.int32)
    for i, length in enumerate([4, 7, context, 9, 2]):
        rows[i, :length] = rng.integers(1, vocab - 1, length)
        rows[i, length - 1] = vocab - 1
    rows[1, 2] = 0
    rows[3, 3] = vocab - 1
    return rows


def make_case(open_clip, name: str, spec: dict, out_dir: str) -> None:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(spec["seed"])
    model_cfg, preprocess_cfg = spec["model_cfg"], spec["preprocess_cfg"]
    model = build(open_clip, model_cfg)
    perturb(model, spec["seed"])
    state = {k: v.detach().to(getattr(torch, spec["dtype"])).contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in state.items()})  # outputs of exactly the saved weights
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, "open_clip_model.safetensors"))
    if preprocess_cfg is None:
        with open(os.path.join(out_dir, "model_config.json"), "w") as f:
            json.dump(model_cfg, f, indent=2)
        mean, std = open_clip.constants.OPENAI_DATASET_MEAN, open_clip.constants.OPENAI_DATASET_STD
    else:
        with open(os.path.join(out_dir, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, f, indent=2)
        mean, std = preprocess_cfg["mean"], preprocess_cfg["std"]
    rng = np.random.default_rng(spec["seed"])
    size = model_cfg["vision_cfg"]["image_size"]
    images = rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    text_cfg = model_cfg["text_cfg"]
    io = {"images": images}
    if spec["texts"] is not None:
        tokens = open_clip.tokenizer.tokenize(spec["texts"], context_length=text_cfg["context_length"]).numpy()
        io["texts"] = np.array(spec["texts"])
    else:
        tokens = token_ids(rng, text_cfg["vocab_size"], text_cfg["context_length"])
    io["tokens"] = tokens.astype(np.int32)
    io.update(encode(open_clip, model, images, tokens, mean, std))
    np.savez(os.path.join(out_dir, "io.npz"), **io)
    print(f"{name}: {out_dir} ({sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))} bytes)")


def builtin_case(open_clip, name: str) -> dict:
    """A case for one of open_clip's model_configs/*.json (random weights, float32, strings)."""
    path = os.path.join(os.path.dirname(open_clip.model.__file__), "model_configs", name + ".json")
    with open(path) as f:
        model_cfg = json.load(f)
    return dict(model_cfg=model_cfg, preprocess_cfg=None, dtype="float32", texts=TEXTS[:3], seed=2)


def check_export(open_clip, folder: str) -> None:
    """Loads an exported folder into open_clip strictly and writes its embeddings of inputs.npz."""
    import torch
    from safetensors.torch import load_file

    with open(os.path.join(folder, "open_clip_config.json")) as f:
        files = json.load(f)
    model = build(open_clip, files["model_cfg"])
    model.load_state_dict(load_file(os.path.join(folder, "open_clip_model.safetensors")), strict=True)
    inputs = np.load(os.path.join(folder, "inputs.npz"))
    pp = files["preprocess_cfg"]
    out = encode(open_clip, model, inputs["images"], inputs["tokens"], pp["mean"], pp["std"])
    np.savez(os.path.join(folder, "open_clip_out.npz"), **out)
    print(f"loaded {folder} strictly into open_clip's {type(model).__name__}")
    del torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", help="one of open_clip's model configs (e.g. ViT-B-32) instead of CASES")
    parser.add_argument("--out", help="output folder (default: tests/interop/vectors/<case>)")
    parser.add_argument("--check-export", metavar="DIR")
    args = parser.parse_args()
    open_clip = import_open_clip()
    if args.check_export:
        check_export(open_clip, args.check_export)
    elif args.case:
        make_case(open_clip, args.case, builtin_case(open_clip, args.case), args.out or os.path.join(VECTORS, args.case))
    else:
        for name, spec in CASES.items():
            make_case(open_clip, name, spec, os.path.join(VECTORS, name))


if __name__ == "__main__":
    main()
