"""The pure DPO train and eval steps.

    train_step(state, ref_params, batch) -> (state, metrics)

``batch`` holds a global batch of B pairs (see sdpo_jax.data) in one of two layouts:
plain, ``{chosen,rejected}_input_ids``, ``{chosen,rejected}_attention_mask``,
``{chosen,rejected}_loss_mask`` [B, L], where chosen and rejected go through the model in one
forward of 2B rows; or prefix-shared (sdpo_jax.prefix_sharing: ``input_ids``, ``positions``,
``segment_ids`` [B, L] and ``{side}_index``/``{side}_labels``/``{side}_label_mask`` [B, K]), one row
per pair, the prompt computed once. Both carry optionally ``valid`` [B] (0 for padding pairs)
and, when the reference log-probs were precomputed, ``ref_chosen_logps``/``ref_rejected_logps``
[B] (then ``ref_params`` is None). The steps dispatch on the batch's keys. With ``grad_accum`` = A
the batch is split into A micro-batches (rows i, i+A, i+2A, ... so each stays spread over the
devices) whose gradients add up to the full batch's, so A changes memory, not the result; a loss that
couples micro-batches (aot sorts the whole batch) takes one more policy forward per micro-batch for
that (``_coupled_gradients``). Precomputed reference log-probs must come from ``make_reference_step``
with the loss's ``ld_alpha``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from sdpo_jax.logprobs import TokenLogps, completion_token_logps, gathered_token_logps, ld_token_weights
from sdpo_jax.losses import DPOSettings, PairLogps, batch_loss_sum, per_pair_metrics
from sdpo_jax.models.llama import LlamaForCausalLM, output_embedding
from sdpo_jax.prefix_sharing import chosen_token_counts, is_packed, packed_attention_mask


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    opt_state: Any

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def completion_logps(model: LlamaForCausalLM, params: Any, batch: dict, chunk_size: int, ld_alpha: float = 1.0):
    """(chosen, rejected) sequence log-probs (LD-weighted unless ``ld_alpha`` is 1) and completion
    token counts, either layout."""
    stats = _completion_stats(model, params, batch, chunk_size, ld_alpha, with_weight=False)
    return stats["policy_chosen"], stats["policy_rejected"], stats["chosen_tokens"], stats["rejected_tokens"]


def _completion_stats(model: LlamaForCausalLM, params: Any, batch: dict, chunk_size: int, ld_alpha: float,
                      with_weight: bool) -> dict[str, jnp.ndarray]:
    """The policy's fields of PairLogps [B]: sequence log-probs (LD-weighted when ``ld_alpha`` != 1, then
    also ``policy_chosen_plain``), token counts and, ``with_weight``, WPO's ``log_weight``."""
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
        stats["log_weight"] = aligned[0] / jnp.maximum(chosen_tokens, 1.0) + aligned[1] / jnp.maximum(rejected_tokens, 1.0)
    return stats


def _token_logps(model: LlamaForCausalLM, params: Any, batch: dict, chunk_size: int, with_sum_sq: bool) -> TokenLogps:
    """Per-token completion log-probs in the batch's layout: plain [2B, L-1] (chosen rows, then
    rejected rows) or packed [B, 2K] (chosen columns, then rejected columns)."""
    if is_packed(batch):
        return _packed_token_logps(model, params, batch, chunk_size, with_sum_sq)
    return _plain_token_logps(model, params, batch, chunk_size, with_sum_sq)


def _packed_token_logps(model: LlamaForCausalLM, params: Any, batch: dict, chunk_size: int, with_sum_sq: bool) -> TokenLogps:
    """One forward of B prefix-shared rows; the output layer only at the 2K gathered positions."""
    mask = packed_attention_mask(batch["segment_ids"], batch["positions"], model.config.sliding_window)
    hidden = model.apply({"params": params}, batch["input_ids"], positions=batch["positions"], mask=mask, return_hidden=True)
    both = {name: jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=1)
            for name in ("index", "labels", "label_mask")}
    return gathered_token_logps(hidden, output_embedding(params, model.config), both["index"], both["labels"],
                                both["label_mask"], chunk_size, with_sum_sq)


def _plain_token_logps(model: LlamaForCausalLM, params: Any, batch: dict, chunk_size: int, with_sum_sq: bool) -> TokenLogps:
    """One forward of 2B rows (chosen rows, then rejected rows)."""
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attention = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    loss_mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    hidden = model.apply({"params": params}, ids, attention_mask=attention, return_hidden=True)
    return completion_token_logps(hidden, output_embedding(params, model.config), ids, loss_mask, chunk_size, with_sum_sq)


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
        return jnp.concatenate([ld_token_weights(mask[:, :width], shared, alpha),
                                ld_token_weights(mask[:, width:], shared, alpha)], axis=1)
    return ld_token_weights(mask, jnp.concatenate([shared, shared]), alpha)


def reference_logps(model: LlamaForCausalLM, ref_params: Any, batch: dict, chunk_size: int, ld_alpha: float = 1.0):
    """(chosen, rejected) reference log-probs: precomputed in the batch (with the same ``ld_alpha``),
    or from ``ref_params``."""
    if ref_params is None:
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    chosen, rejected, _, _ = completion_logps(model, jax.lax.stop_gradient(ref_params), batch, chunk_size, ld_alpha)
    return chosen, rejected


def _pair_logps(model, params, ref_params, batch, chunk_size, settings: DPOSettings) -> PairLogps:
    stats = _completion_stats(model, params, batch, chunk_size, settings.ld_alpha, settings.use_weighting)
    ref_chosen, ref_rejected = reference_logps(model, ref_params, batch, chunk_size, settings.ld_alpha)
    return PairLogps(reference_chosen=ref_chosen, reference_rejected=ref_rejected, **stats)


def _weights(batch: dict) -> jnp.ndarray:
    pairs = batch["input_ids" if is_packed(batch) else "chosen_input_ids"].shape[0]
    return batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones((pairs,), jnp.float32)


def _metric_sums(logps: PairLogps, weights: jnp.ndarray, settings: DPOSettings, loss: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Per-pair metrics summed over valid pairs, ``num_pairs``, and ``loss``: this batch's share of the loss."""
    sums = {name: jnp.sum(weights * value) for name, value in per_pair_metrics(logps, settings).items()}
    sums["loss"] = jax.lax.stop_gradient(loss)
    sums["num_pairs"] = jnp.sum(weights)
    return sums


def metric_means(sums: dict[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """Turn summed metrics into TRL's means (``loss`` is already the whole loss) plus ``num_pairs``."""
    count = jnp.maximum(sums["num_pairs"], 1.0)
    means = {name: value / count for name, value in sums.items() if name not in ("loss", "num_pairs")}
    means["loss"] = sums["loss"]
    means["num_pairs"] = sums["num_pairs"]
    return means


def pair_set_metrics(per_pair: dict[str, Any], settings: DPOSettings) -> dict[str, jnp.ndarray]:
    """TRL's metrics of a set of pairs taken as one batch, from ``eval_step`` outputs (without
    ``valid``) of its valid pairs, concatenated: the loss over all of them (aot sorts all of them, sft
    averages all their chosen tokens), whatever the batches they were scored in."""
    logps = PairLogps(**{name: jnp.asarray(value) for name, value in per_pair.items()})
    valid = jnp.ones_like(logps.policy_chosen)
    loss = batch_loss_sum(logps, valid, settings, jnp.maximum(jnp.sum(valid), 1.0),
                          jnp.maximum(jnp.sum(logps.chosen_tokens), 1.0))
    return metric_means(_metric_sums(logps, valid, settings, loss))


def _split_microbatches(batch: dict, grad_accum: int) -> dict:
    def split(x):
        if x.shape[0] % grad_accum:
            raise ValueError(f"batch of {x.shape[0]} pairs does not split into {grad_accum} micro-batches")
        return x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree_util.tree_map(split, batch)


def make_train_step(
    model: LlamaForCausalLM,
    settings: DPOSettings,
    optimizer: optax.GradientTransformation,
    grad_accum: int = 1,
    chunk_size: int = 128,
) -> Callable:
    """Build ``train_step(state, ref_params, batch) -> (state, metrics)``, a pure function.

    The loss is that of the whole batch (sdpo_jax.losses), whatever ``grad_accum``: the micro-batch
    shares add up to it, except when ``settings.couples_pairs`` (aot sorts the whole batch), where
    ``_coupled_gradients`` takes two passes.
    """

    def pair_logps(params, ref_params, batch):
        return _pair_logps(model, params, ref_params, batch, chunk_size, settings)

    def train_step(state: TrainState, ref_params: Any, batch: dict):
        weights = _weights(batch)
        totals = (jnp.maximum(jnp.sum(weights), 1.0),
                  jnp.maximum(jnp.sum(weights * chosen_token_counts(batch).astype(jnp.float32)), 1.0))
        if grad_accum > 1 and settings.couples_pairs:
            grads, sums = _coupled_gradients(model, chunk_size, settings, pair_logps, state.params, ref_params, batch,
                                             grad_accum, totals)
        else:
            grads, sums = _accumulated_gradients(settings, pair_logps, state.params, ref_params, batch, grad_accum, totals)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = metric_means(sums)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def _accumulated_gradients(settings: DPOSettings, pair_logps: Callable, params: Any, ref_params: Any, batch: dict,
                           grad_accum: int, totals: tuple) -> tuple[Any, dict]:
    """(gradient, metric sums) as the sum over micro-batches of the gradients of their loss shares."""

    def micro_loss(params, micro):
        logps = pair_logps(params, ref_params, micro)
        loss = batch_loss_sum(logps, _weights(micro), settings, *totals)
        return loss, _metric_sums(logps, _weights(micro), settings, loss)

    grad_fn = jax.grad(micro_loss, has_aux=True)
    if grad_accum == 1:
        return grad_fn(params, batch)

    def accumulate(carry, micro):
        return jax.tree_util.tree_map(jnp.add, carry, grad_fn(params, micro)), None

    micro_batches = _split_microbatches(batch, grad_accum)
    zeros = jax.eval_shape(lambda: grad_fn(params, jax.tree_util.tree_map(lambda x: x[0], micro_batches)))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    result, _ = jax.lax.scan(accumulate, zeros, micro_batches)
    return result


def _coupled_gradients(model: LlamaForCausalLM, chunk_size: int, settings: DPOSettings, pair_logps: Callable, params: Any,
                       ref_params: Any, batch: dict, grad_accum: int, totals: tuple) -> tuple[Any, dict]:
    """(gradient, metric sums) of a loss that couples micro-batches, exactly, in two passes.

    Pass 1 runs every micro-batch forward only and gathers the whole batch's PairLogps; the loss L
    of those and its cotangent g = dL/d(per-pair log-probs) follow. Pass 2 runs each micro-batch
    forward and backward again on sum_i g_i . logps_i(params), whose gradients add up to dL/dparams
    (chain rule). Cost: one more policy forward per micro-batch than the one-pass path.
    """
    micro_batches = _split_microbatches(batch, grad_accum)
    stacked = jax.lax.map(lambda micro: pair_logps(params, ref_params, micro), micro_batches)
    logps = jax.tree_util.tree_map(lambda x: x.reshape(-1), stacked)
    valid = _split_microbatches({"valid": _weights(batch)}, grad_accum)["valid"].reshape(-1)
    loss, cotangent = jax.value_and_grad(lambda lp: batch_loss_sum(lp, valid, settings, *totals))(logps)
    cotangents = jax.tree_util.tree_map(lambda x: x.reshape(grad_accum, -1), cotangent)

    def accumulate(grads, micro_and_cotangent):
        micro, cot = micro_and_cotangent

        def surrogate(p):  # the token counts do not depend on p: their terms have no gradient
            stats = _completion_stats(model, p, micro, chunk_size, settings.ld_alpha, with_weight=False)
            return sum(jnp.vdot(getattr(cot, name), value) for name, value in stats.items())

        return jax.tree_util.tree_map(jnp.add, grads, jax.grad(surrogate)(params)), None

    grads, _ = jax.lax.scan(accumulate, jax.tree_util.tree_map(jnp.zeros_like, params), (micro_batches, cotangents))
    return grads, _metric_sums(logps, valid, settings, loss)


def make_eval_step(model: LlamaForCausalLM, settings: DPOSettings, chunk_size: int = 128) -> Callable:
    """Build ``eval_step(params, ref_params, batch) -> per-pair values`` [B]: PairLogps's fields by name
    and ``valid``. Concatenate the valid rows of all batches, then ``pair_set_metrics``. The values
    depend on ``settings`` only through ld_alpha and use_weighting."""

    def eval_step(params: Any, ref_params: Any, batch: dict):
        logps = _pair_logps(model, params, ref_params, batch, chunk_size, settings)
        values = {field.name: getattr(logps, field.name) for field in dataclasses.fields(logps)}
        return {**{name: value for name, value in values.items() if value is not None}, "valid": _weights(batch)}

    return eval_step


def make_reference_step(model: LlamaForCausalLM, chunk_size: int = 128, ld_alpha: float = 1.0) -> Callable:
    """Build ``reference_step(ref_params, batch) -> (chosen_logps, rejected_logps)`` for precomputing;
    ``ld_alpha`` must be the loss's (LD-DPO weighs the reference's tokens too)."""

    def reference_step(ref_params: Any, batch: dict):
        return reference_logps(model, ref_params, batch, chunk_size, ld_alpha)

    return reference_step
