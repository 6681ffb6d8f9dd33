"""`TokenizedPairs`: the canonical tokenized preference pairs of one dataset, in flat arrays.

Every format ends up here. All token ids live in one int32 array; each pair points into it with
(start, length) for prompt, chosen and rejected, so truncation and subsetting only change those
pointers and batches are gathered with vectorized numpy indexing. `pair_index` in batches is
the index into this object. `prompt_ids(i)` etc. return a pair's (truncated) ids as lists.

In a multi-process run every process knows every pair's lengths, source and record number, but
holds the tokens of its own shard only: `owner[i]` is the process holding pair i's tokens (-1:
every process holds them), and the start pointers of pairs held elsewhere are -1. `gather`
refuses pairs this process does not hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from sdpo_jax.data.errors import Location
from sdpo_jax.data.truncation import truncate

SIDES = ("prompt", "chosen", "rejected")
_WHOLE = ("tokens", "sources", "report", "process_index", "content_id")  # fields not indexed per pair


@dataclasses.dataclass
class TokenizedPairs:
    """Preference pairs as pointers into one flat token array (see the module docstring).

    A prompt is `tokens[prompt_start : prompt_start + head]` (a kept BOS, see truncation) then
    `tokens[body_start : body_start + prompt_len - head]`; completions are plain slices.
    """

    tokens: np.ndarray
    prompt_start: np.ndarray
    head: np.ndarray
    body_start: np.ndarray
    prompt_len: np.ndarray
    chosen_start: np.ndarray
    chosen_len: np.ndarray
    rejected_start: np.ndarray
    rejected_len: np.ndarray
    source_id: np.ndarray
    number: np.ndarray
    sources: list[tuple[str, str]]  # (name, 'line' | 'row') per source id
    report: dict = dataclasses.field(default_factory=dict)
    owner: np.ndarray | None = None  # process holding each pair's tokens; -1 (default): every process
    process_index: int = 0  # the process this object lives in
    content_id: str = ""  # what the tokens were made from (see `identity`)

    def __post_init__(self):
        if self.owner is None:
            self.owner = np.full(len(self.prompt_len), -1, np.int32)

    @classmethod
    def from_tables(
        cls, tables: Sequence, sources: Sequence[tuple[str, str]], report: dict | None = None
    ) -> TokenizedPairs:
        """Builds from pyarrow tables with prompt_ids/chosen_ids/rejected_ids/number columns."""
        import pyarrow.compute as pc

        chunks, fields, base = [], {f"{s}_{k}": [] for s in SIDES for k in ("start", "len")}, 0
        ids, numbers = [], []
        for source_id, table in enumerate(tables):
            for side in SIDES:
                column = table.column(f"{side}_ids").combine_chunks()
                values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int32)
                lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
                lengths = lengths.astype(np.int64)
                fields[f"{side}_start"].append(base + np.cumsum(lengths) - lengths)
                fields[f"{side}_len"].append(lengths)
                chunks.append(values)
                base += len(values)
            numbers.append(table.column("number").to_numpy().astype(np.int64))
            ids.append(np.full(table.num_rows, source_id, np.int32))
        cat = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in fields.items()}
        return cls(
            tokens=np.concatenate(chunks) if chunks else np.zeros(0, np.int32),
            prompt_start=cat["prompt_start"],
            head=np.zeros_like(cat["prompt_len"]),
            body_start=cat["prompt_start"],
            prompt_len=cat["prompt_len"],
            chosen_start=cat["chosen_start"],
            chosen_len=cat["chosen_len"],
            rejected_start=cat["rejected_start"],
            rejected_len=cat["rejected_len"],
            source_id=np.concatenate(ids) if ids else np.zeros(0, np.int32),
            number=np.concatenate(numbers) if numbers else np.zeros(0, np.int64),
            sources=list(sources),
            report=dict(report or {}),
        )

    def __len__(self) -> int:
        return len(self.prompt_len)

    def identity(self) -> str:
        """A hash of these pairs, the same in every process of a run and for any process count:
        `content_id` (set by the loader from the sources' cache keys and the truncation settings;
        without one, a hash of the token array) and each pair's source, record number and truncated
        lengths."""
        content = self.content_id or hashlib.sha256(np.ascontiguousarray(self.tokens).tobytes()).hexdigest()
        digest = hashlib.sha256(content.encode())
        for array in (self.source_id, self.number, self.head, self.prompt_len, self.chosen_len, self.rejected_len):
            digest.update(np.ascontiguousarray(array, np.int64).tobytes())
        return digest.hexdigest()[:16]

    def held_here(self, indices: np.ndarray) -> np.ndarray:
        """Whether this process holds the tokens of each pair in `indices`."""
        owner = self.owner[np.asarray(indices, np.int64)]
        return (owner < 0) | (owner == self.process_index)

    @property
    def lengths(self) -> np.ndarray:
        """Longest sequence of each pair: prompt + the longer completion."""
        return self.prompt_len + np.maximum(self.chosen_len, self.rejected_len)

    def location(self, i: int) -> Location:
        """The source line/row pair `i` came from (for messages)."""
        name, unit = self.sources[self.source_id[i]]
        return Location(name, unit, int(self.number[i]))

    def prompt_ids(self, i: int) -> list[int]:
        self._require_held(i)
        return self._slice(self.prompt_start[i], self.head[i]) + self._slice(
            self.body_start[i], self.prompt_len[i] - self.head[i]
        )

    def chosen_ids(self, i: int) -> list[int]:
        self._require_held(i)
        return self._slice(self.chosen_start[i], self.chosen_len[i])

    def rejected_ids(self, i: int) -> list[int]:
        self._require_held(i)
        return self._slice(self.rejected_start[i], self.rejected_len[i])

    def _require_held(self, i: int) -> None:
        if not self.held_here(np.asarray([i]))[0]:
            raise ValueError(
                f"pair {i} ({self.location(i)}) is held by process {self.owner[i]}, "
                f"not by this process {self.process_index}"
            )

    def _slice(self, start: int, length: int) -> list[int]:
        return self.tokens[start : start + length].tolist()

    def subset(self, indices: np.ndarray) -> TokenizedPairs:
        """The pairs at `indices` (the token array is shared, not copied)."""
        indices = np.asarray(indices, np.int64)
        per_pair = {f.name: getattr(self, f.name)[indices] for f in dataclasses.fields(self) if f.name not in _WHOLE}
        return TokenizedPairs(
            tokens=self.tokens,
            sources=self.sources,
            report=dict(self.report),
            process_index=self.process_index,
            content_id=self.content_id,
            **per_pair,
        )

    def truncated(self, max_length: int, max_prompt_length: int, mode: str, bos_id: int | None) -> TokenizedPairs:
        """Applies `truncation.truncate`; drops (and reports) pairs left without a completion."""
        first = (
            self.tokens[np.minimum(self.prompt_start, max(len(self.tokens) - 1, 0))]
            if len(self.tokens)
            else np.zeros(len(self), np.int32)
        )
        starts_with_bos = first == bos_id if bos_id is not None else np.zeros(len(self), bool)
        t = truncate(
            self.prompt_len, self.chosen_len, self.rejected_len, starts_with_bos, max_length, max_prompt_length, mode
        )
        out = dataclasses.replace(
            self,
            head=t.head,
            body_start=self.prompt_start + t.body_offset,
            prompt_len=t.prompt_len,
            chosen_len=t.chosen_len,
            rejected_len=t.rejected_len,
        )
        empty = np.flatnonzero(t.empty)
        report = dict(
            self.report,
            truncated_prompts=int((t.prompt_len < self.prompt_len).sum()),
            truncated_completions=int(((t.chosen_len < self.chosen_len) | (t.rejected_len < self.rejected_len)).sum()),
            dropped_empty_completion=len(empty),
            dropped_examples=[str(self.location(i)) for i in empty[:5]],
        )
        kept = out.subset(np.flatnonzero(~t.empty))
        kept.report = report
        return kept

    def gather(self, indices: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """Right-padded input ids, attention and loss masks of both sides for `indices`.

        Index -1 is a padding pair: all zeros/False. Loss masks are True on completion tokens.
        """
        indices = np.asarray(indices, np.int64)
        valid = indices >= 0
        idx = np.where(valid, indices, 0)
        elsewhere = valid & ~self.held_here(idx)
        if elsewhere.any():
            self._require_held(int(indices[elsewhere][0]))
        j = np.arange(length, dtype=np.int64)[None, :]
        prompt_len = np.where(valid, self.prompt_len[idx], 0)[:, None]
        head = self.head[idx][:, None]
        prompt_pos = np.where(j < head, self.prompt_start[idx][:, None], self.body_start[idx][:, None] + j - head)
        out = {}
        for side in ("chosen", "rejected"):
            side_len = np.where(valid, getattr(self, f"{side}_len")[idx], 0)[:, None]
            pos = np.where(j < prompt_len, prompt_pos, getattr(self, f"{side}_start")[idx][:, None] + j - prompt_len)
            if (prompt_len + side_len > length).any():
                raise ValueError(f"a {side} sequence is longer than the batch length {length}")
            real = j < prompt_len + side_len
            ids = (
                self.tokens[np.clip(pos, 0, max(len(self.tokens) - 1, 0))]
                if len(self.tokens)
                else np.zeros(pos.shape, np.int32)
            )
            out[f"{side}_input_ids"] = np.where(real, ids, 0).astype(np.int32)
            out[f"{side}_attention_mask"] = real.astype(np.int32)
            out[f"{side}_loss_mask"] = real & (j >= prompt_len)
        out["pair_index"] = indices.astype(np.int32)
        out["valid"] = valid
        return out
