"""Scorers: a number per (prompt, completion), higher is better, for on-policy stage data and rewards.

    scorer = load_scorer("exact_match" | "package.module:function" | "reward_model:HF_DIR", mesh=None)
    scores = scorer(prompts, completions, references)   # list[float], one per completion

``references`` holds, per prompt, the reference answer (the chunk's chosen completion, or the
reference of a held-out reward prompt) or None.

- ``exact_match``: 1.0 when the completion's normalised text equals the reference's, else 0.0;
  normalised = surrounding whitespace stripped, runs of whitespace as one space, case folded.
  A completion whose prompt has no reference is an error.
- ``package.module:function``: a function ``score(prompts, completions, references) -> list[float]``
  imported from a module on the Python path (installed, or in the working directory). Nothing is
  ever imported from a checkpoint folder: the scorer is code the user chose, never remote code.
- ``reward_model:HF_DIR``: a Llama-family ``*ForSequenceClassification`` checkpoint run in Flax
  on the run's mesh (sdpo_jax.models.reward); the reward is its score head at the last token.
Every score list is checked: one finite float per completion, else a one-line `ScorerError`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from sdpo_jax.errors import SdpoError

Scorer = Callable[[Sequence[str], Sequence[str], Sequence[str | None]], list[float]]
REWARD_MODEL_PREFIX = "reward_model:"
_FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_]\w*$")


class ScorerError(SdpoError):
    """A scorer that cannot be loaded, or that returned something other than one finite float per completion."""


def normalise(text: str) -> str:
    """Surrounding whitespace stripped, runs of whitespace as one space, case folded."""
    return " ".join(text.split()).casefold()


def exact_match(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str | None]) -> list[float]:
    """1.0 where normalise(completion) == normalise(reference), else 0.0."""
    missing = [i for i, reference in enumerate(references) if reference is None]
    if missing:
        raise ScorerError(
            f"generate.scorer exact_match: prompt {missing[0]} ({prompts[missing[0]][:60]!r}) has no reference answer"
        )
    return [float(normalise(c) == normalise(r)) for c, r in zip(completions, references)]


def spec_problem(spec: str) -> str | None:
    """Why ``spec`` names no scorer (checked without loading a model or importing user code), else None."""
    if spec == "exact_match":
        return None
    if spec.startswith(REWARD_MODEL_PREFIX):
        folder = spec[len(REWARD_MODEL_PREFIX) :]
        if not os.path.isfile(os.path.join(folder, "config.json")):
            return f"reward model folder {folder!r} has no config.json"
        return None
    if not _FUNCTION_SPEC.match(spec):
        return f"{spec!r} is not 'exact_match', 'package.module:function' or 'reward_model:HF_DIR'"
    module = spec.split(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    return None if found is not None else f"module {module!r} is not importable (not on the Python path)"


def load_scorer(spec: str, mesh: Any = None) -> Scorer:
    """The scorer ``spec`` names (module docstring), its results checked."""
    problem = spec_problem(spec)
    if problem:
        raise ScorerError(f"generate.scorer: {problem}")
    if spec == "exact_match":
        function: Scorer = exact_match
    elif spec.startswith(REWARD_MODEL_PREFIX):
        from sdpo_jax.reward_scorer import RewardModelScorer

        function = RewardModelScorer(spec[len(REWARD_MODEL_PREFIX) :], mesh=mesh)
    else:
        function = _user_function(spec)
    return _checked(spec, function)


def _user_function(spec: str) -> Scorer:
    """The function a 'package.module:function' spec names; whatever the user's code raises, on import or
    when called, is a one-line ScorerError naming the exception and the file and line it came from."""
    module, name = spec.split(":")
    try:
        loaded = importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 (the user's module, not ours)
        raise ScorerError(f"generate.scorer: importing {module} failed: {_raised(err)}") from None
    function = getattr(loaded, name, None)
    if not callable(function):
        raise ScorerError(f"generate.scorer: {module} has no function {name!r}")

    def score(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str | None]) -> list[float]:
        try:
            return function(prompts, completions, references)
        except Exception as err:  # noqa: BLE001 (the user's function, not ours)
            raise ScorerError(f"generate.scorer {spec} raised {_raised(err)}") from None

    return score


def _raised(err: BaseException) -> str:
    """'ValueError: its first line (file.py line 12)': an exception and the last frame it passed through."""
    text = str(err).strip()
    what = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
    frames = traceback.extract_tb(err.__traceback__)
    return what + (f" ({frames[-1].filename} line {frames[-1].lineno})" if frames else "")


def _checked(spec: str, function: Scorer) -> Scorer:
    def score(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str | None]) -> list[float]:
        values = function(list(prompts), list(completions), list(references))
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ScorerError(
                f"generate.scorer {spec}: returned {type(values).__name__}, not a list of numbers"
            ) from None
        if len(values) != len(completions):
            raise ScorerError(
                f"generate.scorer {spec}: returned {len(values)} scores for {len(completions)} completions"
            )
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise ScorerError(f"generate.scorer {spec}: score {values[bad]} of completion {bad} is not finite")
        return values

    return score


def load_reward_prompts(path: str) -> list[tuple[str, str | None]]:
    """``eval.reward_prompts``: (prompt, reference answer or None) per record of a .jsonl/.json file with a
    non-empty 'prompt' string and an optional 'reference' string; a bad record is a one-line DataError."""
    from sdpo_jax.data.errors import DataError
    from sdpo_jax.data.sources import read_source
    from sdpo_jax.data.validation import require_text

    prompts = []
    for record in read_source(path).records:
        if isinstance(record.value, DataError):
            raise record.value
        extra = sorted(set(record.value) - {"prompt", "reference"})
        if extra:
            raise DataError(
                record.where, "unexpected field (reward prompts hold 'prompt' and an optional 'reference')", extra[0]
            )
        reference = record.value.get("reference")
        prompts.append(
            (
                require_text(record.value.get("prompt"), record.where, "prompt"),
                None if reference is None else require_text(reference, record.where, "reference"),
            )
        )
    return prompts
