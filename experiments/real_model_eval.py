"""What a model can do after alignment: exact accuracy on held-out lists, and ARC-Easy.

    accuracy(pi)      = mean_x r(x, greedy_pi(x))  over the held-out problems (experiments.largest)
    accuracy_n(pi)    = the same over the problems of length n
    arc_easy(pi)      = ARC-Easy log-likelihood accuracy (sdpo_jax.choice_eval, lm-eval-harness prompts:
                        "Question: ...\\nAnswer:" then each choice; acc = argmax_c log p(c | q) is right)

Answers are greedy (temperature 0) decodes of the chat-templated question, ``max_new_tokens`` at most.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from experiments.largest import Problem, reward
from sdpo_jax.choice_eval import choice_step, evaluate_choices, load_choice_questions
from sdpo_jax.generation import generate
from sdpo_jax.run_context import prompt_ids

ARC_EASY = "sample:arc_easy/validation.json"


def answers(model, params, tokenizer, problems: Sequence[Problem], max_new_tokens: int, **sampling) -> list[str]:
    """Decoded answers to the chat-templated questions (greedy unless ``sampling`` sets a temperature/seed)."""
    ids = [prompt_ids(tokenizer, p.question) for p in problems]
    out = generate(model, params, ids, max_new_tokens, tokenizer.eos_token_id, batch_size=128, **sampling)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in out]


def exact_accuracy(model, params, tokenizer, problems: Sequence[Problem], max_new_tokens: int) -> dict:
    """{'accuracy', 'accuracy_by_length': {'n': accuracy}, 'correct': [0/1 per problem]} of greedy answers."""
    rewards = np.array(
        [reward(p, a) for p, a in zip(problems, answers(model, params, tokenizer, problems, max_new_tokens))]
    )
    lengths = np.array([p.difficulty for p in problems])
    return {
        "accuracy": float(rewards.mean()),
        "accuracy_by_length": {str(n): float(rewards[lengths == n].mean()) for n in np.unique(lengths)},
        "correct": rewards.astype(int).tolist(),
    }


class ArcEasy:
    """ARC-Easy accuracy of any params of one model, the questions loaded and the step compiled once."""

    def __init__(self, model, tokenizer, limit: int):
        self.model, self.tokenizer = model, tokenizer
        self.questions = load_choice_questions(ARC_EASY, limit=limit or None)
        self.step = choice_step(model)

    def __call__(self, params) -> dict:
        metrics = evaluate_choices(self.model, params, self.tokenizer, self.questions, step=self.step)
        return {k: metrics[k] for k in ("acc", "acc_norm", "num_questions")}
