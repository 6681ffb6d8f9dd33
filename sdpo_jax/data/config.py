"""Defaults of the `data.*` settings (mounted by the trainer as `config.data`).

Fields (0 means "off/unset" for the integer limits, since ml_collections cannot override a
None field from the command line; sequences are tuples so `--config.data.train="('a','b')"`
works):

train            tuple of sources (empty by default; the shipped Anthropic hh-rlhf test split is
                 'sample:hh_rlhf/helpful-base-test.jsonl.gz', which needs skip_invalid=True for
                 its 13 rows without a clean shared prompt). A source is a local file (.jsonl,
                 .jsonl.gz, .json, .parquet), `sample:NAME/FILE` (shipped samples),
                 a local dataset folder, or a Hugging Face hub dataset name. Append `@split` to
                 pick a split for that source (`HuggingFaceH4/ultrafeedback_binarized@train_prefs`);
                 otherwise `split` applies (ignored for single files). A plain string is taken as
                 one source; commas separate several.
eval             tuple of evaluation sources (empty: none, unless `eval_fraction` > 0).
split            default split for hub datasets and folders.
format           'auto' | 'text' | 'conversational' | 'shared_prefix' | 'tokenized'.
                 'auto' detects per source from the first record; forcing a format makes every
                 record that does not have that shape an error.
columns          column map 'src=dst,src2=dst2' (or a mapping), applied before detection, e.g.
                 'question=prompt' for Intel/orca_dpo_pairs. Dotted sources reach into nested
                 objects ('input.messages=prompt'); an empty destination drops a column
                 ('prompt_id='). Known layouts (orca, OpenAI DPO, ShareGPT, UltraFeedback) are
                 mapped automatically when `columns` is empty.
extra_fields     'error' (default) refuses columns that no format uses; 'ignore' drops them.
assistant_marker the text that starts an assistant turn in whole text transcripts
                 (shared_prefix text, e.g. Anthropic hh-rlhf).
limit            keep at most this many records per source (0: all).
sample_seed      if > 0 with `limit`, take a seeded random sample instead of the first records.
max_length       maximum prompt + completion tokens of a sequence.
max_prompt_length  prompts longer than this are cut (0: only max_length applies); then
                 completions are cut to fit max_length. See truncation.py.
truncation_mode  which part of an over-long prompt to keep: 'keep_end' (the default; keeps a
                 leading BOS) or 'keep_start'. Completions always keep their start.
skip_invalid     skip invalid records (counted per reason) instead of stopping at the first.
length_buckets   allowed padded lengths (the batch shapes); empty: powers of two from
                 max_length/8 up to max_length, plus max_length itself.
num_proc         worker processes for tokenization (datasets map).
cache_dir        where tokenized sources are cached ('' : $SDPO_JAX_CACHE/data, else ~/.cache/sdpo_jax/data).
eval_fraction    with no `eval` sources, hold out this fraction of train (seeded by
                 `eval_seed`) for evaluation.
prefix_sharing   batch each pair as one row, prompt + chosen + rejected, so the prompt goes
                 through the model once (exact; sdpo_jax.prefix_sharing). Needs a dense
                 attention mask: the XLA path, or cuDNN on GPU, not TPU splash.
"""

from __future__ import annotations

import ml_collections

FORMATS = ("auto", "text", "conversational", "shared_prefix", "tokenized")
TRUNCATION_MODES = ("keep_end", "keep_start")


def get_data_config() -> ml_collections.ConfigDict:
    """Returns the default `data` settings; see the module docstring for each field."""
    c = ml_collections.ConfigDict()
    c.train = ()
    c.eval = ()
    c.split = "train"
    c.format = "auto"
    c.columns = ""
    c.extra_fields = "error"
    c.assistant_marker = "\n\nAssistant:"
    c.limit = 0
    c.sample_seed = 0
    c.max_length = 1024
    c.max_prompt_length = 512
    c.truncation_mode = "keep_end"
    c.skip_invalid = False
    c.length_buckets = ()
    c.num_proc = 1
    c.cache_dir = ""
    c.eval_fraction = 0.0
    c.eval_seed = 0
    c.prefix_sharing = False
    return c
