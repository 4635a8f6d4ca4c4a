"""ImageNet zero-shot, ImageNet-v2 zero-shot and COCO retrieval: what a pre-training run tracks first.

Data, prepared once by the user (nothing here downloads it):
  * TFDS's ``imagenet2012`` (validation, 50,000 images) and ``imagenet_v2/matched-frequency`` (test, 10,000),
    prepared under ``data_dir`` (``tfds build imagenet2012 --data_dir ...`` with the manual download); read with
    ``tfds.data_source``, no TensorFlow;
  * COCO captions in CLIP_benchmark's WebDataset layout (the 5,000-image Karpathy test split with about 5
    captions each, e.g. ``huggingface-cli download --repo-type dataset clip-benchmark/wds_mscoco_captions
    --local-dir /data/wds_mscoco_captions``).
Class names and the 80 templates are CLIP_benchmark's ``imagenet1k`` set, read from its package at run time.

After training (CLIP_benchmark-style JSON per dataset under ``<workdir>/eval/step_<S>/benchmarks/``):
  python -m clus_jax.evaluate /tmp/clus_jax/clip \\
      --evals configs/evals/imagenet.py:data_dir=/data/tfds,coco=/data/wds_mscoco_captions

During training, add the same entries to the training config (README, "Evaluation on standard benchmarks"):
``config.evals.update(imagenet.entries(...))`` is what these lines amount to.

Arguments (``key=value``, comma-separated): ``data_dir`` (TFDS data dir; default TFDS's own), ``coco`` (the
WebDataset folder; omit to leave COCO out), ``every`` (steps between runs during training; default 5000),
``limit`` (score only the first N images of each set; default all).
"""
import ml_collections


def entries(data_dir: str = "", coco: str = "", every: int = 5000, limit: int = 0) -> dict:
    """The evaluator entries, by name."""
    imagenet = dict(type="zeroshot", prompts="clip_benchmark:imagenet1k", data_dir=data_dir, every=every,
                    limit=limit)
    out = {"imagenet": dict(imagenet, data="tfds:imagenet2012:validation"),
           "imagenet_v2": dict(imagenet, data="tfds:imagenet_v2/matched-frequency:test")}
    if coco:
        out["coco"] = dict(type="retrieval", data=f"wds:{coco}", every=every, limit=limit)
    return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    kwargs = {}
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in ("data_dir", "coco", "every", "limit"):
            raise ValueError(f"arguments are data_dir=, coco=, every= and limit=, comma-separated; got {part!r}")
        kwargs[key] = int(value) if key in ("every", "limit") else value
    return ml_collections.ConfigDict(entries(**kwargs))
