"""One DPO training run on a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices, in one process or
as one of two processes with 4 devices each (jax.distributed over 127.0.0.1, gloo collectives).

    python multihost_step_script.py single
    python multihost_step_script.py PROCESS_ID PORT       (run twice, PROCESS_ID 0 and 1)

Each process feeds only its own rows of every global batch. Process 0 prints one JSON line:
{"losses": [...], "params_sum_sq": [...per leaf...]}.
"""

import json
import os
import sys

mode = sys.argv[1]
devices_here = 8 if mode == "single" else 4
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_here}"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

if mode != "single":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{sys.argv[2]}", num_processes=2, process_id=int(mode))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from batch_fixtures import random_pair_batch  # noqa: E402
from sdpo_jax.losses import DPOSettings  # noqa: E402
from sdpo_jax.models import LlamaForCausalLM, ModelConfig  # noqa: E402
from sdpo_jax.models.llama import init_params  # noqa: E402
from sdpo_jax.optim import OptimizerSettings, make_optimizer  # noqa: E402
from sdpo_jax.placement import place, state_shardings  # noqa: E402
from sdpo_jax.sharding import batch_sharding, build_mesh  # noqa: E402
from sdpo_jax.train_step import TrainState, jit_train_step  # noqa: E402

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
optimizer = make_optimizer(OptimizerSettings(learning_rate=1e-2, total_steps=10))
mesh = build_mesh(2, 2, 2)
shardings, _ = state_shardings(model, optimizer, mesh)
step = jit_train_step(
    model, DPOSettings(beta=0.5), optimizer, mesh, shardings, with_reference_params=True, grad_accum=2, chunk_size=7
)
state = place(TrainState.create(params, optimizer), shardings)
ref = place(jax.tree_util.tree_map(lambda x: x * 0.9, params), shardings.params)
rows = slice(None) if mode == "single" else slice(int(mode) * 4, int(mode) * 4 + 4)
losses = []
for seed in range(3):
    full = random_pair_batch(8, 20, config.vocab_size, seed=seed)
    local = {k: v[rows] for k, v in full.items()}
    batch = {k: jax.make_array_from_process_local_data(batch_sharding(mesh), v) for k, v in local.items()}
    state, metrics = step(state, ref, batch)
    losses.append(float(metrics["loss"]))
sums = [
    float(x)
    for x in jax.tree_util.tree_leaves(
        jax.jit(
            lambda p: jax.tree_util.tree_map(lambda leaf: jnp.sum(leaf.astype(jnp.float32) ** 2), p), out_shardings=None
        )(state.params)
    )
]
gathered = multihost_utils.process_allgather(state.params["embed_tokens"], tiled=True)
if jax.process_index() == 0:
    print(
        json.dumps(
            {
                "losses": losses,
                "params_sum_sq": sums,
                "embed_checksum": float(np.abs(np.asarray(gathered)).sum()),
                "process_count": jax.process_count(),
                "devices": jax.device_count(),
            }
        )
    )
