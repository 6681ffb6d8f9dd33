"""Autoregressive decoding with a KV cache: greedy or sampled (temperature, top-p), batched, one
compile per shape, on one device or with the rows of each batch split over a mesh.

Prompts are left-padded to a common length P (a multiple of ``pad_multiple``) so that every row
writes its next token into the same cache slot. Slot j of the cache holds a key that is valid
once written; the token in slot i attends to slots j <= i that are valid and, with a sliding
window w, whose position p_j satisfies p_i - p_j < w. Positions count real tokens only: the
prompt's are 0..len-1 and the n-th new token's is len + n - 1, so the left padding changes nothing.

    prefill:  decode(prompt [B, P]) writes slots 0..P-1; new token 0 comes from slot P-1
    step n:   decode(token n-1 [B, 1]) writes slot P+n-1 and yields new token n

Greedy picks argmax_v logits. Sampling draws from softmax(logits / temperature), restricted with
``top_p`` < 1 to the nucleus of `top_p_filter`, by inverting the cumulative distribution at one
uniform number per row and step: new token n of row r of batch b (prompts b*batch_size ..
(b+1)*batch_size - 1, in order) uses

    u = uniform(fold_in(fold_in(fold_in(key(seed), b), n), r))

and nothing else random, so the samples are fixed by (seed, b, r, n) and the row's logits: a run
that regenerates the same batches (same prompts in the same order, batch_size, pad_multiple,
seed, settings, model and parameters) gets the same tokens, whichever mesh the rows are split over
(up to float rounding of the logits where the layout changes the order of a sum). A row stops
after ``eos_token_id``; the loop stops when every row has.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdpo_jax.models.llama import KVCache, LlamaForCausalLM, decode, output_embedding, unstacked_layers
from sdpo_jax.sharding import BATCH_AXES

_SAMPLING_BLOCK = 128  # tokens per block of the two-level inverse CDF


def cache_attention_mask(
    key_valid: jnp.ndarray,
    key_positions: jnp.ndarray,
    first_slot: jnp.ndarray,
    query_len: int,
    sliding_window: int | None,
) -> jnp.ndarray:
    """Boolean [B, 1, S, T] for queries in slots first_slot..first_slot+S-1 over T cache slots."""
    query_slots = first_slot + jnp.arange(query_len)
    key_slots = jnp.arange(key_valid.shape[1])
    allowed = (key_slots[None, :] <= query_slots[:, None])[None] & key_valid[:, None, :]
    if sliding_window is not None:
        query_positions = jax.lax.dynamic_slice_in_dim(key_positions, first_slot, query_len, axis=1)
        allowed = allowed & (query_positions[:, :, None] - key_positions[:, None, :] < sliding_window)
    return allowed[:, None]


def _ordered_bits(x: jnp.ndarray) -> jnp.ndarray:
    """int32 keys in the order of the float32 values x (bit patterns, negatives' magnitude bits flipped)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def top_p_filter(logits: jnp.ndarray, top_p: float) -> jnp.ndarray:
    """logits [B, V] with -inf outside each row's nucleus: transformers' TopPLogitsWarper rule.

    Token v is kept iff the probability mass of the tokens above it, sum of softmax(logits) over
    logits > logits[v], is below ``top_p``: the smallest set of most likely tokens whose mass reaches
    top_p, and always the most likely token. Tokens tied with the smallest kept logit are all kept
    (transformers keeps those its sort puts last). The cutoff is found without sorting the
    vocabulary, by bisection over the float32 order: the largest logit c with mass(logits >= c) >=
    top_p, in 32 passes of a masked sum (a sort of 49k floats per row is ~150 ms on XLA's CPU).
    """
    probs = jax.nn.softmax(logits, axis=-1)
    keys = _ordered_bits(logits)

    def halve(_, bounds):
        low, high = bounds  # the cutoff key lies in [low, high]; mass(keys >= low) >= top_p
        span = jax.lax.bitcast_convert_type(high - low, jnp.uint32)  # high >= low: exact as unsigned
        middle = low + jax.lax.bitcast_convert_type((span >> 1) + (span & 1), jnp.int32)
        reaches = jnp.sum(jnp.where(keys >= middle, probs, 0.0), axis=-1, keepdims=True) >= top_p
        return jnp.where(reaches, middle, low), jnp.where(reaches, high, middle - 1)

    bounds = (jnp.min(keys, axis=-1, keepdims=True), jnp.max(keys, axis=-1, keepdims=True))
    cutoff, _ = jax.lax.fori_loop(0, 32, halve, bounds)
    return jnp.where(keys >= cutoff, logits, -jnp.inf)


def _last_positive(weights: jnp.ndarray) -> jnp.ndarray:
    """Index of the last positive entry along the last axis (0 when there is none)."""
    size = weights.shape[-1]
    return size - 1 - jnp.argmax(weights[..., ::-1] > 0, axis=-1)


def inverse_cdf(weights: jnp.ndarray, uniform: jnp.ndarray) -> jnp.ndarray:
    """int32 [B]: for weights [B, V] >= 0 (each row with positive mass W) and uniform [B] in [0, 1),
    the first v whose cumulative weight exceeds uniform * W, i.e. a draw from weights / W.

    Two levels (blocks of 128 tokens, then the tokens of one block) instead of a cumulative sum over
    the whole vocabulary; float rounding at the end of a row can never pick a token of weight 0.
    """
    batch, vocab = weights.shape
    blocks = -(-vocab // _SAMPLING_BLOCK)
    blocked = jnp.pad(weights, ((0, 0), (0, blocks * _SAMPLING_BLOCK - vocab))).reshape(batch, blocks, _SAMPLING_BLOCK)
    block_mass = blocked.sum(axis=-1)
    block_end = jnp.cumsum(block_mass, axis=-1)
    target = uniform * block_end[:, -1]
    block = jnp.minimum(jnp.sum(block_end <= target[:, None], axis=-1), _last_positive(block_mass))
    inside = jnp.take_along_axis(blocked, block[:, None, None], axis=1)[:, 0]
    before = jnp.take_along_axis(block_end - block_mass, block[:, None], axis=1)
    token = jnp.minimum(
        jnp.sum(before + jnp.cumsum(inside, axis=-1) <= target[:, None], axis=-1), _last_positive(inside)
    )
    return (block * _SAMPLING_BLOCK + token).astype(jnp.int32)


def next_tokens(logits: jnp.ndarray, key: jax.Array, temperature: float, top_p: float) -> jnp.ndarray:
    """int32 [B] from float32 logits [B, V]: argmax when temperature is 0, else a draw from
    softmax(top_p_filter(logits / temperature)) with row r's uniform from fold_in(key, r)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if top_p < 1.0:
        scaled = top_p_filter(scaled, top_p)
    weights = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))
    rows = jnp.arange(logits.shape[0])
    uniform = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r)))(rows)
    return inverse_cdf(weights, uniform)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_token_id", "temperature", "top_p", "rows"))
def _decode(
    model: LlamaForCausalLM,
    params: Any,
    prompt: jnp.ndarray,
    prompt_valid: jnp.ndarray,
    key: jax.Array,
    max_new_tokens: int,
    eos_token_id: int | None,
    temperature: float,
    top_p: float,
    rows: NamedSharding | None,
) -> jnp.ndarray:
    """New tokens [B, max_new_tokens] (after a row's EOS: EOS repeated) for left-padded prompts;
    new token n is drawn with fold_in(key, n); ``rows`` (or None) splits the batch over a mesh.

    ``model``: the decoding clone (XLA attention, activations laid out as ``rows``); ``prompt``:
    int32 [B, P] token ids, left-padded (padding ids are arbitrary); ``prompt_valid``: bool [B, P],
    True on a row's real tokens, False on its left padding (positions and the cache mask come from
    it); ``key``: the batch's key, fold_in(key(seed), batch index); ``max_new_tokens``: the decode
    steps and the output width; ``eos_token_id``: the id after which a row is done (None: no row
    stops early, the loop runs all ``max_new_tokens`` steps); ``temperature``: 0 for greedy, else
    the softmax temperature; ``top_p``: the nucleus mass (1.0: no filter); ``rows``: the
    NamedSharding of the rows over the mesh's batch axes, or None on one device. All but the
    arrays and ``params`` are static (a compile per value).
    """
    batch, prompt_len = prompt.shape
    slots = prompt_len + max_new_tokens
    lengths = prompt_valid.sum(axis=1)
    key_valid = jnp.zeros((batch, slots), bool).at[:, :prompt_len].set(prompt_valid)
    prompt_positions = jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0)
    key_positions = jnp.concatenate([prompt_positions, lengths[:, None] + jnp.arange(max_new_tokens)[None]], axis=1)
    head = output_embedding(params, model.config).astype(model.dtype)
    layers = unstacked_layers(params)
    window = model.config.sliding_window

    def forward(tokens, cache, key_valid):
        first = cache.index
        positions = jax.lax.dynamic_slice_in_dim(key_positions, first, tokens.shape[1], axis=1)
        mask = cache_attention_mask(key_valid, key_positions, first, tokens.shape[1], window)
        hidden, cache = decode(model, layers, tokens, positions, mask, cache)
        logits = jnp.einsum("bd,dv->bv", hidden[:, -1], head, preferred_element_type=jnp.float32)
        return logits, cache

    def pick(logits, n):
        return next_tokens(logits, jax.random.fold_in(key, n), temperature, top_p)

    cache = KVCache.empty(model.config, batch, slots, model.dtype)
    if rows is not None:  # each row's cache on its row's devices; heads and slots as XLA likes
        layout = NamedSharding(rows.mesh, PartitionSpec(rows.spec[0], *[PartitionSpec.UNCONSTRAINED] * 3))
        cache = jax.tree_util.tree_map(lambda a: jax.lax.with_sharding_constraint(a, layout) if a.ndim else a, cache)
    logits, cache = forward(prompt, cache, key_valid)
    token = pick(logits, 0)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)
    done = token == eos_token_id if eos_token_id is not None else jnp.zeros((batch,), bool)

    def keep_going(carry):
        n, _, _, _, _, done = carry
        return (n < max_new_tokens) & ~jnp.all(done)

    def step(carry):
        n, token, cache, key_valid, out, done = carry
        key_valid = key_valid.at[:, prompt_len + n - 1].set(True)
        logits, cache = forward(token[:, None], cache, key_valid)
        new = pick(logits, n)
        if eos_token_id is not None:
            new = jnp.where(done, eos_token_id, new)
            done = done | (new == eos_token_id)
        return n + 1, new, cache, key_valid, out.at[:, n].set(new), done

    carry = (jnp.int32(1), token, cache, key_valid, out, done)
    out = jax.lax.while_loop(keep_going, step, carry)[4]
    return out if rows is None else jax.lax.with_sharding_constraint(out, NamedSharding(rows.mesh, PartitionSpec()))


def _check(
    model: LlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    mesh: Mesh | None,
) -> None:
    """One-line ValueErrors for arguments `generate` cannot decode."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if mesh is not None:
        devices = int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))
        if batch_size % devices:
            raise ValueError(
                f"generate: batch_size {batch_size} does not split over the mesh's {devices} batch devices "
                f"({' x '.join(BATCH_AXES)}); use a multiple of {devices}"
            )
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"generate: prompt {i} has a token id outside [0, {vocab})")


def _left_padded(group: list[list[int]], batch_size: int, pad_multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, valid) [batch_size, P]: the prompts left-padded to P, a multiple of ``pad_multiple``;
    rows past the group repeat its first prompt."""
    width = -(-max(len(p) for p in group) // pad_multiple) * pad_multiple
    tokens = np.zeros((batch_size, width), np.int32)
    valid = np.zeros((batch_size, width), bool)
    for r, p in enumerate(group + [group[0]] * (batch_size - len(group))):
        tokens[r, width - len(p) :] = p
        valid[r, width - len(p) :] = True
    return tokens, valid


def generate(
    model: LlamaForCausalLM,
    params: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    pad_multiple: int = 16,
    mesh: Mesh | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (up to and including EOS), greedy when ``temperature`` is 0,
    else sampled at that temperature from the ``top_p`` nucleus (1.0: the whole vocabulary).

    ``prompts``: token id lists exactly as the model should read them (special tokens, chat
    template already applied), each non-empty with ids in [0, vocab_size); ``max_new_tokens``:
    the most new tokens per prompt (>= 1); ``eos_token_id``: a row stops after generating it and
    its result ends with it (None: every result has exactly ``max_new_tokens`` tokens);
    ``temperature`` >= 0; ``top_p`` in (0, 1]; ``seed``: the sampling seed (unused when greedy);
    ``batch_size``: rows per decode call (a short last batch is filled with copies of its first
    prompt, whose results are dropped); ``pad_multiple``: each batch's prompts are left-padded to
    a multiple of it.

    Prompts are decoded ``batch_size`` at a time, left-padded to a multiple of ``pad_multiple``
    (a few compiled shapes); the XLA attention path is used because the cache mask is custom.
    Without ``mesh`` the rows are not pinned to any layout. With ``mesh`` the rows of each batch
    are split over its batch axes (data, fsdp): batch_size must be a multiple of their size, and
    ``params`` are used as placed (e.g. already sharded on that mesh). Which random numbers a
    sample uses is in the module docstring: (seed, batch index, row, step).
    """
    _check(model, prompts, max_new_tokens, temperature, top_p, batch_size, mesh)
    rows = None if mesh is None else NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    decoder = model.clone(attention_implementation="xla", activation_sharding=rows)
    results: list[list[int]] = []
    for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
        group = [list(p) for p in prompts[start : start + batch_size]]
        tokens, valid = (jax.device_put(a, rows) for a in _left_padded(group, batch_size, pad_multiple))
        key = jax.random.fold_in(jax.random.key(seed), batch_index)
        out = np.asarray(
            _decode(
                decoder,
                params,
                tokens,
                valid,
                key,
                max_new_tokens,
                eos_token_id,
                float(temperature),
                float(top_p),
                rows,
            )
        )
        for row in out[: len(group)]:
            row = row.tolist()
            if eos_token_id is not None and eos_token_id in row:
                row = row[: row.index(eos_token_id) + 1]
            results.append(row)
    return results
