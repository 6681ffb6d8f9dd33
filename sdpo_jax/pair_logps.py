"""A batch's per-pair sequence log-probs under the policy and the reference: the loss's inputs.

For pair j with prompt x_j, chosen y_w and rejected y_l, and model parameters theta,

    log pi_theta(y|x) = sum over the completion tokens t of y of log p_theta(y_t | x, y_<t),

with LD-DPO's weights when ``ld_alpha`` = a != 1 (the tokens beyond the pair's shorter completion
count a times). ``pair_logps`` returns them as losses.PairLogps: the policy's (with gradient),
the reference's (from ``ref_params`` without gradient, or precomputed in the batch), completion
token counts and, when the settings need them, the chosen sum without LD weighting and WPO's
log-weight.

``batch`` holds B pairs (see sdpo_jax.data) in one of two layouts: plain,
``{chosen,rejected}_input_ids``, ``{chosen,rejected}_attention_mask``, ``{chosen,rejected}_loss_mask``
[B, L], where chosen and rejected go through the model in one forward of 2B rows; or prefix-shared
(sdpo_jax.prefix_sharing: ``input_ids``, ``positions``, ``segment_ids`` [B, L] and
``{side}_index``/``{side}_labels``/``{side}_label_mask`` [B, K]), one row per pair, the prompt
computed once. Both carry optionally ``valid`` [B] (0 for padding pairs) and, when the reference
log-probs were precomputed (sdpo_jax.reference), ``ref_chosen_logps``/``ref_rejected_logps`` [B].
The functions dispatch on the batch's keys.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sdpo_jax.logprobs import TokenLogps, completion_token_logps, gathered_token_logps, ld_token_weights
from sdpo_jax.losses import DPOSettings, PairLogps
from sdpo_jax.models.llama import LlamaForCausalLM, output_embedding
from sdpo_jax.prefix_sharing import is_packed, packed_attention_mask


def pair_logps(
    model: LlamaForCausalLM, params: Any, ref_params: Any, batch: dict, chunk_size: int, settings: DPOSettings
) -> PairLogps:
    """The loss's inputs for every pair of ``batch``: the policy's fields from ``params`` (module
    docstring), the reference's from ``ref_params`` (None: precomputed in the batch).
    ``chunk_size`` is the output layer's chunk (sdpo_jax.logprobs); ``settings`` supplies ld_alpha
    and whether WPO's weight is needed."""
    stats = policy_completion_stats(model, params, batch, chunk_size, settings.ld_alpha, settings.use_weighting)
    ref_chosen, ref_rejected = reference_sequence_logps(model, ref_params, batch, chunk_size, settings.ld_alpha)
    return PairLogps(reference_chosen=ref_chosen, reference_rejected=ref_rejected, **stats)


def reference_sequence_logps(
    model: LlamaForCausalLM, ref_params: Any, batch: dict, chunk_size: int, ld_alpha: float = 1.0
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(log pi_ref(y_w|x), log pi_ref(y_l|x)) [B]: precomputed in the batch (with the same ``ld_alpha``)
    when ``ref_params`` is None, else one forward of the reference, without gradient."""
    if ref_params is None:
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    stats = policy_completion_stats(
        model, jax.lax.stop_gradient(ref_params), batch, chunk_size, ld_alpha, with_weight=False
    )
    return stats["policy_chosen"], stats["policy_rejected"]


def completion_logps(model: LlamaForCausalLM, params: Any, batch: dict, chunk_size: int, ld_alpha: float = 1.0):
    """(chosen, rejected) sequence log-probs under ``params`` (LD-weighted unless ``ld_alpha`` is 1) and
    (chosen, rejected) completion token counts, each [B], either layout."""
    stats = policy_completion_stats(model, params, batch, chunk_size, ld_alpha, with_weight=False)
    return stats["policy_chosen"], stats["policy_rejected"], stats["chosen_tokens"], stats["rejected_tokens"]


def policy_completion_stats(
    model: LlamaForCausalLM, params: Any, batch: dict, chunk_size: int, ld_alpha: float, with_weight: bool
) -> dict[str, jnp.ndarray]:
    """The policy's fields of PairLogps [B] under ``params``: sequence log-probs (LD-weighted when
    ``ld_alpha`` != 1, then also ``policy_chosen_plain``), token counts and, ``with_weight``, WPO's
    ``log_weight`` (no gradient)."""
    tokens = _token_logps(model, params, batch, chunk_size, with_weight)
    packed = is_packed(batch)
    chosen_tokens, rejected_tokens = _side_sums(tokens.mask, packed)
    stats = {"chosen_tokens": chosen_tokens, "rejected_tokens": rejected_tokens}
    plain_chosen, plain_rejected = _side_sums(tokens.logps, packed)
    if ld_alpha == 1.0:
        stats["policy_chosen"], stats["policy_rejected"] = plain_chosen, plain_rejected
    else:
        weights = _ld_weights(tokens.mask, packed, ld_alpha)
        stats["policy_chosen"], stats["policy_rejected"] = _side_sums(tokens.logps * weights, packed)
        stats["policy_chosen_plain"] = plain_chosen
    if with_weight:
        # WPO: log w = sum over both sides of the mean over the side's tokens of log p_t - log sum_v p_v^2.
        aligned = _side_sums(jax.lax.stop_gradient(tokens.logps - tokens.sum_sq), packed)
        stats["log_weight"] = aligned[0] / jnp.maximum(chosen_tokens, 1.0) + aligned[1] / jnp.maximum(
            rejected_tokens, 1.0
        )
    return stats


def pair_weights(batch: dict) -> jnp.ndarray:
    """1.0 for each real pair of the batch and 0.0 for each padding pair, [B]."""
    pairs = batch["input_ids" if is_packed(batch) else "chosen_input_ids"].shape[0]
    return batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones((pairs,), jnp.float32)


def _token_logps(model: LlamaForCausalLM, params: Any, batch: dict, chunk_size: int, with_sum_sq: bool) -> TokenLogps:
    """Per-token completion log-probs in the batch's layout: plain [2B, L-1] (chosen rows, then
    rejected rows) or packed [B, 2K] (chosen columns, then rejected columns)."""
    if is_packed(batch):
        return _packed_token_logps(model, params, batch, chunk_size, with_sum_sq)
    return _plain_token_logps(model, params, batch, chunk_size, with_sum_sq)


def _packed_token_logps(
    model: LlamaForCausalLM, params: Any, batch: dict, chunk_size: int, with_sum_sq: bool
) -> TokenLogps:
    """One forward of B prefix-shared rows; the output layer only at the 2K gathered positions."""
    mask = packed_attention_mask(batch["segment_ids"], batch["positions"], model.config.sliding_window)
    hidden = model.apply(
        {"params": params}, batch["input_ids"], positions=batch["positions"], mask=mask, return_hidden=True
    )
    both = {
        name: jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=1)
        for name in ("index", "labels", "label_mask")
    }
    return gathered_token_logps(
        hidden,
        output_embedding(params, model.config),
        both["index"],
        both["labels"],
        both["label_mask"],
        chunk_size,
        with_sum_sq,
    )


def _plain_token_logps(
    model: LlamaForCausalLM, params: Any, batch: dict, chunk_size: int, with_sum_sq: bool
) -> TokenLogps:
    """One forward of 2B rows (chosen rows, then rejected rows)."""
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attention = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    loss_mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    hidden = model.apply({"params": params}, ids, attention_mask=attention, return_hidden=True)
    return completion_token_logps(
        hidden, output_embedding(params, model.config), ids, loss_mask, chunk_size, with_sum_sq
    )


def _side_sums(values: jnp.ndarray, packed: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(chosen, rejected) sums [B] of per-token values in the batch's layout (rows are summed before
    chosen and rejected are split, so a sharded row axis moves B numbers, not tokens)."""
    if packed:
        width = values.shape[1] // 2
        return jnp.sum(values[:, :width], -1), jnp.sum(values[:, width:], -1)
    sums = jnp.sum(values, -1)
    pairs = sums.shape[0] // 2
    return sums[:pairs], sums[pairs:]


def _ld_weights(mask: jnp.ndarray, packed: bool, alpha: float) -> jnp.ndarray:
    """LD-DPO token weights in the batch's layout: the shared length of a pair is its shorter completion."""
    chosen_tokens, rejected_tokens = _side_sums(mask, packed)
    shared = jnp.minimum(chosen_tokens, rejected_tokens)
    if packed:
        width = mask.shape[1] // 2
        return jnp.concatenate(
            [ld_token_weights(mask[:, :width], shared, alpha), ld_token_weights(mask[:, width:], shared, alpha)], axis=1
        )
    return ld_token_weights(mask, jnp.concatenate([shared, shared]), alpha)
