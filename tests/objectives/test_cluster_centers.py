"""k-means centres for config.mlcd.init_centers: a .npy or a clustering output directory, read as unit rows."""
import numpy as np
import pytest

from clus_jax.data.side_fields import CENTERS_FILE
from clus_jax.objectives import cluster_centers


def test_a_directory_gives_the_clustering_outputs_centres_and_centroids_npy_only_without_them(tmp_path):
    np.save(tmp_path / "centroids.npy", np.ones((3, 2), np.float32))
    assert cluster_centers.centers_file(str(tmp_path)) == str(tmp_path / "centroids.npy")
    np.save(tmp_path / CENTERS_FILE, np.ones((5, 2), np.float32))
    assert cluster_centers.centers_file(str(tmp_path)) == str(tmp_path / CENTERS_FILE)
    assert cluster_centers.centers_shape(str(tmp_path)) == (5, 2)
    assert cluster_centers.centers_file(str(tmp_path / CENTERS_FILE)) == str(tmp_path / CENTERS_FILE)


def test_missing_centres_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds none of \['centers.npy', 'centroids.npy'\]"):
        cluster_centers.centers_file(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere.npy"):
        cluster_centers.centers_shape(str(tmp_path / "nowhere.npy"))


def test_centres_are_read_as_float32_unit_rows(tmp_path):
    x = np.asarray([[3.0, 4.0], [0.0, 0.0], [-2.0, 0.0]])
    np.save(tmp_path / "c.npy", x)
    got = cluster_centers.load_centers(str(tmp_path / "c.npy"))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.float32([[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]]))
