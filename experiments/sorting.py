"""The synthetic task: sort a list of digits. Exact reward, graded difficulty, tiny vocabulary.

A prompt is ``<s> d_1 ... d_n =`` with digits d_i in 0..9 (repeats allowed); the answer is the
digits in ascending order followed by ``</s>``. Difficulty is the list length n.

Ground-truth reward of an answer a (the generated digits, EOS excluded) for target s = sorted(d):

    r(a, s) = #{ i < min(|a|, |s|) : a_i = s_i } / max(|a|, |s|)        in [0, 1]

the fraction of positions that hold the right item, with a wrong length counted against it;
r = 1 exactly when a == s. Any non-digit token in a counts as a wrong item.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

PAD, BOS, EOS, UNK, SEP = "<pad>", "<s>", "</s>", "<unk>", "="
VOCAB = [PAD, BOS, EOS, UNK, SEP] + [str(d) for d in range(10)]
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID, SEP_ID = TOKEN_ID[PAD], TOKEN_ID[BOS], TOKEN_ID[EOS], TOKEN_ID[SEP]
DIGIT_ID = [TOKEN_ID[str(d)] for d in range(10)]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One list to sort: its digits (the difficulty is ``len(digits)``)."""

    digits: tuple[int, ...]

    @property
    def difficulty(self) -> int:
        return len(self.digits)

    @property
    def prompt_ids(self) -> list[int]:
        return [BOS_ID] + [DIGIT_ID[d] for d in self.digits] + [SEP_ID]

    @property
    def answer_ids(self) -> list[int]:
        """The correct completion, EOS included."""
        return [DIGIT_ID[d] for d in sorted(self.digits)] + [EOS_ID]


def sample_problems(rng: np.random.Generator, count: int, lengths: tuple[int, int]) -> list[Problem]:
    """``count`` problems, lengths uniform in [lengths[0], lengths[1]], digits uniform."""
    low, high = lengths
    sizes = rng.integers(low, high + 1, size=count)
    return [Problem(tuple(int(d) for d in rng.integers(0, 10, size=n))) for n in sizes]


def strip_eos(ids: list[int]) -> list[int]:
    """The answer part of a completion: everything before the first EOS."""
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else list(ids)


def reward(problem: Problem, completion_ids: list[int]) -> float:
    """The ground-truth reward r(a, sorted(d)) of the module docstring for a completion's ids."""
    answer = strip_eos(completion_ids)
    target = problem.answer_ids[:-1]
    hits = sum(a == s for a, s in zip(answer, target))
    return hits / max(len(answer), len(target))


def score(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
    """The true reward r as a stage-data scorer (``generate.scorer = experiments.sorting:score``): each prompt
    text is "d_1 ... d_n =" and each completion "a_1 ... a_m" (special tokens already dropped)."""
    values = []
    for prompt, completion in zip(prompts, completions):
        digits = tuple(int(token) for token in prompt.split("=")[0].split())
        values.append(reward(Problem(digits), [TOKEN_ID.get(token, TOKEN_ID[UNK]) for token in completion.split()]))
    return values


def build_tokenizer(folder: str | Path):
    """Writes a word-level fast tokenizer of ``VOCAB`` (whitespace-separated tokens) to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=TOKEN_ID, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer
