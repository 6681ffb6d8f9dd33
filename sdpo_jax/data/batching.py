"""Static-shape training batches from length buckets, with an exactly resumable position.

Plan of an epoch (identical on every process, since it depends only on the pair lengths, the
seed and the epoch):
1. Shuffle all pairs with a generator seeded by (seed, epoch) (or keep their order, for eval).
2. Walk the buckets from short to long. Each bucket's pairs, in shuffled order and after the
   pairs carried over from the shorter buckets, are cut into global batches of `batch_size`;
   the remainder is carried up into the next bucket (a short pair fits a longer shape).
3. The last remainder forms one final batch padded with invalid pairs (index -1, `valid`
   False, all masks zero), so nothing is dropped and an epoch has ceil(n / batch_size) steps.
4. The batches are shuffled with the same generator.
A batch's length L is the smallest bucket holding its longest sequence, so the set of shapes is
the bucket list.

With `prefix_sharing=True` a pair is one row, prompt + chosen + rejected (sdpo_jax.prefix_sharing):
the sequence length bucketed is P + Cc + Cr (the bucket list is extended by doubling its largest
bucket when a packed pair is longer), and the completion width K of the batch is the smallest
bucket of the given list holding its longer completion, so the shapes are (L, K) pairs. A pair's
chosen and rejected are always in the same row.

Processes. Process p feeds rows [p * B/P, (p+1) * B/P) of every global batch. When every process
holds every pair's tokens (`TokenizedPairs.owner` -1) it builds exactly those rows. When each
holds only its own shard (the loader's multi-process result), the plan is the same (it needs only
lengths), and each process builds the rows of the pairs it holds: row j of the batch comes from
its holder h(j) (the padding rows from their planned process). Process p lays its rows out in
batch order in a staging block of W rows (W = B/P times the fewest whole blocks that fit the
busiest holder; the rest padding), and `source_row[j] = h(j) * W + (rank of j among h(j)'s rows)`
says where the planned row j is in the P * W staging rows; `placement.global_batch` moves
them into place on the devices. So a global batch is the same for any number of processes, and no
process touches another's tokens. Unshuffled plans (reference log-probs, evaluation) take the
pairs interleaved by holder (for one process: in order), so their batches rarely need W > B/P.

`state()` is {'epoch', 'position', ...}; `restore(state)` continues with exactly the batch an
uninterrupted run would have produced next (the process count may differ on restore).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np

from sdpo_jax.data.pairs import TokenizedPairs
from sdpo_jax.errors import ConfigError, SdpoError
from sdpo_jax.prefix_sharing import pack_pairs


def default_buckets(max_length: int) -> tuple[int, ...]:
    """Powers of two from max_length/8 up to max_length, plus max_length itself."""
    buckets = {max_length}
    size = 1
    while size < max_length:
        if size >= max_length // 8:
            buckets.add(size)
        size *= 2
    return tuple(sorted(buckets))


def resolve_buckets(length_buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
    """`data.length_buckets` (empty: `default_buckets`), checked to reach `max_length`."""
    buckets = tuple(sorted(set(int(b) for b in length_buckets))) or default_buckets(max_length)
    if buckets[0] <= 0 or buckets[-1] < max_length:
        raise ConfigError(f"data.length_buckets {buckets} must be positive and reach max_length {max_length}")
    return buckets


def interleaved_by_holder(owner: np.ndarray) -> np.ndarray:
    """All pair indices, round-robin over the processes holding them (each holder's in order):
    the first pair of each holder, then the second of each, ...; 0..n-1 when one process holds all."""
    return np.lexsort((owner, _rank_in_group(owner)))


def _rank_in_group(groups: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements share its group (0 for the first of each)."""
    order = np.argsort(groups, kind="stable")
    ranked = groups[order]
    rank = np.empty(len(groups), np.int64)
    rank[order] = np.arange(len(groups)) - np.searchsorted(ranked, ranked, side="left")
    return rank


def staging_layout(indices: np.ndarray, owner: np.ndarray, process_count: int) -> tuple[np.ndarray, int, np.ndarray]:
    """(holder of each row, staging width W, source_row) of the global batch `indices` (see the module docstring).

    The holder of a row is the process holding its pair, or for padding rows and pairs every
    process holds, the process the row is planned on.
    """
    local = len(indices) // process_count
    planned = np.arange(len(indices)) // local
    held_by = np.where(indices >= 0, owner[np.maximum(indices, 0)], -1)
    holder = np.where(held_by >= 0, held_by, planned)
    counts = np.bincount(holder, minlength=process_count)
    width = -(-int(counts.max()) // local) * local
    return holder, width, holder * width + _rank_in_group(holder)


class PairBatcher:
    """Iterator over this process's slice of bucketed global batches (see module docstring).

    ``pairs``: the tokenized pairs (sdpo_jax.data.TokenizedPairs) to batch; every process passes
    the same pairs (same lengths), holding the tokens of all of them or of its own shard only
    (``pairs.owner``); ``batch_size``: pairs per global batch (one optimizer step) over all
    processes, a positive multiple of ``process_count``; ``seed``: with the epoch, seeds the
    shuffles of an epoch's plan (unused without ``shuffle``); ``buckets``: the allowed padded
    sequence lengths, which must hold the longest pair (``resolve_buckets``; with
    ``prefix_sharing`` they are also the completion widths, and the sequence lengths are extended
    by doubling); ``process_index``, ``process_count``: this process and how many feed the batch
    (``jax.process_index()``, ``jax.process_count()``); ``shuffle``: False plans the pairs in
    order (interleaved by holder) and keeps the batches in plan order, for reference log-probs and
    evaluation; ``prefix_sharing``: True makes each pair one packed row, prompt + chosen +
    rejected (sdpo_jax.prefix_sharing), instead of a chosen row and a rejected row.
    """

    def __init__(
        self,
        pairs: TokenizedPairs,
        batch_size: int,
        seed: int,
        buckets: Sequence[int],
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
        prefix_sharing: bool = False,
    ):
        if batch_size <= 0 or batch_size % process_count:
            raise ValueError(
                f"batch size {batch_size} must be a positive multiple of the process count {process_count}"
            )
        if not len(pairs):
            raise ValueError("no pairs to batch")
        self.pairs = pairs
        self.batch_size = batch_size
        self.seed = seed
        self.completion_buckets = np.asarray(sorted(set(int(b) for b in buckets)), np.int64)
        self.shuffle = shuffle
        self.prefix_sharing = prefix_sharing
        self.local_size = batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.local_rows = slice(process_index * self.local_size, (process_index + 1) * self.local_size)
        lengths = self.row_lengths(pairs, prefix_sharing)
        self.buckets = self.completion_buckets
        while prefix_sharing and lengths.max() > self.buckets[-1]:
            self.buckets = np.append(self.buckets, 2 * self.buckets[-1])
        if lengths.max() > self.buckets[-1]:
            raise ValueError(f"a pair of {lengths.max()} tokens exceeds the largest bucket {self.buckets[-1]}")
        self.bucket_of = np.searchsorted(self.buckets, lengths)
        self.epoch, self.position = 0, 0
        self._plan_epoch, self._plan = -1, []
        self.lengths = lengths
        self._identity = hashlib.sha256(
            lengths.tobytes() + self.buckets.tobytes() + bytes([shuffle]) + (b"prefix" if prefix_sharing else b"")
        ).hexdigest()[:16]

    @staticmethod
    def row_lengths(pairs: TokenizedPairs, prefix_sharing: bool) -> np.ndarray:
        """Tokens of each pair's longest row: P + max(Cc, Cr), or P + Cc + Cr when packed."""
        if prefix_sharing:
            return pairs.prompt_len + pairs.chosen_len + pairs.rejected_len
        return pairs.lengths

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.pairs) // self.batch_size)

    def plan(self, epoch: int) -> list[np.ndarray]:
        """The global batches of `epoch` as arrays of pair indices (-1 pads the last one)."""
        if epoch == self._plan_epoch:
            return self._plan
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.pairs)
        order = rng.permutation(n) if self.shuffle else interleaved_by_holder(self.pairs.owner)
        batches, carry = [], np.zeros(0, np.int64)
        for bucket in range(len(self.buckets)):
            pool = np.concatenate([carry, order[self.bucket_of[order] == bucket]])
            full = len(pool) - len(pool) % self.batch_size
            batches.extend(pool[:full].reshape(-1, self.batch_size))
            carry = pool[full:]
        if len(carry):
            batches.append(np.concatenate([carry, np.full(self.batch_size - len(carry), -1)]))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._plan_epoch, self._plan = epoch, batches
        return batches

    def batch_length(self, indices: np.ndarray) -> int:
        """The smallest bucket that holds the longest row among `indices`."""
        real = indices[indices >= 0]
        return int(self.buckets[np.searchsorted(self.buckets, self.lengths[real].max())])

    def completion_width(self, indices: np.ndarray) -> int:
        """The smallest bucket that holds the longest completion among `indices`."""
        real = indices[indices >= 0]
        longest = np.maximum(self.pairs.chosen_len[real], self.pairs.rejected_len[real]).max()
        return int(self.completion_buckets[np.searchsorted(self.completion_buckets, longest)])

    def make_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """This process's rows of the global batch `indices`, padded to the batch's bucket(s):
        its planned rows, or its staging block plus its rows of `source_row` (module docstring)."""
        length = self.batch_length(indices)
        holder, width, source_row = staging_layout(indices, self.pairs.owner, self.process_count)
        in_place = np.array_equal(source_row, np.arange(len(indices)))
        if in_place:
            rows = indices[self.local_rows]
        else:
            mine = indices[holder == self.process_index]
            rows = np.concatenate([mine, np.full(width - len(mine), -1, np.int64)])
        plain = self.pairs.gather(rows, length)
        batch = pack_pairs(plain, length, self.completion_width(indices)) if self.prefix_sharing else plain
        if not in_place:
            batch["source_row"] = source_row[self.local_rows].astype(np.int32)
        return batch

    def epoch_batches(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """All batches of one epoch, without moving the iterator (e.g. for evaluation)."""
        for indices in self.plan(epoch):
            yield self.make_batch(indices)

    def __iter__(self) -> PairBatcher:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The next batch; runs on into the next epoch (check `epoch` to stop)."""
        batch = self.make_batch(self.plan(self.epoch)[self.position])
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state(self) -> dict:
        """JSON-able position: the next batch is batch `position` of epoch `epoch`."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_pairs": len(self.pairs),
            "data_id": self._identity,
        }

    def restore(self, state: dict) -> None:
        """Continues from `state()`; refuses a state taken with other data or settings."""
        mine = self.state()
        for key in ("seed", "batch_size", "num_pairs", "data_id"):
            if state.get(key) != mine[key]:
                raise SdpoError(f"cannot restore the data iterator: {key} was {state.get(key)!r}, now {mine[key]!r}")
        if not 0 <= state["position"] < self.steps_per_epoch:
            raise SdpoError(
                f"cannot restore the data iterator: position {state['position']} "
                f"outside an epoch of {self.steps_per_epoch} steps"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
