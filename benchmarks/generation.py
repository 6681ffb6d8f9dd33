"""Sampling throughput of sdpo_jax.generation against transformers' generate, same model and prompts.

    python benchmarks/generation.py [--batch 16 --max-new-tokens 128 --prompt-lengths 8,24,40,64
        --temperature 0.8 --top-p 0.95 --rounds 3 --warmup 1] [--dtype float32|bfloat16] [--json]
        [--hidden 576 --layers 30 --heads 9 --kv-heads 3 --vocab 49152 --mlp 1536 --rope-theta 1e5]

A random transformers LlamaForCausalLM of SmolLM2-135M's shape (tied embeddings, defaults above) is
saved as float32 safetensors in a temporary folder; transformers (PyTorch CPU, float32, eager
attention) loads it back and sdpo_jax loads the same folder with `load_hf_checkpoint`. The
prompts are random token ids with lengths cycling through --prompt-lengths, left-padded: by
transformers to the longest prompt of the batch, by us to a multiple of 16. The model has no EOS
token, so both sample exactly --max-new-tokens tokens per row, with ``do_sample=True, temperature,
top_p, top_k=0, use_cache=True`` for transformers and ``generate(..., temperature, top_p)`` for us
(--dtype sets only our compute dtype; transformers stays float32).

Our first call (trace + compile + one run) is timed apart, with JAX's own tracing, lowering and
backend compile durations. Then --warmup calls of each, then --rounds rounds, each timing one
batch of transformers then one of ours (both in this process, so a shared machine's load hits both
alike). The rate is new tokens per second: batch x max_new_tokens over the call's wall time. Prints
the medians and per-round ratio (ours / transformers), the load average before and after; --json
prints one JSON line instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--prompt-lengths", default="8,24,40,64", help="comma-separated; prompt i has length i mod this list"
    )
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="our compute dtype")
    p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--mlp", type=int, default=1536)
    p.add_argument("--rope-theta", type=float, default=1e5)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def save_random_checkpoint(a: argparse.Namespace, folder: Path) -> Path:
    """A random float32 transformers Llama of the requested shape (tied embeddings, no EOS) in ``folder``."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.mlp,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        tie_word_embeddings=True,
        rope_theta=a.rope_theta,
        max_position_embeddings=max(int(n) for n in a.prompt_lengths.split(",")) + a.max_new_tokens,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(a.seed)
    transformers.LlamaForCausalLM(config).float().save_pretrained(folder)
    return folder


def random_prompts(a: argparse.Namespace) -> list[list[int]]:
    """``batch`` prompts of random ids in [3, vocab), lengths cycling through --prompt-lengths."""
    rng = np.random.default_rng(a.seed)
    lengths = [int(n) for n in a.prompt_lengths.split(",")]
    return [rng.integers(3, a.vocab, size=lengths[i % len(lengths)]).tolist() for i in range(a.batch)]


def transformers_sampler(a: argparse.Namespace, folder: Path, prompts: list[list[int]]):
    """A function that samples --max-new-tokens for the whole batch with transformers and checks the count."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1

    def sample() -> None:
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=a.max_new_tokens,
                do_sample=True,
                temperature=a.temperature,
                top_p=a.top_p,
                top_k=0,
                use_cache=True,
                pad_token_id=0,
            )
        assert out.shape == (len(prompts), width + a.max_new_tokens), out.shape

    return sample


def ours_sampler(a: argparse.Namespace, folder: Path, prompts: list[list[int]]):
    """A function that samples --max-new-tokens for the whole batch with sdpo_jax and checks the count."""
    import jax.numpy as jnp

    from sdpo_jax.checkpoint.hf_import import load_hf_checkpoint
    from sdpo_jax.generation import generate
    from sdpo_jax.models import LlamaForCausalLM

    config, params = load_hf_checkpoint(folder)
    model = LlamaForCausalLM(config, dtype=jnp.dtype(a.dtype))

    def sample() -> None:
        out = generate(
            model,
            params,
            prompts,
            a.max_new_tokens,
            eos_token_id=None,
            temperature=a.temperature,
            top_p=a.top_p,
            seed=a.seed,
            batch_size=len(prompts),
        )
        assert all(len(row) == a.max_new_tokens for row in out)

    return sample


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds over all threads) of fn()."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def first_call(sample) -> dict:
    """Wall time of our first call and the JAX tracing/lowering/compile durations inside it."""
    import jax

    durations = {event: 0.0 for event in COMPILE_EVENTS}

    def listen(event, duration, **_):
        if event in durations:
            durations[event] += duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    wall, _ = timed(sample)
    jax.monitoring.unregister_event_duration_listener(listen)
    return {
        "first_call_s": wall,
        "compile_s": sum(durations.values()),
        **{event.rsplit("/", 1)[1]: seconds for event, seconds in durations.items()},
    }


def run(a: argparse.Namespace) -> dict:
    import torch

    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    load_before = os.getloadavg()
    prompts = random_prompts(a)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_checkpoint(a, Path(tmp))
        theirs, ours = transformers_sampler(a, folder, prompts), ours_sampler(a, folder, prompts)
    compile_info = first_call(ours)
    for _ in range(a.warmup):
        theirs(), ours()
    tokens = a.batch * a.max_new_tokens
    rates: dict[str, list[float]] = {"transformers": [], "ours": []}
    cpu: dict[str, list[float]] = {"transformers": [], "ours": []}
    for _ in range(a.rounds):
        for name, sample in (("transformers", theirs), ("ours", ours)):
            wall, cpu_s = timed(sample)
            rates[name].append(tokens / wall)
            cpu[name].append(cpu_s / tokens)
    ratios = [o / t for o, t in zip(rates["ours"], rates["transformers"])]
    return {
        "bench": "generation",
        "batch": a.batch,
        "max_new_tokens": a.max_new_tokens,
        "prompt_lengths": a.prompt_lengths,
        "temperature": a.temperature,
        "top_p": a.top_p,
        "dtype": a.dtype,
        "rounds": a.rounds,
        "transformers_tokens_per_s": statistics.median(rates["transformers"]),
        "ours_tokens_per_s": statistics.median(rates["ours"]),
        "ratio_median": statistics.median(ratios),
        "ratio_rounds": ratios,
        "transformers_rounds": rates["transformers"],
        "ours_rounds": rates["ours"],
        "cpu_s_per_token": {name: statistics.median(v) for name, v in cpu.items()},
        **compile_info,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def main(argv=None) -> None:
    a = parse_args(argv)
    result = run(a)
    if a.json:
        print(json.dumps(result))
        return
    print(
        f"transformers {result['transformers_tokens_per_s']:.1f} new tokens/s, ours {result['ours_tokens_per_s']:.1f} "
        f"({a.dtype}): {result['ratio_median']:.2f}x (rounds {', '.join(f'{r:.2f}' for r in result['ratio_rounds'])}); "
        f"our compile {result['compile_s']:.1f} s (first call {result['first_call_s']:.1f} s); "
        f"load {result['loadavg_before'][0]:.1f} -> {result['loadavg_after'][0]:.1f}"
    )


if __name__ == "__main__":
    main()
