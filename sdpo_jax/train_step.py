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
devices) whose gradients add up to the full batch's, so A changes memory, not the result.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from sdpo_jax.logprobs import gathered_token_logps, sequence_logps
from sdpo_jax.losses import DPOSettings, PairLogps, batch_loss_sum, per_pair_loss, per_pair_metrics
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


def completion_logps(model: LlamaForCausalLM, params: Any, batch: dict, chunk_size: int):
    """(chosen, rejected) sequence log-probs and completion token counts, either layout."""
    if is_packed(batch):
        return _packed_completion_logps(model, params, batch, chunk_size)
    return _plain_completion_logps(model, params, batch, chunk_size)


def _packed_completion_logps(model: LlamaForCausalLM, params: Any, batch: dict, chunk_size: int):
    """One forward of B prefix-shared rows; the output layer only at the 2K gathered positions."""
    mask = packed_attention_mask(batch["segment_ids"], batch["positions"], model.config.sliding_window)
    hidden = model.apply({"params": params}, batch["input_ids"], positions=batch["positions"], mask=mask, return_hidden=True)
    width = batch["chosen_index"].shape[1]
    both = {name: jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=1)
            for name in ("index", "labels", "label_mask")}
    logps = gathered_token_logps(hidden, output_embedding(params, model.config), both["index"], both["labels"],
                                 both["label_mask"], chunk_size)
    counts = both["label_mask"].astype(jnp.float32)
    return (jnp.sum(logps[:, :width], -1), jnp.sum(logps[:, width:], -1),
            jnp.sum(counts[:, :width], -1), jnp.sum(counts[:, width:], -1))


def _plain_completion_logps(model: LlamaForCausalLM, params: Any, batch: dict, chunk_size: int):
    """One forward of 2B rows (chosen rows, then rejected rows)."""
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attention = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    loss_mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    hidden = model.apply({"params": params}, ids, attention_mask=attention, return_hidden=True)
    sums, counts = sequence_logps(hidden, output_embedding(params, model.config), ids, loss_mask, chunk_size)
    pairs = batch["chosen_input_ids"].shape[0]
    return sums[:pairs], sums[pairs:], counts[:pairs], counts[pairs:]


def reference_logps(model: LlamaForCausalLM, ref_params: Any, batch: dict, chunk_size: int):
    """(chosen, rejected) reference log-probs: precomputed in the batch, or from ``ref_params``."""
    if ref_params is None:
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    chosen, rejected, _, _ = completion_logps(model, jax.lax.stop_gradient(ref_params), batch, chunk_size)
    return chosen, rejected


def _pair_logps(model, params, ref_params, batch, chunk_size) -> PairLogps:
    chosen, rejected, chosen_tokens, rejected_tokens = completion_logps(model, params, batch, chunk_size)
    ref_chosen, ref_rejected = reference_logps(model, ref_params, batch, chunk_size)
    return PairLogps(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens)


def _weights(batch: dict) -> jnp.ndarray:
    pairs = batch["input_ids" if is_packed(batch) else "chosen_input_ids"].shape[0]
    return batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones((pairs,), jnp.float32)


def _metric_sums(logps: PairLogps, weights: jnp.ndarray, settings: DPOSettings) -> dict[str, jnp.ndarray]:
    sums = {name: jnp.sum(weights * value) for name, value in per_pair_metrics(logps, settings).items()}
    sums["loss"] = jnp.sum(weights * jax.lax.stop_gradient(per_pair_loss(logps, settings)))
    sums["num_pairs"] = jnp.sum(weights)
    sums["chosen_tokens"] = jnp.sum(weights * logps.chosen_tokens)
    sums["nll_sum"] = -jnp.sum(weights * jax.lax.stop_gradient(logps.policy_chosen))
    return sums


def metric_means(sums: dict[str, jnp.ndarray], settings: DPOSettings) -> dict[str, jnp.ndarray]:
    """Turn summed metrics into TRL's means; ``loss`` includes the RPO term."""
    count = jnp.maximum(sums["num_pairs"], 1.0)
    means = {name: value / count for name, value in sums.items() if name not in ("num_pairs", "chosen_tokens", "nll_sum")}
    if settings.rpo_alpha:
        means["loss"] = means["loss"] + settings.rpo_alpha * sums["nll_sum"] / jnp.maximum(sums["chosen_tokens"], 1.0)
    means["num_pairs"] = sums["num_pairs"]
    return means


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
    """Build ``train_step(state, ref_params, batch) -> (state, metrics)``, a pure function."""

    def train_step(state: TrainState, ref_params: Any, batch: dict):
        weights = _weights(batch)
        num_pairs = jnp.maximum(jnp.sum(weights), 1.0)
        num_chosen_tokens = jnp.maximum(
            jnp.sum(weights * chosen_token_counts(batch).astype(jnp.float32)), 1.0
        )

        def micro_loss(params, micro):
            logps = _pair_logps(model, params, ref_params, micro, chunk_size)
            loss = batch_loss_sum(logps, _weights(micro), settings, num_pairs, num_chosen_tokens)
            return loss, _metric_sums(logps, _weights(micro), settings)

        grad_fn = jax.grad(micro_loss, has_aux=True)
        if grad_accum == 1:
            grads, sums = grad_fn(state.params, batch)
        else:
            def accumulate(carry, micro):
                grads, sums = grad_fn(state.params, micro)
                return jax.tree_util.tree_map(jnp.add, carry, (grads, sums)), None

            zero_grads = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            micro_batches = _split_microbatches(batch, grad_accum)
            zero_sums = jax.eval_shape(lambda: grad_fn(state.params, jax.tree_util.tree_map(lambda x: x[0], micro_batches))[1])
            zero_sums = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums)
            (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), micro_batches)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = metric_means(sums, settings)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model: LlamaForCausalLM, settings: DPOSettings, chunk_size: int = 128) -> Callable:
    """Build ``eval_step(params, ref_params, batch) -> metric sums`` (add them up, then metric_means)."""

    def eval_step(params: Any, ref_params: Any, batch: dict):
        return _metric_sums(_pair_logps(model, params, ref_params, batch, chunk_size), _weights(batch), settings)

    return eval_step


def make_reference_step(model: LlamaForCausalLM, chunk_size: int = 128) -> Callable:
    """Build ``reference_step(ref_params, batch) -> (chosen_logps, rejected_logps)`` for precomputing."""

    def reference_step(ref_params: Any, batch: dict):
        return reference_logps(model, ref_params, batch, chunk_size)

    return reference_step
