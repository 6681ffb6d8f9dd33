"""The pipeline entry points: sources -> records -> pairs -> token ids (cached) -> truncation.

    train, eval = load_datasets(config.data, tokenizer, vocab_size=model_config.vocab_size,
                                process_index=jax.process_index(), process_count=jax.process_count())

Each process handles its own contiguous shard of every source (the whole source when alone). Per
source: fingerprint -> cache lookup (keyed by the shard too); on a miss: read the shard,
normalize and validate (so that errors carry line numbers), tokenize with `datasets.Dataset.map`
(batched, `num_proc` workers, progress bar on process 0), store. The shard's sources are
concatenated in order and truncated. The processes then exchange what the others need (each
pair's lengths, source and record number; counts; the first error), so each ends with every
pair's metadata and its own pairs' tokens (`TokenizedPairs.owner`). Warnings (skipped records
per reason, identical chosen/rejected, boundary merges, truncation, pairs dropped for an empty
completion) are logged on process 0 and kept in `pairs.report`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from sdpo_jax.cache_dir import cache_dir as sdpo_cache_dir
from sdpo_jax.data import cache
from sdpo_jax.data.config import FORMATS, TRUNCATION_MODES
from sdpo_jax.data.errors import DataError, Location
from sdpo_jax.data.formats import normalize, parse_columns
from sdpo_jax.data.pairs import TokenizedPairs
from sdpo_jax.data.sources import parse_spec, read_source, source_fingerprint
from sdpo_jax.data.tokenize import PairEncoder, tokenizer_identity
from sdpo_jax.data.validation import Problems
from sdpo_jax.host_exchange import allgather_arrays, allgather_json

logger = logging.getLogger("sdpo_jax.data")
MIN_ROWS_PER_WORKER = 256


def source_list(value: str | Sequence[str]) -> list[str]:
    """`data.train`/`data.eval` as a list: a sequence, or one string with comma separators."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if s and s.strip()]


def load_datasets(
    config: Any,
    tokenizer: Any,
    *,
    vocab_size: int,
    process_index: int = 0,
    process_count: int = 1,
    progress_bars: bool = True,
    log_sources: bool = True,
) -> tuple[TokenizedPairs, TokenizedPairs | None]:
    """(train, eval) pairs from `config` (the `data` ConfigDict); eval is None without any.

    ``tokenizer``: the model's Hugging Face tokenizer (it needs an EOS token); ``vocab_size``: the
    model's vocabulary size (token ids of pre-tokenized data must lie in [0, vocab_size));
    ``process_index``, ``process_count``: this process and the number of processes
    (``jax.process_index()``, ``jax.process_count()``; each reads its shard of every source);
    ``progress_bars``, ``log_sources``: as in `load_pairs`. Eval pairs come from ``data.eval``,
    else from a held-out ``data.eval_fraction`` of the train pairs (seeded by ``data.eval_seed``).
    """
    load = functools.partial(
        load_pairs,
        tokenizer=tokenizer,
        config=config,
        vocab_size=vocab_size,
        process_index=process_index,
        process_count=process_count,
        progress_bars=progress_bars,
        log_sources=log_sources,
    )
    train = load(source_list(config.train))
    eval_sources = source_list(config.eval)
    if eval_sources:
        return train, load(eval_sources)
    if config.eval_fraction > 0:
        return split_eval(train, config.eval_fraction, config.eval_seed)
    return train, None


def split_eval(pairs: TokenizedPairs, fraction: float, seed: int):
    """Holds out a seeded `fraction` (at least one pair) of `pairs`: (train, eval)."""
    if not 0 < fraction < 1 or len(pairs) < 2:
        raise DataError(
            "data.eval_fraction", f"expected a fraction in (0, 1) of at least 2 pairs, got {fraction} of {len(pairs)}"
        )
    order = np.random.default_rng(seed).permutation(len(pairs))
    k = max(1, int(round(len(pairs) * fraction)))
    return pairs.subset(np.sort(order[k:])), pairs.subset(np.sort(order[:k]))


@dataclasses.dataclass
class Shard:
    """What one process read of the sources: its pairs (tokens included) and per-source counts."""

    pairs: TokenizedPairs | None  # truncated; None after an error
    metas: list[dict]  # per source: name, format, pairs, skipped, ... and its cache `key`
    error: Exception | None = None  # what stopped the shard (a DataError for bad data), in source len(metas)

    def summary(self) -> dict:
        """The JSON-able part the other processes need (besides `pair_fields`)."""
        error = self.error
        if isinstance(error, DataError):
            error = {"source": len(self.metas), "data": [str(error.where), error.detail, error.field, error.reason]}
        elif error is not None:
            error = {"source": len(self.metas), "other": f"{type(error).__name__}: {error}"}
        return {"metas": self.metas, "report": self.pairs.report if self.pairs is not None else {}, "error": error}

    def pair_fields(self) -> dict[str, np.ndarray]:
        """Per-pair lengths, source and record number of this shard's pairs (int32: all are small counts)."""
        if self.pairs is None:
            return {name: np.zeros(0, np.int32) for name in PAIR_FIELDS}
        return {name: np.asarray(getattr(self.pairs, name)).astype(np.int32) for name in PAIR_FIELDS}


PAIR_FIELDS = ("source_id", "number", "head", "prompt_len", "chosen_len", "rejected_len")


def load_pairs(
    sources: Sequence[str],
    tokenizer: Any,
    config: Any,
    *,
    vocab_size: int,
    process_index: int = 0,
    process_count: int = 1,
    progress_bars: bool = True,
    log_sources: bool = True,
) -> TokenizedPairs:
    """Loads, tokenizes (cached) and truncates `sources` into one `TokenizedPairs`.

    ``sources``: source specs, in order (a file, ``sample:NAME/FILE``, a dataset folder or a hub
    name, each optionally with ``@split``); ``tokenizer``: the model's Hugging Face tokenizer;
    ``config``: the `data` ConfigDict (format, column map, limits, truncation, cache, ...);
    ``vocab_size``: the model's vocabulary size (token ids must lie in [0, vocab_size));
    ``process_index``, ``process_count``: this process and the number of processes, which must be
    ``jax.process_count()``.

    Each of the `process_count` processes reads and tokenizes only its shard of every source
    (`read_shard`); the processes then exchange each pair's lengths, source and record number
    (and their counts and first error), so every process knows all pairs and holds the tokens of
    its own (`combine_shards`). Process 0 logs what each source gave (``log_sources``; sdpo-train
    prints the same lines in its start-up summary instead); with ``progress_bars`` it also shows
    tokenization bars.
    """
    _check_config(config)
    if not sources:
        raise DataError("data.train", "no sources given")
    if process_count != jax.process_count():
        raise ValueError(f"load_pairs: process_count={process_count} but this run has {jax.process_count()} processes")
    shard = read_shard(
        sources,
        tokenizer,
        config,
        vocab_size=vocab_size,
        shard=(process_index, process_count),
        bars=process_index == 0 and progress_bars,
    )
    if shard.error is not None and process_count == 1:
        raise shard.error
    pairs = combine_shards(
        shard,
        allgather_json(shard.summary()),
        allgather_arrays(shard.pair_fields()),
        process_index,
        sources,
        truncation_id(config, tokenizer.bos_token_id),
    )
    if process_index == 0 and log_sources:
        for meta in pairs.report["sources"]:
            _log_source(meta)
    if process_index == 0:
        _log_truncation(pairs.report)
    return pairs


def truncation_id(config: Any, bos_id: int | None) -> list:
    """The settings that decide how pairs are cut to length (part of the pairs' identity)."""
    return [config.max_length, config.max_prompt_length, config.truncation_mode, bos_id]


def read_shard(
    sources: Sequence[str],
    tokenizer: Any,
    config: Any,
    *,
    vocab_size: int,
    shard: tuple[int, int] = (0, 1),
    bars: bool = False,
) -> Shard:
    """Shard `shard = (i, n)` of every source: read, checked, tokenized (cached per shard), truncated.

    A bad record (the first, unless `data.skip_invalid`) ends the shard with its `DataError`; any
    other failure (say an unreadable cache entry) ends it too, so that every process still reaches
    the exchange and all stop together.
    """
    encoder = PairEncoder(tokenizer, vocab_size)
    identity = tokenizer_identity(tokenizer)
    tables, names, metas = [], [], []
    try:
        for spec in sources:
            dataset, meta = _load_source(spec, encoder, identity, config, vocab_size, shard, bars)
            tables.append(dataset.data.table)
            names.append((meta["name"], meta["unit"]))
            metas.append(meta)
    except Exception as err:  # noqa: BLE001 (reported to every process by combine_shards, re-raised here)
        return Shard(None, metas, err)
    pairs = TokenizedPairs.from_tables(tables, names)
    pairs = pairs.truncated(config.max_length, config.max_prompt_length, config.truncation_mode, tokenizer.bos_token_id)
    return Shard(pairs, metas)


def combine_shards(
    local: Shard,
    summaries: list[dict],
    fields: list[dict[str, np.ndarray]],
    process_index: int,
    sources: Sequence[str],
    truncation: list,
) -> TokenizedPairs:
    """All pairs, in source order and within a source in record order, from every shard's summary
    and pair fields (in process order); the tokens are `local`'s, the shard of `process_index`.

    The first error in source order, then process order (so the first bad record in file order,
    as one process would report it) is raised on every process: this process's own exception as it
    is, another's bad data as the same `DataError`, another's failure as a RuntimeError naming it.
    """
    failed = [(summary["error"]["source"], index) for index, summary in enumerate(summaries) if summary["error"]]
    if failed:
        index = min(failed)[1]
        if index == process_index:
            raise local.error
        error = summaries[index]["error"]
        if "data" in error:
            where, detail, field, reason = error["data"]
            raise DataError(where, detail, field, reason=reason)
        where = (
            sources[error["source"]] if error["source"] < len(sources) else ", ".join(sources)
        )  # (after the last source)
        raise RuntimeError(f"process {index} could not read its shard of {where}: {error['other']}")
    metas = [_merge_metas([summary["metas"][k] for summary in summaries]) for k in range(len(sources))]
    for meta in metas:
        if not meta["pairs"]:
            raise DataError(meta["name"], _no_pairs_detail(meta))
    counts = [len(f["number"]) for f in fields]
    if not sum(counts):
        raise DataError(", ".join(sources), "no trainable pairs left after truncation")
    owner = np.concatenate([np.full(n, p, np.int32) for p, n in enumerate(counts)])
    merged = {name: np.concatenate([f[name] for f in fields]) for name in PAIR_FIELDS}
    order = np.argsort(merged["source_id"] * len(fields) + owner, kind="stable")
    mine = np.flatnonzero(owner[order] == process_index)
    starts = {}
    for name in ("prompt_start", "body_start", "chosen_start", "rejected_start"):
        starts[name] = np.full(len(order), -1, np.int64)
        starts[name][mine] = getattr(local.pairs, name)
    keys = [meta["key"] for meta in metas]
    return TokenizedPairs(
        tokens=local.pairs.tokens,
        **starts,
        **{name: merged[name][order].astype(np.int32 if name == "source_id" else np.int64) for name in PAIR_FIELDS},
        sources=[(meta["name"], meta["unit"]) for meta in metas],
        report={"sources": metas, **_merge_truncation([summary["report"] for summary in summaries])},
        owner=owner[order],
        process_index=process_index,
        content_id=cache.cache_key(keys, truncation)[:16],
    )


def _no_pairs_detail(meta: dict) -> str:
    """Why a source gave no pairs: the count skipped, the most common reason and its first record."""
    if not meta["skipped"]:
        return "no valid pairs"
    reason, count = max(meta["skipped"].items(), key=lambda item: (item[1], item[0]))
    return (
        f"no valid pairs ({sum(meta['skipped'].values())} skipped; most for {reason}: {count}, first: "
        f"{_example(meta, reason)})"
    )


def _merge_metas(shards: list[dict]) -> dict:
    """One source's report from its shards' reports: counts summed, the first example of each reason."""
    merged = dict(
        {k: v for k, v in shards[0].items() if k != "shard"},
        pairs=0,
        skipped={},
        skipped_examples={},
        identical=0,
        boundary_merges=0,
        from_cache=all(meta["from_cache"] for meta in shards),
    )
    for meta in shards:
        if meta["pairs"] and not merged["pairs"]:
            merged.update(format=meta["format"], layout=meta["layout"], kind=meta["kind"])
        for reason, count in meta["skipped"].items():
            merged["skipped"][reason] = merged["skipped"].get(reason, 0) + count
            merged["skipped_examples"].setdefault(reason, meta["skipped_examples"][reason])
        for count in ("pairs", "identical", "boundary_merges"):
            merged[count] += meta[count]
    return merged


def _merge_truncation(reports: list[dict]) -> dict:
    reports = [r for r in reports if r]
    merged = {
        count: sum(r[count] for r in reports)
        for count in ("truncated_prompts", "truncated_completions", "dropped_empty_completion")
    }
    merged["dropped_examples"] = [example for r in reports for example in r["dropped_examples"]][:5]
    return merged


def _check_config(config: Any) -> None:
    checks = (
        ("format", config.format, FORMATS),
        ("truncation_mode", config.truncation_mode, TRUNCATION_MODES),
        ("extra_fields", config.extra_fields, ("error", "ignore")),
    )
    for field, value, allowed in checks:
        if value not in allowed:
            raise DataError(f"data.{field}", f"expected one of {', '.join(allowed)}, got {value!r}")


def _load_source(
    spec: str, encoder: PairEncoder, identity: str, config: Any, vocab_size: int, shard: tuple[int, int], bars: bool
):
    """(tokenized dataset, meta) of this process's shard of one source, from the cache or made and cached now.

    ``spec``: one source spec (see `load_pairs`); ``encoder``: the tokenizer's `PairEncoder`;
    ``identity``: `tokenizer_identity` of the tokenizer (part of the cache key); ``config``: the
    `data` ConfigDict; ``vocab_size``: the model's (part of the key, bounds the token ids);
    ``shard``: (process index, process count), the contiguous block of the source's records read;
    ``bars``: show a tokenization progress bar. The dataset has the columns number, prompt_ids,
    chosen_ids and rejected_ids; meta is the source's report (name, unit, format, pair and skip
    counts, ...) with the source's cache ``key`` (without the shard), the ``shard`` and
    ``from_cache``.
    """
    columns = parse_columns(config.columns)
    name, split = parse_spec(spec, config.split)
    cache_dir = config.cache_dir or str(sdpo_cache_dir("data"))
    key = cache.cache_key(
        source_fingerprint(spec, config.split),
        split,
        config.limit,
        config.sample_seed,
        config.format,
        columns,
        config.extra_fields,
        config.assistant_marker,
        config.skip_invalid,
        identity,
        vocab_size,
    )
    shard_key = cache.cache_key(key, list(shard)) if shard != (0, 1) else key
    entry = cache.load(cache_dir, shard_key)
    if entry is None:
        dataset, meta = _tokenize_source(spec, encoder, config, columns, vocab_size, shard, bars)
        meta = {**meta, "key": key, "shard": list(shard)}
        if len(dataset):  # (`datasets` cannot reload an empty saved dataset; an empty shard is cheap to redo)
            with _progress_bars(False):
                dataset, meta = cache.save(cache_dir, shard_key, dataset, meta)
        entry = dataset, meta
        entry[1]["from_cache"] = False
    else:  # (the entry may come from a run that saw this file at another path, e.g. another clone)
        entry[1].update(from_cache=True, name=name)
    return entry


def _tokenize_source(spec, encoder, config, columns, vocab_size, shard, bars):
    """(tokenized dataset, meta) of shard ``shard`` of source ``spec``, read, normalized and tokenized now.

    ``encoder``: the tokenizer's `PairEncoder`; ``config``: the `data` ConfigDict; ``columns``: the
    parsed column map (`parse_columns` of ``data.columns``); ``vocab_size``: the model's (bounds
    pre-tokenized ids); ``shard``: (process index, process count); ``bars``: show the progress bar.
    Records that fail (in reading, normalization or tokenization) go to a `Problems` built from
    ``data.skip_invalid``: the first is raised, or each is skipped and counted in meta.
    """
    import datasets

    raw = read_source(spec, config.split, config.limit, config.sample_seed, shard=shard)
    problems = Problems(config.skip_invalid)
    norm = normalize(raw, config.format, columns, config.extra_fields, config.assistant_marker, vocab_size, problems)
    features = _tokenized_features()
    if not norm.numbers:  # a shard without valid records (the source's total is checked later)
        dataset = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    else:
        dataset = datasets.Dataset.from_dict(
            {"number": norm.numbers, "prompt": norm.prompt, "chosen": norm.chosen, "rejected": norm.rejected}
        )
        workers = min(config.num_proc, len(dataset) // MIN_ROWS_PER_WORKER)
        with _progress_bars(bars), _spawned_workers(workers > 1):
            dataset = dataset.map(
                functools.partial(encoder.encode, norm.kind),
                batched=True,
                num_proc=workers if workers > 1 else None,
                remove_columns=["prompt", "chosen", "rejected"],
                features=features,
                desc=f"tokenizing {os.path.basename(raw.name)}",
            )
    errors = [i for i, e in enumerate(dataset["error"]) if e]
    for i in errors:
        row = dataset[i]
        reason = "chat template" if row["error"].startswith("chat") else "token id out of range"
        problems.add(
            DataError(Location(raw.name, norm.unit, row["number"]), row["error"], row["error_field"], reason=reason)
        )
    if errors:
        dataset = dataset.select(np.setdiff1d(np.arange(len(dataset)), errors))
    meta = {
        "name": raw.name,
        "unit": norm.unit,
        "format": norm.format,
        "layout": norm.layout,
        "kind": norm.kind,
        "pairs": len(dataset),
        "skipped": dict(problems.skipped),
        "skipped_examples": problems.examples,
        "identical": norm.identical,
        "boundary_merges": int(np.sum(dataset["boundary_merges"])),
    }
    return dataset.remove_columns(["error", "error_field", "boundary_merges"]), meta


def _tokenized_features():
    """The columns `PairEncoder.encode` leaves, typed (so an empty shard has them too)."""
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features(
        {
            "number": datasets.Value("int64"),
            "prompt_ids": ids,
            "chosen_ids": ids,
            "rejected_ids": ids,
            "boundary_merges": datasets.Value("int64"),
            "error": datasets.Value("string"),
            "error_field": datasets.Value("string"),
        }
    )


@contextlib.contextmanager
def _spawned_workers(enabled: bool):
    """`datasets.map` worker processes started fresh ('spawn') instead of forked: by the time data is
    tokenized JAX runs threads, and a forked child of a multithreaded process can deadlock."""
    if not enabled:
        yield
        return
    import multiprocess

    method = multiprocess.get_start_method(allow_none=True)
    multiprocess.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        multiprocess.set_start_method(method, force=True)


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


def source_lines(meta: dict) -> tuple[str, list[str]]:
    """(what a source gave, [warnings about it]): skipped records per reason with the first of each,
    identical pairs, completions tokenized apart from their prompt."""
    name = meta["name"]
    info = (
        f"{name}: {meta['pairs']} pairs, {meta['format']} format"
        + (f" ({meta['layout']} layout)" if meta["layout"] else "")
        + (", from cache" if meta["from_cache"] else "")
    )
    warnings = [
        f"{name}: skipped {count} invalid record(s): {reason}, first: {_example(meta, reason)}"
        for reason, count in sorted(meta["skipped"].items(), key=lambda item: (-item[1], item[0]))
    ]
    if meta["identical"]:
        warnings.append(
            f"{name}: {meta['identical']} pair(s) have identical chosen and rejected completions (they "
            f"carry no preference signal)"
        )
    if meta["boundary_merges"]:
        warnings.append(
            f"{name}: {meta['boundary_merges']} completion(s) would tokenize differently joined to their "
            f"prompt (a token merges across the boundary, e.g. a prompt ending in a space); the prompt and "
            f"completion are tokenized apart"
        )
    return info, warnings


def _example(meta: dict, reason: str) -> str:
    return meta["skipped_examples"][reason].removeprefix("data error: ")


def _log_source(meta: dict) -> None:
    info, warnings = source_lines(meta)
    logger.info(info)
    for line in warnings:
        logger.warning(line)


def _log_truncation(report: dict) -> None:
    if report["truncated_prompts"] or report["truncated_completions"]:
        logger.info(
            "truncated %d prompt(s) and %d completion pair(s)",
            report["truncated_prompts"],
            report["truncated_completions"],
        )
    if report["dropped_empty_completion"]:
        logger.warning(
            "dropped %d pair(s) whose completion would be empty after truncation "
            "(prompt fills max_length; lower max_prompt_length), e.g. %s",
            report["dropped_empty_completion"],
            ", ".join(report["dropped_examples"]),
        )
