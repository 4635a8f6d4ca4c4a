"""An evaluation suite on generated coloured shapes (``synthetic:`` data, no files, no download): retrieval, k-NN,
few-shot linear probe and cluster quality. Cheap and runnable anywhere: the example of a suite and a check that
the evaluation pipeline works, not a benchmark (``synthetic:M`` starts with ``synthetic:N``'s images, so the
k-NN memory and the few-shot draws hold the scored images too).

Command (a run's workdir, or an open_clip checkpoint into --out):
  python -m clus_jax.evaluate /tmp/clus_jax/clip --evals configs/evals/shapes.py
  python -m clus_jax.evaluate OPEN_CLIP_DIR --evals configs/evals/shapes.py:400 --out /tmp/clus_jax/shapes_eval

Expected result: one ``benchmarks/<entry>.json`` per entry (retrieval, knn, fewshot, clusters) with
CLIP_benchmark's keys, and the metrics ``retrieval/shapes_retrieval/i2t_r1``, ``knn/shapes_knn/top1``,
``fewshot/shapes_fewshot/5shot``, ``cluster/shapes_clusters/kmeans_nmi``, ... in the printed line.

Argument (``--evals configs/evals/shapes.py:N``): N images scored (default 200); the k-NN memory and the
few-shot draws read 2N.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    try:
        n = int(arg or 200)
    except ValueError:
        raise ValueError(f"the argument is a number of images, not {arg!r}") from None
    if n < 1:
        raise ValueError(f"the argument is a number of images >= 1, not {n}")
    data, train = f"synthetic:{n}", f"synthetic:{2 * n}"
    return ml_collections.ConfigDict(dict(
        shapes_retrieval=dict(type="retrieval", data=data),
        shapes_knn=dict(type="knn", data=data, train_data=train, k=10),
        shapes_fewshot=dict(type="fewshot", data=data, train_data=train, shots=(1, 5), seeds=2),
        shapes_clusters=dict(type="clusters", data=data),
    ))
