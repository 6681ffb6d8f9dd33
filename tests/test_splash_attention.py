"""TPU splash attention, run through the Pallas interpreter on CPU, against the XLA attention path.

Only real (non-padding) query rows are compared: padding queries attend to padding keys in the
splash path and to real keys in the XLA path, and never reach a loss either way. The kernel under
shard_map on an 8-device mesh runs in a subprocess (tests/splash_sharded_script.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdpo_jax.errors import ConfigError
from sdpo_jax.models import LlamaForCausalLM, ModelConfig
from sdpo_jax.models.attention import (
    PaddedCausalMask,
    causal_attention_mask,
    grouped_query_attention,
    resolve_implementation,
)
from sdpo_jax.models.llama import init_params
from sdpo_jax.models.splash import interpret_mode, shard_specs
from sdpo_jax.sharding import MESH_AXES

TOL = dict(rtol=1e-5, atol=1e-5)


def _qkv(seq: int, heads: int, kv_heads: int, head_dim: int = 64, batch: int = 2):
    keys = jax.random.split(jax.random.key(seq + heads), 3)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim))
    return q, k, v


def _right_padded(batch: int, seq: int, lengths) -> jnp.ndarray:
    return (jnp.arange(seq)[None] < jnp.asarray(lengths)[:, None]).astype(jnp.int32)


CASES = {
    # name: (seq, heads, kv_heads, real lengths per row, sliding window)
    "mha_causal_padded": (256, 4, 4, (256, 170), None),  # one 256 block
    "gqa_causal_padded_unaligned": (200, 8, 2, (200, 131), None),  # padded to 256
    "gqa_window_padded_unaligned": (300, 8, 2, (300, 217), 100),  # padded to 384: 3x3 blocks of 128
    "gqa_window_small": (128, 8, 2, (128, 128), 1),  # window 1: each token sees only itself
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_splash_forward_and_gradients_equal_xla(case):
    seq, heads, kv_heads, lengths, window = CASES[case]
    q, k, v = _qkv(seq, heads, kv_heads)
    valid = _right_padded(len(lengths), seq, lengths)
    mask = PaddedCausalMask(valid, window)
    positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)  # the model's default positions
    np.testing.assert_array_equal(
        mask.dense() & valid.astype(bool)[:, None, :, None],
        causal_attention_mask(valid, positions, window) & valid.astype(bool)[:, None, :, None],
    )
    weights = jax.random.normal(jax.random.key(1), q.shape) * valid[:, :, None, None]  # real rows only

    def loss_and_out(implementation, q, k, v):
        out = grouped_query_attention(q, k, v, mask, implementation)
        return jnp.sum(out * weights), out

    with interpret_mode():
        (_, splash), splash_grads = jax.value_and_grad(
            lambda *a: loss_and_out("splash", *a), argnums=(0, 1, 2), has_aux=True
        )(q, k, v)
    (_, xla), xla_grads = jax.value_and_grad(lambda *a: loss_and_out("xla", *a), argnums=(0, 1, 2), has_aux=True)(
        q, k, v
    )
    assert splash.shape == q.shape and np.isfinite(np.asarray(splash)).all()  # padding rows too
    real = np.asarray(valid, bool)
    np.testing.assert_allclose(splash[real], xla[real], **TOL)
    for name, ours, reference in zip("qkv", splash_grads, xla_grads):
        np.testing.assert_allclose(ours, reference, err_msg=f"d/d{name}", **TOL)


def test_model_logits_with_splash_equal_xla():
    config = ModelConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=40,
    )  # fmt: skip
    params = init_params(LlamaForCausalLM(config, attention_implementation="xla"), jax.random.key(0))
    ids = jax.random.randint(jax.random.key(2), (2, 150), 0, config.vocab_size)
    valid = _right_padded(2, 150, (150, 97))
    xla = LlamaForCausalLM(config, attention_implementation="xla").apply({"params": params}, ids, attention_mask=valid)
    with interpret_mode():
        splash = LlamaForCausalLM(config, attention_implementation="splash").apply(
            {"params": params}, ids, attention_mask=valid
        )
    real = np.asarray(valid, bool)
    assert np.abs(xla[real]).max() > 1e-2  # the logits are not trivially zero
    np.testing.assert_allclose(splash[real], xla[real], **TOL)


def test_splash_refuses_what_it_cannot_compute():
    q, k, v = _qkv(16, 2, 2, head_dim=8, batch=1)
    valid = jnp.ones((1, 16), jnp.int32)
    with pytest.raises(
        ConfigError, match="model.attention: splash attention is a TPU kernel"
    ):  # not on TPU, not interpreting
        grouped_query_attention(q, k, v, PaddedCausalMask(valid), "splash")
    dense = causal_attention_mask(valid, jnp.arange(16)[None])
    with interpret_mode(), pytest.raises(ValueError, match="dense mask"):
        grouped_query_attention(q, k, v, dense, "splash")
    config = ModelConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4,
    )  # fmt: skip
    model = LlamaForCausalLM(config, attention_implementation="splash")
    ids = jnp.zeros((1, 16), jnp.int32)
    with interpret_mode(), pytest.raises(ValueError, match="custom mask"):
        model.init(jax.random.key(0), ids, mask=dense)
    with interpret_mode(), pytest.raises(ValueError, match="custom mask"):  # window by position, not index
        model.init(jax.random.key(0), ids, positions=jnp.arange(16)[None] * 2)


def test_auto_picks_splash_only_on_tpu_with_the_default_mask(monkeypatch):
    assert resolve_implementation("auto", jnp.bfloat16) == "xla"  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_implementation("auto", jnp.float32) == "splash"
    assert resolve_implementation("auto", jnp.bfloat16, custom_mask=True) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_implementation("auto", jnp.bfloat16) == "cudnn"
    assert resolve_implementation("auto", jnp.float32) == "xla"


@pytest.mark.parametrize(
    "mesh_shape, batch, heads, kv_heads, expected",
    [
        ((2, 2, 2), 4, 4, 2, ("P(('data', 'fsdp'), None, 'tensor', None)", "P(('data', 'fsdp'), None)")),
        ((1, 4, 1), 2, 2, 2, ("P(None, None, 'tensor', None)", "P(None, None)")),  # 2 rows, 4 row shards
        ((1, 1, 4), 2, 6, 2, ("P(('data', 'fsdp'), None, None, None)", "P(('data', 'fsdp'), None)")),  # 6 query heads
        ((1, 1, 4), 2, 8, 2, ("P(('data', 'fsdp'), None, None, None)", "P(('data', 'fsdp'), None)")),  # 2 kv heads
    ],
    ids=["even", "rows_whole", "query_heads_whole", "kv_heads_fewer_than_tensor"],
)
def test_shard_specs_split_only_what_divides(mesh_shape, batch, heads, kv_heads, expected):
    mesh = jax.sharding.AbstractMesh(mesh_shape, MESH_AXES)  # the specs depend on the axis sizes only
    assert tuple(map(str, shard_specs(mesh, batch, heads, kv_heads))) == expected


@pytest.fixture(scope="module")
def sharded_report():
    """The JSON report of tests/splash_sharded_script.py (8 host-CPU devices, interpret mode)."""
    script = Path(__file__).with_name("splash_sharded_script.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_splash_under_shard_map_equals_xla_and_gathers_nothing(sharded_report):
    """On (data, fsdp, tensor) = 2x2x2, 1x2x4 and 4x1x2, and 2x2x2 with rows that do not split: output
    and dq, dk, dv equal the XLA path; every result stays split (rows over data x fsdp where they
    divide, heads over tensor) and the compiled step holds no all-gather, where the same step
    without the mesh holds some (so the check can fail)."""
    assert sharded_report["devices"] == 8
    cases = sharded_report["cases"]
    split, rows_whole = "P(('data', 'fsdp'), None, 'tensor', None)", "P(None, None, 'tensor', None)"
    layouts = {  # name: (spec, shapes of out, dq, dk, dv on one device)
        "2x2x2_gqa_causal": (split, [[1, 128, 2, 32], [1, 128, 2, 32], [1, 128, 1, 32], [1, 128, 1, 32]]),
        "1x2x4_gqa_window_unaligned": (split, [[1, 200, 2, 32], [1, 200, 2, 32], [1, 200, 1, 32], [1, 200, 1, 32]]),
        "4x1x2_mha_window": (split, [[1, 128, 1, 32]] * 4),
        "2x2x2_rows_whole": (rows_whole, [[2, 128, 2, 32], [2, 128, 2, 32], [2, 128, 1, 32], [2, 128, 1, 32]]),
    }
    assert set(cases) == set(layouts)
    for name, case in cases.items():
        spec, shapes = layouts[name]
        assert "x".join(str(case["mesh"][a]) for a in MESH_AXES) == name.split("_")[0], name
        assert case["specs"] == [spec] * 4, name
        assert case["shard_shapes"] == shapes, name
        assert case["out_max_diff"] < 1e-5 and case["out_max_abs"] > 1, (name, case)
        for axis, diff, size in zip("qkv", case["grad_max_diff"], case["grad_max_abs"]):
            assert diff < 1e-5 and size > 1, (name, f"d/d{axis}", case)
        assert case["all_gathers"] == 0, (name, case)
        assert case["all_gathers_without_mesh"] > 0, (name, case)


@pytest.mark.slow
def test_model_on_a_mesh_runs_splash_under_shard_map(sharded_report):
    """The model takes the mesh from its activation_sharding: it initialises on one row, its splash
    layers run under shard_map on 2x2x2 and the logits equal the XLA path's on one device; a tensor
    axis larger than the key/value head count is refused when the parameters are laid out."""
    model = sharded_report["model"]
    assert model["shard_map_in_jaxpr"]
    assert model["logits_max_diff"] < 1e-5 and model["logits_max_abs"] > 1e-2, model
    assert sharded_report["kv_heads_refused"] == (
        "mesh: parameter ['layers']['self_attn']['k_proj_kernel'] has a dimension of 2, which does not split "
        "over mesh axes ('tensor',) of total size 4"
    )
