"""Held-out preference metrics: the DPO loss and TRL's reward metrics over a whole pair set.

The eval step returns each pair's log-probs (sdpo_jax.train_step.make_eval_step); the valid pairs of
all batches are gathered on the host (a few numbers per pair) and the metrics computed once, with
the whole set as one batch (train_step.pair_set_metrics): every pair weighs the same whatever the
batch boundaries and padding, and the batch losses (aot's sort, sft's token mean) cover the set.
"""
from __future__ import annotations

from typing import Any, Iterable

import jax
import numpy as np

from sdpo_jax.losses import METRIC_NAMES, DPOSettings
from sdpo_jax.models.llama import LlamaForCausalLM
from sdpo_jax.sharded_steps import global_batch, jit_eval_step
from sdpo_jax.train_step import make_eval_step, pair_set_metrics


def eval_step(model: LlamaForCausalLM, settings: DPOSettings, mesh: jax.sharding.Mesh, param_shardings: Any,
              with_reference_params: bool, chunk_size: int = 128):
    """The jitted ``(params, ref_params, global batch) -> per-pair values`` step; build once, reuse."""
    return jit_eval_step(make_eval_step(model, settings, chunk_size), mesh, param_shardings, with_reference_params)


def evaluate_pairs(
    step, params: Any, ref_params: Any, batches: Iterable[dict[str, np.ndarray]], settings: DPOSettings, mesh: jax.sharding.Mesh
) -> dict[str, float]:
    """TRL-named means over all valid pairs of ``batches`` plus ``num_pairs``; each process passes its own rows
    of every global batch, and every process gets the metrics of all of them."""
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
