"""On-policy stage data: stage t's pairs built from M(t-1)'s own samples on the stage's prompts.

For every distinct prompt of the stage's chunk (its token ids exactly as training sees them; the
chunk's chosen completion is its reference answer), ``samples_per_prompt`` completions are sampled
from M(t-1) with the KV-cache generator (``temperature``, ``top_p``, ``max_new_tokens``), scored
by the stage's scorer (sdpo_jax.scorers), and turned into at most one pair:

    chosen   = the best sample (generate.chosen = 'best') or the reference answer ('gold', scored too)
    rejected = the worst sample
    no pair when score(chosen) - score(rejected) < generate.min_margin, or when score(chosen) <=
    score(rejected) (nothing to prefer: tied samples, or a reference answer no better than the worst)

Prompts are sampled in batches of ``generate.batch_size`` in chunk order; batch b is seeded by
(train.seed, stage, b), so the samples depend only on the model, the prompts and the settings.
Each finished batch is appended to ``generated/stage_<t>.partial.jsonl`` (a header line with the
key of everything the samples depend on, then one line per prompt), so a killed run samples only
the batches it had not saved. At the end ``generated/stage_<t>.jsonl`` holds one line per pair
(prompt, chosen, rejected, chosen_score, rejected_score, the scores and texts of every sample, and
the token ids) and ``generated/stage_<t>.meta.json`` its key and counts; a rerun whose key matches
reuses them. The pairs are then read back as pre-tokenized data, through the same loader, cache,
truncation and batching as any other source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from sdpo_jax.data.load import load_pairs
from sdpo_jax.data.pairs import TokenizedPairs
from sdpo_jax.generation import generate
from sdpo_jax.host_exchange import allgather_json, barrier

PARTIAL_VERSION = 1


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    """A generated stage's sampling, scoring and pairing settings (the config's ``generate`` section)."""

    scorer: str
    samples_per_prompt: int
    temperature: float
    top_p: float
    max_new_tokens: int
    chosen: str  # 'best' | 'gold'
    min_margin: float
    batch_size: int  # prompts per sampling batch (each gives samples_per_prompt rows)


@dataclasses.dataclass(frozen=True)
class StagePrompt:
    """One distinct prompt of a chunk: its ids and the chunk's chosen completion as the reference answer."""

    prompt_ids: tuple[int, ...]
    reference_ids: tuple[int, ...]


def generated_origin(stage: int, sources: list[str], pairs: int | None = None) -> str:
    """Where a generated stage's pairs come from, for the run's lines: M(stage-1)'s samples on the prompts
    of the chunk drawn from ``sources`` (of its ``pairs`` offline pairs, when given)."""
    chunk = f"{pairs} pairs of " if pairs is not None else ""
    return f"M{stage - 1}'s samples on the prompts of {chunk}{', '.join(sources)}"


def chunk_prompts(chunk: TokenizedPairs) -> list[StagePrompt]:
    """The chunk's distinct prompts in chunk order (the first pair's chosen answer as each one's reference),
    gathered from every process (each holds only its pairs' tokens)."""
    mine = np.flatnonzero(chunk.held_here(np.arange(len(chunk))))
    held = [(int(i), chunk.prompt_ids(int(i)), chunk.chosen_ids(int(i))) for i in mine]
    rows = sorted(row for rows in allgather_json(held) for row in rows)
    prompts, seen = [], set()
    for _, prompt, chosen in rows:
        if tuple(prompt) not in seen:
            seen.add(tuple(prompt))
            prompts.append(StagePrompt(tuple(prompt), tuple(chosen)))
    return prompts


def _without_eos(ids, eos_id: int | None) -> list[int]:
    ids = list(ids)
    return ids[:-1] if ids and ids[-1] == eos_id else ids


class StageSampler:
    """Samples one stage's prompts from ``params`` on ``mesh`` and scores the samples (module docstring).

    ``model``: the policy's LlamaForCausalLM; ``params``: M(t-1)'s parameters, as placed on
    ``mesh`` (sharded there when there is a mesh); ``tokenizer``: decodes prompts, samples and
    references to the texts the scorer reads, and gives the EOS id that ends a sample; ``mesh``:
    the run's mesh, whose data x fsdp devices split the rows of each sampling batch, or None;
    ``scorer``: a sdpo_jax.scorers.Scorer, ``scorer(prompts, completions, references)`` -> one
    float per completion, higher is better; ``settings``: the stage's GenerateSettings (samples per
    prompt, temperature, top_p, max_new_tokens, chosen, min_margin, prompts per batch); ``seed``:
    ``train.seed``, which with the stage and the batch index seeds each batch (``_batch_seed``).
    """

    def __init__(
        self,
        model: Any,
        params: Any,
        tokenizer: Any,
        mesh: Any,
        scorer: Callable,
        settings: GenerateSettings,
        seed: int,
    ):
        self.model, self.params, self.tokenizer, self.mesh = model, params, tokenizer, mesh
        self.scorer, self.settings, self.seed = scorer, settings, seed

    def text(self, ids) -> str:
        return self.tokenizer.decode(_without_eos(ids, self.tokenizer.eos_token_id), skip_special_tokens=True)

    def batch(self, prompts: list[StagePrompt], batch_seed: int) -> list[dict]:
        """Per prompt: its samples' ids, texts and scores, and the reference's text and score."""
        k, s = self.settings.samples_per_prompt, self.settings
        rows = [list(p.prompt_ids) for p in prompts for _ in range(k)]
        devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"] if self.mesh is not None else 1
        samples = generate(
            self.model,
            self.params,
            rows,
            s.max_new_tokens,
            self.tokenizer.eos_token_id,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=batch_seed,
            batch_size=-(-len(rows) // devices) * devices,
            mesh=self.mesh,
        )
        prompt_texts = [self.text(p.prompt_ids) for p in prompts]
        references = [self.text(p.reference_ids) for p in prompts]
        sample_texts = [self.text(ids) for ids in samples]
        scores = self.scorer(
            [t for t in prompt_texts for _ in range(k)], sample_texts, [r for r in references for _ in range(k)]
        )
        gold = self.scorer(prompt_texts, references, references) if s.chosen == "gold" else [None] * len(prompts)
        return [
            {
                "prompt": prompt_texts[i],
                "prompt_ids": list(p.prompt_ids),
                "reference": references[i],
                "reference_ids": list(p.reference_ids),
                "reference_score": gold[i],
                "samples": sample_texts[i * k : (i + 1) * k],
                "sample_ids": samples[i * k : (i + 1) * k],
                "sample_scores": scores[i * k : (i + 1) * k],
            }
            for i, p in enumerate(prompts)
        ]


def pair_of(record: dict, settings: GenerateSettings) -> dict | None:
    """The pair one prompt gives (module docstring), or None when its margin is below min_margin."""
    scores = record["sample_scores"]
    worst = int(np.argmin(scores))  # ties: the first sample
    if settings.chosen == "best":
        best = int(np.argmax(scores))
        chosen, chosen_ids, chosen_score = record["samples"][best], record["sample_ids"][best], scores[best]
    else:
        chosen, chosen_ids, chosen_score = record["reference"], record["reference_ids"], record["reference_score"]
    margin = chosen_score - scores[worst]
    if margin < settings.min_margin or margin <= 0:
        return None
    return {
        "prompt": record["prompt"],
        "chosen": chosen,
        "rejected": record["samples"][worst],
        "chosen_score": chosen_score,
        "rejected_score": scores[worst],
        "sample_scores": scores,
        "samples": record["samples"],
        "prompt_ids": record["prompt_ids"],
        "chosen_ids": list(chosen_ids),
        "rejected_ids": list(record["sample_ids"][worst]),
    }


def sampling_key(model_key: str, prompts: list[StagePrompt], settings: GenerateSettings, seed: int, stage: int) -> str:
    """A hash of everything a stage's samples and pairs depend on."""
    blob = json.dumps(
        [
            PARTIAL_VERSION,
            model_key,
            [(p.prompt_ids, p.reference_ids) for p in prompts],
            dataclasses.asdict(settings),
            seed,
            stage,
        ],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def generated_stage(
    folder: Path,
    stage: int,
    sampler: StageSampler,
    prompts: list[StagePrompt],
    key: str,
    progress: Callable,
    note: Callable[[str], None],
) -> tuple[Path, dict]:
    """(the pairs file, its summary) of ``stage``, sampled now or reused from ``folder`` (module docstring);
    ``note`` hears how much a killed run had saved.

    ``folder``: where the stage's files live (the run's ``generated/``); ``stage``: t, 1-based;
    ``sampler``: the StageSampler of M(t-1) with the stage's settings and scorer; ``prompts``: the
    chunk's distinct prompts in chunk order (`chunk_prompts`, the same list on every process);
    ``key``: `sampling_key` of the model, prompts, settings, seed and stage: saved files (final or
    partial) are reused only under the same key; ``progress``: ``progress(items, count)`` ->
    the items, wrapping the loop over the batches still to sample (a progress bar); ``note``:
    takes one line of text (the run's log). Every process samples; process 0 writes the files.
    """
    final, meta_path = folder / f"stage_{stage}.jsonl", folder / f"stage_{stage}.meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text())["key"] == key and final.exists():
        return final, json.loads(meta_path.read_text())["summary"]
    partial = folder / f"stage_{stage}.partial.jsonl"
    batches = _saved_batches(partial, key)
    size, is_main = sampler.settings.batch_size, jax.process_index() == 0
    if batches:
        note(
            f"stage {stage}: {len(batches)} of {-(-len(prompts) // size)} sampled batches saved by an earlier run "
            "are reused"
        )
    if is_main and not batches:
        folder.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"key": key}) + "\n")
    todo = range(len(batches), -(-len(prompts) // size))
    for b in progress(todo, len(todo)):
        batches.append(sampler.batch(prompts[b * size : (b + 1) * size], _batch_seed(sampler.seed, stage, b)))
        if is_main:
            with open(partial, "a", encoding="utf-8") as f:
                f.write(json.dumps(batches[-1]) + "\n")
    records = [record for batch in batches for record in batch]
    pairs = [pair for pair in (pair_of(r, sampler.settings) for r in records) if pair is not None]
    summary = _summary(records, pairs, sampler.settings)
    if is_main:
        tmp = final.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(pair) + "\n" for pair in pairs), encoding="utf-8")
        tmp.replace(final)
        meta_tmp = meta_path.with_suffix(".tmp")
        meta_tmp.write_text(json.dumps({"key": key, "summary": summary}, indent=2) + "\n")
        meta_tmp.replace(meta_path)  # a kill leaves the old meta file or the new one, never half of one
        partial.unlink()
    barrier(f"generated_stage_{stage}")
    return final, summary


def _saved_batches(partial: Path, key: str) -> list[list[dict]]:
    """The batches (one line each) a killed run saved under the same key; a line cut by the kill and
    everything after it is sampled again."""
    if not partial.exists():
        return []
    lines = partial.read_text(encoding="utf-8").splitlines()
    batches = []
    try:
        if not lines or json.loads(lines[0]).get("key") != key:
            return []
        for line in lines[1:]:
            batches.append(json.loads(line))
    except ValueError:
        pass
    return batches


def _batch_seed(seed: int, stage: int, batch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}-{stage}-{batch}".encode()).digest()[:4], "little")


def _summary(records: list[dict], pairs: list[dict], settings: GenerateSettings) -> dict:
    best = [max(r["sample_scores"]) for r in records]
    worst = [min(r["sample_scores"]) for r in records]
    return {
        "prompts": len(records),
        "pairs": len(pairs),
        "prompts_without_pair": len(records) - len(pairs),
        "mean_best_score": float(np.mean(best)),
        "mean_worst_score": float(np.mean(worst)),
        "samples_per_prompt": settings.samples_per_prompt,
        "scorer": settings.scorer,
        "chosen": settings.chosen,
    }


def load_generated(
    path: Path, data_config: ml_collections.ConfigDict, tokenizer: Any, vocab_size: int
) -> TokenizedPairs:
    """A generated pairs file as training pairs: its token ids used as they are, truncated like any source."""
    config = ml_collections.ConfigDict(data_config.to_dict())
    config.format, config.extra_fields, config.columns = "tokenized", "ignore", ""
    config.limit, config.sample_seed, config.skip_invalid = 0, 0, False
    return load_pairs(
        [str(path)],
        tokenizer,
        config,
        vocab_size=vocab_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        progress_bars=False,
        log_sources=False,
    )
