"""The pure DPO train step: reference modes, gradient accumulation, learning, sharded = single."""

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

from batch_fixtures import random_pair_batch
from sdpo_jax.checkpoint.hf_import import load_hf_checkpoint
from sdpo_jax.losses import DPOSettings
from sdpo_jax.models import LlamaForCausalLM
from sdpo_jax.optim import OptimizerSettings, make_optimizer, scheduled_lr, weight_decay_mask
from sdpo_jax.reference import make_reference_step
from sdpo_jax.train_step import TrainState, make_train_step


def _setup(hf_checkpoint, **dpo):
    config, params = load_hf_checkpoint(hf_checkpoint("llama3"))
    model = LlamaForCausalLM(config)
    optimizer = make_optimizer(OptimizerSettings(learning_rate=1e-3, total_steps=20, warmup_steps=2, weight_decay=0.01))
    ref_params = jax.tree_util.tree_map(jnp.asarray, params)
    batch = jax.tree_util.tree_map(jnp.asarray, random_pair_batch(4, 24, config.vocab_size, seed=1))
    return model, optimizer, params, ref_params, batch, DPOSettings(beta=0.1, **dpo)


def _assert_close_trees(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_precomputed_reference_equals_in_step_reference(hf_checkpoint):
    model, optimizer, params, ref_params, batch, settings = _setup(hf_checkpoint)
    step = jax.jit(make_train_step(model, settings, optimizer, chunk_size=8))
    in_step, metrics_a = step(TrainState.create(params, optimizer), ref_params, batch)
    ref_chosen, ref_rejected = jax.jit(make_reference_step(model, chunk_size=8))(ref_params, batch)
    precomputed_batch = {**batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    precomputed, metrics_b = step(TrainState.create(params, optimizer), None, precomputed_batch)
    _assert_close_trees(in_step.params, precomputed.params, rtol=0, atol=0)
    for name in metrics_a:
        np.testing.assert_array_equal(metrics_a[name], metrics_b[name])
    # The reference equals the initial policy: DPO's loss starts at log 2 and the rewards at 0.
    np.testing.assert_allclose(metrics_a["loss"], np.log(2), rtol=1e-5)
    np.testing.assert_allclose(metrics_a["rewards/margins"], 0.0, atol=1e-5)


def test_gradient_accumulation_equals_full_batch(hf_checkpoint):
    model, optimizer, params, ref_params, batch, settings = _setup(hf_checkpoint, rpo_alpha=0.3)
    batch = {**batch, "valid": jnp.array([True, True, False, True])}
    full, m_full = jax.jit(make_train_step(model, settings, optimizer, grad_accum=1))(
        TrainState.create(params, optimizer), ref_params, batch
    )
    accum, m_accum = jax.jit(make_train_step(model, settings, optimizer, grad_accum=2))(
        TrainState.create(params, optimizer), ref_params, batch
    )
    _assert_close_trees(full.params, accum.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m_full["loss"], m_accum["loss"], rtol=1e-5)
    assert float(m_full["num_pairs"]) == 3.0


def test_policy_learns_the_preference(hf_checkpoint):
    model, optimizer, params, ref_params, batch, settings = _setup(hf_checkpoint)
    step = jax.jit(make_train_step(model, settings, optimizer))
    state = TrainState.create(params, optimizer)
    losses = []
    for _ in range(6):
        state, metrics = step(state, ref_params, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    assert float(metrics["rewards/accuracies"]) == 1.0
    assert int(state.step) == 6
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), ref_params, params)  # reference untouched


def test_schedule_and_decay_mask():
    linear = OptimizerSettings(learning_rate=1.0, total_steps=10, warmup_steps=2, schedule="linear")
    np.testing.assert_allclose(
        [scheduled_lr(t, "linear", **linear.schedule_numbers()) for t in (0, 1, 2, 6, 10)],
        [0.0, 0.5, 1.0, 0.5, 0.0],
        atol=1e-6,
    )
    cosine = OptimizerSettings(learning_rate=1.0, total_steps=4, schedule="cosine", min_lr_ratio=0.1)
    np.testing.assert_allclose(scheduled_lr(2, "cosine", **cosine.schedule_numbers()), 0.1 + 0.9 * 0.5, rtol=1e-6)
    mask = weight_decay_mask(
        {
            "embed_tokens": 0,
            "layers": {"mlp": {"up_proj_kernel": 0}, "input_layernorm": {"scale": 0}},
            "norm": {"scale": 0},
        }
    )
    assert mask == {
        "embed_tokens": True,
        "layers": {"mlp": {"up_proj_kernel": True}, "input_layernorm": {"scale": False}},
        "norm": {"scale": False},
    }


@pytest.mark.slow
def test_sharded_step_on_8_devices_equals_1_device():
    script = Path(__file__).with_name("sharded_step_script.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"8x1x1", "2x2x2", "1x4x2"}
    for mesh, row in report.items():
        np.testing.assert_allclose(row["losses"], row["single_losses"], rtol=1e-4, err_msg=mesh)
        assert row["param_max_abs_diff"] < 5e-4, (mesh, row)  # Adam with lr 1e-2: float noise on ~0 gradients
