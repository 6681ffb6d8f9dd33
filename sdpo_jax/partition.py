"""Splitting the preference pairs into the T stage chunks of sDPO, easiest first.

Strategies (``sdpo.partition``):
  * ``datasets``: source k of ``data.train`` is stage k, in the given order (the paper's setup:
    orca_dpo_pairs, then UltraFeedback Cleaned); needs exactly T sources.
  * ``random``: a seeded permutation of all pairs cut into T chunks whose sizes follow
    ``sdpo.stage_fractions`` (equal when empty).
  * ``easy_to_hard``: every pair is scored by the SFT model with
        gamma(x, y_w, y_l) = log pi_SFT(y_w|x) - log pi_SFT(y_l|x)
    (the reference log-ratio the first stage's policy must beat) and ordered easiest first.
    ``sdpo.difficulty`` chooses the unit:
      - ``source_accuracy`` (default, the paper's rule): one source per stage, sources ordered
        by the SFT model's preference accuracy mean[gamma > 0], highest first;
      - ``pair_logratio``: pairs sorted by gamma, highest first, cut into T chunks as above;
      - ``dpo_probe``: pairs sorted by the implicit reward margin after a short DPO probe from
        the SFT model (``sdpo.probe_steps`` steps over all pairs), highest first:
            m = [log pi_probe(y_w|x) - log pi_SFT(y_w|x)] - [log pi_probe(y_l|x) - log pi_SFT(y_l|x)]
        (pairs the model learns fastest are the easy ones); the caller passes m as ``gamma``.
Every pair lands in exactly one chunk; chunks keep the pairs' original order.

Replay (``sdpo.replay_fraction`` f > 0, `with_replay`): stage t >= 2 trains on its chunk D_t plus a
seeded uniform sample of round(f |D_t|) pairs of the earlier chunks D_1 u ... u D_(t-1)
(`replay_sample`); the chunks themselves do not change.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sdpo_jax.errors import ConfigError

PARTITIONS = ("datasets", "random", "easy_to_hard")
DIFFICULTIES = ("source_accuracy", "pair_logratio", "dpo_probe")


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """The pair indices of each stage (into the combined training pairs) and their sources."""

    indices: list[np.ndarray]
    sources: list[list[str]]
    source_scores: dict[str, float] = dataclasses.field(default_factory=dict)
    replayed: list[np.ndarray] = dataclasses.field(default_factory=list)  # per stage, from `with_replay` (or none)

    def replayed_count(self, stage: int) -> int:
        """How many earlier-chunk pairs stage ``stage`` (1-based) replays."""
        return len(self.replayed[stage - 1]) if self.replayed else 0

    def training_indices(self, stage: int) -> np.ndarray:
        """Stage ``stage``'s (1-based) training pairs: its chunk and its replay sample, in the pairs' order."""
        chunk = self.indices[stage - 1]
        return np.sort(np.concatenate([chunk, self.replayed[stage - 1]])) if self.replayed else chunk


def chunk_sizes(total: int, num_stages: int, fractions=()) -> list[int]:
    """Sizes of T chunks of ``total`` items: proportional to ``fractions`` (equal if empty)."""
    weights = np.asarray(fractions if len(fractions) else [1.0] * num_stages, np.float64)
    if len(weights) != num_stages or np.any(weights <= 0):
        raise ValueError(f"sdpo.stage_fractions must hold {num_stages} positive numbers, got {tuple(fractions)}")
    bounds = np.round(np.cumsum(weights) / weights.sum() * total).astype(int)
    sizes = np.diff(np.concatenate([[0], bounds])).tolist()
    if min(sizes) < 1:
        raise ConfigError(
            f"sdpo.num_stages: {total} pairs cannot fill {num_stages} stages with fractions "
            f"{tuple(fractions) or 'equal'}"
        )
    return sizes


def _cut(order: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


def plan_stages(
    partition: str,
    num_stages: int,
    source_id: np.ndarray,
    source_names: list[str],
    seed: int = 0,
    fractions=(),
    difficulty: str = "source_accuracy",
    gamma: np.ndarray | None = None,
) -> StagePlan:
    """The stage chunks for ``partition``; easy_to_hard needs ``gamma``, the per-pair score (higher = easier).

    ``partition``: ``sdpo.partition``, one of PARTITIONS (module docstring); ``num_stages``: T,
    the number of chunks (``sdpo.num_stages``, >= 1); ``source_id``: [pairs] int, the index into
    ``source_names`` of each training pair's source (``TokenizedPairs.source_id``); its length is
    the number of pairs; ``source_names``: the names of the sources of ``data.train``, in order;
    ``seed``: seeds the permutation of ``random`` (unused otherwise); ``fractions``: the relative
    chunk sizes (``sdpo.stage_fractions``, T positive numbers; empty: equal) for ``random``,
    ``pair_logratio`` and ``dpo_probe`` (one source per stage ignores them); ``difficulty``:
    ``sdpo.difficulty``, the unit of easy_to_hard (one of DIFFICULTIES; ignored otherwise);
    ``gamma``: [pairs] float, easy_to_hard's per-pair score: the SFT log-ratio, or the probe's
    reward margin with ``dpo_probe`` (None for the other partitions).
    """
    if partition not in PARTITIONS:
        raise ValueError(f"sdpo.partition {partition!r} is not one of {PARTITIONS}")
    if num_stages < 1:
        raise ValueError(f"sdpo.num_stages must be >= 1, got {num_stages}")
    total = len(source_id)
    if partition == "random":
        order = np.random.default_rng(seed).permutation(total)
        chunks = _cut(order, chunk_sizes(total, num_stages, fractions))
        return StagePlan(chunks, [_sources_of(c, source_id, source_names) for c in chunks])
    if partition == "datasets" or difficulty == "source_accuracy":
        if len(source_names) != num_stages:
            raise ValueError(
                f"sdpo.partition={partition!r}"
                f"{' with difficulty source_accuracy' if partition == 'easy_to_hard' else ''} "
                f"puts one source per stage: data.train has {len(source_names)} sources, sdpo.num_stages is "
                f"{num_stages}"
            )
        order = list(range(len(source_names)))
        scores: dict[str, float] = {}
        if partition == "easy_to_hard":
            accuracy = [float(np.mean(gamma[source_id == k] > 0)) for k in order]
            scores = {source_names[k]: accuracy[k] for k in order}
            order = sorted(order, key=lambda k: -accuracy[k])  # stable: ties keep the listed order
        chunks = [np.flatnonzero(source_id == k) for k in order]
        return StagePlan(chunks, [[source_names[k]] for k in order], scores)
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"sdpo.difficulty {difficulty!r} is not one of {DIFFICULTIES}")
    order = np.argsort(-gamma, kind="stable")
    chunks = _cut(order, chunk_sizes(total, num_stages, fractions))
    return StagePlan(chunks, [_sources_of(c, source_id, source_names) for c in chunks])


def _sources_of(chunk: np.ndarray, source_id: np.ndarray, source_names: list[str]) -> list[str]:
    return [source_names[k] for k in np.unique(source_id[chunk])]


def replay_sample(chunks: list[np.ndarray], stage: int, fraction: float, seed: int) -> np.ndarray:
    """The earlier chunks' pairs that stage ``stage`` replays beside its own chunk (``sdpo.replay_fraction``):

        R_t = a uniform sample without replacement of k_t = floor(f |D_t| + 1/2) pairs of D_1 u ... u D_(t-1)

    (k_t is f |D_t| rounded to the nearest integer, halves up), drawn by numpy's ``default_rng`` seeded with
    (``seed``, t), so every rerun and resume plans the same sample; returned sorted. Stage 1, or f = 0,
    replays nothing. R_t never meets D_t (the chunks are disjoint).

    ``chunks``: the stage chunks D_1..D_T (`StagePlan.indices`, pair indices); ``stage``: t, 1-based;
    ``fraction``: f in [0, 1), the stage's ``sdpo.replay_fraction``; ``seed``: ``train.seed``.
    Raises ConfigError when the earlier chunks hold fewer than k_t pairs (nothing is clipped).
    """
    earlier = np.sort(np.concatenate(chunks[: stage - 1])) if stage > 1 else np.zeros(0, np.int64)
    own = len(chunks[stage - 1])
    wanted = int(np.floor(fraction * own + 0.5)) if stage > 1 else 0
    if wanted > len(earlier):
        raise ConfigError(
            f"sdpo.replay_fraction: stage {stage} replays {fraction:g} x its {own} pairs = {wanted} pairs, but "
            f"the chunks of {earlier_stages(stage)} hold only {len(earlier)}"
        )
    picks = np.random.default_rng([seed, stage]).choice(len(earlier), size=wanted, replace=False)
    return np.sort(earlier[picks])


def with_replay(plan: StagePlan, fractions: list[float], seed: int) -> StagePlan:
    """``plan`` with every stage's replay sample (`replay_sample`; ``fractions``: each stage's
    ``sdpo.replay_fraction``, stage 1 first; ``seed``: ``train.seed``)."""
    replayed = [replay_sample(plan.indices, t, f, seed) for t, f in enumerate(fractions, start=1)]
    return dataclasses.replace(plan, replayed=replayed)


def earlier_stages(stage: int) -> str:
    """The stages a replay of stage ``stage`` draws from, for messages: 'stage 1', 'stages 1-2', ..."""
    return "stage 1" if stage == 2 else f"stages 1-{stage - 1}"
