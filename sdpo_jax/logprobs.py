"""Completion log-probabilities from final hidden states, without full-vocabulary logits.

For a row with tokens x_0..x_{S-1} and a completion mask m_i (1 where x_i belongs to the
completion), the sequence log-probability is

    log pi(y | x) = sum_{i=1}^{S-1} m_i * log softmax(h_{i-1} W)[x_i]

with h the final normalised hidden states and W the [hidden, vocab] output embedding. The
logits h W are computed for one chunk of ``chunk_size`` positions at a time inside ``lax.scan``;
each chunk is wrapped in ``jax.checkpoint`` so the backward pass recomputes its logits instead of
keeping them. Peak memory is therefore rows x chunk_size x vocab floats, not rows x S x vocab.
When everything fits in one chunk the logits are kept instead: the same peak (the output layer
is the last thing the forward computes and the first the backward needs), one fewer logits
matmul. The logits accumulate in float32; in bfloat16 compute the backward products stay
bfloat16 (``sdpo_jax.mixed_einsum``).
A chunk in which no row has a completion token (all prompt, or all padding) is skipped
(``lax.cond``), forward and backward: its log-probs are 0 and never used.

``gathered_token_logps`` goes further when the batch says which hidden state predicts each
completion token (``index`` [rows, K], as prefix-shared batches do): it gathers those K hidden
states per row first, so the output layer runs on completion tokens only (rows x K instead of
rows x S positions), whatever the prompt lengths of the rows.

Two per-token extras serve TRL's pair weightings (sdpo_jax.losses): ``with_sum_sq`` also returns
log sum_v p_v^2 of each predicted distribution (no gradient; WPO's weights), computed in the same
chunks from the same logits; ``ld_token_weights`` gives LD-DPO's weight of each completion token.
Neither costs anything when unused.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sdpo_jax.mixed_einsum import mixed_einsum


class TokenLogps(NamedTuple):
    """Per-token completion log-probs of some rows: ``logps`` (0 off the completion), ``mask`` (float,
    1 on completion tokens) and, when asked for, ``sum_sq`` = log sum_v p_v^2 (0 off it, no gradient)."""

    logps: jnp.ndarray
    mask: jnp.ndarray
    sum_sq: jnp.ndarray | None = None


def token_logps(
    hidden: jnp.ndarray,
    output_embedding: jnp.ndarray,
    targets: jnp.ndarray,
    chunk_size: int,
    needed: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """log softmax(hidden @ output_embedding)[targets], float32 [rows, seq], chunked over seq.

    ``hidden`` [rows, seq, hidden] predicts ``targets`` [rows, seq] at the same index (the caller
    shifts). ``chunk_size`` >= seq computes everything in one chunk. With ``needed`` [rows, seq],
    chunks where it is false for every row are skipped and hold 0.
    """
    return _chunked_head(hidden, output_embedding, targets, chunk_size, needed, with_sum_sq=False)[0]


def _chunked_head(hidden, output_embedding, targets, chunk_size, needed, with_sum_sq: bool):
    """(token log-probs, log sum_v p_v^2 or None), both float32 [rows, seq]: ``token_logps``'s chunking."""
    rows, seq, _ = hidden.shape
    chunk = max(1, min(chunk_size, seq))
    padded = -(-seq // chunk) * chunk
    if needed is None:
        needed = jnp.ones(targets.shape, bool)
    if padded != seq:
        hidden = jnp.pad(hidden, ((0, 0), (0, padded - seq), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, padded - seq)))
        needed = jnp.pad(needed, ((0, 0), (0, padded - seq)))
    # [chunks, rows, chunk, ...]: the batch axis stays where sharding put it.
    hidden_chunks = hidden.reshape(rows, padded // chunk, chunk, -1).swapaxes(0, 1)
    target_chunks = targets.reshape(rows, padded // chunk, chunk).swapaxes(0, 1)
    chunk_needed = jnp.any(needed.reshape(rows, padded // chunk, chunk), axis=(0, 2))
    weights = output_embedding.astype(hidden.dtype)
    outputs = 2 if with_sum_sq else 1

    def chunk_logps(h, t):
        logits = mixed_einsum("rcd,dv->rcv", h, weights)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        log_z = jax.nn.logsumexp(logits, axis=-1)
        if not with_sum_sq:
            return (target_logit - log_z,)
        # log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)
        return target_logit - log_z, jax.lax.stop_gradient(jax.nn.logsumexp(2 * logits, axis=-1) - 2 * log_z)

    def maybe_chunk_logps(h, t, wanted):
        return jax.lax.cond(wanted, chunk_logps, lambda h, t: (jnp.zeros(t.shape, jnp.float32),) * outputs, h, t)

    if padded > chunk:  # several chunks: keep no chunk's logits for the backward pass
        maybe_chunk_logps = jax.checkpoint(maybe_chunk_logps)

    def body(carry, xs):
        return carry, maybe_chunk_logps(*xs)

    _, results = jax.lax.scan(body, None, (hidden_chunks, target_chunks, chunk_needed))
    results = [r.swapaxes(0, 1).reshape(rows, padded)[:, :seq] for r in results]
    return results[0], (results[1] if with_sum_sq else None)


def completion_token_logps(
    hidden: jnp.ndarray,
    output_embedding: jnp.ndarray,
    input_ids: jnp.ndarray,
    loss_mask: jnp.ndarray,
    chunk_size: int,
    with_sum_sq: bool = False,
) -> TokenLogps:
    """Per-token completion log-probs [rows, seq-1] of right-shifted rows (position i predicts i+1).

    ``loss_mask[r, i]`` is true where ``input_ids[r, i]`` is a completion token; position 0 can
    never be one (nothing predicts it).
    """
    needed = loss_mask[:, 1:]
    mask = needed.astype(jnp.float32)
    logps, sum_sq = _chunked_head(hidden[:, :-1], output_embedding, input_ids[:, 1:], chunk_size, needed, with_sum_sq)
    return TokenLogps(logps * mask, mask, None if sum_sq is None else sum_sq * mask)


def sequence_logps(
    hidden: jnp.ndarray, output_embedding: jnp.ndarray, input_ids: jnp.ndarray, loss_mask: jnp.ndarray, chunk_size: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum of completion-token log-probs [rows], number of completion tokens [rows]); see
    ``completion_token_logps``."""
    tokens = completion_token_logps(hidden, output_embedding, input_ids, loss_mask, chunk_size)
    return jnp.sum(tokens.logps, axis=-1), jnp.sum(tokens.mask, axis=-1)


def gathered_token_logps(
    hidden: jnp.ndarray,
    output_embedding: jnp.ndarray,
    index: jnp.ndarray,
    labels: jnp.ndarray,
    label_mask: jnp.ndarray,
    chunk_size: int,
    with_sum_sq: bool = False,
) -> TokenLogps:
    """label_mask[r, k] * log softmax(hidden[r, index[r, k]] W)[labels[r, k]], float32 [rows, K].

    ``hidden`` [rows, S, hidden]; ``index``, ``labels``, ``label_mask`` [rows, K]. Only the K gathered
    positions reach the output layer (chunked over K as in ``token_logps``).

    ``hidden``: the final normalised hidden states; ``output_embedding``: W, the [hidden, vocab]
    output layer (sdpo_jax.models.llama.output_embedding: the transposed input embedding when
    tied); ``index``: int32, the position in S of the hidden state that predicts completion token
    k of row r (sdpo_jax.prefix_sharing); ``labels``: int32, that token's id; ``label_mask``: bool,
    True on real completion tokens, False on the padding of the K columns (their index and label
    are 0 and their results 0); ``chunk_size``: gathered positions per output-layer chunk (>= K:
    one chunk, logits kept for the backward pass); ``with_sum_sq``: also return ``sum_sq`` =
    log sum_v p_v^2 per token (WPO's weights, no gradient), else it is None.
    """
    picked = jnp.take_along_axis(hidden, index[..., None], axis=1)
    logps, sum_sq = _chunked_head(picked, output_embedding, labels, chunk_size, label_mask, with_sum_sq)
    mask = label_mask.astype(jnp.float32)
    return TokenLogps(
        jnp.where(label_mask, logps, 0.0), mask, None if sum_sq is None else jnp.where(label_mask, sum_sq, 0.0)
    )


def ld_token_weights(mask: jnp.ndarray, shared_length: jnp.ndarray, alpha: float) -> jnp.ndarray:
    """LD-DPO's token weights [rows, T] (arXiv 2409.06411): 1 on a row's first ``shared_length`` [rows]
    completion tokens (the length both completions of its pair have), ``alpha`` on the rest, 0 off the
    completion (``mask``, float [rows, T], 1 on completion tokens in order)."""
    position = jnp.cumsum(mask, axis=-1)  # 1-based index within the completion
    return mask * jnp.where(position <= shared_length[:, None], 1.0, alpha)
