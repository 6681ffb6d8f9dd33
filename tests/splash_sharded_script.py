"""Splash attention under shard_map on 8 host-CPU devices (Pallas interpret mode) against the XLA path.

Invoked by tests/test_splash_attention.py in a subprocess (the device count must be set before jax
is imported). Prints one JSON line: {"devices": 8, "cases": {name: {...}}, "model": {...},
"kv_heads_refused": message}; the test makes the assertions.

Per case, on a (data, fsdp, tensor) mesh: q, k, v and the attention mask are placed as the model
lays them out (rows over data x fsdp, heads over tensor, where they split evenly), and one jitted function gives the
output and the gradients w.r.t. q, k, v of sum(out * weights) (weights zero on padding queries,
whose outputs differ by design; see sdpo_jax.models.splash). Reported: the largest differences
from the XLA path on whole arrays (output on real query rows), the layout of the results, the
all-gathers in that function's compiled HLO and, as a control, in the same function without the
mesh (the kernel then needs whole arrays, so XLA gathers them).
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from sdpo_jax.models import LlamaForCausalLM, ModelConfig  # noqa: E402
from sdpo_jax.models.attention import PaddedCausalMask, grouped_query_attention  # noqa: E402
from sdpo_jax.models.llama import init_params, logical_axes  # noqa: E402
from sdpo_jax.models.splash import interpret_mode, shard_specs  # noqa: E402
from sdpo_jax.placement import state_shardings  # noqa: E402
from sdpo_jax.sharding import MeshError, batch_sharding, build_mesh, logical_to_shardings  # noqa: E402

CASES = {
    # name: ((data, fsdp, tensor), batch, seq, heads, kv_heads, real lengths per row, sliding window)
    "2x2x2_gqa_causal": ((2, 2, 2), 4, 128, 4, 2, (128, 100, 77, 128), None),
    "1x2x4_gqa_window_unaligned": ((1, 2, 4), 2, 200, 8, 4, (200, 131), 50),  # padded to 256 per device
    "4x1x2_mha_window": ((4, 1, 2), 4, 128, 2, 2, (128, 9, 128, 64), 16),
    "2x2x2_rows_whole": ((2, 2, 2), 2, 128, 4, 2, (128, 60), None),  # 2 rows do not split over data x fsdp = 4
}
HEAD_DIM = 32


def _gathers(hlo: str) -> int:
    """Number of all-gather instructions (sync or async start) in compiled HLO text."""
    return len(re.findall(r"\ball-gather(?:-start)?\(", hlo))


def _inputs(batch, seq, heads, kv_heads, lengths):
    keys = jax.random.split(jax.random.key(seq + heads), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, HEAD_DIM))
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, HEAD_DIM))
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, HEAD_DIM))
    valid = (jnp.arange(seq)[None] < jnp.asarray(lengths)[:, None]).astype(jnp.int32)
    weights = jax.random.normal(keys[3], q.shape) * valid[:, :, None, None]  # real query rows only
    return q, k, v, valid, weights


def _out_and_grads(implementation, window, weights, mesh=None):
    """f(q, k, v, valid) -> (out, (dq, dk, dv)) of sum(out * weights)."""

    def loss(q, k, v, valid):
        out = grouped_query_attention(q, k, v, PaddedCausalMask(valid, window), implementation, mesh)
        return jnp.sum(out * weights), out

    def f(q, k, v, valid):
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, valid)
        return out, grads

    return f


def run_case(mesh_shape, batch, seq, heads, kv_heads, lengths, window):
    mesh = build_mesh(*mesh_shape)
    q, k, v, valid, weights = _inputs(batch, seq, heads, kv_heads, lengths)
    heads_layout, rows_layout = (NamedSharding(mesh, spec) for spec in shard_specs(mesh, batch, heads, kv_heads))
    placed = [jax.device_put(x, heads_layout) for x in (q, k, v)] + [jax.device_put(valid, rows_layout)]
    with interpret_mode():
        sharded = jax.jit(_out_and_grads("splash", window, weights, mesh))
        unsharded = jax.jit(_out_and_grads("splash", window, weights))
        hlo = sharded.lower(*placed).compile().as_text()
        control_hlo = unsharded.lower(*placed).compile().as_text()
        out, grads = sharded(*placed)
    xla_out, xla_grads = jax.jit(_out_and_grads("xla", window, weights))(q, k, v, valid)
    real = np.asarray(valid, bool)
    return {
        "mesh": dict(mesh.shape),
        "specs": [str(x.sharding.spec) for x in (out, *grads)],
        "shard_shapes": [list(x.addressable_shards[0].data.shape) for x in (out, *grads)],
        "out_max_diff": float(np.abs(np.asarray(out)[real] - np.asarray(xla_out)[real]).max()),
        "out_max_abs": float(np.abs(np.asarray(xla_out)[real]).max()),
        "grad_max_diff": [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(grads, xla_grads)],
        "grad_max_abs": [float(np.abs(np.asarray(b)).max()) for b in xla_grads],
        "all_gathers": _gathers(hlo),
        "all_gathers_without_mesh": _gathers(control_hlo),
    }


def run_model():
    """Logits of a 2-layer GQA model on a 2x2x2 mesh (params initialised by the splash model itself, on
    one row, and laid out by their logical axes; rows by activation_sharding), against the XLA path
    on one device."""
    config = ModelConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=40,
    )
    mesh = build_mesh(2, 2, 2)
    xla = LlamaForCausalLM(config, attention_implementation="xla")
    splash = LlamaForCausalLM(config, attention_implementation="splash", activation_sharding=batch_sharding(mesh))
    with interpret_mode():
        params = init_params(splash, jax.random.key(0))
        placed = jax.device_put(params, logical_to_shardings(logical_axes(splash), mesh))
    ids = jax.random.randint(jax.random.key(2), (4, 150), 0, config.vocab_size)
    valid = (jnp.arange(150)[None] < jnp.asarray([150, 97, 150, 20])[:, None]).astype(jnp.int32)

    def forward(p, i, m):
        return splash.apply({"params": p}, i, attention_mask=m)

    with interpret_mode():
        args = (placed, jax.device_put(ids, batch_sharding(mesh)), jax.device_put(valid, batch_sharding(mesh)))
        jaxpr = str(jax.make_jaxpr(forward)(*args))
        logits = jax.jit(forward)(*args)
    reference = xla.apply({"params": params}, ids, attention_mask=valid)
    real = np.asarray(valid, bool)
    return {
        "shard_map_in_jaxpr": "shard_map" in jaxpr,
        "logits_max_diff": float(np.abs(np.asarray(logits)[real] - np.asarray(reference)[real]).max()),
        "logits_max_abs": float(np.abs(np.asarray(reference)[real]).max()),
    }


def kv_heads_refusal() -> str:
    """What laying a model with 2 key/value heads on a tensor axis of 4 says (GQA, K < tensor)."""
    config = ModelConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    try:
        state_shardings(LlamaForCausalLM(config), optax.sgd(0.1), build_mesh(1, 2, 4))
    except MeshError as err:
        return str(err)
    return ""


report = {
    "devices": jax.device_count(),
    "cases": {name: run_case(*case) for name, case in CASES.items()},
    "model": run_model(),
    "kv_heads_refused": kv_heads_refusal(),
}
print(json.dumps(report))
