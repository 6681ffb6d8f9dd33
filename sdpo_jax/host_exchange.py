"""Small host values all-gathered between the processes of a multi-process run (jax.distributed).

Each process of a run reads its own shard of the data; then every process needs what all of
them found (counts, the lengths of every pair, the first bad record). These helpers gather such
values from every process, in process order, through JAX's collectives
(`multihost_utils.process_allgather`). With one process they return the local value alone.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def on_main_process(action: Callable[[], Any], what: str) -> Any:
    """Run ``action`` on process 0 alone and tell every process how it went: its (JSON-able) result on all
    of them, or its error raised on all of them (process 0 raises the error itself, the others a one-line
    `SdpoError` naming it), so that no process waits for one that failed."""
    from sdpo_jax.errors import SdpoError

    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = action()
        except Exception as err:  # noqa: BLE001 (re-raised below, on every process)
            error = err
    if jax.process_count() > 1:
        outcome = allgather_json({"result": result, "error": f"{type(error).__name__}: {error}" if error else None})[0]
        if outcome["error"] and error is None:
            raise SdpoError(f"process 0 could not {what}: {' '.join(outcome['error'].split())}")
        result = outcome["result"]
    if error is not None:
        raise error
    return result


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (none reads a file process 0 is still writing)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def allgather_bytes(blob: bytes) -> list[bytes]:
    """Every process's `blob` (lengths may differ), in process order."""
    if jax.process_count() == 1:
        return [blob]
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(blob)], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()) or 1, np.uint8)
    padded[: len(blob)] = np.frombuffer(blob, np.uint8)
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
