"""The real-model task: name the largest number of a list, asked and answered in natural language.

A problem x is a list of n distinct integers drawn uniformly from 0..99; the user turn is

    What is the largest number in this list: 12, 57, 3?

and the answer a is free text. The parser reads the first integer a states (``stated_number``);
the reward is exact and binary:

    r(x, a) = 1  if stated_number(a) == max(x)  else 0   (no integer in a: 0)

Difficulty = n (``LENGTHS``, 3..8 by default): SmolLM2-135M-Instruct answers about 6 in 10 lists of
3 right and about 2 in 10 lists of 6 (greedy). The gold answer is written in the model's own
phrasing: "The largest number in this list is 57."

``score`` is the stage driver's scorer for this task (``generate.scorer=experiments.largest:score``):
it reads the list back from the prompt text (the rendered chat template holds the question), so
on-policy stages are scored by the same exact reward.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

QUESTION = "What is the largest number in this list: {}?"
GOLD = "The largest number in this list is {}."
_LIST_IN_PROMPT = re.compile(r"largest number in this list: ([\d, ]+)\?")
_INTEGER = re.compile(r"-?\d+")


@dataclasses.dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]

    @property
    def difficulty(self) -> int:
        return len(self.numbers)

    @property
    def answer(self) -> int:
        return max(self.numbers)

    @property
    def question(self) -> str:
        return QUESTION.format(", ".join(map(str, self.numbers)))

    @property
    def gold(self) -> str:
        return GOLD.format(self.answer)


def sample_problems(rng: np.random.Generator, count: int, lengths: tuple[int, int]) -> list[Problem]:
    """``count`` problems, each of a length drawn uniformly from lengths[0]..lengths[1] (inclusive)."""
    sizes = rng.integers(lengths[0], lengths[1] + 1, size=count)
    return [Problem(tuple(int(v) for v in rng.choice(100, size=int(n), replace=False))) for n in sizes]


def problems_per_length(rng: np.random.Generator, per_length: int, lengths: tuple[int, int]) -> list[Problem]:
    """``per_length`` problems of every length in lengths[0]..lengths[1], shortest first (a balanced test set)."""
    return [
        Problem(tuple(int(v) for v in rng.choice(100, size=n, replace=False)))
        for n in range(lengths[0], lengths[1] + 1)
        for _ in range(per_length)
    ]


def stated_number(answer: str) -> int | None:
    """The first integer written in ``answer`` (thousands separators removed), or None."""
    found = _INTEGER.search(answer.replace(",", ""))
    return None if found is None else int(found.group())


def reward(problem: Problem, answer: str) -> float:
    """r(x, a) of the module docstring."""
    return float(stated_number(answer) == problem.answer)


def problem_in(prompt_text: str) -> Problem:
    """The problem a prompt asks (the question may sit inside a rendered chat template)."""
    found = _LIST_IN_PROMPT.search(prompt_text)
    if found is None:
        raise ValueError(f"no 'largest number in this list: ...?' question in the prompt {prompt_text[-120:]!r}")
    return Problem(tuple(int(v) for v in found.group(1).split(",")))


def score(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str | None]) -> list[float]:
    """The driver's scorer: r(x, a) for each (prompt, completion); ``references`` are not needed."""
    return [reward(problem_in(p), c) for p, c in zip(prompts, completions)]
