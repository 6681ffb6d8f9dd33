"""Multiple-choice log-likelihood eval (ARC / OpenBookQA style): a quick capability check.

    questions = load_choice_questions("arc_easy/validation.json", limit=100)
    metrics = evaluate_choices(model, params, tokenizer, questions)  # {"acc", "acc_norm", ...}

See questions.py (file layouts), encode.py (prompt and token boundary) and score.py (maths).
"""

from sdpo_jax.choice_eval.encode import EncodedChoices, encode_choices
from sdpo_jax.choice_eval.questions import ChoiceQuestion, load_choice_questions
from sdpo_jax.choice_eval.score import choice_loglikelihoods, choice_metrics, choice_step, evaluate_choices

__all__ = [
    "ChoiceQuestion",
    "EncodedChoices",
    "choice_loglikelihoods",
    "choice_metrics",
    "choice_step",
    "encode_choices",
    "evaluate_choices",
    "load_choice_questions",
]
