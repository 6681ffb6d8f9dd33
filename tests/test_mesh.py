"""Mesh shapes from the config's mesh section, and the errors for shapes that cannot fit."""
from __future__ import annotations

import jax
import pytest

from configs.default import get_config
from sdpo_jax.sharding import MeshError, build_mesh, mesh_shape


def test_default_mesh_uses_every_device():
    mesh = build_mesh(**get_config().mesh)
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.size == len(jax.devices())


@pytest.mark.parametrize("sizes, devices, expected", [((-1, 1, 1), 8, (8, 1, 1)), ((2, -1, 2), 8, (2, 2, 2)), ((1, 4, -1), 8, (1, 4, 2))])
def test_minus_one_fills_the_rest(sizes, devices, expected):
    assert mesh_shape(*sizes, devices) == expected


@pytest.mark.parametrize("sizes, devices, message", [
    ((2, 2, 1), 8, "data\\*fsdp\\*tensor = 4 but there are 8 devices"),
    ((-1, -1, 1), 8, "at most one axis may be -1"),
    ((3, -1, 1), 8, "8 devices cannot be split"),
    ((0, 1, 1), 1, "must be positive or -1"),
])
def test_impossible_meshes_are_refused(sizes, devices, message):
    with pytest.raises(MeshError, match=message):
        mesh_shape(*sizes, devices)
