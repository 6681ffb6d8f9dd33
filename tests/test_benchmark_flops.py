"""The FLOP count behind every MFU the benchmarks report (benchmarks/throughput.py's `flops_per_pair`, and
vs_trl.py's count of TRL's step) against an independent count: PyTorch's FlopCounterMode over a transformers
Llama's forward and backward pass at the same shape."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import vs_trl  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

SHAPE = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 300, "intermediate": 96}


@pytest.mark.parametrize("prompt_len, completion_len", [(12, 8), (5, 11)])
def test_trl_step_flops_equal_pytorch_counted_forward_and_backward(prompt_len, completion_len):
    a = argparse.Namespace(**SHAPE, prompt_len=prompt_len, completion_len=completion_len, batch=1)
    torch.manual_seed(0)
    # TRL's model in the comparison, with explicit attention products, which the counter sees (it skips CPU SDPA)
    model = transformers.AutoModelForCausalLM.from_config(vs_trl.llama_config(a), attn_implementation="eager")
    tokens = prompt_len + completion_len
    ids = torch.randint(3, a.vocab, (2, tokens))  # a pair: chosen and rejected rows
    with FlopCounterMode(display=False) as forward:
        model(ids)
    with FlopCounterMode(display=False) as forward_backward:
        model(ids).logits.sum().backward()
    # transformers scores every position; TRL's fused head every position but the last of each row
    last_positions = 2 * 2 * a.hidden * a.vocab
    policy = forward_backward.get_total_flops() - 3 * last_positions
    reference = forward.get_total_flops() - last_positions
    assert vs_trl.trl_flops_per_pair(a) == policy + reference
