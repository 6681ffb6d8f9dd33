"""Grouped-query attention: a plain XLA path and the fused `jax.nn.dot_product_attention`.

For query heads h = 1..H grouped onto key/value heads k = h // (H / K):
  out[b, t, h] = sum_s softmax_s(q[b,t,h] . k[b,s,k] / sqrt(d) + bias[b,t,s]) v[b,s,k]
where bias is 0 where attention is allowed and the most negative finite float32 elsewhere
(finite, so a query with no allowed key gives a uniform average instead of NaN; such queries are
padding and never reach a loss).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def causal_attention_mask(
    attention_mask: jnp.ndarray, positions: jnp.ndarray, sliding_window: int | None = None
) -> jnp.ndarray:
    """Boolean [batch, 1, seq, seq]: causal by index, padding keys hidden, optional window.

    ``attention_mask`` [batch, seq] is 1 on real tokens. The window keeps keys whose position is
    less than ``sliding_window`` behind the query's (Mistral's rule: q_pos - k_pos < window).
    """
    seq = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None]
    allowed = causal & attention_mask.astype(bool)[:, None, :]
    if sliding_window is not None:
        distance = positions[:, :, None] - positions[:, None, :]
        allowed = allowed & (distance < sliding_window)
    return allowed[:, None]


def resolve_implementation(name: str, dtype: jnp.dtype) -> str:
    """'auto' picks cuDNN's fused kernel on GPU for 16-bit compute, else the XLA path."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    if name != "auto":
        return name
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def grouped_query_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray, implementation: str
) -> jnp.ndarray:
    """q [B, T, H, d], k/v [B, S, K, d], mask bool [B, 1, T, S] -> [B, T, H, d] in q's dtype."""
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)
