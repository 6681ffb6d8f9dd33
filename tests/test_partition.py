"""Stage partitioning: sizes, order, determinism, every pair exactly once, and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from sdpo_jax.errors import ConfigError
from sdpo_jax.partition import chunk_sizes, plan_stages

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
