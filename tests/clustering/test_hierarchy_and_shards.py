"""two_level: fine k-means, coarse k-means of the fine centres, the fine->coarse map; EmbeddingShards reads
the valid rows of an embed output directory and kmeans over it equals kmeans over the array."""
import numpy as np
import pytest

from clus_jax.clustering import EmbeddingShards, kmeans, two_level
from clus_jax.data.side_fields import write_side_file

import kmeans_reference


@pytest.mark.slow
def test_two_level_maps_fine_centres_to_their_nearest_coarse_centre():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 5)).astype(np.float32)
    result = two_level(x, 12, 4, balanced=True, num_iters=3)
    assert result.fine_centers.shape == (12, 5) and result.coarse_centers.shape == (4, 5)
    np.testing.assert_array_equal(np.bincount(result.fine_assignments, minlength=12), np.full(12, 8))
    np.testing.assert_array_equal(result.fine_to_coarse,
                                  kmeans_reference.nearest(result.fine_centers, result.coarse_centers, "euclidean"))
    assert set(result.fine_to_coarse) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="1 <= n <= m"):
        two_level(x, 4, 5)


def test_a_balanced_coarse_level_gives_every_coarse_centre_as_many_fine_centres():
    """Twelve tight groups of 8 points, nine near one place and three near another: plain coarse k-means
    splits the fine centres 9 / 3, the balanced coarse level (MoDE's) 6 / 6, at the least total squared
    distance of any 6 / 6 split (brute force over the 924), so every coarse cluster holds 48 points."""
    import itertools

    rng = np.random.default_rng(1)
    places = np.concatenate([rng.normal(0, 1, (9, 4)), 10 + rng.normal(0, 1, (3, 4))])
    x = np.repeat(places, 8, axis=0) + rng.normal(0, 0.01, (96, 4))
    plain = two_level(x.astype(np.float32), 12, 2, balanced=True, num_iters=5)
    assert sorted(np.bincount(plain.fine_to_coarse, minlength=2)) == [3, 9]
    result = two_level(x.astype(np.float32), 12, 2, balanced=True, num_iters=5, balanced_coarse=True)
    np.testing.assert_array_equal(np.bincount(result.fine_to_coarse, minlength=2), [6, 6])
    np.testing.assert_array_equal(np.bincount(result.fine_to_coarse[result.fine_assignments], minlength=2), [48, 48])
    cost = ((result.fine_centers[:, None, :].astype(np.float64) - result.coarse_centers[None]) ** 2).sum(-1)
    chosen = cost[np.arange(12), result.fine_to_coarse].sum()
    best = min(cost[list(s), 0].sum() + cost[[i for i in range(12) if i not in s], 1].sum()
               for s in itertools.combinations(range(12), 6))
    np.testing.assert_allclose(chosen, best, rtol=1e-9)
    with pytest.raises(ValueError, match="m=12 fine centres to divide into n=5 equal groups"):
        two_level(x, 12, 5, balanced_coarse=True)


def test_embedding_shards_skip_invalid_rows(tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(50, 4)).astype(np.float32)
    valid = rng.random(50) > 0.2
    emb[~valid] = 0.0
    write_side_file(tmp_path / "emb", {"image_emb": emb, "text_emb": emb + 1, "index": np.arange(50, dtype=np.int64),
                                       "valid": valid}, shard_size=16)
    with pytest.raises(ValueError, match="name the one"):
        EmbeddingShards(tmp_path / "emb")
    shards = EmbeddingShards(tmp_path / "emb", field="image_emb")
    assert shards.num_rows == valid.sum() and shards.dim == 4
    np.testing.assert_array_equal(np.concatenate(list(shards)), emb[valid])
    np.testing.assert_array_equal(shards.record_indices(), np.nonzero(valid)[0])
    init = emb[valid][:3]
    from_shards = kmeans(shards, 3, num_iters=3, init=init, chunk_rows=8)
    from_array = kmeans(emb[valid], 3, num_iters=3, init=init, chunk_rows=8)
    np.testing.assert_array_equal(from_shards.centers, from_array.centers)
    with pytest.raises(ValueError, match="no field 'caption'"):
        EmbeddingShards(tmp_path / "emb", field="caption")


@pytest.mark.parametrize("field", ["image_emb", "index"])
def test_a_shard_cut_short_fails_when_the_shards_are_opened(tmp_path, field):
    """Before any pass: k-means must not stop in its last shard after an hour of the others."""
    write_side_file(tmp_path / "emb", {"image_emb": np.ones((40, 4), np.float32), "index": np.arange(40)},
                    shard_size=16)
    path = tmp_path / "emb" / f"{field}-00002.npy"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match=f"cannot read side file shard .*{field}-00002.npy"):
        EmbeddingShards(tmp_path / "emb", field="image_emb")
