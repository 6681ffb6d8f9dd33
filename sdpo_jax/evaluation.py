"""Held-out preference metrics: the DPO loss and TRL's reward metrics over a whole pair set.

The eval step (``make_eval_step``; ``jit_eval_step`` compiles it for a mesh) returns each pair's
log-probs; the valid pairs of all batches are gathered on the host (a few numbers per pair) and the
metrics computed once, with the whole set as one batch (``pair_set_metrics``): every pair weighs the
same whatever the batch boundaries and padding, and the batch losses (aot's sort, sft's token mean)
cover the set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdpo_jax.losses import METRIC_NAMES, DPOSettings, PairLogps, batch_loss_sum, metric_means, metric_sums
from sdpo_jax.models.llama import LlamaForCausalLM
from sdpo_jax.pair_logps import pair_logps, pair_weights
from sdpo_jax.placement import global_batch
from sdpo_jax.sharding import batch_sharding, replicated


def make_eval_step(model: LlamaForCausalLM, settings: DPOSettings, chunk_size: int = 128) -> Callable:
    """Build ``eval_step(params, ref_params, batch) -> per-pair values`` [B], a pure function: PairLogps's
    fields by name and ``valid``. Concatenate the valid rows of all batches, then ``pair_set_metrics``.
    The values depend on ``settings`` only through ld_alpha and use_weighting."""

    def eval_step(params: Any, ref_params: Any, batch: dict):
        logps = pair_logps(model, params, ref_params, batch, chunk_size, settings)
        values = {field.name: getattr(logps, field.name) for field in dataclasses.fields(logps)}
        return {**{name: value for name, value in values.items() if value is not None}, "valid": pair_weights(batch)}

    return eval_step


def jit_eval_step(
    model: LlamaForCausalLM,
    settings: DPOSettings,
    mesh: jax.sharding.Mesh,
    param_shardings: Any,
    with_reference_params: bool,
    chunk_size: int = 128,
) -> Callable:
    """``make_eval_step``'s step jitted for ``mesh``: params (and ``ref_params`` when
    ``with_reference_params``, else None) laid out as ``param_shardings``, the batch split over the
    mesh's batch axes, the values replicated. Build once, reuse."""
    ref_sharding = param_shardings if with_reference_params else None
    return jax.jit(
        make_eval_step(model, settings, chunk_size),
        in_shardings=(param_shardings, ref_sharding, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )


def pair_set_metrics(per_pair: dict[str, Any], settings: DPOSettings) -> dict[str, jnp.ndarray]:
    """TRL's metrics of a set of pairs taken as one batch, from eval-step outputs (without ``valid``)
    of its valid pairs, concatenated: the loss over all of them (aot sorts all of them, sft averages
    all their chosen tokens), whatever the batches they were scored in."""
    logps = PairLogps(**{name: jnp.asarray(value) for name, value in per_pair.items()})
    valid = jnp.ones_like(logps.policy_chosen)
    loss = batch_loss_sum(
        logps, valid, settings, jnp.maximum(jnp.sum(valid), 1.0), jnp.maximum(jnp.sum(logps.chosen_tokens), 1.0)
    )
    return metric_means(metric_sums(logps, valid, settings, loss))


def evaluate_pairs(
    step,
    params: Any,
    ref_params: Any,
    batches: Iterable[dict[str, np.ndarray]],
    settings: DPOSettings,
    mesh: jax.sharding.Mesh,
) -> dict[str, float]:
    """TRL-named means over all valid pairs of ``batches`` plus ``num_pairs``, scored by ``step`` (from
    ``jit_eval_step``); each process passes its own rows of every global batch, and every process gets
    the metrics of all of them."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        values = jax.device_get(step(params, ref_params, global_batch(batch, mesh)))
        valid = values.pop("valid") > 0
        for name, value in values.items():
            parts.setdefault(name, []).append(value[valid])
    if not parts:
        raise ValueError("evaluation got no batches")
    per_pair = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    means = jax.device_get(pair_set_metrics(per_pair, settings))
    result = {name: float(means[name]) for name in METRIC_NAMES}
    result["num_pairs"] = int(means["num_pairs"])
    return result
