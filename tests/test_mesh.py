"""Mesh shapes from the config's mesh section, and the errors for shapes that cannot fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from configs.default import get_config
from run_fixtures import free_port
from sdpo_jax.sharding import MeshError, build_mesh, global_mesh_shape, hybrid_mesh_shapes, mesh_shape, slice_count


def test_default_mesh_uses_every_device():
    mesh = build_mesh(**get_config().mesh)
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.size == len(jax.devices())


@pytest.mark.parametrize(
    "sizes, devices, expected", [((-1, 1, 1), 8, (8, 1, 1)), ((2, -1, 2), 8, (2, 2, 2)), ((1, 4, -1), 8, (1, 4, 2))]
)
def test_minus_one_fills_the_rest(sizes, devices, expected):
    assert mesh_shape(*sizes, devices) == expected


@pytest.mark.parametrize(
    "sizes, devices, message",
    [
        ((2, 2, 1), 8, "data\\*fsdp\\*tensor = 4 but there are 8 devices"),
        ((-1, -1, 1), 8, "at most one axis may be -1"),
        ((3, -1, 1), 8, "8 devices cannot be split"),
        ((0, 1, 1), 1, "must be positive or -1"),
    ],
)
def test_impossible_meshes_are_refused(sizes, devices, message):
    with pytest.raises(MeshError, match=message):
        mesh_shape(*sizes, devices)


@pytest.mark.parametrize(
    "sizes, dcn, devices, slices, ici, global_shape",
    [
        ((-1, 4, 1), 2, 16, 2, (2, 4, 1), (4, 4, 1)),  # two 8-chip slices, FSDP 4 inside each
        ((1, -1, 1), 4, 64, 4, (1, 16, 1), (4, 16, 1)),  # four v5p-32 slices
        ((-1, 1, 1), 1, 8, 1, (8, 1, 1), (8, 1, 1)),  # one slice: the plain mesh
    ],
)
def test_multi_slice_shapes(sizes, dcn, devices, slices, ici, global_shape):
    assert hybrid_mesh_shapes(*sizes, dcn, devices, slices) == (ici, (dcn, 1, 1))
    assert global_mesh_shape(*sizes, devices, dcn_data=dcn) == global_shape


@pytest.mark.parametrize(
    "dcn, devices, slices, message",
    [
        (3, 16, 2, "mesh.dcn_data=3 but the 16 devices form 2 slice\\(s\\)"),
        (1, 16, 2, "mesh.dcn_data=1 but the 16 devices form 2 slice"),
        (2, 15, 2, "15 devices do not split evenly into 2 slices"),
        (0, 8, 1, "mesh.dcn_data must be >= 1"),
    ],
)
def test_impossible_multi_slice_meshes_are_refused(dcn, devices, slices, message):
    with pytest.raises(MeshError, match=message):
        hybrid_mesh_shapes(-1, 1, 1, dcn, devices, slices)


def test_one_process_is_one_slice():
    # Off TPU the processes are the slices: one process asking for two is an error, not a silent mesh.
    assert slice_count(jax.devices()) == 1
    with pytest.raises(MeshError, match="mesh.dcn_data=2 but the 1 devices form 1 slice"):
        build_mesh(-1, 1, 1, dcn_data=2)


_TWO_PROCESS_MESH = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from sdpo_jax.sharding import MeshError, build_mesh, check_process_rows

try:
    check_process_rows(build_mesh(1, 1, 8), 8)  # tensor across both hosts: each holds every row
    refused = ""
except MeshError as err:
    refused = str(err)
check_process_rows(build_mesh(2, 2, 2), 8)  # each process's 4 devices: one data row, rows 4p..4p+3
mesh = build_mesh(1, -1, 1, dcn_data=2)  # per process: data 1 x fsdp 4; the two processes are data replicas
rows = [sorted({d.process_index for d in row.flat}) for row in mesh.devices]
local = np.arange(4, dtype=np.float32) + 4 * jax.process_index()
x = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), local)
total = jax.jit(lambda v: v.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(x)
if jax.process_index() == 0:
    print(json.dumps({"shape": dict(mesh.shape), "processes_per_data_row": rows, "sum": float(total),
                      "refused": refused}))
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_are_two_dcn_replicas(tmp_path):
    """dcn_data=2 over 2 processes x 4 CPU devices: create_hybrid_device_mesh puts each process's devices in
    one data row (processes are the granules off TPU) and a batch split over (data, fsdp) adds up."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _TWO_PROCESS_MESH, str(i), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=240) for w in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-2000:]
    report = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert report.pop("refused") == (
        "mesh {'data': 1, 'fsdp': 1, 'tensor': 8}: process 0's devices hold batch rows 0..7, not its "
        "own block 0..3 of 8: the data and fsdp axes must split the rows over the 2 processes "
        "(keep the tensor axis within a host)"
    )
    assert report == {"shape": {"data": 2, "fsdp": 4, "tensor": 1}, "processes_per_data_row": [[0], [1]], "sum": 28.0}
