"""The reference model's part of a stage: its log-probs precomputed once per stage's pairs, then
looked up by pair index; and TR-DPO's soft update when the reference moves within a stage.

``make_reference_step`` is the pure step, ``jit_reference_step`` its form jitted for a mesh, and
``precompute_reference_logps`` runs it over a pair set.

One forward pass of the frozen reference over every pair of the chunk gives
log pi_ref(y_w|x) and log pi_ref(y_l|x) per pair; training batches then carry them
(``ref_chosen_logps``/``ref_rejected_logps``) and the reference params can leave the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from sdpo_jax.models.llama import LlamaForCausalLM
from sdpo_jax.pair_logps import reference_sequence_logps
from sdpo_jax.placement import global_batch, host_rows
from sdpo_jax.sharding import batch_sharding, replicated


def make_reference_step(model: LlamaForCausalLM, chunk_size: int = 128, ld_alpha: float = 1.0) -> Callable:
    """Build ``reference_step(ref_params, batch) -> (chosen_logps, rejected_logps)`` [B], a pure function;
    ``ld_alpha`` must be the loss's (LD-DPO weighs the reference's tokens beyond the shorter completion too)."""

    def reference_step(ref_params: Any, batch: dict):
        return reference_sequence_logps(model, ref_params, batch, chunk_size, ld_alpha)

    return reference_step


def jit_reference_step(
    model: LlamaForCausalLM, mesh: jax.sharding.Mesh, param_shardings: Any, chunk_size: int = 128, ld_alpha: float = 1.0
) -> Callable:
    """``make_reference_step``'s step jitted for ``mesh``: ``ref_params`` laid out as ``param_shardings``,
    the batch split over the mesh's batch axes, the log-probs replicated. Build once, reuse."""
    return jax.jit(
        make_reference_step(model, chunk_size, ld_alpha),
        in_shardings=(param_shardings, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )


def precompute_reference_logps(
    step, ref_params: Any, batches: Iterable[dict[str, np.ndarray]], num_pairs: int, mesh: jax.sharding.Mesh
) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) float32 [num_pairs], the reference log-probs of every pair, scored by ``step``
    (from ``jit_reference_step``) over batches that cover every pair once.

    ``batches`` are this process's rows; every process gets the full arrays back.
    """
    chosen = np.full(num_pairs, np.nan, np.float32)
    rejected = np.full(num_pairs, np.nan, np.float32)
    for batch in batches:
        placed = global_batch(batch, mesh)
        ref_chosen, ref_rejected = jax.device_get(step(ref_params, placed))
        rows = host_rows(placed["valid"]).astype(bool)
        pair_index = host_rows(placed["pair_index"])
        chosen[pair_index[rows]] = ref_chosen[rows]
        rejected[pair_index[rows]] = ref_rejected[rows]
    missing = np.flatnonzero(np.isnan(chosen) | np.isnan(rejected))
    if missing.size:
        raise ValueError(
            f"reference log-probs missing for {missing.size} pairs (e.g. pair {missing[0]}): batches did not cover "
            "the chunk"
        )
    return chosen, rejected


def attach_reference(batch: dict[str, np.ndarray], chosen: np.ndarray, rejected: np.ndarray) -> dict[str, np.ndarray]:
    """The batch plus its pairs' precomputed reference log-probs (0 on padding rows)."""
    index = np.where(batch["valid"].astype(bool), batch["pair_index"], 0)
    valid = batch["valid"].astype(bool)
    return {
        **batch,
        "ref_chosen_logps": np.where(valid, chosen[index], 0.0).astype(np.float32),
        "ref_rejected_logps": np.where(valid, rejected[index], 0.0).astype(np.float32),
    }


@jax.jit
def mix_reference(policy: Any, reference: Any, alpha: float) -> Any:
    """TR-DPO's soft update (TRL's ``sync_ref_model``): reference <- alpha * policy + (1 - alpha) * reference,
    leaf by leaf, laid out as the reference is."""
    return jax.tree_util.tree_map(lambda p, r: (alpha * p + (1.0 - alpha) * r).astype(r.dtype), policy, reference)
