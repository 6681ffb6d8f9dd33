"""Random preference batches in the trainer's layout, for model-level tests."""

from __future__ import annotations

import numpy as np


def random_pair_batch(pairs: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded pairs: a prompt of 2..length/2 tokens, completions of 1.. tokens, padding after."""
    rng = np.random.default_rng(seed)
    batch = {}
    prompt_lens = rng.integers(2, length // 2, size=pairs)
    for side in ("chosen", "rejected"):
        ids = rng.integers(3, vocab, size=(pairs, length)).astype(np.int32)
        total = np.minimum(prompt_lens + rng.integers(1, length // 2, size=pairs), length)
        position = np.arange(length)[None]
        attention = (position < total[:, None]).astype(np.int32)
        ids = np.where(attention == 1, ids, 0)
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_attention_mask"] = attention
        batch[f"{side}_loss_mask"] = (position >= prompt_lens[:, None]) & (attention == 1)
    batch["rejected_input_ids"][:, : length // 2] = np.where(  # pairs share their prompt
        np.arange(length // 2)[None] < prompt_lens[:, None],
        batch["chosen_input_ids"][:, : length // 2],
        batch["rejected_input_ids"][:, : length // 2],
    )
    batch["valid"] = np.ones(pairs, bool)
    return batch


def write_token_pairs(
    path, count: int, rng: np.random.Generator, vocab: int = 160, max_prompt: int = 16, max_completion: int = 12
) -> str:
    """A .jsonl of pre-tokenized pairs (completions end with EOS id 2); returns the path."""
    import json

    rows = [
        {
            "prompt_ids": rng.integers(3, vocab, rng.integers(2, max_prompt)).tolist(),
            "chosen_ids": rng.integers(3, vocab, rng.integers(1, max_completion)).tolist() + [2],
            "rejected_ids": rng.integers(3, vocab, rng.integers(1, max_completion)).tolist() + [2],
        }
        for _ in range(count)
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)
