"""Device mesh (data, fsdp, tensor) and the logical-axis rules that place arrays on it.

Parameters carry logical axis names (see sdpo_jax.models.llama); ``rules`` map each name to
mesh axes. Batches are split over ("data", "fsdp"): data-parallel replicas and fully sharded
data parallelism both consume different examples; "tensor" splits heads, MLP and vocabulary.

Multi-slice (several TPU slices joined by the data-centre network, DCN): ``dcn_data`` > 1 makes
the "data" axis span slices. Each slice holds a (data, fsdp, tensor) mesh over its own chips (fast
ICI links); the slices are data-parallel replicas of each other, so only the gradient all-reduce
crosses DCN. The global "data" axis then has dcn_data * data entries, slice-major. On GPU (and
CPU) nodes the processes are the slices: dcn_data = number of nodes keeps FSDP inside each node.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdpo_jax.errors import SdpoError

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
    ("labels", None),
)


class MeshError(SdpoError, ValueError):
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


def granule_attribute(devices: Sequence[jax.Device]) -> str:
    """What joins devices by the slow network: TPU slices (``slice_index``), elsewhere processes (hosts)."""
    return "slice_index" if devices[0].platform == "tpu" else "process_index"


def slice_count(devices: Sequence[jax.Device]) -> int:
    """Number of slices (TPU) or processes (GPU, CPU) the devices belong to."""
    attribute = granule_attribute(devices)
    return len({getattr(d, attribute, 0) for d in devices})


def hybrid_mesh_shapes(
    data: int, fsdp: int, tensor: int, dcn_data: int, num_devices: int, num_slices: int
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(per-slice mesh shape, across-slice shape) for ``num_devices`` devices in ``num_slices`` slices.

    The slices must be equal and there must be exactly ``dcn_data`` of them; -1 in data/fsdp/tensor
    fills the devices of one slice.
    """
    if dcn_data < 1:
        raise MeshError(f"mesh.dcn_data must be >= 1, got {dcn_data}")
    if num_slices != dcn_data:
        raise MeshError(
            f"mesh.dcn_data={dcn_data} but the {num_devices} devices form {num_slices} slice(s); "
            f"set mesh.dcn_data to the slice count"
        )
    if num_devices % num_slices:
        raise MeshError(f"mesh: {num_devices} devices do not split evenly into {num_slices} slices")
    return mesh_shape(data, fsdp, tensor, num_devices // num_slices), (dcn_data, 1, 1)


def global_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int, dcn_data: int = 1) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) shape of the whole mesh: the data axis counts dcn_data * data replicas."""
    (d, f, t), _ = hybrid_mesh_shapes(data, fsdp, tensor, dcn_data, num_devices, dcn_data)
    return d * dcn_data, f, t


def build_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None, dcn_data: int = 1
) -> Mesh:
    """The mesh over ``devices`` (default: all); with ``dcn_data`` > 1, over that many slices.

    On GPU and CPU the processes (hosts) play the slices' part. With dcn_data = 1 one mesh spans all
    devices, as on one TPU slice; several TPU slices need dcn_data = their count.
    """
    devices = list(devices if devices is not None else jax.devices())
    attribute = granule_attribute(devices)
    slices = slice_count(devices) if dcn_data > 1 or attribute == "slice_index" else 1
    ici, dcn = hybrid_mesh_shapes(data, fsdp, tensor, dcn_data, len(devices), slices)
    if dcn_data > 1:
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices=devices, process_is_granule=attribute == "process_index"
        )
    elif len(devices) > 1:
        grid = mesh_utils.create_device_mesh(ici, devices=devices)
    else:
        grid = np.array(devices).reshape(ici)
    return Mesh(grid, MESH_AXES)


def planning_mesh(data: int, fsdp: int, tensor: int, dcn_data: int, devices: Sequence[jax.Device]) -> Mesh:
    """A mesh of the same global shape as ``build_mesh`` on real slices, laid over stand-in devices.

    For checking shapes and memory on fake host devices, which have no slices: the arrays' shards
    (and so divisibility and per-device bytes) depend only on the global shape.
    """
    shape = global_mesh_shape(data, fsdp, tensor, len(devices), dcn_data)
    return Mesh(np.array(list(devices)).reshape(shape), MESH_AXES)


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


def batch_row_multiple(mesh: Mesh | None) -> int:
    """What a global batch's row count must be a multiple of on ``mesh``: its data x fsdp shards and
    the process count (each process gives an equal block of rows); 1 without a mesh."""
    if mesh is None:
        return 1
    return math.lcm(math.prod(mesh.shape[a] for a in BATCH_AXES), jax.process_count())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_process_rows(mesh: Mesh, batch_size: int) -> None:
    """Refuses a mesh on which some process p's devices do not hold exactly rows [p * B/P, (p+1) * B/P)
    of a batch, the block each process builds (sdpo_jax.data.batching): the (data, fsdp) axes
    must split the rows over the processes, e.g. not a tensor axis that spans hosts. Decided from
    every device's rows, so all processes reach the same verdict."""
    count = jax.process_count()
    blocks: dict[int, set] = {}
    for device, index in batch_sharding(mesh).devices_indices_map((batch_size,)).items():
        blocks.setdefault(device.process_index, set()).add(index[0].indices(batch_size)[:2])
    for process in range(count):
        rows = blocks[process]
        start, stop = min(a for a, _ in rows), max(b for _, b in rows)
        expected = (process * batch_size // count, (process + 1) * batch_size // count)
        if (start, stop) != expected or sum(b - a for a, b in rows) != stop - start:
            raise MeshError(
                f"mesh {dict(mesh.shape)}: process {process}'s devices hold batch rows {start}..{stop - 1}, not "
                f"its own block {expected[0]}..{expected[1] - 1} of {batch_size}: the data and fsdp axes must "
                f"split the rows over the {count} processes (keep the tensor axis within a host)"
            )
