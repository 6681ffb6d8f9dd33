"""sdpo_jax vs TRL's DPOTrainer: the same Llama shape, the same random pairs, the same batch.

    python benchmarks/vs_trl.py [--shapes small,smollm2-135m] [--environments default,tuned]
        [--dtypes float32,bfloat16] [--rounds R] [--ours "EXTRA throughput.py FLAGS"] [--json]
        [--hidden ... --layers ... (override the shapes' sizes)]
    python benchmarks/vs_trl.py --render benchmarks/results/vs_trl_DATE.json ...   # a saved run's table

Shapes (random init): ``small`` hidden 256, 4 layers, 8 heads, 4 kv heads, vocab 8192, MLP 704,
prompt 64 + completion 64, batch 8; ``smollm2-135m`` SmolLM2-135M's: hidden 576, 30 layers, 9
heads, 3 kv heads, vocab 49152, MLP 1536, prompt 128 + completion 64, batch 4.

Environments: ``default`` runs each library as it starts (TRL with glibc's malloc as configured,
sdpo_jax with sdpo-train's own ``train.host_allocator`` default); ``tuned`` gives BOTH processes
the glibc settings that keep large freed blocks mapped (GLIBC_TUNABLES, the settings of
sdpo_jax.host_memory), which speed up PyTorch's CPU training step as much as XLA's: TRL at its
fastest on this machine.

For each shape, environment and dtype: TRL 1.16 (PyTorch CPU; bf16=True for bfloat16, which is
autocast; no gradient checkpointing; the reference model forward in the step as TRL does by
default) trains a random-init transformers LlamaForCausalLM on pre-tokenized pairs, timed per
optimizer step with a trainer callback, in a subprocess of its own; then benchmarks/throughput.py
runs the same shape in another subprocess with sdpo-train's own settings (throughput.py's
defaults: prefix sharing, full rematerialisation, the host allocator) and, like TRL, the reference
forward inside every step; --ours adds throughput.py flags. With --rounds R both run R times in
turn and the medians are reported (a shared machine's load then hits both alike). Prints pairs/s
of each and the ratio, the ratio of CPU seconds per step (all threads, TRL's over ours), which a
shared machine's load disturbs less than wall time, and both libraries' MFU.

The peak is the larger of XLA's and PyTorch's measured 2048^3 matmul FLOP/s in the dtype (each
measured in its library's process). Each library's MFU counts the model FLOPs of its own step
(`trl_flops_per_pair`: TRL keeps chosen and rejected in two rows and scores every position through
the output layer; we pack a pair into one row and score its completion positions only), against
that peak. The ceiling is the ratio our step would reach at 100% of the peak, peak / (our FLOPs per
pair x TRL's pairs/s): no kernel work on our side can move the ratio past it, only doing less
arithmetic per pair can.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import throughput
from knobs import run_json

HERE = Path(__file__).resolve().parent
SHAPES = {
    "small": {
        "hidden": 256,
        "layers": 4,
        "heads": 8,
        "kv_heads": 4,
        "vocab": 8192,
        "intermediate": 704,
        "prompt_len": 64,
        "completion_len": 64,
        "batch": 8,
    },
    "smollm2-135m": {
        "hidden": 576,
        "layers": 30,
        "heads": 9,
        "kv_heads": 3,
        "vocab": 49152,
        "intermediate": 1536,
        "prompt_len": 128,
        "completion_len": 64,
        "batch": 4,
    },
}
# glibc's malloc told to keep large freed blocks mapped: sdpo_jax.host_memory's settings, as environment variables.
TUNED_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=2147483647"
ENVIRONMENTS = {"default": {}, "tuned": {"GLIBC_TUNABLES": TUNED_MALLOC}}


def llama_config(a):
    """The transformers LlamaConfig of ``a``'s shape, TRL's model in this comparison."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate or int(round(8 * a.hidden / 3 / 64)) * 64,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=a.prompt_len + a.completion_len,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )


def trl_pairs_per_s(a, dtype: str) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    config = llama_config(a)
    torch.manual_seed(0)
    policy = transformers.AutoModelForCausalLM.from_config(config)
    reference = transformers.AutoModelForCausalLM.from_config(config)
    reference.load_state_dict(policy.state_dict())
    rng = np.random.default_rng(0)
    total_steps = a.warmup + a.steps + 1
    rows = [
        {
            "prompt_ids": rng.integers(3, a.vocab, a.prompt_len).tolist(),
            "chosen_ids": rng.integers(3, a.vocab, a.completion_len).tolist(),
            "rejected_ids": rng.integers(3, a.vocab, a.completion_len).tolist(),
        }
        for _ in range(a.batch * total_steps)
    ]
    times: list[float] = []
    cpu_times: list[float] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)
            cpu_times.append(time.process_time() - self.cpu_start)

    # The rows are in the token layout TRL's collator consumes; TRL 1.16 only prepares text datasets.
    DPOTrainer._prepare_dataset = lambda self, dataset, *args, **kwargs: dataset
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=a.batch,
            max_steps=total_steps,
            learning_rate=1e-5,
            bf16=dtype == "bfloat16",
            gradient_checkpointing=False,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            logging_steps=10_000,
            max_length=None,
            beta=0.1,
        )
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=_byte_tokenizer(), pad_token="<pad>", eos_token="</s>"
        )
        trainer = DPOTrainer(
            model=policy,
            ref_model=reference,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[StepTimer()],
        )
        trainer.train()
    timed = times[1 + a.warmup :]
    step_s = statistics.median(timed)
    return {
        "framework": "trl",
        "dtype": dtype,
        "peak_flops": torch_matmul_peak(dtype),
        "pairs_per_s": a.batch / step_s,
        "step_s_median": step_s,
        "cpu_s_per_step_median": statistics.median(cpu_times[1 + a.warmup :]),
        "torch_threads": torch.get_num_threads(),
    }


def torch_matmul_peak(dtype: str, size: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of PyTorch's square matmul in ``dtype``: its kernels may reach more of the machine than
    XLA's, and the peak an MFU is taken against must be the machine's, not one library's."""
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(torch_dtype) for _ in range(2))
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def _byte_tokenizer():
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    return Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))


def ours(a, dtype: str, environment: str) -> dict:
    """throughput.py's result for ``a``'s shape in ``dtype``, in its own process under ``environment``."""
    flags = [
        f"--{k}={v}"
        for k, v in (
            ("hidden", a.hidden),
            ("layers", a.layers),
            ("heads", a.heads),
            ("kv-heads", a.kv_heads),
            ("vocab", a.vocab),
            ("prompt-len", a.prompt_len),
            ("completion-len", a.completion_len),
            ("batch", a.batch),
            ("steps", a.steps),
            ("warmup", a.warmup),
            ("intermediate", a.intermediate),
            ("dtype", dtype),
            ("reference", "in-step"),
        )
    ]
    flags += shlex.split(a.ours)
    return _json_subprocess([str(HERE / "throughput.py"), *flags], environment)


def trl(a, dtype: str, environment: str) -> dict:
    """``trl_pairs_per_s`` for ``a``'s shape in ``dtype``, in its own process under ``environment``."""
    shape = [f"--{name.replace('_', '-')}={getattr(a, name)}" for name in (*SHAPES["small"], "steps", "warmup")]
    return _json_subprocess([str(Path(__file__).resolve()), "--trl-only", dtype, *shape], environment)


def trl_flops_per_pair(a) -> float:
    """The model FLOPs of one pair in TRL 1.16's DPO step at ``a``'s shape, by throughput.py's count: two rows
    (chosen, rejected) of P + C tokens, the output layer at every position but the last of each (on a CPU its fused
    LM head scores them all; only on Triton devices does it gather the completion positions:
    ``trl.trainer.utils.add_fused_lm_head``), and the reference forward in the step."""
    layout = argparse.Namespace(
        prompt_len=a.prompt_len,
        completion_len=a.completion_len,
        prefix_sharing=False,
        pad_to=0,
        logprob_chunk=a.prompt_len + a.completion_len,  # one chunk: every position reaches the head
    )
    return throughput.flops_per_pair(throughput.model_config(a), layout, reference_in_step=True)


def _json_subprocess(command: list[str], environment: str) -> dict:
    env = {**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, **ENVIRONMENTS[environment]}
    return run_json(command, env)


def _comparison(a, dtype: str, environment: str) -> dict:
    """Both libraries, ``a.rounds`` times in turn, at ``a``'s shape: medians and per-round values."""
    runs = [(trl(a, dtype, environment), ours(a, dtype, environment)) for _ in range(a.rounds)]
    xla_peak = statistics.median(m["peak_flops"] for _, m in runs)
    torch_peak = statistics.median(t["peak_flops"] for t, _ in runs)
    peak = max(xla_peak, torch_peak)
    trl_flops, our_flops = trl_flops_per_pair(a), runs[0][1]["model_flops_per_pair"]
    trl_pairs_per_s = statistics.median(t["pairs_per_s"] for t, _ in runs)
    return {
        "environment": environment,
        "dtype": dtype,
        "trl_pairs_per_s": trl_pairs_per_s,
        "sdpo_jax_pairs_per_s": statistics.median(m["pairs_per_s"] for _, m in runs),
        "ratio": statistics.median(m["pairs_per_s"] / t["pairs_per_s"] for t, m in runs),
        "ratio_per_round": [m["pairs_per_s"] / t["pairs_per_s"] for t, m in runs],
        "trl_pairs_per_s_per_round": [t["pairs_per_s"] for t, _ in runs],
        "sdpo_jax_pairs_per_s_per_round": [m["pairs_per_s"] for _, m in runs],
        "cpu_ratio": statistics.median(t["cpu_s_per_step_median"] / m["cpu_s_per_step_median"] for t, m in runs),
        "sdpo_jax_mfu": statistics.median(m["pairs_per_s"] for _, m in runs) * our_flops / peak,
        "trl_mfu": trl_flops * trl_pairs_per_s / peak,
        "peak_flops": peak,
        "xla_peak_flops": xla_peak,
        "torch_peak_flops": torch_peak,
        "trl_flops_per_pair": trl_flops,
        "sdpo_jax_flops_per_pair": our_flops,
        "ratio_ceiling": peak / our_flops / trl_pairs_per_s,
        "trl_step_s": statistics.median(t["step_s_median"] for t, _ in runs),
        "sdpo_jax_step_s": statistics.median(m["step_s_median"] for _, m in runs),
        "sdpo_jax_host_allocator": runs[0][1]["host_allocator"],
    }


def _shape_args(a, shape: str) -> argparse.Namespace:
    """``a`` with ``shape``'s sizes where no size flag was given."""
    sizes = {name: getattr(a, name) if getattr(a, name) is not None else value for name, value in SHAPES[shape].items()}
    return argparse.Namespace(**{**vars(a), **sizes})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in SHAPES["small"]:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help="overrides the shapes' value")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--shapes", default="small", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--environments", default="default,tuned", help=f"comma-separated, of {', '.join(ENVIRONMENTS)}")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument(
        "--ours", default="", help="extra throughput.py flags for sdpo_jax (default: none, i.e. sdpo-train's settings)"
    )
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--trl-only", choices=("float32", "bfloat16"), help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    p.add_argument("--render", nargs="+", metavar="JSON", help="print the table of saved --json outputs and exit")
    a = p.parse_args(argv)
    if a.render:
        print(markdown_table([row for path in a.render for row in json.loads(Path(path).read_text())["results"]]))
        return
    if a.trl_only:
        print(json.dumps(trl_pairs_per_s(_shape_args(a, "small"), a.trl_only)))
        return
    rows = []
    for shape in a.shapes.split(","):
        shaped = _shape_args(a, shape)
        for environment in a.environments.split(","):
            for dtype in a.dtypes.split(","):
                rows.append(
                    {
                        "shape": shape,
                        **{k: getattr(shaped, k) for k in SHAPES[shape]},
                        **_comparison(shaped, dtype, environment),
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if a.json:
        print(json.dumps({"args": vars(a), "machine": _machine(), "results": rows}))
        return
    print(markdown_table(rows))


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a markdown table, one row per shape, environment and dtype."""
    lines = [
        "| shape | environment | dtype | TRL pairs/s | sdpo_jax pairs/s | ratio | CPU-time ratio | TRL MFU | "
        "sdpo_jax MFU | peak GFLOP/s | ceiling |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['environment']} | {r['dtype']} | {r['trl_pairs_per_s']:.3g} | "
            f"{r['sdpo_jax_pairs_per_s']:.3g} | {r['ratio']:.2f}x | {r['cpu_ratio']:.2f}x | {r['trl_mfu']:.0%} | "
            f"{r['sdpo_jax_mfu']:.0%} | {r['peak_flops'] / 1e9:.0f} | {r['ratio_ceiling']:.2f}x |"
        )
    return "\n".join(lines)


def _machine() -> dict:
    """When and where: the date, CPU model and count, the libraries' versions."""
    import platform

    import jax
    import torch
    import trl

    model = (
        next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        )
        if os.path.exists("/proc/cpuinfo")
        else platform.processor()
    )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": model,
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "trl": trl.__version__,
    }


if __name__ == "__main__":
    main()
