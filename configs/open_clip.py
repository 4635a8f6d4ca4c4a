"""Fine-tuning, or a LiT stage, from an open_clip checkpoint file (clus_jax.interop), with CLIP's loss.

The model is the checkpoint's architecture, set from its open_clip model config (``clus_jax.interop.run_config``:
widths, depths, QuickGELU, layer scale, pixel mean and std, CLIP's tokenizer and context length), and
``init_from`` loads its weights inside the sharded init, on any mesh.

Commands (a tiny random-weight checkpoint from the test vectors stands in for a released one here; with
ViT-B-32 weights the same command runs a ViT-B/32 at 224 px, so give it a GPU or TPU mesh):
  python -m clus_jax.train --config configs/open_clip.py:weights=tests/interop/vectors/quickgelu/open_clip_model.safetensors,model_config=tests/interop/vectors/quickgelu/model_config.json \\
      --workdir /tmp/clus_jax/oc_finetune
  python -m clus_jax.train --config configs/open_clip.py:weights=ViT-B-32.safetensors,model_config=ViT-B-32.json,lit \\
      --workdir /tmp/clus_jax/oc_lit

Expected result: at step 0 the run's embeddings are the checkpoint's (``clus_jax.interop.load_open_clip``
gives the same), and the loss falls from there. With ``lit`` the image tower and its projection stay
bit-identical to the checkpoint's for the whole run.

Arguments (``--config configs/open_clip.py:ARGS``):
  weights=PATH       a .safetensors file (no torch needed), a .pt/.bin/.pth file (needs torch), or a folder with
                     open_clip_config.json and the weights (open_clip's hub / local-dir layout) (required)
  model_config=PATH  the open_clip model config (e.g. open_clip's model_configs/ViT-B-32.json); not needed for a folder
  lit                load only the image tower and its projection, and freeze them; the text tower starts fresh
  lr=X               peak learning rate (default 1e-5 for fine-tuning, 1e-3 for LiT)
  steps=, batch=, synthetic   as in configs/clip.py
"""
from clus_jax.config import base as common
from clus_jax.interop import open_clip

IMAGE_TOWER = r"^image(_proj)?/"


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, weights="", model_config="", lit=False, lr=0.0, steps=0, batch=0, synthetic=False)
    config = common.base_config()
    config.objectives = {"clip": 1.0}
    if a.weights:
        _, model_cfg, preprocess_cfg = open_clip.resolve(a.weights, a.model_config or None)
        open_clip.run_config(model_cfg, preprocess_cfg, base=config)
    config.init_from.path = a.weights
    config.init_from.open_clip_config = a.model_config
    config.optim.lr = a.lr or (1e-3 if a.lit else 1e-5)
    config.param_groups = []  # trained towers: both at the one fine-tuning rate, not the from-scratch default
    if a.lit:
        config.init_from.include = IMAGE_TOWER
        config.param_groups = [(IMAGE_TOWER, {"frozen": True})]
    common.apply_args(config, a)
    return config
