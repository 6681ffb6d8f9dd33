"""Placing host data on the device mesh and reading it back: the train state's shardings, batches
split over the mesh's batch axes, whole arrays gathered on a host.

The train state's shardings come from the parameters' logical axes: the optimizer's moments
follow the parameters they belong to, scalars are replicated. The jitted steps that consume them
live with their pure forms (sdpo_jax.train_step, sdpo_jax.evaluation, sdpo_jax.reference).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from sdpo_jax.models.llama import LlamaForCausalLM
from sdpo_jax.sharding import DEFAULT_RULES, batch_sharding, check_divisible, logical_to_shardings
from sdpo_jax.train_step import TrainState


def state_shardings(model: LlamaForCausalLM, optimizer: optax.GradientTransformation, mesh: Mesh, rules=DEFAULT_RULES):
    """(shardings of the TrainState, abstract TrainState), checked for even splits."""

    def init():
        boxed = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        return TrainState.create(boxed, optimizer)

    abstract_boxed = jax.eval_shape(init)
    shardings = logical_to_shardings(nn.get_partition_spec(abstract_boxed), mesh, rules)
    abstract = nn.meta.unbox(abstract_boxed)
    check_divisible(abstract.params, shardings.params)
    return shardings, abstract


def place(tree: Any, shardings: Any) -> Any:
    """Put a host pytree on the mesh with the given shardings."""
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), tree, shardings)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays (pairs split over data and fsdp) from this process's rows of a batch.

    A batch with ``source_row`` arrives as staging blocks (sdpo_jax.data.batching: each process
    gives the rows of the pairs it holds): row j of the result is staging row ``source_row[j]``,
    gathered on the devices (XLA lowers it to an all-reduce of the batch's token arrays, B x L int32
    each: a few MB a step), so no process needs another's tokens on its host.
    """
    sharding = batch_sharding(mesh)
    arrays = {name: jax.make_array_from_process_local_data(sharding, value) for name, value in local.items()}
    if "source_row" not in arrays:
        return arrays
    rows = arrays.pop("source_row")
    return _rows_into_place(sharding)(arrays, rows)


def whole_batch_on_mesh(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays split over the mesh's batch axes from a batch that every process holds whole:
    each process gives its own block of rows (its equal share, in process order)."""
    local = len(next(iter(batch.values()))) // jax.process_count()
    mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    return global_batch({name: value[mine] for name, value in batch.items()}, mesh)


@functools.cache
def _rows_into_place(sharding: NamedSharding) -> Callable:
    return jax.jit(
        lambda staged, rows: jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=0), staged), out_shardings=sharding
    )


def host_rows(array: jax.Array) -> np.ndarray:
    """A global (possibly multi-process) array, whole, on this host."""
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
