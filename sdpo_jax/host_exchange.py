"""Small host values all-gathered between the processes of a multi-process run (jax.distributed).

Each process of a run reads its own shard of the data; then every process needs what all of
them found (counts, the lengths of every pair, the first bad record). These helpers gather such
values from every process, in process order, through JAX's collectives
(`multihost_utils.process_allgather`). With one process they return the local value alone.
"""
from __future__ import annotations

import io
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def allgather_bytes(blob: bytes) -> list[bytes]:
    """Every process's `blob` (lengths may differ), in process order."""
    if jax.process_count() == 1:
        return [blob]
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(blob)], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()) or 1, np.uint8)
    padded[:len(blob)] = np.frombuffer(blob, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [gathered[p, :size].tobytes() for p, size in enumerate(sizes)]


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-able `value`, in process order."""
    return [json.loads(blob) for blob in allgather_bytes(json.dumps(value).encode())]


def allgather_arrays(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Every process's dict of numpy arrays (any shapes and dtypes, kept exactly), in process order."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return [dict(np.load(io.BytesIO(blob))) for blob in allgather_bytes(buffer.getvalue())]


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on at least one (waits for the collective)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).any())


class LaggedAgreement:
    """Whether any process raised a flag, agreed one call late so that the host never waits on the
    devices: `poll(flag)` dispatches this call's all-process OR and returns the previous call's
    (False at the first). Every process gets the same answer at the same call."""

    def __init__(self):
        self._pending: jax.Array | None = None
        if jax.process_count() > 1:
            mesh = Mesh(np.asarray(jax.devices()), ("all",))
            self._sharding = NamedSharding(mesh, PartitionSpec("all"))
            self._reduce = jax.jit(jnp.any, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def poll(self, flag: bool) -> bool:
        if jax.process_count() == 1:
            return flag
        previous = self._pending
        local = np.full(jax.local_device_count(), flag, bool)
        self._pending = self._reduce(jax.make_array_from_process_local_data(self._sharding, local))
        return bool(previous) if previous is not None else False
