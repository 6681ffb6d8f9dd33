"""The DPO train step: pure, and jitted with shardings over a device mesh (pjit).

    train_step(state, ref_params, batch) -> (state, metrics)

``batch`` holds a global batch of B pairs in either layout of sdpo_jax.pair_logps, with the
reference's log-probs precomputed in it (``ref_params`` None; sdpo_jax.reference) or computed in
the step from ``ref_params``. With ``grad_accum`` = A the batch is split into A micro-batches
(rows i, i+A, i+2A, ... so each stays spread over the devices) whose gradients add up to the full
batch's, so A changes memory, not the result; a loss that couples micro-batches (aot sorts the
whole batch) takes one more policy forward per micro-batch for that (``_coupled_gradients``).
Precomputed reference log-probs must come from sdpo_jax.reference with the loss's ``ld_alpha``.

``jit_train_step`` compiles it for a mesh: the state's shardings come from the parameters'
logical axes (sdpo_jax.placement.state_shardings), the state is donated (updated in place), the
reference parameters are an input only, never donated, and the metrics come back replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from sdpo_jax.losses import DPOSettings, batch_loss_sum, metric_means, metric_sums
from sdpo_jax.models.llama import LlamaForCausalLM
from sdpo_jax.pair_logps import pair_logps, pair_weights, policy_completion_stats
from sdpo_jax.prefix_sharing import chosen_token_counts
from sdpo_jax.sharding import batch_sharding, replicated


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    opt_state: Any

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


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

    def logps_of(params, ref_params, batch):
        return pair_logps(model, params, ref_params, batch, chunk_size, settings)

    def train_step(state: TrainState, ref_params: Any, batch: dict):
        weights = pair_weights(batch)
        totals = (
            jnp.maximum(jnp.sum(weights), 1.0),
            jnp.maximum(jnp.sum(weights * chosen_token_counts(batch).astype(jnp.float32)), 1.0),
        )
        if grad_accum > 1 and settings.couples_pairs:
            grads, sums = _coupled_gradients(
                model, chunk_size, settings, logps_of, state.params, ref_params, batch, grad_accum, totals
            )
        else:
            grads, sums = _accumulated_gradients(
                settings, logps_of, state.params, ref_params, batch, grad_accum, totals
            )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = metric_means(sums)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def _accumulated_gradients(
    settings: DPOSettings, logps_of: Callable, params: Any, ref_params: Any, batch: dict, grad_accum: int, totals: tuple
) -> tuple[Any, dict]:
    """(gradient, metric sums) as the sum over micro-batches of the gradients of their loss shares.

    ``settings``: the loss's DPOSettings; ``logps_of``: ``logps_of(params, ref_params, batch)`` ->
    the PairLogps (loss inputs) of a (micro-)batch's pairs; ``params``: the policy's;
    ``ref_params``: the reference's, or None when its log-probs are precomputed in ``batch``;
    ``batch``: the global batch of B pairs; ``grad_accum``: A, the number of micro-batches of B/A
    pairs (rows i, i+A, i+2A, ...), run one after another in a ``lax.scan`` (1: the whole batch in
    one pass); ``totals``: (valid pairs, their chosen tokens) of the whole batch, float32 scalars
    at least 1, the loss's denominators (``batch_loss_sum``), so the micro-batch shares add up.
    """

    def micro_loss(params, micro):
        logps = logps_of(params, ref_params, micro)
        loss = batch_loss_sum(logps, pair_weights(micro), settings, *totals)
        return loss, metric_sums(logps, pair_weights(micro), settings, loss)

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


def _coupled_gradients(
    model: LlamaForCausalLM,
    chunk_size: int,
    settings: DPOSettings,
    logps_of: Callable,
    params: Any,
    ref_params: Any,
    batch: dict,
    grad_accum: int,
    totals: tuple,
) -> tuple[Any, dict]:
    """(gradient, metric sums) of a loss that couples micro-batches, exactly, in two passes.

    Pass 1 runs every micro-batch forward only and gathers the whole batch's PairLogps; the loss L
    of those and its cotangent g = dL/d(per-pair log-probs) follow. Pass 2 runs each micro-batch
    forward and backward again on sum_i g_i . logps_i(params), whose gradients add up to dL/dparams
    (chain rule). Cost: one more policy forward per micro-batch than the one-pass path.

    ``model`` and ``chunk_size`` (positions per output-layer chunk, sdpo_jax.logprobs) serve pass
    2's policy forward; ``logps_of``, ``totals`` and the rest are `_accumulated_gradients`'s:
    ``logps_of(params, ref_params, batch)`` -> PairLogps, ``totals`` = (valid pairs, their chosen
    tokens) of the whole batch; ``grad_accum`` (> 1 here) is the number of micro-batches.
    """
    micro_batches = _split_microbatches(batch, grad_accum)
    stacked = jax.lax.map(lambda micro: logps_of(params, ref_params, micro), micro_batches)
    logps = jax.tree_util.tree_map(lambda x: x.reshape(-1), stacked)
    valid = _split_microbatches({"valid": pair_weights(batch)}, grad_accum)["valid"].reshape(-1)
    loss, cotangent = jax.value_and_grad(lambda lp: batch_loss_sum(lp, valid, settings, *totals))(logps)
    cotangents = jax.tree_util.tree_map(lambda x: x.reshape(grad_accum, -1), cotangent)

    def accumulate(grads, micro_and_cotangent):
        micro, cot = micro_and_cotangent

        def surrogate(p):  # the token counts do not depend on p: their terms have no gradient
            stats = policy_completion_stats(model, p, micro, chunk_size, settings.ld_alpha, with_weight=False)
            return sum(jnp.vdot(getattr(cot, name), value) for name, value in stats.items())

        return jax.tree_util.tree_map(jnp.add, grads, jax.grad(surrogate)(params)), None

    grads, _ = jax.lax.scan(accumulate, jax.tree_util.tree_map(jnp.zeros_like, params), (micro_batches, cotangents))
    return grads, metric_sums(logps, valid, settings, loss)


def jit_train_step(
    model: LlamaForCausalLM,
    settings: DPOSettings,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    shardings: TrainState,
    with_reference_params: bool,
    grad_accum: int = 1,
    chunk_size: int = 128,
) -> Callable:
    """``make_train_step``'s step jitted for ``mesh``: the state laid out and donated as ``shardings``
    says, the batch split over the mesh's batch axes, ``ref_params`` laid out as the parameters
    (``with_reference_params``) or None (log-probs precomputed in the batch), the metrics replicated.
    Build once, reuse.

    ``settings``: the loss's DPOSettings; ``optimizer``: the stage's optax transformation (AdamW
    and schedule, sdpo_jax.optim); ``shardings``: a TrainState of NamedShardings
    (sdpo_jax.placement.state_shardings); ``with_reference_params``: True when the step computes
    the reference's log-probs itself from ``ref_params`` (a moving reference, or
    ``train.precompute_reference`` off); ``grad_accum``: A, micro-batches per optimizer step
    (``train.grad_accum``): the global batch's B pairs must split into A micro-batches of B/A
    pairs, each spread over the devices; it changes memory and time, not the result (up to float
    rounding); ``chunk_size``: positions per chunk of the output layer (``model.logprob_chunk``,
    sdpo_jax.logprobs), bounding the logits in memory to rows x chunk_size x vocab.
    """
    ref_sharding = shardings.params if with_reference_params else None
    return jax.jit(
        make_train_step(model, settings, optimizer, grad_accum, chunk_size),
        in_shardings=(shardings, ref_sharding, batch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )
