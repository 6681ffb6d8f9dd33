"""Grouped-query attention: a plain XLA path, cuDNN's fused kernel and TPU splash attention.

For query heads h = 1..H grouped onto key/value heads k = h // (H / K):
  out[b, t, h] = sum_s softmax_s(q[b,t,h] . k[b,s,k] / sqrt(d) + bias[b,t,s]) v[b,s,k]
where bias is 0 where attention is allowed and the most negative finite float32 elsewhere
(finite, so a query with no allowed key gives a uniform average instead of NaN; such queries are
padding and never reach a loss).

Where attention is allowed comes either as a dense boolean mask [B, 1, T, S] (any pattern; the
'xla' and 'cudnn' paths) or as a `PaddedCausalMask` (the architecture's default pattern given by
its parameters: causal by index, padding keys hidden, optional sliding window), which every path
takes and which is the only form 'splash' takes: the TPU kernel builds its block-sparse mask from
the pattern and cannot read an arbitrary dense one (see `sdpo_jax.models.splash`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sdpo_jax.mixed_einsum import mixed_einsum
from sdpo_jax.models.splash import splash_attention

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PaddedCausalMask:
    """The default mask as parameters: ``causal_attention_mask(attention_mask, arange(S), window)``.

    The window counts token indices, which equals counting positions whenever a row's real tokens
    have positions equal to their index plus a constant (the default positions cumsum - 1 when the
    real tokens are contiguous: right or left padding). ``attention_mask`` [B, S] is 1 on real
    tokens; ``sliding_window`` is static (part of the pytree structure).
    """

    attention_mask: jnp.ndarray
    sliding_window: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    def dense(self) -> jnp.ndarray:
        """The boolean [B, 1, S, S] mask this stands for."""
        positions = jnp.broadcast_to(jnp.arange(self.attention_mask.shape[1]), self.attention_mask.shape)
        return causal_attention_mask(self.attention_mask, positions, self.sliding_window)


def resolve_implementation(name: str, dtype: jnp.dtype, custom_mask: bool = False) -> str:
    """The attention path to use; ``custom_mask`` says the mask is not a `PaddedCausalMask`.

    'auto' picks splash on TPU (unless the mask is custom: then the XLA path), cuDNN's fused kernel
    on GPU for 16-bit compute, else the XLA path. An explicit 'splash' with a custom mask is an error.
    """
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    if name == "splash" and custom_mask:
        raise ValueError(
            "attention implementation 'splash' takes only the default causal/padding/window mask "
            "(with default positions when there is a sliding window); use 'xla' or 'cudnn' for a custom mask"
        )
    if name != "auto":
        return name
    backend = jax.default_backend()
    if backend == "tpu" and not custom_mask:
        return "splash"
    return "cudnn" if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def grouped_query_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: jnp.ndarray | PaddedCausalMask,
    implementation: str,
    mesh: Mesh | None = None,
) -> jnp.ndarray:
    """q [B, T, H, d], k/v [B, S, K, d], mask bool [B, 1, T, S] or a `PaddedCausalMask` -> [B, T, H, d].

    The output is in q's dtype. 'splash' requires a `PaddedCausalMask` (and T == S), and on a
    ``mesh`` runs per device under shard_map (rows over data x fsdp, heads over tensor; see
    `sdpo_jax.models.splash`); the other paths leave the layout to XLA and ignore ``mesh``.
    """
    if implementation == "splash":
        if not isinstance(mask, PaddedCausalMask):
            raise ValueError(
                "attention implementation 'splash' needs a PaddedCausalMask (the default causal/padding/window "
                "mask), not a dense mask; use 'xla' or 'cudnn' for a custom mask"
            )
        return splash_attention(q, k, v, mask.attention_mask, mask.sliding_window, mesh)
    if isinstance(mask, PaddedCausalMask):
        mask = mask.dense()
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    # Head-major operands (q [B, K, T, G, d], k and v [B, K, S, d]: small copies) give the scores
    # [B, K, T, G, S] in the product's natural layout (no transpose of a scores-sized tensor in the
    # forward pass), with the contracted (T, G) of the key/value gradients contiguous in both of their
    # operands. The mask enters as an additive float32 bias [B, 1, T, 1, S], whose backward is the
    # identity (no select). Both products run in q's dtype with float32 accumulation, backward too.
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 1, 3, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, :, :, None, :]
    scores = mixed_einsum("bktgd,bksd->bktgs", q, k)
    probs = jax.nn.softmax(scores * (head_dim**-0.5) + bias, axis=-1).astype(v.dtype)
    out = mixed_einsum("bktgs,bksd->bktgd", probs, v)
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, q_len, heads, head_dim).astype(q.dtype)
