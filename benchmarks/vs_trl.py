"""sdpo_jax vs TRL's DPOTrainer: the same Llama shape, the same random pairs, the same batch.

    python benchmarks/vs_trl.py [--hidden 256 --layers 4 --heads 8 --kv-heads 4 --vocab 8192
        --prompt-len 64 --completion-len 64 --batch 8 --steps 10] [--dtypes float32,bfloat16]
        [--ours "EXTRA throughput.py FLAGS"] [--rounds 3] [--json]

For each dtype: TRL 1.16 (PyTorch CPU; bf16=True for bfloat16, no gradient checkpointing, the
reference model forward in the step as TRL does by default) trains a random-init
transformers LlamaForCausalLM on pre-tokenized pairs, timed per optimizer step with a trainer
callback; then benchmarks/throughput.py runs the same shape in a subprocess (so the two
frameworks never share threads) with sdpo-train's own settings (throughput.py's defaults: prefix
sharing, full rematerialisation) and, like TRL, the reference forward inside every step; --ours
adds throughput.py flags (the same pairs, batch and model either way, only our layout of them
and what the backward pass keeps). With --rounds R both run R
times in turn and the medians are reported (a shared machine's load then hits both alike).
Prints pairs/s of each and the ratio (extra `bench`), and the ratio of CPU seconds per step (all
threads, TRL's over ours), which a shared machine's load disturbs less than wall time.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def trl_pairs_per_s(a, dtype: str) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    intermediate = a.intermediate or int(round(8 * a.hidden / 3 / 64)) * 64
    config = transformers.LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=a.prompt_len + a.completion_len,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
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
        "pairs_per_s": a.batch / step_s,
        "step_s_median": step_s,
        "cpu_s_per_step_median": statistics.median(cpu_times[1 + a.warmup :]),
        "torch_threads": torch.get_num_threads(),
    }


def _byte_tokenizer():
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    return Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))


def ours(a, dtype: str) -> dict:
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
    result = subprocess.run(
        [sys.executable, str(HERE / "throughput.py"), *flags, "--json"], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
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
        ("warmup", 2),
        ("intermediate", 0),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument(
        "--ours", default="", help="extra throughput.py flags for sdpo_jax (default: none, i.e. sdpo-train's settings)"
    )
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rows = []
    for dtype in a.dtypes.split(","):
        runs = [(trl_pairs_per_s(a, dtype), ours(a, dtype)) for _ in range(a.rounds)]
        theirs = statistics.median(t["pairs_per_s"] for t, _ in runs)
        mine = statistics.median(m["pairs_per_s"] for _, m in runs)
        rows.append(
            {
                "dtype": dtype,
                "trl_pairs_per_s": theirs,
                "sdpo_jax_pairs_per_s": mine,
                "ratio": mine / theirs,
                "ratio_per_round": [m["pairs_per_s"] / t["pairs_per_s"] for t, m in runs],
                "trl_pairs_per_s_per_round": [t["pairs_per_s"] for t, _ in runs],
                "sdpo_jax_pairs_per_s_per_round": [m["pairs_per_s"] for _, m in runs],
                "cpu_ratio": statistics.median(
                    t["cpu_s_per_step_median"] / m["cpu_s_per_step_median"] for t, m in runs
                ),
                "sdpo_jax_mfu": statistics.median(m["mfu"] for _, m in runs),
                "peak_flops": statistics.median(m["peak_flops"] for _, m in runs),
                "trl_step_s": statistics.median(t["step_s_median"] for t, _ in runs),
                "sdpo_jax_step_s": statistics.median(m["step_s_median"] for _, m in runs),
            }
        )
    if a.json:
        print(json.dumps({"shape": vars(a), "results": rows}))
    else:
        print(
            f"{'dtype':10s} {'TRL pairs/s':>12s} {'sdpo_jax pairs/s':>17s} {'ratio':>7s} {'CPU ratio':>10s} "
            f"{'sdpo_jax MFU':>13s}"
        )
        for r in rows:
            print(
                f"{r['dtype']:10s} {r['trl_pairs_per_s']:12.2f} {r['sdpo_jax_pairs_per_s']:17.2f} {r['ratio']:7.2f} "
                f"{r['cpu_ratio']:10.2f} {r['sdpo_jax_mfu']:13.1%}"
            )


if __name__ == "__main__":
    main()
