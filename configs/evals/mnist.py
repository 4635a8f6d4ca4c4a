"""An evaluation suite of one entry: zero-shot MNIST with CLIP_benchmark's class names and prompt templates
(``prompts='clip_benchmark:mnist'``), on any copy of MNIST's test set the evaluators read.

Command (a run's workdir; an open_clip checkpoint the same way with --out DIR):
  python -m clus_jax.evaluate /tmp/clus_jax/clip --evals configs/evals/mnist.py
  python -m clus_jax.evaluate /tmp/clus_jax/clip --evals configs/evals/mnist.py:wds:/data/wds_mnist --out /tmp/mnist

Expected result: ``benchmarks/mnist.json`` with CLIP_benchmark's keys (task ``zeroshot_classification``, metrics
``acc1``, ``acc5``, ``mean_per_class_recall``) and ``zeroshot/mnist/top1`` in the printed line.

Argument (``--evals configs/evals/mnist.py:REF``): the data reference (``clus_jax.data.eval_data``), e.g.
``wds:/data/wds_mnist`` (CLIP_benchmark's WebDataset layout), ``tfds:mnist:test``; default
``folder:~/data/mnist/test`` (one sub-folder per digit, in order).
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    data = arg or "folder:~/data/mnist/test"
    return ml_collections.ConfigDict(dict(mnist=dict(type="zeroshot", data=data, prompts="clip_benchmark:mnist")))
