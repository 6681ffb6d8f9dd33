"""KV-cache decoding against transformers' generate and against our own cache-free forward; top-p
sampling against transformers' rule; seeds; a 4-device mesh against one device.

Run as a script (``python tests/test_generation.py FOLDER``, 4 host devices) it prints the mesh
report that `test_mesh_decoding_equals_one_device` checks.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_fixtures import load_torch_model
from run_fixtures import cpu_env
from sdpo_jax.checkpoint.hf_import import load_hf_checkpoint
from sdpo_jax.generation import generate, inverse_cdf, next_tokens, top_p_filter
from sdpo_jax.models import LlamaForCausalLM
from sdpo_jax.models.llama import logical_axes
from sdpo_jax.placement import place
from sdpo_jax.sharding import build_mesh, logical_to_shardings

NEW_TOKENS = 12


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(3, vocab, size=n).tolist() for n in (1, 4, 9, 17)]


def _transformers_greedy(folder, prompt: list[int]) -> list[int]:
    model = load_torch_model(folder)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2"])
def test_greedy_equals_transformers_generate(hf_checkpoint, family):
    """Rows of different lengths decoded together (left-padded) equal one-by-one HF decoding.

    Mistral's window (5) is shorter than prompt + new tokens, so the window over the cache counts.
    """
    folder = hf_checkpoint(family)
    config, params = load_hf_checkpoint(folder)
    prompts = _prompts(config.vocab_size)
    ours = generate(
        LlamaForCausalLM(config), params, prompts, NEW_TOKENS, eos_token_id=None, batch_size=4, pad_multiple=8
    )
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
    assert generate(model, params, [prompt], NEW_TOKENS, eos_token_id=None, batch_size=1) == [tokens[len(prompt) :]]


def test_eos_stops_a_row_and_sampling_is_seeded(hf_checkpoint):
    config, params = load_hf_checkpoint(hf_checkpoint("llama2"))
    model = LlamaForCausalLM(config)
    prompts = _prompts(config.vocab_size)
    greedy = generate(model, params, prompts, NEW_TOKENS, eos_token_id=None)
    eos = greedy[1][3]  # make the 4th greedy token of row 1 the EOS
    stopped = generate(model, params, prompts, NEW_TOKENS, eos_token_id=eos)
    assert stopped[1] == greedy[1][: greedy[1].index(eos) + 1]
    for full, cut in zip(greedy, stopped):
        assert cut == (full[: full.index(eos) + 1] if eos in full else full)
    sampled = [generate(model, params, prompts, NEW_TOKENS, None, temperature=1.0, seed=s) for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    assert sampled[0] != greedy  # temperature 1 on logits of order 1-10 departs from greedy


def test_bad_prompts_and_settings_are_errors(hf_checkpoint):
    config, params = load_hf_checkpoint(hf_checkpoint("llama2"))
    model = LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="outside"):
        generate(model, params, [[1, config.vocab_size]], 4, None)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, params, [[]], 4, None)
    for top_p in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            generate(model, params, [[1]], 4, None, temperature=1.0, top_p=top_p)


def _transformers_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """TopPLogitsWarper (transformers 5) in float64 numpy: sort ascending, remove the tokens whose
    cumulative probability is <= 1 - top_p, keep the most likely one, -inf for the removed."""
    order = np.argsort(logits, axis=-1, kind="stable")
    ascending = np.take_along_axis(logits, order, axis=-1)
    probs = np.exp(ascending - ascending[:, -1:])
    cumulative = np.cumsum(probs / probs.sum(axis=-1, keepdims=True), axis=-1)
    assert np.abs(cumulative - (1 - top_p)).min() > 1e-5, "a token sits on the boundary: float rounding decides"
    removed_sorted = cumulative <= 1 - top_p
    removed_sorted[:, -1] = False
    removed = np.zeros_like(removed_sorted)
    np.put_along_axis(removed, order, removed_sorted, axis=-1)
    return np.where(removed, -np.inf, logits)


def _fixed_logits() -> np.ndarray:
    """Rows of 40 distinct logits: spread, flat-ish, and one peaked row (a one-token nucleus)."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(5, 40)) * np.array([[3.0], [1.0], [0.3], [2.0], [1.0]])
    logits[4, 11] += 25.0
    return logits


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.62, 0.9, 0.995])
def test_top_p_filter_equals_transformers_rule(top_p):
    logits = _fixed_logits()
    ours = np.asarray(top_p_filter(jnp.asarray(logits, jnp.float32), top_p))
    expected = _transformers_top_p(logits, top_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
    np.testing.assert_allclose(ours[np.isfinite(ours)], logits[np.isfinite(expected)].astype(np.float32))
    assert np.isfinite(ours[4]).sum() == 1  # the peaked row: its top token alone holds > 0.995


def test_top_p_sampling_stays_in_the_nucleus_with_its_probabilities():
    """4096 draws (one per row) from fixed logits at temperature 0.7, top_p 0.8: only nucleus tokens,
    each as often as its renormalised probability says (within 5 standard deviations)."""
    logits = _fixed_logits()[0]
    draws = 4096
    tokens = np.asarray(
        next_tokens(
            jnp.asarray(np.tile(logits, (draws, 1)), jnp.float32), jax.random.key(0), temperature=0.7, top_p=0.8
        )
    )
    nucleus = _transformers_top_p(logits[None] / 0.7, 0.8)[0]
    probs = np.where(np.isfinite(nucleus), np.exp(nucleus - nucleus.max()), 0.0)
    probs /= probs.sum()
    assert 1 < np.count_nonzero(probs) < len(logits) and set(tokens.tolist()) <= set(np.flatnonzero(probs).tolist())
    counts = np.bincount(tokens, minlength=len(logits))
    assert np.all(np.abs(counts - draws * probs) <= 5 * np.sqrt(draws * probs * (1 - probs)) + 1)


def test_inverse_cdf_never_picks_a_zero_weight_token():
    """Two blocks and a padded tail; zero weights at both ends; the largest uniform below 1."""
    weights = np.zeros((5, 300), np.float32)
    weights[:, [3, 130, 131, 200]] = [2.0, 1.0, 3.0, 4.0]
    uniform = np.array([0.0, 0.2, 0.5, 0.99, np.nextafter(np.float32(1), np.float32(0))], np.float32)
    expected = np.minimum(np.searchsorted(np.cumsum(weights[0]), uniform * weights[0].sum(), side="right"), 200)
    np.testing.assert_array_equal(np.asarray(inverse_cdf(jnp.asarray(weights), jnp.asarray(uniform))), expected)


def test_top_p_one_compiles_no_filter():
    """top_p = 1 traces no bisection loop (a scan of 32 masked sums) and nothing else the filter adds."""
    logits, key = jnp.zeros((2, 40)), jax.random.key(0)

    def jaxpr(top_p):
        return jax.make_jaxpr(functools.partial(next_tokens, temperature=0.7, top_p=top_p))(logits, key)

    filtered, unfiltered = jaxpr(0.9), jaxpr(1.0)
    assert "scan" in str(filtered) and "scan" not in str(unfiltered)
    assert len(unfiltered.eqns) < len(filtered.eqns)


def test_samples_are_fixed_by_seed_batch_and_row(hf_checkpoint):
    """Same call, same tokens; a row's tokens do not change when another row's prompt does; the
    same prompts as batch 0 instead of batch 1 draw other numbers (the batch index is folded in)."""
    config, params = load_hf_checkpoint(hf_checkpoint("llama3"))
    model = LlamaForCausalLM(config)
    prompts = _prompts(config.vocab_size)
    settings = dict(temperature=1.0, top_p=0.9, seed=3, batch_size=2, pad_multiple=32)
    first = generate(model, params, prompts, NEW_TOKENS, None, **settings)
    assert generate(model, params, prompts, NEW_TOKENS, None, **settings) == first
    other = prompts[:1] + [[(t + 1) % config.vocab_size for t in prompts[1]]] + prompts[2:]
    changed = generate(model, params, other, NEW_TOKENS, None, **settings)
    assert [changed[i] for i in (0, 2, 3)] == [first[i] for i in (0, 2, 3)] and changed[1] != first[1]
    assert generate(model, params, prompts[2:], NEW_TOKENS, None, **settings) != first[2:]


def _mesh_report(folder: str) -> dict:
    """Greedy and seeded top-p tokens of 8 prompts (2 batches of 4) on one device and on meshes of
    the 4 host devices (params sharded by their logical axes), and the error for a batch that does
    not split over the mesh."""
    config, params = load_hf_checkpoint(folder)
    model = LlamaForCausalLM(config)
    prompts = _prompts(config.vocab_size) * 2
    settings = {"greedy": {}, "sampled": dict(temperature=1.0, top_p=0.9, seed=5)}
    report = {
        name: {
            "1 device": generate(
                model, jax.device_put(params, jax.devices()[0]), prompts, NEW_TOKENS, None, batch_size=4, **kw
            )
        }
        for name, kw in settings.items()
    }
    for shape in [(4, 1, 1), (1, 2, 2)]:
        mesh = build_mesh(*shape)
        placed = place(params, logical_to_shardings(logical_axes(model), mesh))
        for name, kw in settings.items():
            report[name]["x".join(map(str, shape))] = generate(
                model, placed, prompts, NEW_TOKENS, None, batch_size=4, mesh=mesh, **kw
            )
    try:
        generate(model, params, prompts, NEW_TOKENS, None, batch_size=6, mesh=build_mesh(4, 1, 1))
    except ValueError as error:
        report["error"] = str(error)
    return report


@pytest.mark.slow
def test_mesh_decoding_equals_one_device(hf_checkpoint):
    """Rows split over (data=4) and over (fsdp=2, tensor=2) with sharded params: greedy and seeded
    top-p sampling give the single-device tokens."""
    folder = hf_checkpoint("llama3")
    result = subprocess.run(
        [sys.executable, __file__, str(folder)], capture_output=True, text=True, env=cpu_env(4), timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("greedy", "sampled"):
        assert set(report[name]) == {"1 device", "4x1x1", "1x2x2"}
        assert all(tokens == report[name]["1 device"] for tokens in report[name].values()), name
    assert report["sampled"]["1 device"] != report["greedy"]["1 device"]
    assert report["error"] == (
        "generate: batch_size 6 does not split over the mesh's 4 batch devices (data x fsdp); use a multiple of 4"
    )


if __name__ == "__main__":
    assert jax.device_count() == 4, os.environ.get("XLA_FLAGS")
    print(json.dumps(_mesh_report(sys.argv[1])))
