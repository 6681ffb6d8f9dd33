"""Flax Llama-family models against transformers' PyTorch classes on tiny local checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_fixtures import FAMILIES, load_torch_model
from sdpo_jax.checkpoint.hf_import import load_hf_checkpoint
from sdpo_jax.models import LlamaForCausalLM, ModelConfig
from sdpo_jax.models.attention import causal_attention_mask, grouped_query_attention
from sdpo_jax.models.llama import init_params, logical_axes, output_embedding


def _batch(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(3, 14)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 10:] = 0  # right padding
    mask[2, 6:] = 0
    return ids, mask


def _torch_logits(folder, ids, mask):
    with torch.no_grad():
        return load_torch_model(folder)(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_logits_match_transformers(hf_checkpoint, family):
    folder = hf_checkpoint(family)
    config, params = load_hf_checkpoint(folder)
    ids, mask = _batch(config.vocab_size)
    expected = _torch_logits(folder, ids, mask)
    model = LlamaForCausalLM(config, attention_implementation="xla")
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert 1.0 < np.abs(expected[real]).max() < 20.0  # logits of order 1-10, so the bound means something
    np.testing.assert_array_less(np.abs(logits[real] - expected[real]).max(), 1e-4)


def test_bf16_forward_within_tolerance(hf_checkpoint):
    """bf16 compute (fp32 params, fp32 accumulation) stays within 0.1 of fp32 logits (~2% of range)."""
    config, params = load_hf_checkpoint(hf_checkpoint("llama3"))
    ids, mask = _batch(config.vocab_size)

    def run(dtype):
        return np.asarray(
            LlamaForCausalLM(config, dtype=dtype).apply(
                {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)
            )
        )

    full, half = run(jnp.float32), run(jnp.bfloat16)
    real = mask.astype(bool)
    diff = np.abs(full[real] - half[real]).max()
    assert 0.0 < diff < 0.1, diff


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_nothing(hf_checkpoint, remat):
    config, params = load_hf_checkpoint(hf_checkpoint("qwen2"))
    ids, mask = _batch(config.vocab_size)

    def loss(p, model):
        return model.apply({"params": p}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).mean()

    plain = jax.grad(loss)(params, LlamaForCausalLM(config))
    remat_grads = jax.grad(loss)(params, LlamaForCausalLM(config, remat=remat))
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_xla_attention_equals_fused_api_conventions():
    """Our einsum path and jax.nn.dot_product_attention (the cuDNN entry point) agree on GQA and masks."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 9, 8, 16))
    k = jax.random.normal(keys[1], (2, 9, 2, 16))
    v = jax.random.normal(keys[2], (2, 9, 2, 16))
    valid = jnp.array([[1] * 9, [1] * 6 + [0] * 3])
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    mask = causal_attention_mask(valid, positions, sliding_window=4)
    ours = grouped_query_attention(q, k, v, mask, "xla")
    reference = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_every_parameter_dimension_has_a_logical_axis(hf_checkpoint):
    config, params = load_hf_checkpoint(hf_checkpoint("qwen2"))
    axes = logical_axes(LlamaForCausalLM(config))
    flat_axes = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_params = jax.tree_util.tree_leaves(params)
    assert len(flat_axes) == len(flat_params)
    for spec, leaf in zip(flat_axes, flat_params):
        assert len(spec) == leaf.ndim and all(isinstance(name, str) for name in spec)


def test_tied_and_untied_output_embedding(hf_checkpoint):
    tied_config, tied = load_hf_checkpoint(hf_checkpoint("llama3"))
    assert tied_config.tie_word_embeddings and "lm_head" not in tied
    np.testing.assert_array_equal(output_embedding(tied, tied_config), tied["embed_tokens"].T)
    untied_config, untied = load_hf_checkpoint(hf_checkpoint("llama2"))
    assert output_embedding(untied, untied_config) is untied["lm_head"]


def test_hidden_states_times_output_embedding_are_the_logits(hf_checkpoint):
    config, params = load_hf_checkpoint(hf_checkpoint("mistral"))
    model = LlamaForCausalLM(config)
    ids = jnp.arange(10)[None] % config.vocab_size
    hidden = model.apply({"params": params}, ids, return_hidden=True)
    logits = model.apply({"params": params}, ids)
    np.testing.assert_allclose(hidden @ output_embedding(params, config), logits, rtol=1e-5, atol=1e-5)


def test_random_init_has_the_checkpoint_shapes(hf_checkpoint):
    config, params = load_hf_checkpoint(hf_checkpoint("solar"))
    fresh = init_params(LlamaForCausalLM(config), jax.random.key(0))
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(fresh), jax.tree_util.tree_leaves(params)):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_param_count_matches_transformers(hf_checkpoint):
    for family in ("llama3", "qwen2", "solar"):
        folder = hf_checkpoint(family)
        expected = sum(p.numel() for p in load_torch_model(folder).parameters())
        assert ModelConfig.from_pretrained(folder).num_params == expected
