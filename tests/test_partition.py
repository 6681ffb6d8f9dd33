"""Stage partitioning: sizes, order, determinism, every pair exactly once, refusals, and replay samples."""

from __future__ import annotations

import numpy as np
import pytest

from sdpo_jax.errors import ConfigError
from sdpo_jax.partition import chunk_sizes, plan_stages, replay_sample, with_replay

SOURCES = ["orca", "hh"]
SOURCE_ID = np.array([0] * 6 + [1] * 9)


def _assert_exact_cover(plan, total):
    joined = np.concatenate(plan.indices)
    assert sorted(joined.tolist()) == list(range(total))


def test_datasets_partition_keeps_the_listed_order():
    plan = plan_stages("datasets", 2, SOURCE_ID, SOURCES)
    assert plan.sources == [["orca"], ["hh"]]
    assert plan.indices[0].tolist() == list(range(6)) and plan.indices[1].tolist() == list(range(6, 15))


def test_random_partition_sizes_and_determinism():
    a = plan_stages("random", 3, SOURCE_ID, SOURCES, seed=1, fractions=(1, 1, 2))
    b = plan_stages("random", 3, SOURCE_ID, SOURCES, seed=1, fractions=(1, 1, 2))
    c = plan_stages("random", 3, SOURCE_ID, SOURCES, seed=2, fractions=(1, 1, 2))
    assert [len(i) for i in a.indices] == [4, 4, 7]
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices))
    assert not all(np.array_equal(x, y) for x, y in zip(a.indices, c.indices))
    _assert_exact_cover(a, 15)
    assert chunk_sizes(10, 3) == [3, 4, 3]


def test_easy_to_hard_by_source_accuracy_orders_sources():
    gamma = np.concatenate([np.array([-1.0, -2, 1, -3, -1, 2]), np.ones(9)])  # orca 2/6 right, hh 9/9
    plan = plan_stages("easy_to_hard", 2, SOURCE_ID, SOURCES, gamma=gamma)
    assert plan.sources == [["hh"], ["orca"]]
    assert plan.source_scores == pytest.approx({"orca": 2 / 6, "hh": 1.0})


def test_easy_to_hard_by_pair_logratio_puts_high_gamma_first():
    gamma = np.linspace(-5, 5, 15)
    plan = plan_stages("easy_to_hard", 3, SOURCE_ID, SOURCES, difficulty="pair_logratio", gamma=gamma)
    _assert_exact_cover(plan, 15)
    assert min(gamma[plan.indices[0]]) > max(gamma[plan.indices[1]]) > max(gamma[plan.indices[2]]) - 10
    assert min(gamma[plan.indices[1]]) > max(gamma[plan.indices[2]])


def test_single_stage_is_plain_dpo_over_everything():
    plan = plan_stages("random", 1, SOURCE_ID, SOURCES)
    assert plan.indices[0].tolist() == list(range(15))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [  # (the config check rules out all but too few pairs)
        (
            dict(partition="datasets", num_stages=3),
            ValueError,
            "one source per stage: data.train has 2 sources, sdpo.num_stages is 3",
        ),
        (dict(partition="weird", num_stages=2), ValueError, "sdpo.partition 'weird'"),
        (dict(partition="random", num_stages=2, fractions=(1, 2, 3)), ValueError, "stage_fractions must hold 2"),
        (dict(partition="random", num_stages=20), ConfigError, "^sdpo.num_stages: 15 pairs cannot fill 20 stages"),
    ],
)
def test_bad_partitions_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        plan_stages(source_id=SOURCE_ID, source_names=SOURCES, gamma=np.zeros(15), **kwargs)


def test_replay_samples_earlier_chunks_only_with_the_asked_size_and_seed():
    chunks = plan_stages("random", 3, np.zeros(40, int), ["all"], seed=3, fractions=(1, 1, 2)).indices  # 10, 10, 20
    second, third = replay_sample(chunks, 2, 0.5, seed=7), replay_sample(chunks, 3, 0.25, seed=7)
    assert (len(second), len(third)) == (5, 5)  # round(0.5 x 10), round(0.25 x 20)
    assert set(second) <= set(chunks[0]) and len(set(second)) == 5 and list(second) == sorted(second)
    assert set(third) <= set(chunks[0]) | set(chunks[1]) and not set(third) & set(chunks[2])
    assert np.array_equal(third, replay_sample(chunks, 3, 0.25, seed=7))
    assert not np.array_equal(third, replay_sample(chunks, 3, 0.25, seed=8))
    assert len(replay_sample(chunks, 2, 0.25, seed=0)) == 3 and len(replay_sample(chunks, 2, 0.24, seed=0)) == 2
    assert len(replay_sample(chunks, 1, 0.5, seed=0)) == 0 and len(replay_sample(chunks, 3, 0.0, seed=0)) == 0
    # every earlier pair is drawn with the same chance: over many seeds, stage 3 takes D_1 and D_2 alike
    drawn = np.concatenate([replay_sample(chunks, 3, 0.5, seed=s) for s in range(400)])
    from_first = np.isin(drawn, chunks[0]).mean()
    assert 0.45 < from_first < 0.55


def test_too_few_earlier_pairs_for_the_replay_is_one_line_naming_the_field_and_counts():
    chunks = plan_stages("random", 2, np.zeros(30, int), ["all"], fractions=(1, 2)).indices  # 10, 20
    message = (
        r"^sdpo.replay_fraction: stage 2 replays 0.6 x its 20 pairs = 12 pairs, but the chunks of stage 1 hold only 10$"
    )
    with pytest.raises(ConfigError, match=message):
        replay_sample(chunks, 2, 0.6, seed=0)
    with pytest.raises(
        ConfigError, match=r"stage 3 replays 0.9 x its 20 pairs = 18 pairs, but the chunks of stages 1-2 hold"
    ):
        replay_sample(plan_stages("random", 3, np.zeros(30, int), ["all"], fractions=(1, 1, 4)).indices, 3, 0.9, 0)


def test_a_plan_with_replay_trains_each_stage_on_its_chunk_and_its_sample():
    plan = with_replay(plan_stages("datasets", 2, SOURCE_ID, SOURCES), [0.5, 0.5], seed=0)
    assert [plan.replayed_count(t) for t in (1, 2)] == [0, 5]  # stage 1: nothing earlier; 0.5 x 9 = 4.5, halves up
    second = plan.training_indices(2)
    assert len(second) == 9 + 5 and set(range(6, 15)) <= set(second) and list(second) == sorted(second)
    assert np.array_equal(plan.training_indices(1), plan.indices[0])
    assert np.array_equal(plan_stages("datasets", 2, SOURCE_ID, SOURCES).training_indices(2), plan.indices[1])
