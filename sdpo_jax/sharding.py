"""Device mesh (data, fsdp, tensor) and the logical-axis rules that place arrays on it.

Parameters carry logical axis names (see sdpo_jax.models.llama); ``rules`` map each name to
mesh axes. Batches are split over ("data", "fsdp"): data-parallel replicas and fully sharded
data parallelism both consume different examples; "tensor" splits heads, MLP and vocabulary.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)


class MeshError(ValueError):
    """A mesh or sharding that cannot be laid on the available devices."""


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolve one -1 axis to the devices left; the product must equal the device count."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise MeshError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh: axis sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise MeshError(f"mesh: {num_devices} devices cannot be split with data={data} fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices")
    return tuple(sizes)


def build_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    grid = mesh_utils.create_device_mesh(shape, devices=devices) if len(devices) > 1 else np.array(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_to_shardings(logical_specs: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for a pytree of logical PartitionSpecs."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def check_divisible(shapes: Any, shardings: Any) -> None:
    """Every sharded dimension must split evenly over its mesh axes; say which does not."""

    def check(path, shape, sharding):
        for dim, axes in zip(shape.shape, sharding.spec):
            if axes is None:
                continue
            names = axes if isinstance(axes, tuple) else (axes,)
            parts = math.prod(sharding.mesh.shape[a] for a in names)
            if dim % parts:
                raise MeshError(
                    f"mesh: parameter {jax.tree_util.keystr(path)} has a dimension of {dim}, "
                    f"which does not split over mesh axes {names} of total size {parts}"
                )

    jax.tree_util.tree_map_with_path(check, shapes, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (pair) axis over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
