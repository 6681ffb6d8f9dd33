"""Run one DPO optimizer step on several mesh shapes of 8 host-CPU devices and on 1 device.

Invoked by tests in a subprocess (the device count must be set before jax is imported).
Prints one JSON line: {mesh_name: {"loss": ..., "param_max_abs_diff_vs_1_device": ...}}.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from batch_fixtures import random_pair_batch  # noqa: E402
from sdpo_jax.losses import DPOSettings  # noqa: E402
from sdpo_jax.models import LlamaForCausalLM, ModelConfig  # noqa: E402
from sdpo_jax.models.llama import init_params  # noqa: E402
from sdpo_jax.optim import OptimizerSettings, make_optimizer  # noqa: E402
from sdpo_jax.placement import place, state_shardings  # noqa: E402
from sdpo_jax.sharding import build_mesh  # noqa: E402
from sdpo_jax.train_step import TrainState, jit_train_step  # noqa: E402


def run(mesh_shape, devices):
    config = ModelConfig(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    model = LlamaForCausalLM(config)
    params = init_params(model, jax.random.key(0))
    ref_params = jax.tree_util.tree_map(lambda x: x * 0.9, params)
    optimizer = make_optimizer(OptimizerSettings(learning_rate=1e-2, total_steps=10))
    mesh = build_mesh(*mesh_shape, devices=devices)
    shardings, _ = state_shardings(model, optimizer, mesh)
    step = jit_train_step(
        model, DPOSettings(beta=0.5), optimizer, mesh, shardings, with_reference_params=True, grad_accum=2, chunk_size=7
    )
    state = place(TrainState.create(params, optimizer), shardings)
    ref = place(ref_params, shardings.params)
    losses = []
    for seed in range(2):
        state, metrics = step(state, ref, random_pair_batch(8, 20, config.vocab_size, seed=seed))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


single_losses, single_params = run((1, 1, 1), jax.devices()[:1])
report = {}
for shape in [(8, 1, 1), (2, 2, 2), (1, 4, 2)]:
    losses, params = run(shape, jax.devices())
    diff = max(
        float(np.abs(a - b).max())
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(single_params))
    )
    report["x".join(map(str, shape))] = {"losses": losses, "single_losses": single_losses, "param_max_abs_diff": diff}
print(json.dumps(report))
