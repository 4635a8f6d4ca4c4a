"""Clustering on the device mesh: k-means up to a million centres, top-l assignment, balanced and
two-level clustering, and the quality figures of a clustering. Depends on ``clus_jax.common``,
``clus_jax.parallel`` and ``clus_jax.data`` only (nothing of the objectives).

API (``from clus_jax import clustering``):

``kmeans(points, k, *, num_iters=20, metric="euclidean", init="random", seed=0, mesh=None, tol=None,
balanced=False, checkpoint_dir=None, progress=None) -> KMeansResult(centers, assignments, inertia, sizes,
num_iters_run)``
    Lloyd's algorithm, squared-euclidean or cosine (spherical: unit centres, nearest = largest dot product).
    ``points`` is an array [N, D] or an ``EmbeddingShards`` (any re-iterable of [n_i, D] arrays), streamed one
    pass per iteration. ``init``: ``"random"`` (k distinct points), ``"kmeans++"``, or an array [k, D] of
    initial centres. ``tol`` stops when the relative inertia change falls below it. Empty clusters are
    re-seeded from the largest clusters (faiss-style split). ``balanced=True`` assigns with exact sizes N/k
    (``balanced_assign``) while estimating centres. ``checkpoint_dir`` saves (centres, iteration, pass
    position, partial sums) with orbax and resumes from there. ``progress(iteration, pass_fraction,
    inertia)`` is called as a pass advances. ``mesh``: points over the data axes (``data``, ``fsdp``), centres
    over the remaining ones; the assignment is a blocked matmul with a running top-1, so no [N, K] array is
    ever formed, and the update is a segment sum reduced over the data axes, in float32. Tuning keywords:
    ``block_k`` (centres scored at a time per device), ``chunk_rows`` (points per step),
    ``checkpoint_every_s`` (seconds between saves within a pass). ``balanced=True`` holds the points in
    memory and assigns with ``balanced_assign_points`` on the same mesh, checkpointing at iteration ends.

``assign(features, centers, metric="euclidean", *, mesh=None) -> ids [N]``
``assign_topk(features, centers, l, metric="euclidean", *, mesh=None) -> (ids [N, l], sims [N, l])``
    Nearest centre(s), best first. ``sims`` are similarities: the dot product with unit centres for
    ``"cosine"``, minus the squared distance for ``"euclidean"``.

``balanced_assign(cost [N, M]) -> ids [N]``
    Every column receives exactly N / M rows at minimal total cost (auction algorithm, ε-optimal with ε
    below the cost resolution).
``balanced_assign_points(points [N, D], centers [M, D], *, metric="euclidean", mesh=None, candidates=48) -> ids``
    The same for squared distances with no [N, M] array: each point's ``candidates`` best centres by
    distance and price are searched on the mesh as ``assign`` does, and searched again when prices have
    moved past them; the auction runs on the host (numba).

``two_level(points, m, n, *, balanced=False, metric="euclidean", num_iters=20, coarse_iters=None, init="random",
seed=0, mesh=None, checkpoint_dir=None, progress=None) -> TwoLevelResult(fine_centers, coarse_centers,
fine_to_coarse, fine_assignments)``
    MoDE's hierarchy: k-means into m fine centres, then the fine centres into n coarse ones.

``EmbeddingShards(directory, field=None)``: the valid rows of one field (``image_emb``, ``text_emb``) of the
shards written by ``python -m clus_jax.embed``, one shard at a time (re-iterable; ``record_indices()`` maps
rows back to records).

``quality``: ``nmi``, ``adjusted_rand_index``, ``purity``, ``inertia``, ``cluster_sizes``.

MoDE (``mode_ensemble``, MetaCLIP's rules): ``fine_assignment`` / ``coarse_assignment`` (nearest centre),
``expert_membership`` (each expert's records plus a seeded out-of-cluster share), ``mode_ensemble_weights``
(expert weights from a task's class embeddings), ``retrieval_weights`` (per query), ``ensemble_logits``.

What the stages write (``python -m clus_jax.cluster`` and ``experts``): ``outputs`` (the files of a clustering
output, written with its summary last), ``topk_labels`` (the top-l labels side file MLCD trains on),
``expert_subsets`` (MoDE's subset index per expert) and ``figures`` (cluster sizes and inertia for the summary).
"""
from clus_jax.clustering import quality
from clus_jax.clustering.assign import assign, assign_topk
from clus_jax.clustering.balanced import balanced_assign, balanced_assign_points
from clus_jax.clustering.hierarchy import TwoLevelResult, two_level
from clus_jax.clustering.kmeans import KMeansResult, kmeans
from clus_jax.clustering.mode_ensemble import (coarse_assignment, ensemble_logits, expert_membership,
                                               fine_assignment, mode_ensemble_weights, retrieval_weights)
from clus_jax.clustering.shards import EmbeddingShards

__all__ = ["EmbeddingShards", "KMeansResult", "TwoLevelResult", "assign", "assign_topk", "balanced_assign",
           "balanced_assign_points",
           "coarse_assignment", "ensemble_logits", "expert_membership", "fine_assignment", "kmeans",
           "mode_ensemble_weights", "quality", "retrieval_weights", "two_level"]
