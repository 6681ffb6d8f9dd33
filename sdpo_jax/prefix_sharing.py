"""Prefix sharing: a pair as ONE row, prompt + chosen + rejected (arXiv 2410.20305).

The plain layout runs the prompt twice (once before each completion). The packed row holds it once:

    index     0 .. P-1 | P .. P+Cc-1      | P+Cc .. P+Cc+Cr-1 | padding
    token     prompt   | chosen           | rejected          | 0
    position  0 .. P-1 | P .. P+Cc-1      | P .. P+Cr-1       | 0
    segment   1        | 2                | 3                 | 0

Attention (``packed_attention_mask``): query i sees key j iff j <= i (by index), both are real
tokens, not (i rejected and j chosen), and, with a sliding window W, pos_i - pos_j < W. Rejected
therefore sees the prompt and itself causally, with the positions it has in the plain layout, so
every hidden state of the row equals the plain layout's hidden state of the same token
(prompt: both rows; chosen: the chosen row; rejected: the rejected row) -- exactly, not
approximately.

Which hidden state predicts which completion token: chosen token k (index P+k) is predicted by
index P+k-1, as in any causal row. Rejected token 0 is predicted by the LAST PROMPT token (index
P-1), rejected token k >= 1 by index P+Cc+k-1. Instead of inserting a copy of the last prompt
token before rejected (the paper's way; one more token per row whose hidden state equals that of
index P-1 anyway), the batch carries, per side, the index of the predicting hidden state for each
completion token (``{side}_index`` [B, K]), the token (``{side}_labels``) and a mask
(``{side}_label_mask``), K a static completion bucket. The log-prob head then gathers those
rows of hidden states and computes logits only there (sdpo_jax.logprobs.gathered_token_logps):
no logits at prompt or padding positions at all.

Attention with a custom mask runs on the 'xla' (or 'cudnn') path; TPU splash attention takes
only the default causal/padding mask, so 'auto' falls back to 'xla' for packed batches.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

PAD, PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3
PACKED_KEYS = ("input_ids", "positions", "segment_ids")
SIDES = ("chosen", "rejected")


def is_packed(batch: dict) -> bool:
    """Whether ``batch`` is in the prefix-shared layout (else the plain chosen/rejected layout)."""
    return "segment_ids" in batch


def pack_pairs(plain: dict[str, np.ndarray], length: int, completion_length: int) -> dict[str, np.ndarray]:
    """The prefix-shared batch (see the module docstring) of a plain-layout batch.

    ``plain`` holds right-padded ``{chosen,rejected}_{input_ids,attention_mask,loss_mask}`` [B, S]
    (prompt then completion), the two sides of a row sharing their prompt; other per-pair keys
    (``valid``, ``pair_index``, reference log-probs) are kept. ``length`` must hold P + Cc + Cr and
    ``completion_length`` (K) the longer completion of every row. Padding pairs (no tokens) stay
    all zero.
    """
    chosen_ids, rejected_ids = plain["chosen_input_ids"], plain["rejected_input_ids"]
    rows, seq = chosen_ids.shape
    counts = {side: plain[f"{side}_loss_mask"].sum(-1).astype(np.int64) for side in SIDES}
    prompt = plain["chosen_attention_mask"].sum(-1).astype(np.int64) - counts["chosen"]
    real = counts["chosen"] + counts["rejected"] > 0
    if np.any(prompt[real] < 1):
        raise ValueError("prefix sharing needs a prompt of at least one token in every pair")
    if np.any(plain["rejected_attention_mask"].sum(-1) - counts["rejected"] != prompt):
        raise ValueError("chosen and rejected of a pair have different prompt lengths")
    j = np.arange(seq)[None]
    if np.any((j < prompt[:, None]) & (chosen_ids != rejected_ids)):
        raise ValueError("chosen and rejected of a pair have different prompts")
    total = prompt + counts["chosen"] + counts["rejected"]
    if total.max(initial=0) > length:
        raise ValueError(f"a packed pair of {total.max()} tokens exceeds the row length {length}")
    longest = max(counts["chosen"].max(initial=0), counts["rejected"].max(initial=0))
    if longest > completion_length:
        raise ValueError(f"a completion of {longest} tokens exceeds the completion length {completion_length}")

    p, c = prompt[:, None], counts["chosen"][:, None]
    i = np.arange(length)[None]
    in_rejected = (i >= p + c) & (i < total[:, None])
    # Packed index i reads the chosen row at i (prompt, chosen) or the rejected row at i - Cc.
    source = np.clip(np.where(in_rejected, i - c, i), 0, seq - 1)
    ids = np.where(in_rejected, np.take_along_axis(rejected_ids, source, 1), np.take_along_axis(chosen_ids, source, 1))
    segment = np.select([i < p, i < p + c, in_rejected], [PROMPT, CHOSEN, REJECTED], PAD)
    out = {key: value for key, value in plain.items() if not key.startswith(SIDES)}
    out["input_ids"] = np.where(segment != PAD, ids, 0).astype(np.int32)
    out["positions"] = np.where(segment != PAD, np.where(in_rejected, i - c, i), 0).astype(np.int32)
    out["segment_ids"] = segment.astype(np.int32)

    k = np.arange(completion_length)[None]
    first = {"chosen": p, "rejected": p + c}  # packed index of each side's first completion token
    for side, side_ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        mask = k < counts[side][:, None]
        predictor = np.where(k == 0, p - 1, first[side] + k - 1)
        labels = np.take_along_axis(side_ids, np.clip(p + k, 0, seq - 1), 1)
        out[f"{side}_index"] = np.where(mask, predictor, 0).astype(np.int32)
        out[f"{side}_labels"] = np.where(mask, labels, 0).astype(np.int32)
        out[f"{side}_label_mask"] = mask
    return out


def packed_attention_mask(segment_ids: jnp.ndarray, positions: jnp.ndarray, sliding_window: int | None) -> jnp.ndarray:
    """Boolean [B, 1, L, L] attention of packed rows (rule in the module docstring)."""
    length = segment_ids.shape[1]
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    allowed = jnp.tril(jnp.ones((length, length), bool))[None] & (query != PAD) & (key != PAD)
    allowed = allowed & ~((query == REJECTED) & (key == CHOSEN))
    if sliding_window is not None:
        allowed = allowed & (positions[:, :, None] - positions[:, None, :] < sliding_window)
    return allowed[:, None]


def chosen_token_counts(batch: dict):
    """Chosen completion token counts [B] of a batch in either layout (numpy or jax arrays)."""
    if is_packed(batch):
        return batch["chosen_label_mask"].sum(-1)
    return batch["chosen_loss_mask"][:, 1:].sum(-1)
