"""Reference log-probs precomputed over a whole chunk give the same training as in-step ones."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import transformers

from sdpo_jax.checkpoint.hf_import import load_hf_checkpoint
from sdpo_jax.data.batching import PairBatcher
from sdpo_jax.data.config import get_data_config
from sdpo_jax.data.load import load_pairs
from sdpo_jax.losses import DPOSettings
from sdpo_jax.models import LlamaForCausalLM
from sdpo_jax.optim import OptimizerSettings, make_optimizer
from sdpo_jax.placement import place, state_shardings
from sdpo_jax.reference import attach_reference, jit_reference_step, precompute_reference_logps
from sdpo_jax.sharding import build_mesh
from sdpo_jax.train_step import TrainState, jit_train_step


@pytest.mark.slow
def test_precomputed_chunk_equals_in_step_reference(hf_checkpoint, tmp_path):
    folder = hf_checkpoint("llama2")
    rng = np.random.default_rng(0)
    rows = [
        {
            "prompt_ids": rng.integers(3, 160, rng.integers(2, 30)).tolist(),
            "chosen_ids": rng.integers(3, 160, rng.integers(1, 20)).tolist() + [2],
            "rejected_ids": rng.integers(3, 160, rng.integers(1, 20)).tolist() + [2],
        }
        for _ in range(11)
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config, params = load_hf_checkpoint(folder)
    data_config = get_data_config()
    data_config.cache_dir = str(tmp_path / "cache")
    pairs = load_pairs(
        [str(tmp_path / "pairs.jsonl")],
        transformers.AutoTokenizer.from_pretrained(folder),
        data_config,
        vocab_size=config.vocab_size,
    )
    batcher = PairBatcher(pairs, batch_size=4, seed=3, buckets=(16, 32, 64))
    model = LlamaForCausalLM(config)
    mesh = build_mesh(data=-1)
    optimizer = make_optimizer(OptimizerSettings(learning_rate=1e-3, total_steps=3))
    shardings, _ = state_shardings(model, optimizer, mesh)
    ref = place(params, shardings.params)
    chosen, rejected = precompute_reference_logps(
        jit_reference_step(model, mesh, shardings.params), ref, batcher.epoch_batches(0), len(pairs), mesh
    )
    assert chosen.shape == (11,) and np.all(chosen < 0)
    packed = PairBatcher(pairs, batch_size=4, seed=3, buckets=(16, 32, 64), prefix_sharing=True)
    packed_logps = precompute_reference_logps(
        jit_reference_step(model, mesh, shardings.params), ref, packed.epoch_batches(0), len(pairs), mesh
    )
    np.testing.assert_allclose(packed_logps, (chosen, rejected), rtol=1e-5, atol=1e-4)  # prefix sharing: same numbers

    settings = DPOSettings(beta=0.1)
    in_step = jit_train_step(model, settings, optimizer, mesh, shardings, with_reference_params=True)
    precomputed = jit_train_step(model, settings, optimizer, mesh, shardings, with_reference_params=False)
    state_a = place(TrainState.create(params, optimizer), shardings)
    state_b = place(TrainState.create(params, optimizer), shardings)
    for batch in batcher.epoch_batches(0):  # 3 batches, the last one with a padding row
        state_a, metrics_a = in_step(state_a, ref, batch)
        state_b, metrics_b = precomputed(state_b, None, attach_reference(batch, chosen, rejected))
        np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(state_a.params), jax.tree_util.tree_leaves(state_b.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_damaged_reference_cache_is_recomputed_not_a_crash(tmp_path):
    """A cache file cut short or overwritten by something else reads as absent (recomputed), like a stale one."""
    from sdpo_jax.run_context import RunContext

    good = tmp_path / "good.npz"
    np.savez(good, key="k", chosen=np.arange(3.0), rejected=-np.arange(3.0))
    chosen, rejected = RunContext.stored_logps(good, "k")
    np.testing.assert_array_equal(chosen, np.arange(3.0))
    assert RunContext.stored_logps(good, "other key") is None
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[:100])
    assert RunContext.stored_logps(cut, "k") is None
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, something=np.zeros(2))
    assert RunContext.stored_logps(foreign, "k") is None
    (tmp_path / "text.npz").write_text("not a zip")
    assert RunContext.stored_logps(tmp_path / "text.npz", "k") is None
