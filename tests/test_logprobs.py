"""Chunked completion log-probs against transformers' forward and the naive full-logits version."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from batch_fixtures import random_pair_batch
from hf_fixtures import load_torch_model
from sdpo_jax.checkpoint.hf_import import load_hf_checkpoint
from sdpo_jax.logprobs import token_logps
from sdpo_jax.mixed_einsum import mixed_einsum
from sdpo_jax.models import LlamaForCausalLM
from sdpo_jax.pair_logps import completion_logps


def _naive_token_logps(hidden, weights, targets):
    logits = jnp.einsum("rsd,dv->rsv", hidden, weights)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
def test_chunked_values_and_gradients_equal_naive(chunk):
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (3, 13, 16))
    weights = jax.random.normal(keys[1], (16, 50))
    targets = jax.random.randint(keys[2], (3, 13), 0, 50)
    np.testing.assert_allclose(
        token_logps(hidden, weights, targets, chunk), _naive_token_logps(hidden, weights, targets), rtol=1e-5, atol=1e-5
    )
    mask = (jnp.arange(13) % 3 != 0)[None].astype(jnp.float32) * jnp.array([[1.0], [2.0], [-0.5]])
    chunked = jax.grad(lambda h, w: jnp.sum(mask * token_logps(h, w, targets, chunk)), argnums=(0, 1))(hidden, weights)
    naive = jax.grad(lambda h, w: jnp.sum(mask * _naive_token_logps(h, w, targets)), argnums=(0, 1))(hidden, weights)
    for a, b in zip(chunked, naive):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_completion_logps_match_transformers(hf_checkpoint):
    folder = hf_checkpoint("qwen2")
    config, params = load_hf_checkpoint(folder)
    batch = random_pair_batch(4, 24, config.vocab_size, seed=3)
    chosen, rejected, chosen_tokens, _ = completion_logps(
        LlamaForCausalLM(config), params, jax.tree_util.tree_map(jnp.asarray, batch), chunk_size=5
    )
    torch_model = load_torch_model(folder)
    for side, ours in (("chosen", chosen), ("rejected", rejected)):
        ids = torch.tensor(batch[f"{side}_input_ids"], dtype=torch.long)
        with torch.no_grad():
            logits = torch_model(input_ids=ids, attention_mask=torch.tensor(batch[f"{side}_attention_mask"])).logits
        logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        expected = (logp * torch.tensor(batch[f"{side}_loss_mask"][:, 1:])).sum(-1).numpy()
        np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=2e-4)
    np.testing.assert_array_equal(chosen_tokens, batch["chosen_loss_mask"][:, 1:].sum(-1))


def test_peak_memory_of_chunked_logps_is_far_below_full_logits():
    """Compiled temp memory for 128k vocab, seq 4096, 2 rows: chunked vs the naive full-logits grad."""
    rows, seq, hidden_size, vocab = 2, 4096, 64, 128 * 1024
    hidden = jax.ShapeDtypeStruct((rows, seq, hidden_size), jnp.float32)
    weights = jax.ShapeDtypeStruct((hidden_size, vocab), jnp.float32)
    targets = jax.ShapeDtypeStruct((rows, seq), jnp.int32)

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(lambda h, w, t: jnp.sum(fn(h, w, t)), argnums=(0, 1)))
        return grad.lower(hidden, weights, targets).compile().memory_analysis().temp_size_in_bytes

    naive = temp_bytes(_naive_token_logps)
    chunked = temp_bytes(lambda h, w, t: token_logps(h, w, t, 128))
    full_logits = rows * seq * vocab * 4
    assert naive >= full_logits  # the naive version holds at least the whole float32 logits
    assert chunked < full_logits / 8, (chunked, naive)


def test_chunks_without_completion_tokens_are_skipped_exactly():
    keys = jax.random.split(jax.random.key(1), 3)
    hidden = jax.random.normal(keys[0], (2, 24, 16))
    weights = jax.random.normal(keys[1], (16, 40))
    targets = jax.random.randint(keys[2], (2, 24), 0, 40)
    needed = (jnp.arange(24)[None] >= jnp.array([[13], [17]])) & (
        jnp.arange(24)[None] < 20
    )  # prompt, completion, padding
    skipped = token_logps(hidden, weights, targets, 4, needed=needed)
    naive = _naive_token_logps(hidden, weights, targets)
    np.testing.assert_allclose(np.where(needed, skipped, 0), np.where(needed, naive, 0), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(skipped)[:, :12] == 0) and np.all(np.asarray(skipped)[:, 20:] == 0)  # whole chunks skipped

    def grad(fn):
        return jax.grad(lambda h, w: jnp.sum(jnp.where(needed, fn(h, w), 0.0)), argnums=(0, 1))(hidden, weights)

    for a, b in zip(
        grad(lambda h, w: token_logps(h, w, targets, 4, needed=needed)),
        grad(lambda h, w: _naive_token_logps(h, w, targets)),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_mixed_einsum_backward_stays_in_bfloat16():
    """float32 operands: exactly jnp.einsum's gradients; bfloat16: no float32 x float32 product left."""
    keys = jax.random.split(jax.random.key(2), 3)
    x, w, g = (jax.random.normal(k, s) for k, s in zip(keys, [(4, 6, 16), (16, 3, 8), (4, 6, 3, 8)]))
    loss = lambda einsum: lambda x, w: jnp.sum(g * einsum("bsd,dhk->bshk", x, w))  # noqa: E731
    ours = jax.grad(loss(mixed_einsum), argnums=(0, 1))(x, w)
    plain = jax.grad(loss(lambda s, a, b: jnp.einsum(s, a, b, preferred_element_type=jnp.float32)), argnums=(0, 1))(
        x, w
    )
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    half = (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    for a, b in zip(jax.grad(loss(mixed_einsum), argnums=(0, 1))(*half), plain):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=0.05 * float(np.abs(b).max()))
    hlo = jax.jit(jax.grad(loss(mixed_einsum), argnums=(0, 1))).lower(*half).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line and "=" in line]
    operands = [d.rsplit(": (", 1)[1].split(") ->")[0] for d in dots]
    assert len(dots) == 2 and all("f32" not in o and o.count("bf16") == 2 for o in operands), dots  # dx and dw
    batched = jax.grad(lambda a, b: jnp.sum(mixed_einsum("bsd,btd->bst", a, b) ** 2), argnums=(0, 1))(x, x)
    expected = jax.grad(lambda a, b: jnp.sum(jnp.einsum("bsd,btd->bst", a, b) ** 2), argnums=(0, 1))(x, x)
    for a, b in zip(batched, expected):  # batch indices (in all three terms)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least two terms"):
        mixed_einsum("bd,be->b", x[:, 0], x[:, 0])
