"""Autoregressive decoding with a KV cache: greedy or sampled, batched, one compile per shape.

Prompts are left-padded to a common length P (a multiple of ``pad_multiple``) so that every row
writes its next token into the same cache slot. Slot j of the cache holds a key that is valid
once written; the token in slot i attends to slots j <= i that are valid and, with a sliding
window w, whose position p_j satisfies p_i - p_j < w. Positions count real tokens only: the
prompt's are 0..len-1 and the n-th new token's is len + n - 1, so the left padding changes nothing.

    prefill:  model(prompt [B, P]) writes slots 0..P-1; the next token comes from slot P-1
    step n:   model(token [B, 1]) writes slot P+n-1 and yields token n+1

Greedy picks argmax_v logits; sampling draws from softmax(logits / temperature). A row stops
after ``eos_token_id``; the loop stops when every row has.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdpo_jax.models.llama import KVCache, LlamaForCausalLM, output_embedding


def cache_attention_mask(key_valid: jnp.ndarray, key_positions: jnp.ndarray, first_slot: jnp.ndarray, query_len: int,
                         sliding_window: int | None) -> jnp.ndarray:
    """Boolean [B, 1, S, T] for queries in slots first_slot..first_slot+S-1 over T cache slots."""
    query_slots = first_slot + jnp.arange(query_len)
    key_slots = jnp.arange(key_valid.shape[1])
    allowed = (key_slots[None, :] <= query_slots[:, None])[None] & key_valid[:, None, :]
    if sliding_window is not None:
        query_positions = jax.lax.dynamic_slice_in_dim(key_positions, first_slot, query_len, axis=1)
        allowed = allowed & (query_positions[:, :, None] - key_positions[:, None, :] < sliding_window)
    return allowed[:, None]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_token_id", "temperature"))
def _decode(model: LlamaForCausalLM, params: Any, prompt: jnp.ndarray, prompt_valid: jnp.ndarray, rng: jax.Array,
            max_new_tokens: int, eos_token_id: int | None, temperature: float) -> jnp.ndarray:
    """New tokens [B, max_new_tokens] (after a row's EOS: EOS repeated) for left-padded prompts."""
    batch, prompt_len = prompt.shape
    slots = prompt_len + max_new_tokens
    lengths = prompt_valid.sum(axis=1)
    key_valid = jnp.zeros((batch, slots), bool).at[:, :prompt_len].set(prompt_valid)
    prompt_positions = jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0)
    key_positions = jnp.concatenate([prompt_positions, lengths[:, None] + jnp.arange(max_new_tokens)[None]], axis=1)
    head = output_embedding(params, model.config)
    window = model.config.sliding_window

    def forward(tokens, cache, key_valid):
        first = cache.index
        positions = jax.lax.dynamic_slice_in_dim(key_positions, first, tokens.shape[1], axis=1)
        mask = cache_attention_mask(key_valid, key_positions, first, tokens.shape[1], window)
        hidden, cache = model.apply({"params": params}, tokens, positions=positions, mask=mask, return_hidden=True, cache=cache)
        logits = jnp.einsum("bd,dv->bv", hidden[:, -1], head.astype(hidden.dtype), preferred_element_type=jnp.float32)
        return logits, cache

    def pick(logits, key):
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

    cache = KVCache.empty(model.config, batch, slots, model.dtype)
    logits, cache = forward(prompt, cache, key_valid)
    rng, key = jax.random.split(rng)
    token = pick(logits, key)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)
    done = token == eos_token_id if eos_token_id is not None else jnp.zeros((batch,), bool)

    def keep_going(carry):
        n, _, _, _, _, done, _ = carry
        return (n < max_new_tokens) & ~jnp.all(done)

    def step(carry):
        n, token, cache, key_valid, out, done, rng = carry
        key_valid = key_valid.at[:, prompt_len + n - 1].set(True)
        logits, cache = forward(token[:, None], cache, key_valid)
        rng, key = jax.random.split(rng)
        new = pick(logits, key)
        if eos_token_id is not None:
            new = jnp.where(done, eos_token_id, new)
            done = done | (new == eos_token_id)
        return n + 1, new, cache, key_valid, out.at[:, n].set(new), done, rng

    carry = (jnp.int32(1), token, cache, key_valid, out, done, rng)
    _, _, _, _, out, _, _ = jax.lax.while_loop(keep_going, step, carry)
    return out


def generate(model: LlamaForCausalLM, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             eos_token_id: int | None, temperature: float = 0.0, seed: int = 0, batch_size: int = 32,
             pad_multiple: int = 16) -> list[list[int]]:
    """The new tokens of each prompt (up to and including EOS), greedy when ``temperature`` is 0.

    Prompts are decoded ``batch_size`` at a time, left-padded to a multiple of ``pad_multiple``
    (a few compiled shapes); the XLA attention path is used because the cache mask is custom, and
    rows are not pinned to the mesh (a few prompts need not split over its devices).
    Sampling is reproducible for a given ``seed`` and batch layout.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"generate: prompt {i} has a token id outside [0, {vocab})")
    decoder = model.clone(attention_implementation="xla", activation_sharding=None)
    rng = jax.random.key(seed)
    results: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        group = [list(p) for p in prompts[start:start + batch_size]]
        rows = len(group)
        width = -(-max(len(p) for p in group) // pad_multiple) * pad_multiple
        tokens = np.zeros((batch_size, width), np.int32)
        valid = np.zeros((batch_size, width), bool)
        for r, p in enumerate(group + [group[0]] * (batch_size - rows)):
            tokens[r, width - len(p):] = p
            valid[r, width - len(p):] = True
        rng, key = jax.random.split(rng)
        out = np.asarray(_decode(decoder, params, jnp.asarray(tokens), jnp.asarray(valid), key, max_new_tokens,
                                 eos_token_id, float(temperature)))
        for row in out[:rows]:
            row = row.tolist()
            if eos_token_id is not None and eos_token_id in row:
                row = row[:row.index(eos_token_id) + 1]
            results.append(row)
    return results
