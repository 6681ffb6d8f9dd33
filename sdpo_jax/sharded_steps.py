"""The train, eval and reference steps jitted with shardings over a device mesh (pjit).

The train state's shardings come from the parameters' logical axes: the optimizer's moments
follow the parameters they belong to, scalars are replicated. The state is donated (updated in
place); the reference parameters are an input only, never donated.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from sdpo_jax.models.llama import LlamaForCausalLM
from sdpo_jax.sharding import DEFAULT_RULES, batch_sharding, check_divisible, logical_to_shardings, replicated
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
    """Global arrays (pairs split over data and fsdp) from this process's rows of a batch."""
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in local.items()}


def gather_rows(local: np.ndarray) -> np.ndarray:
    """This host-side per-row array from every process, in global row order."""
    return np.asarray(multihost_utils.process_allgather(local, tiled=True)) if jax.process_count() > 1 else local


def jit_train_step(step: Callable, mesh: Mesh, shardings: TrainState, with_reference_params: bool) -> Callable:
    ref_sharding = shardings.params if with_reference_params else None
    return jax.jit(
        step,
        in_shardings=(shardings, ref_sharding, batch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


def jit_eval_step(step: Callable, mesh: Mesh, param_shardings: Any, with_reference_params: bool) -> Callable:
    ref_sharding = param_shardings if with_reference_params else None
    return jax.jit(step, in_shardings=(param_shardings, ref_sharding, batch_sharding(mesh)), out_shardings=replicated(mesh))


def jit_reference_step(step: Callable, mesh: Mesh, param_shardings: Any) -> Callable:
    return jax.jit(step, in_shardings=(param_shardings, batch_sharding(mesh)), out_shardings=replicated(mesh))
