"""The pipeline entry points: sources -> records -> pairs -> token ids (cached) -> truncation.

    train, eval = load_datasets(config.data, tokenizer, vocab_size=model_config.vocab_size,
                                process_index=jax.process_index())

Per source: fingerprint -> cache lookup; on a miss: read, normalize and validate (main
process, so that errors carry line numbers), tokenize with `datasets.Dataset.map` (batched,
`num_proc` workers, progress bar on process 0), store. Sources are then concatenated in order
and truncated. Warnings (skipped records per reason, identical chosen/rejected, boundary
merges, truncation, pairs dropped for an empty completion) are logged on process 0 and kept in
`pairs.report`.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any, Sequence

import numpy as np

from sdpo_jax.data import cache
from sdpo_jax.data.config import FORMATS, TRUNCATION_MODES
from sdpo_jax.data.errors import DataError, Location
from sdpo_jax.data.formats import normalize, parse_columns
from sdpo_jax.data.pairs import TokenizedPairs
from sdpo_jax.data.sources import parse_spec, read_source, source_fingerprint
from sdpo_jax.data.tokenize import PairEncoder, tokenizer_identity
from sdpo_jax.data.validation import Problems

logger = logging.getLogger("sdpo_jax.data")
MIN_ROWS_PER_WORKER = 256


def source_list(value: str | Sequence[str]) -> list[str]:
    """`data.train`/`data.eval` as a list: a sequence, or one string with comma separators."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if s and s.strip()]


def load_datasets(config: Any, tokenizer: Any, *, vocab_size: int, process_index: int = 0,
                  progress_bars: bool = True) -> tuple[TokenizedPairs, TokenizedPairs | None]:
    """(train, eval) pairs from `config` (the `data` ConfigDict); eval is None without any."""
    train = load_pairs(source_list(config.train), tokenizer, config, vocab_size=vocab_size,
                       process_index=process_index, progress_bars=progress_bars)
    eval_sources = source_list(config.eval)
    if eval_sources:
        return train, load_pairs(eval_sources, tokenizer, config, vocab_size=vocab_size,
                                 process_index=process_index, progress_bars=progress_bars)
    if config.eval_fraction > 0:
        return split_eval(train, config.eval_fraction, config.eval_seed)
    return train, None


def split_eval(pairs: TokenizedPairs, fraction: float, seed: int):
    """Holds out a seeded `fraction` (at least one pair) of `pairs`: (train, eval)."""
    if not 0 < fraction < 1 or len(pairs) < 2:
        raise DataError("data.eval_fraction", f"expected a fraction in (0, 1) of at least 2 "
                        f"pairs, got {fraction} of {len(pairs)}")
    order = np.random.default_rng(seed).permutation(len(pairs))
    k = max(1, int(round(len(pairs) * fraction)))
    return pairs.subset(np.sort(order[k:])), pairs.subset(np.sort(order[:k]))


def load_pairs(sources: Sequence[str], tokenizer: Any, config: Any, *, vocab_size: int,
               process_index: int = 0, progress_bars: bool = True) -> TokenizedPairs:
    """Loads, tokenizes (cached) and truncates `sources` into one `TokenizedPairs`.

    Process 0 reports each source; with ``progress_bars`` it also shows tokenization bars.
    """
    _check_config(config)
    if not sources:
        raise DataError("data.train", "no sources given")
    encoder = PairEncoder(tokenizer, vocab_size)
    identity = tokenizer_identity(tokenizer)
    tables, names, reports = [], [], []
    for spec in sources:
        dataset, meta = _load_source(spec, encoder, identity, config, vocab_size,
                                     show=process_index == 0, bars=process_index == 0 and progress_bars)
        tables.append(dataset.data.table)
        names.append((meta["name"], meta["unit"]))
        reports.append(meta)
    pairs = TokenizedPairs.from_tables(tables, names, {"sources": reports})
    pairs = pairs.truncated(config.max_length, config.max_prompt_length, config.truncation_mode,
                            tokenizer.bos_token_id)
    if process_index == 0:
        _log_truncation(pairs.report)
    if not len(pairs):
        raise DataError(", ".join(sources), "no trainable pairs left after truncation")
    return pairs


def _check_config(config: Any) -> None:
    checks = (("format", config.format, FORMATS), ("truncation_mode", config.truncation_mode,
              TRUNCATION_MODES), ("extra_fields", config.extra_fields, ("error", "ignore")))
    for field, value, allowed in checks:
        if value not in allowed:
            raise DataError(f"data.{field}", f"expected one of {', '.join(allowed)}, got {value!r}")


def _load_source(spec: str, encoder: PairEncoder, identity: str, config: Any, vocab_size: int,
                 show: bool, bars: bool):
    columns = parse_columns(config.columns)
    _, split = parse_spec(spec, config.split)
    cache_dir = config.cache_dir or cache.default_cache_dir()
    key = cache.cache_key(source_fingerprint(spec, config.split), split, config.limit,
                          config.sample_seed, config.format, columns, config.extra_fields,
                          config.assistant_marker, config.skip_invalid, identity, vocab_size)
    entry = cache.load(cache_dir, key)
    if entry is None:
        dataset, meta = _tokenize_source(spec, encoder, config, columns, vocab_size, bars)
        with _progress_bars(False):
            entry = cache.save(cache_dir, key, dataset, meta)
        entry[1]["from_cache"] = False
    else:
        entry[1]["from_cache"] = True
    if show:
        _log_source(entry[1])
    return entry


def _tokenize_source(spec, encoder, config, columns, vocab_size, bars):
    import datasets

    raw = read_source(spec, config.split, config.limit, config.sample_seed)
    problems = Problems(config.skip_invalid)
    norm = normalize(raw, config.format, columns, config.extra_fields, config.assistant_marker,
                     vocab_size, problems)
    if not norm.numbers:
        raise DataError(raw.name, f"no valid pairs ({sum(problems.skipped.values())} skipped)")
    dataset = datasets.Dataset.from_dict({"number": norm.numbers, "prompt": norm.prompt,
                                          "chosen": norm.chosen, "rejected": norm.rejected})
    workers = min(config.num_proc, len(dataset) // MIN_ROWS_PER_WORKER)
    with _progress_bars(bars):
        dataset = dataset.map(functools.partial(encoder.encode, norm.kind), batched=True,
                              num_proc=workers if workers > 1 else None,
                              remove_columns=["prompt", "chosen", "rejected"],
                              desc=f"tokenizing {os.path.basename(raw.name)}")
    errors = [i for i, e in enumerate(dataset["error"]) if e]
    for i in errors:
        row = dataset[i]
        reason = "chat template" if row["error"].startswith("chat") else "token id out of range"
        problems.add(DataError(Location(raw.name, norm.unit, row["number"]), row["error"],
                               row["error_field"], reason=reason))
    if errors:
        dataset = dataset.select(np.setdiff1d(np.arange(len(dataset)), errors))
    meta = {"name": raw.name, "unit": norm.unit, "format": norm.format, "layout": norm.layout,
            "kind": norm.kind, "pairs": len(dataset),
            "skipped": dict(problems.skipped), "skipped_examples": problems.examples,
            "identical": norm.identical,
            "boundary_merges": int(np.sum(dataset["boundary_merges"]))}
    return dataset.remove_columns(["error", "error_field", "boundary_merges"]), meta


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


def _log_source(meta: dict) -> None:
    name = meta["name"]
    logger.info("%s: %d pairs, %s format%s%s", name, meta["pairs"], meta["format"],
                f" ({meta['layout']} layout)" if meta["layout"] else "",
                ", from cache" if meta["from_cache"] else "")
    for reason, count in sorted(meta["skipped"].items()):
        logger.warning("%s: skipped %d invalid record(s): %s, e.g. %s", name, count, reason,
                       meta["skipped_examples"][reason])
    if meta["identical"]:
        logger.warning("%s: %d pair(s) have identical chosen and rejected completions (they "
                       "carry no preference signal)", name, meta["identical"])
    if meta["boundary_merges"]:
        logger.warning("%s: %d completion(s) would tokenize differently joined to their prompt "
                       "(a token merges across the boundary, e.g. a prompt ending in a space); "
                       "the prompt and completion are tokenized apart", name,
                       meta["boundary_merges"])


def _log_truncation(report: dict) -> None:
    if report["truncated_prompts"] or report["truncated_completions"]:
        logger.info("truncated %d prompt(s) and %d completion pair(s)",
                    report["truncated_prompts"], report["truncated_completions"])
    if report["dropped_empty_completion"]:
        logger.warning("dropped %d pair(s) whose completion would be empty after truncation "
                       "(prompt fills max_length; lower max_prompt_length), e.g. %s",
                       report["dropped_empty_completion"], ", ".join(report["dropped_examples"]))
