"""Reward models (*ForSequenceClassification) in Flax and the reward-model scorer, against transformers."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_fixtures import load_torch_reward_model, make_hf_checkpoint, make_reward_checkpoint
from run_fixtures import cpu_env
from sdpo_jax.checkpoint.hf_import import CheckpointError, load_hf_checkpoint
from sdpo_jax.models.config import ModelConfig, UnsupportedModelError
from sdpo_jax.models.reward import REWARD_ARCHITECTURES, load_reward_model, reward_model_config
from sdpo_jax.reward_scorer import RewardModelScorer, render_texts

MESH_SCRIPT = Path(__file__).resolve().parent / "reward_mesh_script.py"
# Six pairs of 4 to ~200 tokens: two batches of 4 rows, of two padded widths.
PROMPTS = [
    "Hi",
    "What is the capital of France? Answer briefly.",
    "Name a colour.",
    "Tell me a story " * 12,
    "ok",
    "Why is the sky blue?",
]
COMPLETIONS = [
    "Hello!",
    "Paris.",
    "Blue",
    "Once upon a time there was a fox. " * 5,
    "fine",
    "Light scatters off the air, and blue scatters the most.",
]


def transformers_rewards(folder: Path, ids: list[list[int]], padding_side: str) -> np.ndarray:
    """transformers' *ForSequenceClassification rewards of token ``ids`` in one batch padded with id 0
    (the checkpoints' pad_token_id) on ``padding_side``."""
    width = max(map(len, ids))
    pad = [[0] * (width - len(row)) for row in ids]
    rows = [p + row if padding_side == "left" else row + p for row, p in zip(ids, pad)]
    masks = [
        [0] * len(p) + [1] * len(row) if padding_side == "left" else [1] * len(row) + [0] * len(p)
        for row, p in zip(ids, pad)
    ]
    with torch.no_grad():
        logits = load_torch_reward_model(folder)(
            input_ids=torch.tensor(rows), attention_mask=torch.tensor(masks)
        ).logits
    return logits[:, 0].numpy()


def pair_ids(tokenizer, prompts: list[str], completions: list[str]) -> list[list[int]]:
    """Each pair's token ids as the reward model reads them (the scorer's text, tokenized by transformers)."""
    texts, special = render_texts(tokenizer, prompts, completions)
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


@pytest.mark.parametrize("family, chat_template", [("llama2", False), ("qwen2", True), ("llama3", True)])
def test_rewards_equal_transformers(tmp_path, family, chat_template):
    folder = make_reward_checkpoint(family, tmp_path, chat_template=chat_template)
    scorer = RewardModelScorer(folder, batch_size=4, max_length=512)
    rewards = scorer(PROMPTS, COMPLETIONS, [None] * len(PROMPTS))
    texts, special = render_texts(scorer.tokenizer, PROMPTS, COMPLETIONS)
    assert special != chat_template and texts[0].startswith("<s>[user] Hi") == chat_template
    ids = pair_ids(scorer.tokenizer, PROMPTS, COMPLETIONS)
    assert min(map(len, ids)) < 64 < max(map(len, ids))
    for side in ("left", "right"):
        expected = transformers_rewards(folder, ids, side)
        assert np.abs(expected).max() > 1.0
        np.testing.assert_allclose(rewards, expected, atol=1e-4, rtol=0)
    assert scorer(PROMPTS, COMPLETIONS, [None] * len(PROMPTS)) == rewards
    assert scorer.forward._cache_size() == 2  # one program per padded width, reused by the second call


def test_reward_params_have_a_score_head_and_no_lm_head(tmp_path):
    folder = make_reward_checkpoint("llama2", tmp_path)
    module, params = load_reward_model(folder)
    assert sorted(params) == ["embed_tokens", "layers", "norm", "score"] and params["score"].shape == (64, 1)
    config = module.config
    assert (config.architecture, config.num_labels) == ("LlamaForSequenceClassification", 1)
    assert config.num_params == sum(p.numel() for p in load_torch_reward_model(folder).parameters())
    assert ModelConfig.from_hf_dict(config.to_hf_dict(), architectures=REWARD_ARCHITECTURES) == config


def test_not_a_reward_model_is_a_one_line_error(tmp_path):
    causal = make_hf_checkpoint("llama2", tmp_path / "causal")
    with pytest.raises(
        UnsupportedModelError,
        match=r"causal/config.json: architecture 'LlamaForCausalLM' is not "
        r"supported; supported: LlamaForSequenceClassification, MistralForSequenceClassification, "
        r"Qwen2ForSequenceClassification$",
    ):
        reward_model_config(causal)
    two_labels = make_reward_checkpoint("llama2", tmp_path / "two", num_labels=2)
    with pytest.raises(
        CheckpointError,
        match=r"two: config.json gives the score head 2 labels; a reward model has "
        r"exactly one$",
    ):
        reward_model_config(two_labels)
    reward = make_reward_checkpoint("llama2", tmp_path / "reward")
    with pytest.raises(UnsupportedModelError, match=r"architecture 'LlamaForSequenceClassification' is not supported"):
        load_hf_checkpoint(reward)  # nor is a reward model taken for a causal LM
    with pytest.raises(FileNotFoundError, match=r"nowhere/config.json: no config.json in the model folder$"):
        reward_model_config(tmp_path / "nowhere")


def test_long_texts_lose_their_first_tokens_and_are_counted(tmp_path, caplog):
    folder = make_reward_checkpoint("llama2", tmp_path)
    scorer = RewardModelScorer(folder, batch_size=4, max_length=12)
    with caplog.at_level(logging.WARNING, logger="sdpo_jax.reward"):
        rewards = scorer(PROMPTS, COMPLETIONS, [None] * len(PROMPTS))
    assert [r.getMessage() for r in caplog.records] == [
        "reward model: 3 of 6 texts were longer than max_length=12 tokens and lost their first tokens"
    ]
    expected = transformers_rewards(
        folder, [ids[-12:] for ids in pair_ids(scorer.tokenizer, PROMPTS, COMPLETIONS)], "right"
    )
    np.testing.assert_allclose(rewards, expected, atol=1e-4, rtol=0)


def test_token_ids_outside_the_vocabulary_are_an_error(tmp_path):
    scorer = RewardModelScorer(make_reward_checkpoint("llama2", tmp_path, vocab_size=160))
    with pytest.raises(
        CheckpointError,
        match=r"text 0: token id \d+ is outside the vocabulary \(size 160\); the tokenizer "
        r"does not fit the model$",
    ):
        scorer(["What is the capital of France?"], ["Paris."], [None])


@pytest.mark.slow
def test_a_mesh_gives_the_rewards_of_one_device(tmp_path):
    folder = make_reward_checkpoint("qwen2", tmp_path, chat_template=True)
    done = subprocess.run(
        [sys.executable, str(MESH_SCRIPT), str(folder)], capture_output=True, text=True, env=cpu_env(4), timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    single = report.pop("single")
    assert sorted(report) == ["1x2x2", "2x2x1"]
    for mesh in report.values():
        assert mesh["laid_out_as_training"]
        np.testing.assert_allclose(mesh["rewards"], single, atol=1e-5, rtol=0)
