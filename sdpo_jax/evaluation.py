"""Held-out preference metrics: the DPO loss and TRL's reward metrics over a whole pair set.

Each batch's metric sums are added up on the host, then divided once (sdpo_jax.train_step.
metric_means), so every pair weighs the same whatever the batch boundaries and padding.
"""
from __future__ import annotations

from typing import Any, Iterable

import jax
import numpy as np

from sdpo_jax.losses import METRIC_NAMES, DPOSettings
from sdpo_jax.models.llama import LlamaForCausalLM
from sdpo_jax.sharded_steps import global_batch, jit_eval_step
from sdpo_jax.train_step import make_eval_step, metric_means


def eval_step(model: LlamaForCausalLM, settings: DPOSettings, mesh: jax.sharding.Mesh, param_shardings: Any,
              with_reference_params: bool, chunk_size: int = 128):
    """The jitted ``(params, ref_params, global batch) -> metric sums`` step; build once, reuse."""
    return jit_eval_step(make_eval_step(model, settings, chunk_size), mesh, param_shardings, with_reference_params)


def evaluate_pairs(
    step, params: Any, ref_params: Any, batches: Iterable[dict[str, np.ndarray]], settings: DPOSettings, mesh: jax.sharding.Mesh
) -> dict[str, float]:
    """TRL-named means over all valid pairs of ``batches`` (this process's rows) plus ``num_pairs``."""
    totals: dict[str, np.ndarray] | None = None
    for batch in batches:
        sums = jax.device_get(step(params, ref_params, global_batch(batch, mesh)))
        totals = sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
    if totals is None:
        raise ValueError("evaluation got no batches")
    means = jax.device_get(metric_means(totals, settings))
    result = {name: float(means[name]) for name in METRIC_NAMES}
    result["num_pairs"] = int(totals["num_pairs"])
    return result
