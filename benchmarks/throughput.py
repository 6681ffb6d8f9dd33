"""DPO training throughput of sdpo_jax on a random-init Llama, as pairs/s, step time and MFU.

    python benchmarks/throughput.py --hidden H --layers L --heads A --kv-heads K --vocab V
        --prompt-len P --completion-len C --batch B --steps S [--dtype float32|bfloat16] --json

Every setting beyond the shape defaults to what sdpo-train uses (configs/default.py: dtype, remat,
prefix sharing, log-prob chunk, attention, the reference precomputed), so the default figure is
the trainer's; the flags turn each off for A/B comparisons (--no-prefix-sharing, --remat none,
--reference in-step).
Each step trains on B pairs (2B rows of P + C tokens: chosen and rejected after the same prompt,
or with --prefix-sharing B rows of P + 2C tokens: prompt, chosen, rejected; sdpo_jax.prefix_sharing)
with the reference log-probs precomputed (--reference precomputed, the trainer's default) or the
reference forward inside the step (--reference in-step). Times are the median over S timed steps
after compile and --warmup steps. FLOPs per pair count the work the step actually computes (padding and masked positions
included, prompt tokens once per row they occupy):
    plain:  rows = 2, T = P + C tokens per row;   packed: rows = 1, T = P + 2C  (or T = --pad-to)
    per token and layer
      linear    = 2 * (D*H*d + 2*D*K*d + H*d*D + 3*D*F)
      attention = 2 * 2 * T * H*d            (QK^T and AV over the full T x T score matrix)
    head = 2 * D * V per position that reaches the output layer: plain, every position of each
           log-prob chunk holding a completion token; packed, the 2C gathered positions (rounded
           up to whole chunks)
    forward(row) = T * layers * (linear + attention) + head positions * 2 * D * V
    flops_per_pair = rows * forward * (3 for policy forward+backward + 1 for the reference forward,
                     or + 0 when the reference is precomputed)
MFU = flops_per_pair * pairs_per_s / peak_flops, where peak_flops is a measured matmul peak in the
same dtype on this machine (bf16 with float32 accumulation), measured in the same run.
--host-allocator is sdpo-train's train.host_allocator (default: configs/default.py's, auto: glibc keeps
the step's freed temporary buffer instead of mapping it afresh every step when JAX runs on the CPU;
sdpo_jax/host_memory.py, docs/performance.md); the result says which was in effect.
cpu_s_per_step_median is the process's CPU time (all threads) per step: on a machine shared with
other work it varies far less than wall time, so it is the better number for A/B comparisons.
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

from configs.default import get_config as default_config
from sdpo_jax.host_memory import HOST_ALLOCATORS, apply_host_allocator, host_allocations_retained
from sdpo_jax.losses import DPOSettings
from sdpo_jax.models import LlamaForCausalLM, ModelConfig
from sdpo_jax.models.llama import init_params
from sdpo_jax.optim import OptimizerSettings, make_optimizer
from sdpo_jax.placement import place, state_shardings
from sdpo_jax.prefix_sharing import pack_pairs
from sdpo_jax.sharding import build_mesh
from sdpo_jax.train_step import TrainState, jit_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_args(argv=None):
    """The shape flags, and the trainer's settings with sdpo-train's defaults (configs/default.py)."""
    trainer = default_config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (
        ("hidden", 256),
        ("layers", 4),
        ("heads", 8),
        ("kv-heads", 4),
        ("vocab", 8192),
        ("prompt-len", 64),
        ("completion-len", 64),
        ("batch", 8),
        ("steps", 10),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--intermediate", type=int, default=0, help="MLP width (default: 8/3 * hidden rounded to 64)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=tuple(DTYPES), default=trainer.model.dtype)
    p.add_argument(
        "--reference",
        choices=("in-step", "precomputed"),
        default="precomputed" if trainer.train.precompute_reference else "in-step",
        help="the reference forward inside every step, or its log-probs precomputed (train.precompute_reference)",
    )
    p.add_argument("--logprob-chunk", type=int, default=trainer.model.logprob_chunk)
    p.add_argument("--remat", choices=("none", "full", "dots"), default=trainer.model.remat)
    p.add_argument("--attention", default=trainer.model.attention)
    p.add_argument(
        "--prefix-sharing",
        action=argparse.BooleanOptionalAction,
        default=trainer.data.prefix_sharing,
        help="one packed row per pair (prompt + chosen + rejected); --no-prefix-sharing: chosen and rejected rows",
    )
    p.add_argument(
        "--pad-to", type=int, default=0, help="pad every row to this many tokens (the cost of a coarse length bucket)"
    )
    p.add_argument(
        "--host-allocator",
        choices=HOST_ALLOCATORS,
        default=trainer.train.host_allocator,
        help="train.host_allocator, applied before JAX starts (sdpo_jax.host_memory): retain keeps XLA's freed step "
        "buffers mapped, system leaves glibc as configured, auto retains when JAX runs on the CPU only",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line")
    return p.parse_args(argv)


def model_config(a) -> ModelConfig:
    intermediate = a.intermediate or int(round(8 * a.hidden / 3 / 64)) * 64
    return ModelConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.hidden // a.heads,
    )


def row_length(a) -> int:
    """Tokens per row: P + C (plain) or P + 2C (packed), or --pad-to when longer (a coarse bucket)."""
    return max(a.pad_to, a.prompt_len + a.completion_len * (2 if a.prefix_sharing else 1))


def head_positions(a) -> tuple[int, int]:
    """(rows per pair, positions per row that reach the output layer) in the benchmark's layout."""
    if a.prefix_sharing:
        width = 2 * a.completion_len
        return 1, -(-width // a.logprob_chunk) * a.logprob_chunk if a.logprob_chunk < width else width
    chunk = min(a.logprob_chunk, row_length(a) - 1)  # position i predicts token i + 1
    first, last = (a.prompt_len - 1) // chunk, (a.prompt_len + a.completion_len - 2) // chunk
    return 2, (last - first + 1) * chunk


def flops_per_pair(c: ModelConfig, a, reference_in_step: bool) -> float:
    rows, head = head_positions(a)
    tokens = row_length(a)
    d, hd, f = c.hidden_size, c.head_dim, c.intermediate_size
    linear = 2 * (
        d * c.num_attention_heads * hd + 2 * d * c.num_key_value_heads * hd + c.num_attention_heads * hd * d + 3 * d * f
    )
    attention = 2 * 2 * tokens * c.num_attention_heads * hd
    forward = tokens * c.num_hidden_layers * (linear + attention) + head * 2 * d * c.vocab_size
    return rows * forward * (3 + (1 if reference_in_step else 0))


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
    """B random pairs (one prompt, two completions) in the benchmark's layout, padded to row_length."""
    length = a.prompt_len + a.completion_len
    pad = ((0, 0), (0, 0 if a.prefix_sharing else row_length(a) - length))
    batch = {}
    prompt = rng.integers(3, vocab, (a.batch, a.prompt_len))
    for side in ("chosen", "rejected"):
        ids = np.concatenate([prompt, rng.integers(3, vocab, (a.batch, a.completion_len))], 1).astype(np.int32)
        batch[f"{side}_input_ids"] = np.pad(ids, pad)
        batch[f"{side}_attention_mask"] = np.pad(np.ones((a.batch, length), np.int32), pad)
        batch[f"{side}_loss_mask"] = np.pad(np.arange(length)[None].repeat(a.batch, 0) >= a.prompt_len, pad)
    batch["valid"] = np.ones(a.batch, bool)
    return pack_pairs(batch, row_length(a), a.completion_len) if a.prefix_sharing else batch


def peak_memory_bytes() -> tuple[str, int]:
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return "device_peak_bytes", int(stats["peak_bytes_in_use"])
    return "host_max_rss_bytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(a):
    """(jitted train step, train state, reference params or None, 4 random batches, model config) for flags ``a``."""
    config = model_config(a)
    dtype = DTYPES[a.dtype]
    model = LlamaForCausalLM(config, dtype=dtype, remat=a.remat, attention_implementation=a.attention)
    mesh = build_mesh(data=-1)
    optimizer = make_optimizer(OptimizerSettings(learning_rate=1e-5, total_steps=a.warmup + a.steps + 1))
    shardings, _ = state_shardings(model, optimizer, mesh)
    params = init_params(model, jax.random.key(0))
    in_step = a.reference == "in-step"
    step = jit_train_step(
        model,
        DPOSettings(beta=0.1),
        optimizer,
        mesh,
        shardings,
        with_reference_params=in_step,
        chunk_size=a.logprob_chunk,
    )
    ref = place(params, shardings.params) if in_step else None
    state = place(TrainState.create(jax.tree_util.tree_map(jnp.copy, params), optimizer), shardings)
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, a, config.vocab_size) for _ in range(4)]
    if not in_step:
        for b in batches:
            b["ref_chosen_logps"] = rng.normal(-200, 10, a.batch).astype(np.float32)
            b["ref_rejected_logps"] = rng.normal(-200, 10, a.batch).astype(np.float32)
    return step, state, ref, batches, config


def run(a) -> dict:
    step, state, ref, batches, config = build(a)
    dtype, in_step = DTYPES[a.dtype], a.reference == "in-step"
    compile_start = time.perf_counter()
    state, metrics = step(state, ref, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - compile_start
    for i in range(a.warmup):
        state, metrics = step(state, ref, batches[i % 4])
    jax.block_until_ready(metrics)
    times, cpu_times = [], []
    for i in range(a.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        state, metrics = step(state, ref, batches[i % 4])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    step_s = statistics.median(times)
    flops = flops_per_pair(config, a, in_step)
    peak = matmul_peak(dtype, size=2048 if jax.default_backend() == "cpu" else 8192)
    memory_name, memory = peak_memory_bytes()
    pairs_per_s = a.batch / step_s
    return {
        "framework": "sdpo_jax",
        "device": jax.devices()[0].device_kind,
        "num_devices": len(jax.devices()),
        "dtype": a.dtype,
        "shape": {k: v for k, v in vars(a).items() if k != "json"},
        "num_params": config.num_params,
        "pairs_per_s": pairs_per_s,
        "step_s_median": step_s,
        "compile_s": compile_s,
        "cpu_s_per_step_median": statistics.median(cpu_times),
        "model_flops_per_pair": flops,
        "peak_flops": peak,
        "mfu": flops * pairs_per_s / peak,
        memory_name: memory,
        "final_loss": float(metrics["loss"]),
        "host_allocator": "retain" if host_allocations_retained() else "system",
    }


def main(argv=None):
    a = parse_args(argv)
    apply_host_allocator(a.host_allocator)  # before JAX starts its backend
    result = run(a)
    if a.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:24s} {value}")


if __name__ == "__main__":
    sys.exit(main())
