"""Causal self-attention through Pallas' TPU splash-attention kernel.

``splash_attention(q, k, v, attention_mask, sliding_window)`` computes, for query heads h grouped
onto key/value heads h // (H / K) (splash's own grouping, the same as ``grouped_query_attention``),

    out[b, t, h] = sum_s softmax_s(q[b,t,h] . k[b,s,k] / sqrt(d) | allowed[b,t,s]) v[b,s,k]

    allowed[b,t,s] = s <= t                                   (causal, by token index)
                     and seg[b,s] == seg[b,t]                  (seg = attention_mask: 1 real, 0 pad)
                     and t - s < sliding_window                (Mistral's window, if any)

On real query rows this is exactly ``causal_attention_mask(attention_mask, arange(S), window)``:
a real query sees the real keys at or before it within the window. Padding queries see padding
keys instead (the kernel must not meet an empty row: a row always allows its own diagonal, so no
row is empty and nothing is NaN); their outputs are finite but meaningless, and never reach a loss.

Mapping onto the kernel (``splash_attention_kernel.make_splash_mha``):
  * splash does not scale logits, so q is multiplied by 1/sqrt(d) first;
  * GQA is native: the MHA kernel takes q [H, T, d] with k/v [K, T, d], K | H;
  * the window is ``LocalMask(window_size=(window - 1, 0))``, i.e. t - (window - 1) <= s <= t,
    which is t - s < window; without a window it is ``CausalMask``;
  * padding is ``SegmentIds``; the batch is a ``jax.vmap`` of the per-example kernel;
  * the sequence is zero-padded up to a multiple of 128 (the kernel's lane width, the smallest
    legal block) with extra tokens in the padding segment, and the output sliced back; the block
    size is the largest of 512, 256, 128 that divides the padded length.
  The kernel has a custom VJP (its own dq and dk/dv kernels), so it is differentiable.

Off TPU the kernel only runs through the Pallas interpreter, which ``interpret_mode()`` switches
on (for tests on CPU: slow, exact semantics, says nothing about TPU speed). Asking for splash on
another backend outside ``interpret_mode()`` is a ``ConfigError`` naming model.attention.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from sdpo_jax.errors import ConfigError

LANES = kernel_lib.NUM_LANES
BLOCK_SIZES = (512, 256, 128)
_INTERPRET = contextvars.ContextVar("splash_interpret", default=False)


@contextlib.contextmanager
def interpret_mode():
    """Within this block splash kernels traced from now on run in the Pallas interpreter.

    The flag is read when a function is traced: a ``jax.jit`` function traced inside the block keeps
    its interpreted kernel when called later outside it (and vice versa), as jit caches traces.
    """
    token = _INTERPRET.set(True)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def _block_size(length: int) -> int:
    return next(b for b in BLOCK_SIZES if length % b == 0)


def splash_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, attention_mask: jnp.ndarray, sliding_window: int | None
) -> jnp.ndarray:
    """q [B, T, H, d], k/v [B, T, K, d], attention_mask [B, T] (1 real) -> [B, T, H, d] in q's dtype."""
    interpret = _INTERPRET.get()
    if not interpret and jax.default_backend() != "tpu":
        raise ConfigError(
            f"model.attention: splash attention is a TPU kernel and the backend is {jax.default_backend()!r}; use "
            "'xla' (or 'auto'), or sdpo_jax.models.splash.interpret_mode() to test it"
        )
    batch, seq, heads, head_dim = q.shape
    if k.shape[1] != seq:
        raise ValueError(f"splash attention is self-attention: query length {seq} != key length {k.shape[1]}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    padded = -(-seq // LANES) * LANES
    block = _block_size(padded)

    def heads_first(x):  # [B, T, N, d] -> [B, N, padded, d]
        return jnp.pad(x, ((0, 0), (0, padded - seq), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    segments = jnp.pad(attention_mask.astype(jnp.int32), ((0, 0), (0, padded - seq)))
    shape = (padded, padded)
    if sliding_window is None:
        head_mask = mask_lib.CausalMask(shape)
    else:
        head_mask = mask_lib.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
    kernel = kernel_lib.make_splash_mha(
        mask_lib.MultiHeadMask([head_mask] * heads),
        block_sizes=kernel_lib.BlockSizes(
            block_q=block,
            block_kv=block,
            block_kv_compute=block,
            block_q_dkv=block,
            block_kv_dkv=block,
            block_kv_dkv_compute=block,
            block_q_dq=block,
            block_kv_dq=block,
        ),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    scaled_q = (q.astype(jnp.float32) * head_dim**-0.5).astype(q.dtype)
    out = jax.vmap(kernel)(
        heads_first(scaled_q), heads_first(k), heads_first(v), kernel_lib.SegmentIds(q=segments, kv=segments)
    )
    return out.transpose(0, 2, 1, 3)[:, :seq].astype(q.dtype)
