"""The one table between Hugging Face tensor names/layouts and this project's parameter pytree.

A Hugging Face linear layer stores ``weight`` as [out_features, in_features] and computes
y = x W^T. Our kernels are stored input-first, [in..., out...], split per head where that helps
sharding (q: [hidden, heads, head_dim]; o: [heads, head_dim, hidden]). So for a linear tensor

    ours = W.T.reshape(our_shape)            W = ours.reshape(prod(in dims), prod(out dims)).T

and for a vector (norm scale, bias) or the embedding table only the shape changes. Decoder
layers are stacked: our leaf under ``layers`` has a leading [num_hidden_layers] axis and layer i
comes from ``model.layers.{i}.<name>``. A sequence classifier (a reward model) has a ``score``
[hidden, num_labels] kernel from ``score.weight`` [num_labels, hidden] and no ``lm_head``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from sdpo_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One parameter leaf: its path in our pytree, its HF name, and how the layouts relate."""

    path: tuple[str, ...]
    hf_name: str  # contains "{layer}" for stacked decoder-layer tensors
    shape: tuple[int, ...]  # our per-layer shape
    hf_shape: tuple[int, ...]
    transpose: bool  # a linear weight: HF [out, in] is our [in..., out...] transposed
    dims_per_hf_axis: tuple[int, ...]  # how many of our axes each HF axis flattens, in HF's axis order

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf_name

    def hf_axis_groups(self) -> list[range]:
        """For each HF axis, in order, the axes of ours that it is the row-major flattening of."""
        counts = self.dims_per_hf_axis[::-1] if self.transpose else self.dims_per_hf_axis  # ours lists inputs first
        starts = np.cumsum((0, *counts)).tolist()
        groups = [range(a, b) for a, b in zip(starts, starts[1:])]
        return groups[::-1] if self.transpose else groups

    def to_ours(self, hf_tensor: np.ndarray) -> np.ndarray:
        return (hf_tensor.T if self.transpose else hf_tensor).reshape(self.shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.transpose:
            return ours.reshape(self.hf_shape[::-1]).T
        return ours.reshape(self.hf_shape)


def _linear(path, hf_name, shape, input_dims) -> TensorSpec:
    inputs, outputs = int(np.prod(shape[:input_dims])), int(np.prod(shape[input_dims:]))
    return TensorSpec(
        path, hf_name, shape, (outputs, inputs), transpose=True, dims_per_hf_axis=(len(shape) - input_dims, input_dims)
    )


def _vector(path, hf_name, shape) -> TensorSpec:
    return TensorSpec(path, hf_name, shape, (int(np.prod(shape)),), transpose=False, dims_per_hf_axis=(len(shape),))


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every parameter of a model with this config, in Hugging Face's usual order."""
    c = config
    d, f, v, hd = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    h, k = c.num_attention_heads, c.num_key_value_heads
    layer = "model.layers.{layer}."
    specs = [
        TensorSpec(
            ("embed_tokens",), "model.embed_tokens.weight", (v, d), (v, d), transpose=False, dims_per_hf_axis=(1, 1)
        )
    ]
    specs.append(_vector(("layers", "input_layernorm", "scale"), layer + "input_layernorm.weight", (d,)))
    for name, heads in (("q_proj", h), ("k_proj", k), ("v_proj", k)):
        specs.append(
            _linear(("layers", "self_attn", f"{name}_kernel"), f"{layer}self_attn.{name}.weight", (d, heads, hd), 1)
        )
        if c.qkv_bias:
            specs.append(_vector(("layers", "self_attn", f"{name}_bias"), f"{layer}self_attn.{name}.bias", (heads, hd)))
    specs.append(_linear(("layers", "self_attn", "o_proj_kernel"), layer + "self_attn.o_proj.weight", (h, hd, d), 2))
    if c.o_bias:
        specs.append(_vector(("layers", "self_attn", "o_proj_bias"), layer + "self_attn.o_proj.bias", (d,)))
    specs.append(
        _vector(("layers", "post_attention_layernorm", "scale"), layer + "post_attention_layernorm.weight", (d,))
    )
    for name, shape in (("gate_proj", (d, f)), ("up_proj", (d, f)), ("down_proj", (f, d))):
        specs.append(_linear(("layers", "mlp", f"{name}_kernel"), f"{layer}mlp.{name}.weight", shape, 1))
        if c.mlp_bias:
            specs.append(_vector(("layers", "mlp", f"{name}_bias"), f"{layer}mlp.{name}.bias", (shape[1],)))
    specs.append(_vector(("norm", "scale"), "model.norm.weight", (d,)))
    if c.untied_lm_head:
        specs.append(_linear(("lm_head",), "lm_head.weight", (d, v), 1))
    if c.num_labels is not None:
        specs.append(_linear(("score",), "score.weight", (d, c.num_labels), 1))
    return specs


def hf_names(spec: TensorSpec, config: ModelConfig) -> Iterator[tuple[int | None, str]]:
    """(layer index or None, HF tensor name) for each HF tensor behind one spec."""
    if spec.per_layer:
        for i in range(config.num_hidden_layers):
            yield i, spec.hf_name.format(layer=i)
    else:
        yield None, spec.hf_name


def get_leaf(params: dict, path: tuple[str, ...]):
    for key in path:
        params = params[key]
    return params


def set_leaf(params: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        params = params.setdefault(key, {})
    params[path[-1]] = value
