"""Our Flax model on the real SmolLM2-135M-Instruct (imported from GGUF) against transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdpo_jax.checkpoint.hf_import import load_hf_checkpoint
from sdpo_jax.models import LlamaForCausalLM

pytestmark = [pytest.mark.slow]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def greedy_decode(model, params, prompt_ids: list[int], new_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding with one fixed-shape forward per token (a single compiled program)."""
    length = len(prompt_ids) + new_tokens
    forward = jax.jit(lambda ids, mask: model.apply({"params": params}, ids, attention_mask=mask))
    ids = np.zeros((1, length), np.int32)
    ids[0, : len(prompt_ids)] = prompt_ids
    out = []
    for position in range(len(prompt_ids), length):
        mask = (np.arange(length) < position).astype(np.int32)[None]
        token = int(jnp.argmax(forward(ids, mask)[0, position - 1]))
        if token == eos_id:
            break
        ids[0, position] = token
        out.append(token)
    return out


def test_flax_smollm2_matches_transformers_gguf_and_answers(smollm2_gguf, smollm2_hf):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    reference = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).eval()
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([prompt])).logits.numpy()[0]

    config, params = load_hf_checkpoint(smollm2_hf)
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
    model = LlamaForCausalLM(config)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray([prompt])))[0]
    assert np.abs(expected).max() > 5.0
    np.testing.assert_array_less(np.abs(logits - expected).max(), 5e-4)  # logits up to ~38; observed 9.5e-5

    answer = tokenizer.decode(greedy_decode(model, params, prompt, 12, tokenizer.eos_token_id))
    assert "Paris" in answer, answer
