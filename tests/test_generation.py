"""KV-cache decoding against transformers' generate and against our own cache-free forward."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_fixtures import load_torch_model
from sdpo_jax.checkpoint.hf_import import load_hf_checkpoint
from sdpo_jax.generation import generate
from sdpo_jax.models import LlamaForCausalLM

NEW_TOKENS = 12


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(3, vocab, size=n).tolist() for n in (1, 4, 9, 17)]


def _transformers_greedy(folder, prompt: list[int]) -> list[int]:
    model = load_torch_model(folder)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2"])
def test_greedy_equals_transformers_generate(hf_checkpoint, family):
    """Rows of different lengths decoded together (left-padded) equal one-by-one HF decoding.

    Mistral's window (5) is shorter than prompt + new tokens, so the window over the cache counts.
    """
    folder = hf_checkpoint(family)
    config, params = load_hf_checkpoint(folder)
    prompts = _prompts(config.vocab_size)
    ours = generate(LlamaForCausalLM(config), params, prompts, NEW_TOKENS, eos_token_id=None, batch_size=4, pad_multiple=8)
    assert ours == [_transformers_greedy(folder, p) for p in prompts]


@pytest.mark.slow
def test_cache_decoding_equals_full_forward_argmax(hf_checkpoint):
    folder = hf_checkpoint("mistral")
    config, params = load_hf_checkpoint(folder)
    model = LlamaForCausalLM(config, attention_implementation="xla")
    prompt = _prompts(config.vocab_size)[2]
    tokens = list(prompt)
    for _ in range(NEW_TOKENS):
        logits = model.apply({"params": params}, jnp.asarray([tokens]))
        tokens.append(int(jnp.argmax(logits[0, -1])))
    assert generate(model, params, [prompt], NEW_TOKENS, eos_token_id=None, batch_size=1) == [tokens[len(prompt):]]


def test_eos_stops_a_row_and_sampling_is_seeded(hf_checkpoint):
    config, params = load_hf_checkpoint(hf_checkpoint("llama2"))
    model = LlamaForCausalLM(config)
    prompts = _prompts(config.vocab_size)
    greedy = generate(model, params, prompts, NEW_TOKENS, eos_token_id=None)
    eos = greedy[1][3]  # make the 4th greedy token of row 1 the EOS
    stopped = generate(model, params, prompts, NEW_TOKENS, eos_token_id=eos)
    assert stopped[1] == greedy[1][:greedy[1].index(eos) + 1]
    for full, cut in zip(greedy, stopped):
        assert cut == (full[:full.index(eos) + 1] if eos in full else full)
    sampled = [generate(model, params, prompts, NEW_TOKENS, None, temperature=1.0, seed=s) for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    assert sampled[0] != greedy  # temperature 1 on logits of order 1-10 departs from greedy


def test_bad_prompts_are_errors(hf_checkpoint):
    config, params = load_hf_checkpoint(hf_checkpoint("llama2"))
    model = LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="outside"):
        generate(model, params, [[1, config.vocab_size]], 4, None)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, params, [[]], 4, None)
