"""Token ids of a question set: the exact context/continuation boundary, one packed row per question.

Texts (the ARC/OpenBookQA prompt of lm-eval-harness):

- plain (default): context ``"Question: {q}\\nAnswer:"``, continuation ``" {choice}"``;
- chat (``chat_template=True``, for instruct models): context = the tokenizer's chat template
  applied to one user turn holding the question, with the generation prompt; continuation =
  the choice text, i.e. the start of the assistant's reply.

The boundary. The context is tokenized alone and the whole text (context + continuation) is
tokenized in one piece; the continuation's tokens are the whole's tail after the context's
tokens. So the scored ids are exactly what the model would read in running text (" Paris" stays
one token, never a lone space followed by "Paris"), and the context ids are a prefix of them
for the tokenizers in use here (the BPE and SentencePiece pre-tokenizers split before a
space-led word and after a chat template's newline; every row is checked). Should a tokenizer
still merge across the boundary, the split moves back to the longest common prefix (the merged
token counts as continuation) and the row is counted in ``boundary_merges``. For a context
that ends in a space (a chat template whose generation prompt does, under SentencePiece) this
scores the same tokens as lm-eval's rule of moving trailing whitespace into the continuation.

Special tokens: plain contexts start with BOS only where the tokenizer adds one by itself
(like the training pipeline's text prompts; SmolLM2's adds none); chat texts carry whatever
the template writes and get nothing added.

Packing. The choices of a question share their context, so the question is one row

    prefix = context[:-1],  then per choice i:  segment_i = [context[-1]] + continuation_i

with positions running on from the prefix in every segment and a mask that lets a segment see
the prefix and itself only (see score.py). The duplicated last context token has the same
position and sees the same tokens as in the unpacked sequence, so every hidden state, hence
every log-probability, equals the unpacked sequence's, while the context is computed once
instead of once per choice. A packed row longer than ``max_length`` loses tokens from the left
of the prefix (counted in ``truncated``, per question); choices that alone do not fit are an
error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sdpo_jax.choice_eval.questions import ChoiceQuestion
from sdpo_jax.data.chat_template import ChatTemplateRefused, render_chat, user_turn
from sdpo_jax.data.errors import DataError
from sdpo_jax.data.validation import token_range_problem

PLAIN_CONTEXT = "Question: {question}\nAnswer:"


@dataclasses.dataclass(frozen=True)
class EncodedChoices:
    """A question set as packed rows: question q is ``prefixes[q]`` followed by its choices' segments.

    Segment r (one per (question, choice) row, a question's rows contiguous and in choice order)
    starts with the context's last token(s) and holds the continuation from index ``scored[r]``
    on; the unpacked sequence of row r is ``prefixes[question_of[r]] + segments[r]``.
    """

    prefixes: list[list[int]]  # [questions] context tokens all choices share (all but the last)
    segments: list[list[int]]  # [rows] last context token(s) + continuation tokens
    scored: np.ndarray  # [rows] index in segments[r] of the first continuation token (>= 1)
    choice_lengths: np.ndarray  # [rows] characters of the choice text (without the space before it): acc_norm's divisor
    question_of: np.ndarray  # [rows] question index
    answers: np.ndarray  # [questions] index of the right choice
    boundary_merges: int
    truncated: int

    def row(self, r: int) -> tuple[list[int], int]:
        """(context + continuation ids, index of the first continuation token) of row r, unpacked."""
        prefix = self.prefixes[self.question_of[r]]
        return prefix + self.segments[r], len(prefix) + int(self.scored[r])


def prompt_texts(tokenizer: Any, question: ChoiceQuestion, chat_template: bool) -> tuple[str, list[str]]:
    """(context, continuations) of one question, per the module docstring."""
    if not chat_template:
        return PLAIN_CONTEXT.format(question=question.question), [f" {choice}" for choice in question.choices]
    try:
        context = render_chat(
            tokenizer, user_turn(question.question), generation_prompt=True, needed_by="the chat-template prompt"
        )
    except ChatTemplateRefused as err:
        raise DataError(question.where, f"the tokenizer's chat template refuses this question: {err}") from None
    return context, list(question.choices)


def encode_choices(
    tokenizer: Any,
    questions: Sequence[ChoiceQuestion],
    *,
    vocab_size: int,
    max_length: int,
    chat_template: bool = False,
) -> EncodedChoices:
    """Tokenize and pack every question of ``questions`` (at most ``max_length`` tokens each)."""
    if not questions:
        raise DataError("questions", "no questions to score")
    texts = [prompt_texts(tokenizer, q, chat_template) for q in questions]
    prefix = [] if chat_template else _added_prefix(tokenizer)
    context_ids = _tokenize(tokenizer, [context for context, _ in texts], prefix)
    whole_ids = _tokenize(tokenizer, [context + c for context, conts in texts for c in conts], prefix)
    prefixes, segments, scored, choice_lengths, question_of = [], [], [], [], []
    merges = truncated = 0
    for q, (question, (_, continuations)) in enumerate(zip(questions, texts)):
        context = context_ids[q]
        wholes = whole_ids[len(segments) : len(segments) + len(continuations)]
        starts = [_common_prefix(context, whole) for whole in wholes]
        merges += sum(start < len(context) for start in starts)
        for choice, (whole, start) in enumerate(zip(wholes, starts)):
            problem = token_range_problem(whole, vocab_size)
            if start == len(whole):
                problem = "the choice adds no tokens to the context"
            if problem:
                raise DataError(question.where, problem, f"choices[{choice}]", reason="bad choice")
        shared = min(starts) - 1  # the last shared context token opens every segment
        if shared < 0:
            raise DataError(
                question.where,
                "the context and context + choice differ from the first token",
                "choices",
                reason="bad choice",
            )
        own = [whole[shared:] for whole in wholes]
        excess = shared + sum(map(len, own)) - max_length
        if excess > shared:
            raise DataError(
                question.where,
                f"the choices take {sum(map(len, own))} tokens, more than max_length {max_length}",
                "choices",
                reason="too long",
            )
        truncated += excess > 0
        prefixes.append(context[max(excess, 0) : shared])
        segments.extend(own)
        scored.extend(start - shared for start in starts)
        choice_lengths.extend(len(choice) for choice in question.choices)
        question_of.extend([q] * len(continuations))
    return EncodedChoices(
        prefixes,
        segments,
        np.asarray(scored),
        np.asarray(choice_lengths),
        np.asarray(question_of),
        np.asarray([q.answer for q in questions]),
        merges,
        truncated,
    )


def _added_prefix(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer puts BOS in front of plain text by itself, else []."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and with_special[:1] == [bos] else []


def _tokenize(tokenizer: Any, texts: list[str], prefix: list[int]) -> list[list[int]]:
    return [prefix + ids for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
