"""aot + aot_unpaired train steps on 8 host-CPU devices (data parallel, 2 micro-batches) vs 1 device, 1 micro-batch.

Invoked by tests/test_loss_family.py in a subprocess (the device count must be set before jax is
imported). The losses sort over the whole batch: every mesh and accumulation must give the same
losses and, with SGD, the same parameters. Prints one JSON line:
{mesh: {"losses": [...], "single_losses": [...], "param_max_abs_diff": x}}.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from batch_fixtures import random_pair_batch  # noqa: E402
from sdpo_jax.losses import DPOSettings  # noqa: E402
from sdpo_jax.models import LlamaForCausalLM, ModelConfig  # noqa: E402
from sdpo_jax.models.llama import init_params  # noqa: E402
from sdpo_jax.placement import place, state_shardings  # noqa: E402
from sdpo_jax.sharding import build_mesh  # noqa: E402
from sdpo_jax.train_step import TrainState, jit_train_step  # noqa: E402

SETTINGS = DPOSettings(beta=0.5, loss_type=("aot", "aot_unpaired"), loss_weights=(1.0, 0.5), label_smoothing=0.1)


def run(mesh, grad_accum):
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
    optimizer = optax.sgd(0.5)
    shardings, _ = state_shardings(model, optimizer, mesh)
    step = jit_train_step(
        model, SETTINGS, optimizer, mesh, shardings, with_reference_params=True, grad_accum=grad_accum, chunk_size=7
    )
    state = place(TrainState.create(params, optimizer), shardings)
    ref = place(jax.tree_util.tree_map(lambda x: x * 0.9, params), shardings.params)
    losses = []
    for seed in range(2):
        batch = random_pair_batch(16, 20, config.vocab_size, seed=seed)
        batch["valid"][[3, 12]] = False  # padding pairs take no part in the sort
        state, metrics = step(state, ref, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


single_losses, single_params = run(build_mesh(devices=jax.devices()[:1]), grad_accum=1)
report = {}
for shape in [(8, 1, 1)]:
    losses, params = run(build_mesh(*shape), grad_accum=2)
    diff = max(
        float(np.abs(a - b).max())
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(single_params))
    )
    report["x".join(map(str, shape))] = {"losses": losses, "single_losses": single_losses, "param_max_abs_diff": diff}
print(json.dumps(report))
