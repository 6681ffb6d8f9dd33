"""Preference data for sDPO: sources and formats in, bucketed static-shape batches out.

    from sdpo_jax.data import load_datasets, PairBatcher, resolve_buckets
    train, eval_ = load_datasets(config.data, tokenizer, vocab_size=model_vocab_size,
                                 process_index=jax.process_index(), process_count=jax.process_count())
    batches = PairBatcher(train, config.train.batch_size, seed,
                          resolve_buckets(config.data.length_buckets, config.data.max_length),
                          jax.process_index(), jax.process_count())

Modules: config (defaults), sources (reading), formats (shapes and normalization), validation
(field checks, skip counting), tokenize (ids and the prompt/completion boundary), cache,
truncation, pairs (the tokenized store), batching (iterator), load (the pipeline, one shard per
process), errors.
"""

from sdpo_jax.data.batching import PairBatcher, default_buckets, resolve_buckets
from sdpo_jax.data.config import get_data_config
from sdpo_jax.data.errors import DataError, exit_on_data_error
from sdpo_jax.data.load import load_datasets, load_pairs, split_eval
from sdpo_jax.data.pairs import TokenizedPairs

__all__ = [
    "DataError",
    "PairBatcher",
    "TokenizedPairs",
    "default_buckets",
    "exit_on_data_error",
    "get_data_config",
    "load_datasets",
    "load_pairs",
    "resolve_buckets",
    "split_eval",
]
