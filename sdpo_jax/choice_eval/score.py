"""Multiple-choice accuracy from summed continuation log-likelihoods (lm-eval's acc / acc_norm).

For question q with choices c_1..c_n and context x:

    ll_i     = sum over the continuation tokens t of log p(t | x, earlier tokens of c_i)
    acc      = mean over questions of [argmax_i ll_i == answer]
    acc_norm = mean over questions of [argmax_i ll_i / len(c_i) == answer]

where len(c_i) is the number of characters of the choice text itself, without the space that
joins it to the context (lm-evaluation-harness's `completion_len`, taken of `doc_to_choice`).
Ties go to the first choice (numpy's argmax), as in lm-eval.

Batches. Each question is one packed row (see encode.py): its shared context prefix, then one
segment per choice. In the forward pass a token attends to the earlier tokens of the prefix and
of its own segment (causal by index, padding hidden, Mistral's window by position), and carries
the position it would have in the unpacked context + choice sequence; per-token log-probs come
from sdpo_jax.logprobs.token_logps (chunked over the sequence, chunks without a continuation
token skipped) and are summed per choice on the host in float64. Questions are sorted by packed
length and cut into batches of ``batch_size``; each batch is right-padded to the smallest of at
most four widths (chosen to minimise the total padded width, see `length_buckets`) and the last
one is filled with padding rows, so a question set compiles at most four shapes. With a mesh,
each global batch is split over the mesh's batch axes (each process feeds its own rows of it,
as with training batches) and the parameters stay where the caller placed them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdpo_jax.choice_eval.encode import EncodedChoices, encode_choices
from sdpo_jax.choice_eval.questions import ChoiceQuestion
from sdpo_jax.logprobs import token_logps
from sdpo_jax.models.attention import causal_attention_mask
from sdpo_jax.models.llama import LlamaForCausalLM, output_embedding
from sdpo_jax.placement import whole_batch_on_mesh
from sdpo_jax.sharding import batch_row_multiple, replicated

MAX_BUCKETS = 4
BUCKET_MULTIPLE = 8


def choice_step(model: LlamaForCausalLM, mesh: jax.sharding.Mesh | None = None, chunk_size: int = 32) -> Callable:
    """The jitted ``(params, batch) -> [rows, L-1] float32`` step; build once, reuse.

    Entry [b, i] is log p(input_ids[b, i+1] | what token i+1 sees) where ``loss_mask[b, i+1]``
    is set, else 0. ``batch`` holds ``input_ids``, ``attention_mask``, ``positions``, ``segment``
    (0: shared prefix or padding, i+1: choice i) and ``loss_mask``, all [rows, L]; a token sees the
    earlier tokens of the prefix and of its own segment. With a mesh the result is replicated.
    """

    def step(params: Any, batch: dict) -> jax.Array:
        segment = batch["segment"]
        own_or_shared = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
        mask = causal_attention_mask(batch["attention_mask"], batch["positions"], model.config.sliding_window)
        hidden = model.apply(
            {"params": params},
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            positions=batch["positions"],
            mask=mask & own_or_shared[:, None],
            return_hidden=True,
        )
        scored = batch["loss_mask"][:, 1:].astype(bool)
        logps = token_logps(
            hidden[:, :-1], output_embedding(params, model.config), batch["input_ids"][:, 1:], chunk_size, needed=scored
        )
        return jnp.where(scored, logps, 0.0)

    return jax.jit(step) if mesh is None else jax.jit(step, out_shardings=replicated(mesh))


def evaluate_choices(
    model: LlamaForCausalLM,
    params: Any,
    tokenizer: Any,
    questions: Sequence[ChoiceQuestion],
    *,
    batch_size: int = 16,
    max_length: int = 512,
    chat_template: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    step: Callable | None = None,
) -> dict:
    """``acc``, ``acc_norm``, ``num_questions`` (and ``num_rows``, ``boundary_merges``, ``truncated``).

    ``tokenizer`` is the model's Hugging Face tokenizer (texts are tokenized here, see encode.py);
    ``questions`` the question set (ChoiceQuestion: question text, choice texts, index of the
    answer); ``chat_template``: False scores the plain lm-eval prompt ("Question: ...\\nAnswer:"
    then " choice"), True wraps the question in the tokenizer's chat template as one user turn
    with the generation prompt and scores the choice as the start of the assistant's reply (for
    instruct models; the tokenizer must have a template).
    ``batch_size`` questions go through the model per forward pass (one packed row each, at most
    ``max_length`` tokens: longer contexts lose tokens from the left). ``step`` is a `choice_step`
    built for the same model and mesh: pass one to reuse its compiled shapes across calls (say
    once per training stage); without it one is built and compiled. With a mesh, ``params`` must
    already be on it (e.g. the train state's params) and ``batch_size`` a multiple of its
    data x fsdp size and of the process count.
    """
    encoded = encode_choices(
        tokenizer, questions, vocab_size=model.config.vocab_size, max_length=max_length, chat_template=chat_template
    )
    step = step or choice_step(model, mesh)
    return choice_metrics(encoded, choice_loglikelihoods(step, params, encoded, batch_size, mesh))


def choice_loglikelihoods(
    step: Callable, params: Any, encoded: EncodedChoices, batch_size: int, mesh: jax.sharding.Mesh | None = None
) -> np.ndarray:
    """float64 [rows]: ll of every (question, choice) row of ``encoded``; ``batch_size`` questions per forward."""
    parts = batch_row_multiple(mesh)
    if batch_size < 1 or batch_size % parts:
        raise ValueError(f"batch size {batch_size} must be a positive multiple of the {parts} batch shards of the mesh")
    scores = np.full(len(encoded.segments), np.nan)
    for spans, batch in _batches(encoded, batch_size):
        logps = step(params, batch if mesh is None else whole_batch_on_mesh(batch, mesh))
        logps = np.asarray(jax.device_get(logps), np.float64)
        for r, (b, first, end) in spans.items():  # token j is predicted at logps column j - 1
            scores[r] = logps[b, first - 1 : end - 1].sum()
    return scores


def choice_metrics(encoded: EncodedChoices, scores: np.ndarray) -> dict:
    """acc and acc_norm of per-row ``scores`` (see the module docstring), plus counts."""
    num_questions = len(encoded.answers)
    counts = np.bincount(encoded.question_of, minlength=num_questions)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(scores)) - first[encoded.question_of]
    table = np.full((num_questions, counts.max()), -np.inf)
    norm_table = table.copy()
    table[encoded.question_of, slot] = scores
    norm_table[encoded.question_of, slot] = scores / encoded.choice_lengths
    return {
        "acc": float(np.mean(np.argmax(table, axis=1) == encoded.answers)),
        "acc_norm": float(np.mean(np.argmax(norm_table, axis=1) == encoded.answers)),
        "num_questions": int(num_questions),
        "num_rows": int(len(scores)),
        "boundary_merges": int(encoded.boundary_merges),
        "truncated": int(encoded.truncated),
    }


def length_buckets(batch_lengths: np.ndarray, count: int = MAX_BUCKETS) -> np.ndarray:
    """At most ``count`` sorted widths that cover every batch at the least total padded width.

    ``batch_lengths`` are the batches' longest rows, rounded up here to a multiple of 8. Each batch
    takes the smallest width that holds it, so cost(widths) = sum over batches of that width;
    the minimum over all choices of ``count`` widths (each one a batch length, the largest one the
    longest) is found exactly by dynamic programming over the sorted distinct lengths.
    """
    rounded = -(-np.asarray(batch_lengths) // BUCKET_MULTIPLE) * BUCKET_MULTIPLE
    values, counts = np.unique(rounded, return_counts=True)
    below = np.concatenate([[0], np.cumsum(counts)])  # below[j]: batches shorter than values[j]
    # best[k][j]: least cost of covering values[:j] with k widths, the last one values[j - 1]
    best = np.full((count + 1, len(values) + 1), np.inf)
    best[0, 0] = 0.0
    choice = np.zeros((count + 1, len(values) + 1), np.int64)
    for k in range(1, count + 1):
        for j in range(1, len(values) + 1):
            costs = [best[k - 1, i] + values[j - 1] * (below[j] - below[i]) for i in range(j)]
            choice[k, j] = int(np.argmin(costs))
            best[k, j] = costs[choice[k, j]]
    k = int(np.argmin(best[:, len(values)]))
    widths, j = [], len(values)
    while j:
        widths.append(values[j - 1])
        j, k = choice[k, j], k - 1
    return np.asarray(sorted(widths), np.int64)


def packed_rows(encoded: EncodedChoices) -> list[dict]:
    """Per question: ``input_ids``, ``positions``, ``segment``, ``loss_mask`` lists and its rows' spans.

    ``spans`` maps each of the question's (question, choice) rows to (first, end): the token
    indices of its continuation in the packed row.
    """
    rows_of = np.split(np.arange(len(encoded.segments)), np.cumsum(np.bincount(encoded.question_of))[:-1])
    packed = []
    for prefix, rows in zip(encoded.prefixes, rows_of):
        row = {
            "input_ids": list(prefix),
            "positions": list(range(len(prefix))),
            "segment": [0] * len(prefix),
            "loss_mask": [0] * len(prefix),
            "spans": {},
        }
        for choice, r in enumerate(rows):
            segment, scored, begin = encoded.segments[r], int(encoded.scored[r]), len(row["input_ids"])
            row["input_ids"] += segment
            row["positions"] += range(len(prefix), len(prefix) + len(segment))
            row["segment"] += [choice + 1] * len(segment)
            row["loss_mask"] += [0] * scored + [1] * (len(segment) - scored)
            row["spans"][int(r)] = (begin + scored, begin + len(segment))
        packed.append(row)
    return packed


def _batches(encoded: EncodedChoices, batch_size: int) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
    """(spans {row: (batch row, first, end)}, padded global batch) over all questions, shortest first."""
    packed = packed_rows(encoded)
    lengths = np.asarray([len(row["input_ids"]) for row in packed])
    order = np.argsort(lengths, kind="stable")
    groups = [order[begin : begin + batch_size] for begin in range(0, len(order), batch_size)]
    buckets = length_buckets([lengths[questions].max() for questions in groups])
    for questions in groups:
        width = int(buckets[np.searchsorted(buckets, lengths[questions].max())])
        batch = {
            name: np.zeros((batch_size, width), np.int32)
            for name in ("input_ids", "attention_mask", "positions", "segment", "loss_mask")
        }
        batch["attention_mask"][len(questions) :, 0] = 1  # padding rows: one visible token, nothing scored
        spans = {}
        for b, q in enumerate(questions):
            row = packed[q]
            for name in ("input_ids", "positions", "segment", "loss_mask"):
                batch[name][b, : len(row[name])] = row[name]
            batch["attention_mask"][b, : len(row["input_ids"])] = 1
            spans.update({r: (b, first, end) for r, (first, end) in row["spans"].items()})
        yield spans, batch
