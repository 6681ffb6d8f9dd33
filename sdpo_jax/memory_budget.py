"""Per-device memory of one sDPO train step, item by item, from shapes alone (no weights).

State (exact, from the abstract train state and its shardings: each leaf's shard shape times
its item size):
    params       float32 master weights
    grads        float32 gradients; with grad_accum > 1 twice (the scan's running sum and the
                 current micro-batch's gradients are live together)
    optimizer    AdamW's two float32 moments (plus a step count)
    reference    a float32 copy of the reference params when its log-probs are computed in the
                 step (train.precompute_reference=False); 0 when they are precomputed
    kept models  earlier models the stage driver keeps on the devices (see `resident_models`)

Activations (an estimate; symbols per device: R rows of one micro-batch = 2 * pairs (chosen and
rejected) / (dcn_data * data * fsdp) / grad_accum, S the longest bucket, d hidden, q = heads * head_dim,
k = kv_heads * head_dim, f intermediate, H heads, V vocab, t the tensor axis, L layers, c
model.logprob_chunk, b the compute dtype's bytes):
    saved by the layer scan for the backward pass, L times:
        remat full   R S d b                                   (each layer's input only)
        remat dots   R S (d b + 4 ((q + 2k)/t + 2f/t + 2d))    (plus the float32 outputs of the
                                                               projection matmuls)
        remat none   R S (b (4d + (2q + 2k + f)/t) + 4 (2d + 2f/t)) + A
                     (every intermediate the backward pass reads: in the compute dtype the layer
                     input, both norm outputs, the residual sum, q, k, v, the attention output and
                     the MLP product; in float32 the two norms' inputs, gate and up)
        with A = R (H/t) S^2 (4 + b) for the XLA attention path (float32 scores and probabilities)
        or R (H/t) S 4 for fused kernels (cuDNN, splash: the softmax statistics only)
    one layer being recomputed and differentiated: twice the 'remat none' set of one layer
    the attention mask of the XLA and cuDNN paths: R S^2 bytes (boolean)
    chunked log-probs: 3 R c (V/t) 4 (a chunk's float32 logits, their softmax and cotangent)
    final hidden states and their float32 cotangent: R S d (b + 4)
    gathered weights: the largest of one decoder layer and the output embedding, all-gathered
        over fsdp in the compute dtype with its float32 gradient before the reduce-scatter:
        n/t (b + 4) for n weights when fsdp > 1, n/t b (the compute-dtype copy) otherwise.
XLA's own figure for the compiled step (``compiled_memory``) is the check on this estimate.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from sdpo_jax.models.config import ModelConfig

GIB = 2**30
COMPUTE_BYTES = {"float32": 4, "bfloat16": 2}
KEPT_MODELS = "earlier models kept by the driver"


def resident_models(config: Any) -> int:
    """Whole models the stage driver (sdpo_jax.stages) keeps on the devices beside the train state
    and an in-step reference, in the worst stage.

    With precomputed reference log-probs and the paper's policy init, the driver frees M_{t-1}
    (in stage 1 the SFT model) once they are computed: none. Otherwise the SFT model stays for the
    whole run (in stage 1 it is M_0 itself), and with precomputed log-probs M_{t-1} stays too.
    """
    multi_stage = config.sdpo.num_stages > 1
    if config.train.precompute_reference:
        if config.sdpo.get("policy_init", "previous") == "previous":
            return 0
        return 2 if multi_stage else 1
    return 1 if multi_stage else 0


def shard_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a pytree: the largest shard of each leaf times its item size."""
    leaves = jax.tree_util.tree_leaves(abstract)
    shards = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a, s in zip(leaves, shards))


def attention_path(attention: str, platform: str, dtype: str) -> str:
    """The attention implementation 'auto' resolves to on ``platform`` (as models.attention does)."""
    if attention != "auto":
        return attention
    if platform == "tpu":
        return "splash"
    return "cudnn" if platform == "gpu" and dtype in ("bfloat16", "float16") else "xla"


def longest_batch(config: Any) -> int:
    """The longest padded length a batch can have: the largest bucket (data.length_buckets reach
    data.max_length; with none, max_length is the largest)."""
    return max(tuple(config.data.length_buckets) or (config.data.max_length,))


@dataclasses.dataclass(frozen=True)
class Workload:
    """The per-device shape of one micro-batch and the settings the activations depend on."""

    rows: int  # sequences (chosen + rejected) of one micro-batch on one device
    seq_len: int
    compute_bytes: int
    remat: str
    attention: str  # resolved: xla | cudnn | splash
    logprob_chunk: int
    tensor: int
    fsdp: int

    @classmethod
    def from_config(cls, config: Any, mesh_shape: dict, platform: str) -> Workload:
        replicas = mesh_shape["data"] * mesh_shape["fsdp"]
        pairs = config.train.batch_size // config.train.grad_accum
        return cls(
            rows=max(1, 2 * pairs // replicas),
            seq_len=longest_batch(config),
            compute_bytes=COMPUTE_BYTES[config.model.dtype],
            remat=config.model.remat,
            attention=attention_path(config.model.attention, platform, config.model.dtype),
            logprob_chunk=config.model.logprob_chunk,
            tensor=mesh_shape["tensor"],
            fsdp=mesh_shape["fsdp"],
        )


def activation_items(m: ModelConfig, w: Workload) -> list[tuple[str, int, str]]:
    """(item, bytes, formula) of the activation estimate in the module docstring."""
    R, S, b, t = w.rows, w.seq_len, w.compute_bytes, w.tensor
    c = min(w.logprob_chunk, S)  # logprobs.token_logps never takes a chunk longer than the sequence
    d, f, H, L, V = m.hidden_size, m.intermediate_size, m.num_attention_heads, m.num_hidden_layers, m.vocab_size
    q, k = H * m.head_dim, m.num_key_value_heads * m.head_dim
    fused = w.attention in ("cudnn", "splash")
    attention = R * (H // t) * S * 4 if fused else R * (H // t) * S * S * (4 + b)
    every = R * S * (b * (4 * d + (2 * q + 2 * k + f) // t) + 4 * (2 * d + 2 * f // t)) + attention
    saved = {
        "full": R * S * d * b,
        "dots": R * S * (d * b + 4 * ((q + 2 * k) // t + 2 * f // t + 2 * d)),
        "none": every,
    }[w.remat]
    layer_weights = d * (2 * q + 2 * k) + 3 * d * f
    gathered_bytes = (b + 4) if w.fsdp > 1 else b
    gathered = max(layer_weights, d * V) // t * gathered_bytes
    items = [
        (f"saved by the layer scan (remat {w.remat})", L * saved, f"{L} layers x {_gib(saved)}"),
        ("one layer recomputed + its backward", 2 * every, f"{w.attention} attention, {R} rows x {S} tokens"),
        ("chunked log-probs", 3 * R * c * (V // t) * 4, f"3 x {R} rows x {c} positions x {V // t} vocab x 4 B"),
        ("final hidden states + cotangent", R * S * d * (b + 4), f"{R} x {S} x {d} x {b + 4} B"),
        (
            "gathered weights (one layer or the head)",
            gathered,
            f"{max(layer_weights, d * V) // t} weights x {gathered_bytes} B",
        ),
    ]
    if w.attention != "splash":
        items.append(("attention mask", R * S * S, f"{R} x {S} x {S} booleans"))
    return items


@dataclasses.dataclass
class MemoryBudget:
    """Items of per-device memory; ``total`` is their sum."""

    items: list[tuple[str, int, str]]

    @property
    def total(self) -> int:
        return sum(size for _, size, _ in self.items)

    def size(self, name: str) -> int:
        return next(size for item, size, _ in self.items if item == name)

    def largest(self) -> tuple[str, int]:
        name, size, _ = max(self.items, key=lambda item: item[1])
        return name, size

    def table(self, device_bytes: int | None = None) -> str:
        width = max(len(name) for name, _, _ in self.items) + 2
        lines = [f"{'item':<{width}}{'GiB/device':>11}  how"]
        lines += [f"{name:<{width}}{size / GIB:>11.2f}  {how}" for name, size, how in self.items]
        lines.append(f"{'total (estimate)':<{width}}{self.total / GIB:>11.2f}")
        if device_bytes:
            lines.append(
                f"{'device memory':<{width}}{device_bytes / GIB:>11.2f}  {100 * self.total / device_bytes:.0f}% used"
            )
        return "\n".join(lines)


def _gib(size: int) -> str:
    return f"{size / GIB:.3f} GiB"


def estimate(
    model: ModelConfig, config: Any, mesh_shape: dict, abstract_state: Any, state_shardings: Any, platform: str
) -> MemoryBudget:
    """The per-device budget of the config's train step on a mesh of ``mesh_shape``."""
    params = shard_bytes(abstract_state.params, state_shardings.params)
    accumulating = config.train.grad_accum > 1
    in_step = not config.train.precompute_reference
    kept = resident_models(config)
    items = [
        ("params (float32 master)", params, f"{model.num_params / 1e9:.2f}B params"),
        ("grads (float32)", params * (2 if accumulating else 1), "sum + micro-batch" if accumulating else "one copy"),
        ("optimizer (AdamW mu, nu)", shard_bytes(abstract_state.opt_state, state_shardings.opt_state), "float32"),
        ("reference params in the step", params if in_step else 0, "in-step" if in_step else "precomputed log-probs"),
        (KEPT_MODELS, params * kept, f"{kept} model(s) (sdpo_jax.stages)"),
    ]
    items += activation_items(model, Workload.from_config(config, mesh_shape, platform))
    return MemoryBudget(items)


def compiled_memory(compiled: Any) -> dict[str, int]:
    """XLA's per-device figures for a compiled step: arguments, outputs, aliased, temporaries, and
    their peak-resident sum (arguments + outputs - aliased + temporaries)."""
    stats = compiled.memory_analysis()
    figures = {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in ("argument", "output", "alias", "temp")}
    figures["total"] = figures["argument"] + figures["output"] - figures["alias"] + figures["temp"]
    return figures
