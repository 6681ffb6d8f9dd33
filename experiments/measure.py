"""Quality of a model on held-out prompts: the true reward of its greedy answers.

    R(pi) = mean_x r(x, greedy_pi(x)),   exact(pi) = mean_x [r(x, greedy_pi(x)) = 1]

also broken down by list length. Stage snapshots M_t of a driver run are read back with
`sdpo_jax.checkpointing.RunCheckpoints` (as sdpo-export does).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from experiments.sorting import EOS_ID, Problem, reward
from sdpo_jax.checkpointing import RunCheckpoints
from sdpo_jax.generation import generate
from sdpo_jax.models.llama import init_params


def greedy_answers(model, params, problems: list[Problem]) -> list[list[int]]:
    max_new = max(p.difficulty for p in problems) + 2
    return generate(model, params, [p.prompt_ids for p in problems], max_new, EOS_ID, temperature=0.0, batch_size=512)


def greedy_quality(model, params, problems: list[Problem]) -> dict:
    """{'reward', 'exact', 'reward_by_length': {'n': mean reward}} of greedy answers."""
    answers = greedy_answers(model, params, problems)
    rewards = np.array([reward(p, a) for p, a in zip(problems, answers)])
    lengths = np.array([p.difficulty for p in problems])
    return {
        "reward": float(rewards.mean()),
        "exact": float(np.mean(rewards == 1.0)),
        "reward_by_length": {str(n): float(rewards[lengths == n].mean()) for n in np.unique(lengths)},  # JSON keys
    }


def stage_params(model, run_dir: Path) -> list:
    """The params of every finished stage of a driver run, M_1 .. M_T in order."""
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    checkpoints = RunCheckpoints(run_dir)
    try:
        return [checkpoints.load_stage(stage, abstract)[0] for stage in checkpoints.finished_stages()]
    finally:
        checkpoints.close()
