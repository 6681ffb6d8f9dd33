"""Prefix-shared DPO steps on a 2 x 2 mesh of host-CPU devices vs the plain layout on 1 device.

Invoked by tests/test_prefix_sharing.py in a subprocess (the device count must be set before jax
is imported). Prints one JSON line: {"losses": [...], "plain_losses": [...], "param_max_abs_diff": x}.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
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
from sdpo_jax.prefix_sharing import pack_pairs  # noqa: E402
from sdpo_jax.sharding import build_mesh  # noqa: E402
from sdpo_jax.train_step import TrainState, jit_train_step  # noqa: E402


def run(mesh, packed):
    config = ModelConfig(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=6,
    )
    model = LlamaForCausalLM(config)
    params = init_params(model, jax.random.key(0))
    optimizer = optax.sgd(0.5)
    shardings, _ = state_shardings(model, optimizer, mesh)
    step = jit_train_step(
        model, DPOSettings(beta=0.5), optimizer, mesh, shardings, with_reference_params=True, chunk_size=7
    )
    state = place(TrainState.create(params, optimizer), shardings)
    ref = place(jax.tree_util.tree_map(lambda x: x * 0.9, params), shardings.params)
    losses = []
    for seed in range(2):
        batch = random_pair_batch(8, 20, config.vocab_size, seed=seed)
        state, metrics = step(state, ref, pack_pairs(batch, 40, 20) if packed else batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


plain_losses, plain_params = run(build_mesh(devices=jax.devices()[:1]), packed=False)
losses, params = run(build_mesh(data=2, fsdp=2), packed=True)
diff = max(
    float(np.abs(a - b).max())
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(plain_params))
)
print(json.dumps({"losses": losses, "plain_losses": plain_losses, "param_max_abs_diff": diff}))
