"""Accelerator check of the fused attention path: cuDNN vs the XLA einsum path, same params.

Builds a random Llama-shaped model (default ~0.5B: hidden 1536, 12 layers, 12 heads, 4 kv heads)
and prints one JSON line with the max |logit| difference between attention_implementation='cudnn'
and 'xla' in bfloat16, each against a float32 XLA forward, plus the median time of a jitted
forward+backward for both paths. Run on a GPU: python benchmarks/gpu_attention_check.py
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from sdpo_jax.models import LlamaForCausalLM, ModelConfig
from sdpo_jax.models.llama import init_params


def median_seconds(fn, *args, repeats=10):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args()
    config = ModelConfig(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
    )
    params = init_params(LlamaForCausalLM(config), jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, config.vocab_size)
    mask = (jnp.arange(args.seq)[None] < jnp.array([args.seq, args.seq * 3 // 4] * (args.batch // 2))[:, None]).astype(
        jnp.int32
    )
    reference = jax.jit(
        lambda p: LlamaForCausalLM(config, dtype=jnp.float32, attention_implementation="xla").apply(
            {"params": p}, ids, attention_mask=mask
        )
    )(params)
    real = np.asarray(mask).astype(bool)
    report = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "shape": vars(args)}
    logits_by_impl = {}

    def logits_and_step_time(model: LlamaForCausalLM) -> tuple[jnp.ndarray, float]:
        def hidden_square_mean(p):
            hidden = model.apply({"params": p}, ids, attention_mask=mask, return_hidden=True)
            return jnp.mean(hidden.astype(jnp.float32) ** 2)

        logits = jax.jit(lambda p: model.apply({"params": p}, ids, attention_mask=mask))(params)
        return logits, median_seconds(jax.jit(jax.grad(hidden_square_mean)), params)

    for impl in ("xla", "cudnn"):
        model = LlamaForCausalLM(config, dtype=jnp.bfloat16, attention_implementation=impl, remat="dots")
        logits, report[f"{impl}_fwd_bwd_s"] = logits_and_step_time(model)
        logits_by_impl[impl] = logits
        report[f"{impl}_bf16_vs_fp32_max_abs"] = float(jnp.abs(logits - reference)[real].max())
    report["cudnn_vs_xla_bf16_max_abs"] = float(jnp.abs(logits_by_impl["cudnn"] - logits_by_impl["xla"])[real].max())
    report["fp32_logit_max_abs"] = float(jnp.abs(reference).max())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
