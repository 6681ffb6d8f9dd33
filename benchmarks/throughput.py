"""DPO training throughput of sdpo_jax on a random-init Llama, as pairs/s, step time and MFU.

    python benchmarks/throughput.py --hidden H --layers L --heads A --kv-heads K --vocab V
        --prompt-len P --completion-len C --batch B --steps S [--dtype float32|bfloat16] --json

Each step trains on B pairs (2B rows of P + C tokens: chosen and rejected after the same prompt)
with the reference forward inside the step (--reference in-step, default) or precomputed
(--reference precomputed). Times are the median over S timed steps after compile and --warmup
steps. FLOPs per pair (the model's work, masked positions included since they are computed):
    rows = 2, T = P + C tokens per row, per token and layer
      linear    = 2 * (D*H*d + 2*D*K*d + H*d*D + 3*D*F)
      attention = 2 * 2 * T * H*d            (QK^T and AV over the full T x T score matrix)
    head per token = 2 * D * V
    forward(row) = T * (layers * (linear + attention) + head)
    flops_per_pair = rows * forward * (3 for policy forward+backward + 1 for the reference forward,
                     or + 0 when the reference is precomputed)
MFU = flops_per_pair * pairs_per_s / peak_flops, where peak_flops is a measured matmul peak in the
same dtype on this machine (bf16 with float32 accumulation), measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sdpo_jax.losses import DPOSettings
from sdpo_jax.models import LlamaForCausalLM, ModelConfig
from sdpo_jax.models.llama import init_params
from sdpo_jax.optim import OptimizerSettings, make_optimizer
from sdpo_jax.sharded_steps import jit_train_step, place, state_shardings
from sdpo_jax.sharding import build_mesh
from sdpo_jax.train_step import TrainState, make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("hidden", 256), ("layers", 4), ("heads", 8), ("kv-heads", 4), ("vocab", 8192),
                          ("prompt-len", 64), ("completion-len", 64), ("batch", 8), ("steps", 10)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--intermediate", type=int, default=0, help="MLP width (default: 8/3 * hidden rounded to 64)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reference", choices=("in-step", "precomputed"), default="in-step")
    p.add_argument("--logprob-chunk", type=int, default=128)
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none")
    p.add_argument("--attention", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    return p.parse_args(argv)


def model_config(a) -> ModelConfig:
    intermediate = a.intermediate or int(round(8 * a.hidden / 3 / 64)) * 64
    return ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=intermediate, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.hidden // a.heads)


def flops_per_pair(c: ModelConfig, tokens: int, reference_in_step: bool) -> float:
    d, hd, f = c.hidden_size, c.head_dim, c.intermediate_size
    linear = 2 * (d * c.num_attention_heads * hd + 2 * d * c.num_key_value_heads * hd + c.num_attention_heads * hd * d + 3 * d * f)
    attention = 2 * 2 * tokens * c.num_attention_heads * hd
    forward = tokens * (c.num_hidden_layers * (linear + attention) + 2 * d * c.vocab_size)
    return 2 * forward * (3 + (1 if reference_in_step else 0))


def matmul_peak(dtype, size: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul (float32 accumulation) in ``dtype``."""
    a = jax.random.normal(jax.random.key(0), (size, size)).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (size, size)).astype(dtype)
    mm = jax.jit(lambda x, y: jnp.einsum("ij,jk->ik", x, y, preferred_element_type=jnp.float32))
    jax.block_until_ready(mm(a, b))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def random_batch(rng, a, vocab):
    length = a.prompt_len + a.completion_len
    batch = {}
    prompt = rng.integers(3, vocab, (a.batch, a.prompt_len))
    for side in ("chosen", "rejected"):
        batch[f"{side}_input_ids"] = np.concatenate([prompt, rng.integers(3, vocab, (a.batch, a.completion_len))], 1).astype(np.int32)
        batch[f"{side}_attention_mask"] = np.ones((a.batch, length), np.int32)
        batch[f"{side}_loss_mask"] = np.arange(length)[None].repeat(a.batch, 0) >= a.prompt_len
    batch["valid"] = np.ones(a.batch, bool)
    return batch


def peak_memory_bytes() -> tuple[str, int]:
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return "device_peak_bytes", int(stats["peak_bytes_in_use"])
    return "host_max_rss_bytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(a) -> dict:
    config = model_config(a)
    dtype = DTYPES[a.dtype]
    model = LlamaForCausalLM(config, dtype=dtype, remat=a.remat, attention_implementation=a.attention)
    mesh = build_mesh(data=-1)
    optimizer = make_optimizer(OptimizerSettings(learning_rate=1e-5, total_steps=a.warmup + a.steps + 1))
    shardings, _ = state_shardings(model, optimizer, mesh)
    params = init_params(model, jax.random.key(0))
    in_step = a.reference == "in-step"
    step = jit_train_step(make_train_step(model, DPOSettings(beta=0.1), optimizer, chunk_size=a.logprob_chunk),
                          mesh, shardings, with_reference_params=in_step)
    ref = place(params, shardings.params) if in_step else None
    state = place(TrainState.create(jax.tree_util.tree_map(jnp.copy, params), optimizer), shardings)
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, a, config.vocab_size) for _ in range(4)]
    if not in_step:
        for b in batches:
            b["ref_chosen_logps"] = rng.normal(-200, 10, a.batch).astype(np.float32)
            b["ref_rejected_logps"] = rng.normal(-200, 10, a.batch).astype(np.float32)
    compile_start = time.perf_counter()
    state, metrics = step(state, ref, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - compile_start
    for i in range(a.warmup):
        state, metrics = step(state, ref, batches[i % 4])
    jax.block_until_ready(metrics)
    times = []
    for i in range(a.steps):
        start = time.perf_counter()
        state, metrics = step(state, ref, batches[i % 4])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = flops_per_pair(config, a.prompt_len + a.completion_len, in_step)
    peak = matmul_peak(dtype, size=2048 if jax.default_backend() == "cpu" else 8192)
    memory_name, memory = peak_memory_bytes()
    pairs_per_s = a.batch / step_s
    return {
        "framework": "sdpo_jax", "device": jax.devices()[0].device_kind, "num_devices": len(jax.devices()),
        "dtype": a.dtype, "shape": {k: v for k, v in vars(a).items() if k != "json"}, "num_params": config.num_params,
        "pairs_per_s": pairs_per_s, "step_s_median": step_s, "compile_s": compile_s,
        "model_flops_per_pair": flops, "peak_flops": peak, "mfu": flops * pairs_per_s / peak,
        memory_name: memory, "final_loss": float(metrics["loss"]),
    }


def main(argv=None):
    a = parse_args(argv)
    result = run(a)
    if a.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:24s} {value}")


if __name__ == "__main__":
    sys.exit(main())
