"""Flax (linen) Llama-family decoder: one definition for policy and reference.

Parameters are kept in ``param_dtype`` (float32 master weights by default) and cast to the
compute ``dtype`` at use; matrix products accumulate in float32 (``preferred_element_type``)
whatever the compute dtype. Every parameter dimension carries a logical axis name
(``vocab``, ``embed``, ``q_heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``norm``, and ``layers`` for
the stacked decoder layers) so that sharding rules can map them to mesh axes.

The decoder layers run under ``nn.scan`` (one compiled layer body, parameters stacked on a
leading ``layers`` axis), optionally rematerialised with a ``jax.checkpoint`` policy.

For decoding, a `KVCache` holds every layer's keys and values for T slots; `decode` writes the
new tokens' keys/values at slots ``index .. index + S - 1`` and attends over all T slots under the
caller's mask [B, 1, S, T] (see sdpo_jax.generation).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from sdpo_jax.mixed_einsum import mixed_einsum
from sdpo_jax.models.attention import (
    PaddedCausalMask,
    causal_attention_mask,
    grouped_query_attention,
    resolve_implementation,
)
from sdpo_jax.models.config import ModelConfig
from sdpo_jax.models.rope import apply_rotary, inverse_frequencies, rotary_cos_sin

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_INIT_STD = 0.02


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per layer, keys and values head-major [B, kv_heads, T, head_dim] (one array each, so a decoding
    loop updates them in place and attention reads them without a transpose); the next slot to write."""

    keys: tuple[jnp.ndarray, ...]
    values: tuple[jnp.ndarray, ...]
    index: jnp.ndarray

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, slots: int, dtype: Any) -> KVCache:
        shape = (batch, config.num_key_value_heads, slots, config.head_dim)

        def zeros():
            return tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))

        return cls(zeros(), zeros(), jnp.zeros((), jnp.int32))


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init=None):
    init = init or nn.initializers.normal(_INIT_STD)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.param_dtype)


def _matmul(spec: str, x: jnp.ndarray, w: jnp.ndarray, dtype: jnp.dtype) -> jnp.ndarray:
    """einsum in the compute dtype with float32 accumulation, returned in the compute dtype; its
    backward products also run in the compute dtype (sdpo_jax.mixed_einsum)."""
    return mixed_einsum(spec, x.astype(dtype), w.astype(dtype)).astype(dtype)


class RMSNorm(nn.Module):
    """y = scale * x / sqrt(mean(x^2) + eps), the statistics in float32."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(jnp.float32) * normed.astype(self.dtype).astype(jnp.float32)).astype(self.dtype)


class Attention(nn.Module):
    """Projections, rotary, grouped-query attention and the output projection; ``mesh`` (or None)
    is the device mesh the splash kernel is laid on (see `grouped_query_attention`)."""

    config: ModelConfig
    dtype: Any
    param_dtype: Any
    implementation: str
    mesh: Any = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_index=None, layer_cache=None):
        c = self.config
        d, h, k, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        projections = {}
        for name, heads, head_axis in (("q_proj", h, "q_heads"), ("k_proj", k, "kv_heads"), ("v_proj", k, "kv_heads")):
            kernel = _param(self, f"{name}_kernel", (d, heads, hd), ("embed", head_axis, "head_dim"))
            y = _matmul("bsd,dhk->bshk", x, kernel, self.dtype)
            if c.qkv_bias:
                bias = _param(self, f"{name}_bias", (heads, hd), (head_axis, "head_dim"), nn.initializers.zeros)
                y = y + bias.astype(self.dtype)
            projections[name] = y
        # The rotation in float32 on the compute-dtype projections, rounded once after (in bf16 the
        # rotation's products and sum would each round: a convert pair per element and step on CPU).
        q = apply_rotary(projections["q_proj"].astype(jnp.float32), cos, sin).astype(self.dtype)
        key = apply_rotary(projections["k_proj"].astype(jnp.float32), cos, sin).astype(self.dtype)
        value = projections["v_proj"]
        if layer_cache is not None:
            # Written head-major; handed on as [B, T, K, d], whose transpose back to head-major inside
            # the XLA attention path cancels this one (no copy of the cache per step).
            layer_cache = tuple(
                jax.lax.dynamic_update_slice_in_dim(
                    cached, new.astype(cached.dtype).transpose(0, 2, 1, 3), cache_index, axis=2
                )
                for cached, new in zip(layer_cache, (key, value))
            )
            key, value = (cached.transpose(0, 2, 1, 3) for cached in layer_cache)
        out = grouped_query_attention(
            q, key.astype(q.dtype), value.astype(q.dtype), mask, self.implementation, self.mesh
        )
        o_kernel = _param(self, "o_proj_kernel", (h, hd, d), ("q_heads", "head_dim", "embed"))
        y = _matmul("bshk,hkd->bsd", out, o_kernel, self.dtype)
        if c.o_bias:
            y = y + _param(self, "o_proj_bias", (d,), ("embed",), nn.initializers.zeros).astype(self.dtype)
        return y, layer_cache


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    config: ModelConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.config
        d, f = c.hidden_size, c.intermediate_size

        def dense(name, shape, axes, inp, spec, out_dim):
            y = _matmul(spec, inp, _param(self, f"{name}_kernel", shape, axes), self.dtype)
            if c.mlp_bias:
                y = y + _param(self, f"{name}_bias", (out_dim,), (axes[-1],), nn.initializers.zeros).astype(self.dtype)
            return y

        gate = dense("gate_proj", (d, f), ("embed", "mlp"), x, "bsd,df->bsf", f)
        up = dense("up_proj", (d, f), ("embed", "mlp"), x, "bsd,df->bsf", f)
        hidden = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(self.dtype)
        return dense("down_proj", (f, d), ("mlp", "embed"), hidden, "bsf,fd->bsd", d)


class DecoderLayer(nn.Module):
    config: ModelConfig
    dtype: Any
    param_dtype: Any
    implementation: str
    activation_sharding: Any = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_index=None, layer_cache=None):
        c = self.config
        if self.activation_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, self.activation_sharding)

        def norm(name):
            return RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name=name)

        mesh = _sharding_mesh(self.activation_sharding)
        attention = Attention(c, self.dtype, self.param_dtype, self.implementation, mesh, name="self_attn")
        attended, layer_cache = attention(norm("input_layernorm")(x), cos, sin, mask, cache_index, layer_cache)
        h = x + attended
        out = h + MLP(c, self.dtype, self.param_dtype, name="mlp")(norm("post_attention_layernorm")(h))
        return out, layer_cache


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM.

    ``__call__(input_ids [B, S], attention_mask [B, S] = all ones, positions [B, S] = derived,
    mask [B, 1, S, S] = causal+padding(+window))`` returns float32 logits [B, S, vocab], or the
    final normalised hidden states [B, S, hidden] in the compute dtype with ``return_hidden=True``
    (for chunked log-probs that never build the full logits; see ``output_embedding``).
    Positions default to cumsum(attention_mask) - 1, which equals 0..S-1 for right padding.
    Decoding with a KV cache goes through `decode`.
    ``activation_sharding`` (a Sharding of [B, S, hidden], e.g. batch over the mesh's data and fsdp
    axes) pins every layer's input: without it XLA may keep FSDP-gathered activations whole on
    each device of the fsdp axis instead of split by rows. Its mesh, when it is a NamedSharding, is
    also where the splash kernel runs per device (rows over data x fsdp, heads over tensor).
    With ``attention_implementation='splash'`` (TPU) the mask must be the default one, and with a
    sliding window the positions too (the kernel's window counts token indices).
    """

    config: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = "auto"
    remat: str = "none"
    activation_sharding: Any = None

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, mask=None, return_hidden=False):
        c = self.config
        custom_mask = mask is not None or (positions is not None and c.sliding_window is not None)
        implementation = resolve_implementation(self.attention_implementation, self.dtype, custom_mask)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, dtype=jnp.int32)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
        if mask is None:
            mask = attention_mask_for(attention_mask, positions, c, implementation)
        embedding = _param(self, "embed_tokens", (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        x = _embed(embedding, input_ids, self.dtype)
        cos, sin = _rotary(c, positions)

        layer = DecoderLayer
        if REMAT_POLICIES.get(self.remat, "missing") == "missing":
            raise ValueError(f"remat policy {self.remat!r} is not one of {tuple(REMAT_POLICIES)}")
        if self.remat != "none":
            layer = nn.remat(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = layers(c, self.dtype, self.param_dtype, implementation, self.activation_sharding, name="layers")(
            x, cos, sin, mask
        )
        hidden = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        if c.untied_lm_head:
            _param(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"))
        if return_hidden:
            output = hidden
        else:
            head = output_embedding(self.variables["params"], c)
            output = jnp.einsum("bsd,dv->bsv", hidden, head.astype(self.dtype), preferred_element_type=jnp.float32)
        return output


def _sharding_mesh(sharding: Any) -> Mesh | None:
    """The device mesh of an activation sharding when it names one (a NamedSharding), else None."""
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def _embed(embedding: jnp.ndarray, input_ids: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    """Rows of the embedding for ``input_ids``, in ``dtype``."""
    # "clip": ids are in the vocabulary (sdpo_jax.data checks them), so no NaN-fill select per element.
    return jnp.take(embedding, input_ids, axis=0, mode="clip").astype(dtype)


def _rotary(config: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """float32 cos and sin [B, S, head_dim] of the model's rotary embedding at ``positions``."""
    return rotary_cos_sin(positions, inverse_frequencies(config.head_dim, config.rope_theta, config.rope_parameters))


def unstacked_layers(params: Any) -> Any:
    """``params`` with the stacked decoder layers split into a tuple of per-layer trees (for `decode`).

    Inside a jitted decoding loop, call it outside the loop: the slices are then taken once (a
    second copy of the layer weights while the loop runs) instead of on every step, which is what a
    scan over the stacked layers (or slices left inside the loop) costs on CPU.
    """
    layers = params["layers"]
    count = jax.tree_util.tree_leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree_util.tree_map(operator.itemgetter(i), layers) for i in range(count))}


def decode(
    model: LlamaForCausalLM,
    params: Any,
    input_ids: jnp.ndarray,
    positions: jnp.ndarray,
    mask: jnp.ndarray,
    cache: KVCache,
) -> tuple[jnp.ndarray, KVCache]:
    """(final normalised hidden states [B, S, hidden], updated cache) for ``input_ids`` [B, S] at
    ``positions`` [B, S], written at cache slots ``cache.index .. + S - 1``, attending under the
    dense ``mask`` [B, 1, S, T] over all T slots; the same layers and numerics as ``model``, one
    after another on ``params`` from `unstacked_layers`.
    """
    c = model.config
    implementation = resolve_implementation(model.attention_implementation, model.dtype, custom_mask=True)
    layer = DecoderLayer(c, model.dtype, model.param_dtype, implementation, model.activation_sharding)
    x = _embed(params["embed_tokens"], input_ids, model.dtype)
    cos, sin = _rotary(c, positions)
    keys, values = [], []
    for layer_params, layer_cache in zip(params["layers"], zip(cache.keys, cache.values)):
        x, (key, value) = layer.apply({"params": layer_params}, x, cos, sin, mask, cache.index, layer_cache)
        keys.append(key)
        values.append(value)
    hidden = RMSNorm(c.rms_norm_eps, model.dtype, model.param_dtype).apply({"params": params["norm"]}, x)
    return hidden, KVCache(tuple(keys), tuple(values), cache.index + input_ids.shape[1])


def attention_mask_for(
    attention_mask: jnp.ndarray, positions: jnp.ndarray, config: ModelConfig, implementation: str = "xla"
) -> jnp.ndarray | PaddedCausalMask:
    """The default attention mask of this architecture (causal, padding, Mistral's window).

    Dense [B, 1, S, S] by ``positions``, or for 'splash' the same pattern as a `PaddedCausalMask`
    (window by index: the caller keeps positions default when there is a window).
    """
    if implementation == "splash":
        return PaddedCausalMask(attention_mask, config.sliding_window)
    return causal_attention_mask(attention_mask, positions, config.sliding_window)


def output_embedding(params: Any, config: ModelConfig) -> jnp.ndarray:
    """The [hidden, vocab] matrix that maps final hidden states to logits (tied or not)."""
    params = nn.meta.unbox(params)
    return params["embed_tokens"].T if config.tie_word_embeddings else params["lm_head"]


def init_params(model: LlamaForCausalLM, rng: jax.Array, seq_len: int = 8) -> Any:
    """Random parameters (normal(0.02) matrices, unit norms, zero biases), unboxed."""
    tokens = jnp.zeros((1, seq_len), dtype=jnp.int32)
    return nn.meta.unbox(model.init(rng, tokens)["params"])


def logical_axes(model: LlamaForCausalLM) -> Any:
    """A pytree of PartitionSpecs of logical axis names, shaped like the params."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return nn.get_partition_spec(shapes)
