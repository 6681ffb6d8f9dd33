"""Prefix sharing: one packed row per pair gives the plain layout's log-probs, loss and gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from batch_fixtures import random_pair_batch
from sdpo_jax.checkpoint.hf_import import load_hf_checkpoint
from sdpo_jax.evaluation import make_eval_step
from sdpo_jax.losses import DPOSettings
from sdpo_jax.models import LlamaForCausalLM
from sdpo_jax.pair_logps import completion_logps
from sdpo_jax.prefix_sharing import CHOSEN, PAD, PROMPT, REJECTED, pack_pairs, packed_attention_mask
from sdpo_jax.train_step import TrainState, make_train_step


def _tiny_plain_batch():
    """Two pairs (prompt 3, chosen 2, rejected 1; prompt 1, chosen 1, rejected 3) and a padding pair."""
    ids = {
        "chosen": [[5, 6, 7, 10, 11, 0], [8, 12, 0, 0, 0, 0], [0] * 6],
        "rejected": [[5, 6, 7, 20, 0, 0], [8, 21, 22, 23, 0, 0], [0] * 6],
    }
    prompt, lengths = [3, 1, 0], {"chosen": [5, 2, 0], "rejected": [4, 4, 0]}
    batch = {"valid": np.array([True, True, False]), "pair_index": np.array([4, 9, -1], np.int32)}
    j = np.arange(6)[None]
    for side in ("chosen", "rejected"):
        real = j < np.array(lengths[side])[:, None]
        batch[f"{side}_input_ids"] = np.array(ids[side], np.int32)
        batch[f"{side}_attention_mask"] = real.astype(np.int32)
        batch[f"{side}_loss_mask"] = real & (j >= np.array(prompt)[:, None])
    return batch


def test_packed_layout_by_hand():
    packed = pack_pairs(_tiny_plain_batch(), length=7, completion_length=4)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 10, 11, 20, 0], [8, 12, 21, 22, 23, 0, 0], [0] * 7]
    assert packed["positions"].tolist() == [[0, 1, 2, 3, 4, 3, 0], [0, 1, 1, 2, 3, 0, 0], [0] * 7]
    P, C, R, _ = PROMPT, CHOSEN, REJECTED, PAD
    assert packed["segment_ids"].tolist() == [[P, P, P, C, C, R, _], [P, C, R, R, R, _, _], [_] * 7]
    # Chosen token k is predicted by index P+k-1; rejected token 0 by the last prompt token.
    assert packed["chosen_index"].tolist() == [[2, 3, 0, 0], [0, 0, 0, 0], [0] * 4]
    assert packed["chosen_labels"].tolist() == [[10, 11, 0, 0], [12, 0, 0, 0], [0] * 4]
    assert packed["rejected_index"].tolist() == [[2, 0, 0, 0], [0, 2, 3, 0], [0] * 4]
    assert packed["rejected_labels"].tolist() == [[20, 0, 0, 0], [21, 22, 23, 0], [0] * 4]
    assert packed["rejected_label_mask"].sum(-1).tolist() == [1, 3, 0]
    assert packed["pair_index"].tolist() == [4, 9, -1] and "chosen_input_ids" not in packed
    mask = np.asarray(
        packed_attention_mask(jnp.asarray(packed["segment_ids"]), jnp.asarray(packed["positions"]), None)
    )[0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True, False]  # rejected: prompt + itself, never chosen
    assert mask[4].tolist() == [True] * 5 + [False] * 2
    window = np.asarray(packed_attention_mask(jnp.asarray(packed["segment_ids"]), jnp.asarray(packed["positions"]), 2))[
        0, 0
    ]
    assert window[5].tolist() == [False, False, True, False, False, True, False]  # position 3 sees positions 2, 3


def test_pack_refuses_what_does_not_fit_or_differs():
    plain = _tiny_plain_batch()
    with pytest.raises(ValueError, match="row length 5"):
        pack_pairs(plain, length=5, completion_length=4)
    with pytest.raises(ValueError, match="completion length 2"):
        pack_pairs(plain, length=7, completion_length=2)
    plain["rejected_input_ids"][0, 1] = 99
    with pytest.raises(ValueError, match="different prompts"):
        pack_pairs(plain, length=7, completion_length=4)


def _batches(config, seed):
    plain = random_pair_batch(4, 24, config.vocab_size, seed=seed)
    plain["valid"][2] = False  # a padding pair (all zeros), as the batcher makes them
    for side in ("chosen", "rejected"):
        for key in ("input_ids", "attention_mask", "loss_mask"):
            plain[f"{side}_{key}"][2] = 0
    return plain, pack_pairs(plain, 48, 24)


@pytest.mark.parametrize("family", ["mistral", "llama3", "qwen2"])
def test_packed_logps_equal_plain(hf_checkpoint, family):
    """Mistral's window (5) is shorter than the prompts: the rejected rows need positions, not indices."""
    config, params = load_hf_checkpoint(hf_checkpoint(family))
    model = LlamaForCausalLM(config)
    plain, packed = _batches(config, seed=3)
    as_jax = lambda b: jax.tree_util.tree_map(jnp.asarray, b)  # noqa: E731
    expected = completion_logps(model, params, as_jax(plain), chunk_size=5)
    got = completion_logps(model, params, as_jax(packed), chunk_size=5)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-4)
    assert np.asarray(expected[1])[2] == 0.0 and np.asarray(got[1])[2] == 0.0


def test_packed_train_and_eval_steps_equal_plain(hf_checkpoint):
    config, params = load_hf_checkpoint(hf_checkpoint("mistral"))
    model = LlamaForCausalLM(config)
    settings = DPOSettings(beta=0.1, rpo_alpha=0.5)
    optimizer = optax.sgd(1.0)  # the update is minus the gradient: compare gradients, not Adam's sign noise
    ref_params = jax.tree_util.tree_map(lambda x: x * 0.95, params)
    plain, packed = _batches(config, seed=5)
    step = jax.jit(make_train_step(model, settings, optimizer, grad_accum=2, chunk_size=8))
    state_plain, metrics_plain = step(TrainState.create(params, optimizer), ref_params, plain)
    state_packed, metrics_packed = step(TrainState.create(params, optimizer), ref_params, packed)
    for name in metrics_plain:
        np.testing.assert_allclose(metrics_packed[name], metrics_plain[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert float(metrics_plain["grad_norm"]) > 0
    grads = lambda state: jax.tree_util.tree_map(jnp.subtract, params, state.params)  # noqa: E731
    for a, b in zip(jax.tree_util.tree_leaves(grads(state_plain)), jax.tree_util.tree_leaves(grads(state_packed))):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * float(np.abs(a).max()))
    evaluate = jax.jit(make_eval_step(model, settings, chunk_size=8))
    for name, value in evaluate(params, ref_params, plain).items():
        np.testing.assert_allclose(
            evaluate(params, ref_params, packed)[name], value, rtol=1e-5, atol=1e-5, err_msg=name
        )


@pytest.mark.slow
def test_packed_steps_on_a_2x2_mesh_equal_plain_on_one_device():
    script = Path(__file__).with_name("prefix_sharing_sharded_script.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(report["losses"], report["plain_losses"], rtol=1e-5)
    assert report["losses"][1] != report["losses"][0]  # the first step changed the parameters
    assert report["param_max_abs_diff"] < 1e-5, report  # SGD: parameters move by the (equal) gradients
