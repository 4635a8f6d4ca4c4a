"""What an image tower can learn of easy-VQA's 24 classes in a budget, trained with the labels.

The default CLIP run gets colour right and shape barely. This separates the two possible causes: a tower
that cannot represent the shapes (low accuracy here too) from an objective that does not teach them
(high here, low zero-shot there). Each variant is the default config's image tower with some
``config.model.image`` keys changed, a linear head on its pooled feature, softmax cross-entropy on the
labelled easy-VQA training images (the training run's random crops), AdamW with the default run's warm-up
and cosine schedule, then top-1 on the easy-VQA test images (centre view).

    python bench/supervised_ceiling.py                       # the variants below, 400 steps of 64
    python bench/supervised_ceiling.py --steps 800 --variants default,patch8
    python bench/supervised_ceiling.py --quick               # 3 steps, the smoke test's run

Prints one Markdown row and one JSON record per variant: test top-1, shape-only top-1 (the colour is right in nearly all of them),
image-tower forward GFLOPs per image and the seconds it took (not a benchmark: a cost hint).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# name -> config.model.image overrides on the default config (32 px, 4-pixel patches over a (32, 64) stem).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "patch8": {"patch_size": 8, "conv_stem": ()},  # the earlier default: 4x4 tokens of 8x8 pixels
    "patch4": {"patch_size": 4, "conv_stem": ()},
    "patch8_stem3": {"patch_size": 8, "conv_stem": (24, 48, 96)},
    "64px_patch8": {"image_size": 64, "patch_size": 8, "conv_stem": ()},
}


@functools.lru_cache(maxsize=1)
def labelled_train_records() -> tuple[dict[str, Any], ...]:
    """The labelled easy-VQA training records of the embedded dataset (built if needed), read once."""
    from clus_jax.data import embedded

    path = embedded.build_embedded_dataset()
    return tuple(r for r in embedded.read_split(path, "train") if r["style"] == "easyvqa" and r["label"] >= 0)


def run_variant(name: str, overrides: dict[str, Any], steps: int, batch: int, lr: float, seed: int) -> dict[str, Any]:
    """Trains the variant's image tower + a linear head on the labels; returns its row of the table."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from clus_jax.config import base as config_base
    from clus_jax.models import flops
    from clus_jax.data import embedded_eval, transforms
    from clus_jax.data.eval_sets import ClassificationSet
    from clus_jax.models.towers import build_model

    config = config_base.load_config(os.path.join(REPO_ROOT, "configs", "clip.py"))
    config.model.image.update(overrides)
    size = int(config.model.image.image_size)
    tower = build_model(config.model).image
    train = labelled_train_records()
    # The evaluation's own easy-VQA test set at this size (centre crops, cached per size).
    test_set = next(s for s in embedded_eval.load_eval_sets(image_size=size)
                    if isinstance(s, ClassificationSet) and s.name == "easyvqa")
    names, test_x, test_y = list(test_set.classnames), test_set.images, np.asarray(test_set.labels)
    shape_of = np.asarray([n.split()[-1] for n in names])
    augment = transforms.TrainTransform(image_size=size, min_crop_scale=float(config.data.min_crop_scale), seed=seed)

    class Classifier(nn.Module):
        image: nn.Module

        @nn.compact
        def __call__(self, images):
            return nn.Dense(len(names))(self.image(images))

    model = Classifier(image=tower)
    params = nn.meta.unbox(model.init(jax.random.key(seed), test_x[:2]))
    warmup = min(int(config.optim.warmup_steps), max(steps // 10, 1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
    opt = optax.adamw(schedule, b1=float(config.optim.b1), b2=float(config.optim.b2),
                      weight_decay=float(config.optim.weight_decay))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(lambda p, x: jnp.argmax(model.apply(p, x), -1))
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for i in range(steps):
        idx = rng.integers(len(train), size=batch)
        x = np.stack([augment.augment(train[j]["image"], epoch=i, index=int(j)) for j in idx])
        y = np.asarray([train[j]["label"] for j in idx])
        params, opt_state, loss = step(params, opt_state, x, y)
    pred = np.concatenate([np.asarray(predict(params, test_x[i:i + 256])) for i in range(0, len(test_x), 256)])
    seconds = time.perf_counter() - start
    parts = flops.forward_flops_per_example(config.model)
    image_gflops = sum(v for k, v in parts.items() if k.startswith("image_")) / 1e9
    return dict(variant=name, overrides=overrides, top1=float((pred == test_y).mean()),
                shape_top1=float((shape_of[pred] == shape_of[test_y]).mean()), final_loss=float(loss),
                image_gflops=image_gflops, seconds=seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {sorted(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 steps of 8 on two variants (the smoke test)")
    args = parser.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    if args.quick:
        names, args.steps, args.batch = ["patch8", "default"], 3, 8
    print(f"easy-VQA supervised ceiling: {args.steps} steps of {args.batch}, lr {args.lr}, seed {args.seed}")
    print("| variant | config.model.image | test top-1 | shape top-1 | image GFLOPs | seconds |")
    print("|---|---|---|---|---|---|")
    for name in names:
        r = run_variant(name, VARIANTS[name], args.steps, args.batch, args.lr, args.seed)
        keys = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(default)"
        print(f"| {name} | {keys} | {r['top1']:.3f} | {r['shape_top1']:.3f} | {r['image_gflops']:.4f} | "
              f"{r['seconds']:.0f} |")
        print(json.dumps({**r, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                             for k, v in r["overrides"].items()}}), flush=True)


if __name__ == "__main__":
    main()
