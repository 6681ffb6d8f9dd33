"""A reward model as a scorer of (prompt, completion) pairs, e.g. of on-policy stage samples.

`RewardModelScorer(folder)(prompts, completions, references)` gives one float per pair: the
reward model's score (sdpo_jax.models.reward) of

- the chat template's rendering of [user: prompt, assistant: completion] when the reward
  model's tokenizer has a chat template (rendered as text, then tokenized without adding special
  tokens again: the template writes its own), else
- prompt + completion with the tokenizer's special tokens (BOS).

References are not used: a reward model judges the completion alone. A text longer than
``max_length`` tokens keeps its last ``max_length`` (the end of the completion is what the
reward is read at); how many were cut is logged once per call. Token ids outside the model's
vocabulary are an error, not clamped.

Batches. Texts are sorted by length and cut into batches of ``batch_size`` rows, each
right-padded to the next multiple of 64 tokens (the last one filled with padding rows), so the
jitted forward compiles one program per width used, at most max_length / 64 of them, kept
across calls. With a mesh each batch is split by rows over the mesh's batch axes and the
parameters are laid out as the training parameters are; every process passes the same pairs
and gets every reward back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from sdpo_jax.checkpoint.hf_import import CheckpointError
from sdpo_jax.data.chat_template import ChatTemplateRefused, render_chat, user_turn
from sdpo_jax.data.validation import token_range_problem
from sdpo_jax.models.loading import load_tokenizer
from sdpo_jax.models.reward import LlamaForSequenceClassification, load_reward_model
from sdpo_jax.placement import whole_batch_on_mesh
from sdpo_jax.scorers import ScorerError
from sdpo_jax.sharding import batch_row_multiple, replicated

WIDTH_MULTIPLE = 64
logger = logging.getLogger("sdpo_jax.reward")


class RewardModelScorer:
    """Scores (prompt, completion) pairs with the reward model in ``folder`` (see the module docstring)."""

    def __init__(
        self, folder: str | os.PathLike, mesh: Mesh | None = None, batch_size: int = 16, max_length: int = 1024
    ):
        rows = batch_row_multiple(mesh)
        if batch_size < 1 or batch_size % rows:
            raise ValueError(
                f"reward model batch size {batch_size} must be a positive multiple of {rows} "
                f"(the mesh's batch shards and processes)"
            )
        if max_length < 1:
            raise ValueError(f"reward model max_length must be positive, got {max_length}")
        self.folder, self.mesh, self.batch_size, self.max_length = os.fspath(folder), mesh, batch_size, max_length
        self.module, self.params = load_reward_model(folder, mesh)
        self.tokenizer = load_tokenizer(folder)
        self.forward = reward_step(self.module, mesh)

    def __call__(self, prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
        """One float32 reward per (prompt, completion), in order; ``references`` are not used."""
        if not len(prompts) == len(completions) == len(references):
            raise ValueError(
                f"reward model: {len(prompts)} prompts, {len(completions)} completions and "
                f"{len(references)} references; they must pair up"
            )
        ids = self.encode(prompts, completions)
        rewards = np.zeros(len(ids), np.float32)
        for rows, batch in reward_batches(ids, self.batch_size):
            placed = batch if self.mesh is None else whole_batch_on_mesh(batch, self.mesh)
            rewards[rows] = np.asarray(jax.device_get(self.forward(self.params, placed)))[: len(rows)]
        return rewards.tolist()

    def encode(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[int]]:
        """Token ids of each pair's text, cut from the left to ``max_length`` (the count cut is logged)."""
        texts, special = render_texts(self.tokenizer, prompts, completions)
        ids = self.tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"] if texts else []
        for i, row in enumerate(ids):
            problem = token_range_problem(row, self.module.config.vocab_size) if row else "it has no tokens"
            if problem:
                raise CheckpointError(
                    f"reward model {self.folder}: text {i}: {problem}; the tokenizer does not fit the model"
                )
        truncated = sum(len(row) > self.max_length for row in ids)
        if truncated:
            logger.warning(
                "reward model: %d of %d texts were longer than max_length=%d tokens and lost their first tokens",
                truncated,
                len(ids),
                self.max_length,
            )
        return [row[-self.max_length :] for row in ids]


def render_texts(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str]) -> tuple[list[str], bool]:
    """(texts, whether tokenizing them adds special tokens): each pair as the chat template renders
    [user: prompt, assistant: completion] when the tokenizer has one, else prompt + completion."""
    if not tokenizer.chat_template:
        return [p + c for p, c in zip(prompts, completions)], True
    texts = []
    for p, c in zip(prompts, completions):
        conversation = [*user_turn(p), {"role": "assistant", "content": c}]
        try:
            texts.append(render_chat(tokenizer, conversation, generation_prompt=False, needed_by="the reward model"))
        except ChatTemplateRefused as err:
            raise ScorerError(f"reward model: its chat template refuses a (prompt, completion) pair: {err}") from None
    return texts, False


def reward_batches(ids: Sequence[Sequence[int]], batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(indices of the texts in the batch, right-padded int32 ``input_ids`` and ``attention_mask``
    [batch_size, width]) over the texts sorted by length; width is the longest one's length rounded
    up to a multiple of 64, and rows past the texts are padding with one visible token."""
    lengths = np.asarray([len(row) for row in ids], np.int64)
    order = np.argsort(lengths, kind="stable")
    for begin in range(0, len(order), batch_size):
        rows = order[begin : begin + batch_size]
        width = int(-(-lengths[rows].max() // WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
        batch = {name: np.zeros((batch_size, width), np.int32) for name in ("input_ids", "attention_mask")}
        batch["attention_mask"][len(rows) :, 0] = 1
        for b, r in enumerate(rows):
            batch["input_ids"][b, : lengths[r]] = ids[r]
            batch["attention_mask"][b, : lengths[r]] = 1
        yield rows, batch


def reward_step(module: LlamaForSequenceClassification, mesh: Mesh | None = None) -> Callable:
    """The jitted ``(params, batch) -> float32 [rows]`` reward of each row of a batch (``input_ids``,
    ``attention_mask``); compiled once per batch shape. With a mesh the result is replicated."""

    def step(params: Any, batch: dict) -> jax.Array:
        return module.apply({"params": params}, batch["input_ids"], batch["attention_mask"])[:, 0]

    return jax.jit(step) if mesh is None else jax.jit(step, out_shardings=replicated(mesh))
