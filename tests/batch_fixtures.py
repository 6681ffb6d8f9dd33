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
    batch["rejected_input_ids"][:, :length // 2] = np.where(  # pairs share their prompt
        np.arange(length // 2)[None] < prompt_lens[:, None], batch["chosen_input_ids"][:, :length // 2], batch["rejected_input_ids"][:, :length // 2]
    )
    batch["valid"] = np.ones(pairs, bool)
    return batch
