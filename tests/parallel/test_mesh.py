"""parallel.mesh.parse_mesh: the --mesh flag of the commands (plan, cluster) as axis sizes."""
import pytest

from clus_jax.parallel import mesh as mesh_lib


def test_parse_mesh_reads_axis_sizes_and_names_a_malformed_flag():
    assert mesh_lib.parse_mesh("data=8,fsdp=4,tensor=1") == {"data": 8, "fsdp": 4, "tensor": 1}
    assert mesh_lib.parse_mesh("fsdp=-1") == {"fsdp": -1}
    with pytest.raises(ValueError, match="AXIS=SIZE"):
        mesh_lib.parse_mesh("data:8")
