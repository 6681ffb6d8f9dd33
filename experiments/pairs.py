"""Preference pairs ranked by the true reward r, rejected answers sampled from M0, for the driver.

For each prompt x, K completions y_1..y_K are sampled from M0 at temperature tau. The rejected
answer is the worst one, y_l = argmin_k r(x, y_k) (first on ties). The chosen answer is

    'gold' (default): the correct answer y* (r = 1), kept when r(x, y_l) < 1. Like the paper's
                      orca_dpo_pairs, where chosen answers come from a stronger model (GPT-4) and
                      rejected ones from a weaker one.
    'best':           the best sample, y_w = argmax_k r(x, y_k), kept when r(x, y_w) > r(x, y_l)
                      (fully on-policy pairs).

Prompts whose K samples give no such pair (e.g. all correct) are dropped. Pairs are written as
rows {"prompt_ids", "chosen_ids", "rejected_ids"} (pre-tokenized: the driver uses them as they
are, no special tokens added).

Stage files for easy-to-hard by the TRUE difficulty: pairs sorted by list length (ties in a
seeded random order) and cut into T chunks of the sizes `sdpo_jax.partition.chunk_sizes` gives,
one file per stage, easiest first (the driver's 'datasets' partition reads them in order).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from experiments.sorting import EOS_ID, Problem, reward
from sdpo_jax.generation import generate
from sdpo_jax.partition import chunk_sizes


@dataclasses.dataclass(frozen=True)
class Pair:
    problem: Problem
    chosen: list[int]
    rejected: list[int]
    chosen_reward: float
    rejected_reward: float

    def row(self) -> dict:
        return {"prompt_ids": self.problem.prompt_ids, "chosen_ids": self.chosen, "rejected_ids": self.rejected}


CHOSEN = ("gold", "best")


def sample_pairs(
    model, params, problems: list[Problem], samples: int, temperature: float, seed: int, chosen: str = "gold"
) -> list[Pair]:
    """The pairs of the module docstring, from ``samples`` M0 completions per problem."""
    if chosen not in CHOSEN:
        raise ValueError(f"chosen must be one of {CHOSEN}, got {chosen!r}")
    prompts = [p.prompt_ids for p in problems for _ in range(samples)]
    max_new = max(p.difficulty for p in problems) + 2
    completions = generate(model, params, prompts, max_new, EOS_ID, temperature=temperature, seed=seed, batch_size=512)
    pairs = []
    for i, problem in enumerate(problems):
        group = completions[i * samples : (i + 1) * samples]
        rewards = [reward(problem, c) for c in group]
        worst = int(np.argmin(rewards))
        if chosen == "gold":
            best_ids, best_reward = problem.answer_ids, 1.0
        else:
            best = int(np.argmax(rewards))
            best_ids, best_reward = group[best], rewards[best]
        if best_reward > rewards[worst]:
            pairs.append(Pair(problem, best_ids, group[worst], best_reward, rewards[worst]))
    return pairs


def write_jsonl(path: Path, pairs: list[Pair]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair.row()) + "\n")
    return str(path)


def split_by_difficulty(pairs: list[Pair], num_stages: int, seed: int) -> list[list[Pair]]:
    """T chunks, easiest (shortest lists) first; equal lengths in a seeded random order."""
    tiebreak = np.random.default_rng(seed).permutation(len(pairs))
    order = sorted(range(len(pairs)), key=lambda i: (pairs[i].problem.difficulty, tiebreak[i]))
    bounds = np.cumsum([0] + chunk_sizes(len(pairs), num_stages))
    return [[pairs[i] for i in order[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]


def describe(pairs: list[Pair]) -> dict:
    """Counts for the write-up: pairs, mean difficulty, mean chosen/rejected reward."""
    return {
        "num_pairs": len(pairs),
        "mean_difficulty": float(np.mean([p.problem.difficulty for p in pairs])),
        "mean_chosen_reward": float(np.mean([p.chosen_reward for p in pairs])),
        "mean_rejected_reward": float(np.mean([p.rejected_reward for p in pairs])),
    }
