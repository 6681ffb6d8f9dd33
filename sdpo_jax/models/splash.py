"""Causal self-attention through Pallas' TPU splash-attention kernel.

``splash_attention(q, k, v, attention_mask, sliding_window, mesh=None)`` computes, for query heads
h grouped onto key/value heads h // (H / K) (splash's own grouping, the same as
``grouped_query_attention``),

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

On a device mesh (the model passes the mesh of its ``activation_sharding``; no ambient mesh is
consulted) the kernel runs under ``jax.shard_map`` with

    q, k, v, out [B, T, heads, d]: PartitionSpec(("data", "fsdp"), None, "tensor", None)
    attention_mask [B, T]:         PartitionSpec(("data", "fsdp"), None)

i.e. the layout the projections already have (rows over the batch axes, heads over tensor), so
XLA gathers none of q, k, v around the kernel. Each device runs the kernel above on its B / (data
x fsdp) rows, its H/t query heads and its K/t key/value heads (t = tensor axis size): local query
head h of tensor shard j is global head j H/t + h, whose key/value head (j H/t + h) // G = j K/t +
h // G (G = H / K, and H/t = G K/t) is local kv head h // G of the same shard, so splash's own
grouping on the local block is the global one. Nothing crosses devices (attention is independent
per row and per kv group), the backward included. The sequence is never split.

A dimension that does not split evenly is kept whole instead (``shard_specs``): rows when B is
not a multiple of data x fsdp (the parameter init traces the model on one row), heads when H or K
is not a multiple of tensor. That is correct but moves data; the trainer's steps never need it:
the config check makes every micro-batch a multiple of data x fsdp, and laying the parameters on
the mesh (``sharding.check_divisible``: q_heads and kv_heads go over tensor) refuses a model whose
H or K the tensor axis does not divide, so GQA with fewer key/value heads than tensor shards is
refused before any step, with the parameter named.

Off TPU the kernel only runs through the Pallas interpreter, which ``interpret_mode()`` switches
on (for tests on CPU: slow, exact semantics, says nothing about TPU speed). Asking for splash on
another backend outside ``interpret_mode()`` is a ``ConfigError`` naming model.attention.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import Mesh, PartitionSpec

from sdpo_jax.errors import ConfigError
from sdpo_jax.sharding import BATCH_AXES, DEFAULT_RULES

LANES = kernel_lib.NUM_LANES
BLOCK_SIZES = (512, 256, 128)
_INTERPRET = contextvars.ContextVar("splash_interpret", default=False)
HEAD_AXIS = dict(DEFAULT_RULES)["q_heads"]  # also kv_heads' axis: the parameters put both head counts on it


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


def _refuse_unless_runnable() -> bool:
    """Whether kernels run interpreted; a ``ValueError`` off TPU outside ``interpret_mode()``."""
    interpret = _INTERPRET.get()
    if not interpret and jax.default_backend() != "tpu":
        raise ConfigError(
            f"model.attention: splash attention is a TPU kernel and the backend is {jax.default_backend()!r}; use "
            "'xla' (or 'auto'), or sdpo_jax.models.splash.interpret_mode() to test it"
        )
    return interpret


def shard_specs(mesh: Mesh, batch: int, heads: int, kv_heads: int) -> tuple[PartitionSpec, PartitionSpec]:
    """(spec of q, k, v and the output [B, T, heads, d], spec of the attention mask [B, T]) on ``mesh``.

    Rows go over data x fsdp when B divides evenly over them, heads over tensor when both H and K
    do; a dimension that does not is kept whole on every device of those axes (the result is the
    same; XLA moves the data into that layout).
    """
    rows = BATCH_AXES if batch % math.prod(mesh.shape[axis] for axis in BATCH_AXES) == 0 else None
    tensor = mesh.shape[HEAD_AXIS]
    head_axis = HEAD_AXIS if heads % tensor == 0 and kv_heads % tensor == 0 else None
    return PartitionSpec(rows, None, head_axis, None), PartitionSpec(rows, None)


def _splash_on_device(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    attention_mask: jnp.ndarray,
    sliding_window: int | None,
    interpret: bool,
) -> jnp.ndarray:
    """The kernel on arrays one device holds whole: q [B, T, H, d], k/v [B, T, K, d] -> [B, T, H, d]."""
    _, seq, heads, head_dim = q.shape
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


def splash_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    attention_mask: jnp.ndarray,
    sliding_window: int | None,
    mesh: Mesh | None = None,
) -> jnp.ndarray:
    """q [B, T, H, d], k/v [B, T, K, d], attention_mask [B, T] (1 real) -> [B, T, H, d] in q's dtype.

    Without ``mesh`` the kernel sees the whole arrays (one device, or whatever XLA gathers for it).
    On a ``mesh`` with the axes of ``sdpo_jax.sharding.MESH_AXES`` it runs under ``jax.shard_map``
    with the layout of `shard_specs` (see the module docstring): each device runs it on its own
    rows and heads, and the result stays split the same way.
    """
    interpret = _refuse_unless_runnable()
    batch, seq, heads, _ = q.shape
    if k.shape[1] != seq:
        raise ValueError(f"splash attention is self-attention: query length {seq} != key length {k.shape[1]}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    attend = functools.partial(_splash_on_device, sliding_window=sliding_window, interpret=interpret)
    if mesh is None:
        return attend(q, k, v, attention_mask)
    heads_spec, rows_spec = shard_specs(mesh, batch, heads, k.shape[2])
    # check_vma=False: the kernel's pallas_calls declare no per-axis variance of their outputs, which
    # the check requires. The output's promise holds without it: along an axis its spec does not name,
    # every input is whole on each device, so each device computes the same values.
    return jax.shard_map(
        attend,
        mesh=mesh,
        in_specs=(heads_spec, heads_spec, heads_spec, rows_spec),
        out_specs=heads_spec,
        check_vma=False,
    )(q, k, v, attention_mask)
