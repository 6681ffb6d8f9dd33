"""Length limits, computed on lengths alone (vectorized; the token store is never copied).

Rules, in order:
1. A prompt longer than `max_prompt_length` (> 0) is cut to that many tokens: 'keep_end' keeps
   its last tokens (plus a leading BOS, which stays first), 'keep_start' its first tokens.
2. A completion longer than `max_length - prompt` loses its end (and with it the EOS).
3. A pair left with an empty chosen or rejected completion (the prompt fills `max_length`) is
   not trainable: it is dropped and reported, never trained on silently.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Truncation:
    """Per-pair result: prompt = [head tokens from the prompt start] + body; completions cut."""

    head: np.ndarray  # 1 where a leading BOS is kept in front of a keep_end cut, else 0
    body_offset: np.ndarray  # where the kept prompt body starts, relative to the prompt start
    prompt_len: np.ndarray  # kept prompt length, head included
    chosen_len: np.ndarray
    rejected_len: np.ndarray

    @property
    def empty(self) -> np.ndarray:
        """Pairs whose chosen or rejected completion was cut to nothing."""
        return (self.chosen_len == 0) | (self.rejected_len == 0)


def truncate(
    prompt_len: np.ndarray,
    chosen_len: np.ndarray,
    rejected_len: np.ndarray,
    starts_with_bos: np.ndarray,
    max_length: int,
    max_prompt_length: int,
    mode: str,
) -> Truncation:
    """Applies the rules of the module docstring to arrays of lengths.

    ``prompt_len``, ``chosen_len``, ``rejected_len``: [pairs] token counts of each pair's prompt
    and completions before truncation; ``starts_with_bos``: [pairs] bool, whether the prompt's
    first token is the tokenizer's BOS (then a 'keep_end' cut to at least 2 tokens keeps it first,
    as ``head``); ``max_length``: the most tokens of prompt plus one completion
    (``data.max_length``, > 0); ``max_prompt_length``: the most prompt tokens
    (``data.max_prompt_length``; 0: no limit but ``max_length``); ``mode``:
    ``data.truncation_mode``, 'keep_end' or 'keep_start', which part of a cut prompt stays.
    """
    if mode not in ("keep_end", "keep_start"):
        raise ValueError(f"data.truncation_mode must be 'keep_end' or 'keep_start', got {mode!r}")
    if max_length <= 0:
        raise ValueError(f"data.max_length must be positive, got {max_length}")
    prompt_len = np.asarray(prompt_len, np.int64)
    kept = np.minimum(prompt_len, max_prompt_length) if max_prompt_length > 0 else prompt_len
    cut = kept < prompt_len
    if mode == "keep_end":
        head = (cut & np.asarray(starts_with_bos, bool) & (kept >= 2)).astype(np.int64)
        body_offset = np.where(cut, prompt_len - (kept - head), 0)
    else:
        head = np.zeros_like(prompt_len)
        body_offset = np.zeros_like(prompt_len)
    room = np.maximum(max_length - kept, 0)
    return Truncation(
        head=head,
        body_offset=body_offset,
        prompt_len=kept,
        chosen_len=np.minimum(np.asarray(chosen_len, np.int64), room),
        rejected_len=np.minimum(np.asarray(rejected_len, np.int64), room),
    )
