"""Truncation, bucketed static shapes, shuffling, per-process slices and exact resumption."""

import json

import numpy as np
import pyarrow as pa
import pytest

from data_fixtures import config, tokenizer, triple, write_jsonl  # noqa: F401 (fixtures)
from sdpo_jax.data import PairBatcher, TokenizedPairs, default_buckets, load_pairs, resolve_buckets, split_eval
from sdpo_jax.data.truncation import truncate
from sdpo_jax.errors import ConfigError, SdpoError

BUCKETS = (16, 32, 64)


def synthetic_pairs(n=103, seed=0, max_total=64):
    rng = np.random.default_rng(seed)
    rows = {"number": list(range(n)), "prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for i in range(n):
        p = int(rng.integers(1, max_total // 2))
        c, r = (int(x) for x in rng.integers(1, max_total - p + 1, size=2))
        rows["prompt_ids"].append([1] + [1000 + i] * (p - 1))
        rows["chosen_ids"].append([2000 + i] * (c - 1) + [2])
        rows["rejected_ids"].append([3000 + i] * (r - 1) + [2])
    return TokenizedPairs.from_tables([pa.table(rows)], [("synthetic", "row")])


@pytest.fixture(scope="module")
def pairs():
    return synthetic_pairs()


def test_truncation_rules():
    t = truncate(
        np.array([10, 10, 4, 10]),
        np.array([3, 20, 3, 3]),
        np.array([3, 3, 3, 3]),
        np.array([True, True, True, False]),
        max_length=12,
        max_prompt_length=6,
        mode="keep_end",
    )
    assert t.prompt_len.tolist() == [6, 6, 4, 6]
    assert t.head.tolist() == [1, 1, 0, 0]  # BOS kept first unless there was none
    assert t.body_offset.tolist() == [5, 5, 0, 4]  # then the last 5 (or 6) prompt tokens
    assert t.chosen_len.tolist() == [3, 6, 3, 3] and not t.empty.any()
    start = truncate(np.array([10]), np.array([3]), np.array([3]), np.array([True]), 12, 6, "keep_start")
    assert (start.head.tolist(), start.body_offset.tolist()) == ([0], [0])


def test_truncated_ids_and_empty_completion_report(tmp_path, tokenizer, config):
    long_prompt = " ".join(f"w{i}" for i in range(60))
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": long_prompt, "chosen": " yes", "rejected": " no"},
            {"prompt": "short", "chosen": " " + " ".join(["a"] * 50), "rejected": " no"},
        ],
    )
    config.max_length, config.max_prompt_length = 32, 0
    pairs = load_pairs([path], tokenizer, config, vocab_size=32000)
    assert len(pairs) == 1 and pairs.report["dropped_empty_completion"] == 1
    assert pairs.report["dropped_examples"] == [f"{path} line 1"]
    prompt, chosen, _ = triple(pairs, 0)
    assert len(prompt) + len(chosen) == 32 and chosen[-1] != tokenizer.eos_token_id
    config.max_prompt_length = 8
    pairs = load_pairs([path], tokenizer, config, vocab_size=32000)
    full = tokenizer(long_prompt).input_ids
    assert triple(pairs, 0)[0] == [tokenizer.bos_token_id] + full[-7:]  # keep_end keeps BOS
    config.truncation_mode = "keep_start"
    pairs = load_pairs([path], tokenizer, config, vocab_size=32000)
    assert triple(pairs, 0)[0] == full[:8]


def test_default_buckets():
    assert default_buckets(1024) == (128, 256, 512, 1024)
    assert default_buckets(1000) == (128, 256, 512, 1000)
    assert resolve_buckets((64, 32), 64) == (32, 64)
    with pytest.raises(ConfigError, match="data.length_buckets .* reach max_length"):
        resolve_buckets((32,), 64)


def test_batches_are_bucketed_complete_and_correct(pairs):
    batcher = PairBatcher(pairs, 8, seed=3, buckets=BUCKETS)
    batches = list(batcher.epoch_batches(0))
    assert len(batches) == batcher.steps_per_epoch == 13
    assert {b["chosen_input_ids"].shape[1] for b in batches} <= set(BUCKETS)
    seen = np.concatenate([b["pair_index"][b["valid"]] for b in batches])
    assert sorted(seen.tolist()) == list(range(len(pairs)))
    assert sum((~b["valid"]).sum() for b in batches) == 13 * 8 - len(pairs)
    for b in batches:
        length = b["chosen_input_ids"].shape[1]
        longest = pairs.lengths[b["pair_index"][b["valid"]]].max()
        assert length == min(x for x in BUCKETS if x >= longest)
        for row, i in enumerate(b["pair_index"]):
            for side in ("chosen", "rejected"):
                ids, attn = b[f"{side}_input_ids"][row], b[f"{side}_attention_mask"][row]
                loss = b[f"{side}_loss_mask"][row]
                if i < 0:
                    assert not attn.any() and not loss.any()
                    continue
                prompt, completion = pairs.prompt_ids(i), getattr(pairs, f"{side}_ids")(i)
                n = len(prompt) + len(completion)
                assert ids[:n].tolist() == prompt + completion and not ids[n:].any()
                assert attn.sum() == n and loss.tolist() == [len(prompt) <= j < n for j in range(length)]
                assert b["chosen_input_ids"].dtype == np.int32 and loss.dtype == bool


def test_shuffle_is_deterministic(pairs):
    def order(seed, epoch):
        return np.concatenate(
            PairBatcher(pairs, 8, seed, BUCKETS).plan(epoch)  # noqa: E731
        ).tolist()

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    unshuffled = PairBatcher(pairs, 8, 1, BUCKETS, shuffle=False)
    assert np.array_equal(np.concatenate(unshuffled.plan(0)), np.concatenate(unshuffled.plan(5)))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_make_the_global_batch(pairs, process_count):
    whole = PairBatcher(pairs, 8, 5, BUCKETS)
    parts = [PairBatcher(pairs, 8, 5, BUCKETS, p, process_count) for p in range(process_count)]
    for _ in range(whole.steps_per_epoch + 2):
        expected, got = next(whole), [next(p) for p in parts]
        for key, value in expected.items():
            assert np.array_equal(np.concatenate([g[key] for g in got]), value), key


def test_restore_mid_epoch_yields_the_same_batches(pairs):
    straight = PairBatcher(pairs, 8, 7, BUCKETS)
    reference = [next(straight) for _ in range(30)]  # runs into the third epoch
    for stop in (5, 13, 17):
        first = PairBatcher(pairs, 8, 7, BUCKETS)
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.state()))
        resumed = PairBatcher(pairs, 8, 7, BUCKETS)
        resumed.restore(state)
        for expected in reference[stop:]:
            got = next(resumed)
            assert all(np.array_equal(got[k], v) for k, v in expected.items())
    assert straight.state()["epoch"] == 2 and straight.state()["position"] == 4


def test_restore_refuses_other_data(pairs):
    state = PairBatcher(pairs, 8, 7, BUCKETS).state()
    with pytest.raises(SdpoError, match="num_pairs"):  # (a checkpoint of a run resumed with force_resume)
        PairBatcher(pairs.subset(np.arange(50)), 8, 7, BUCKETS).restore(state)
    with pytest.raises(SdpoError, match="seed"):
        PairBatcher(pairs, 8, 8, BUCKETS).restore(state)


def test_batch_size_must_split_over_processes(pairs):
    with pytest.raises(ValueError, match="multiple of the process count"):
        PairBatcher(pairs, 6, 0, BUCKETS, 0, 4)


def test_split_eval(pairs):
    train, held = split_eval(pairs, 0.1, seed=0)
    assert len(held) == 10 and len(train) == len(pairs) - 10
    assert not set(held.number.tolist()) & set(train.number.tolist())


def test_prefix_shared_batches_hold_each_pair_once_per_row(pairs):
    batcher = PairBatcher(pairs, 8, seed=3, buckets=BUCKETS, prefix_sharing=True)
    assert batcher.buckets.tolist() == [16, 32, 64, 128]  # packed pairs exceed 64 tokens
    batches = list(batcher.epoch_batches(0))
    seen = np.concatenate([b["pair_index"][b["valid"]] for b in batches])
    assert sorted(seen.tolist()) == list(range(len(pairs)))
    for b in batches:
        real = b["pair_index"][b["valid"]]
        packed = pairs.prompt_len[real] + pairs.chosen_len[real] + pairs.rejected_len[real]
        longest = np.maximum(pairs.chosen_len[real], pairs.rejected_len[real]).max()
        assert b["input_ids"].shape[1] == min(x for x in batcher.buckets if x >= packed.max())
        assert b["chosen_index"].shape[1] == min(x for x in BUCKETS if x >= longest)
        for row, i in enumerate(b["pair_index"]):
            segments = b["segment_ids"][row]
            if i < 0:
                assert not segments.any() and not b["input_ids"][row].any()
                continue
            for side, segment in (("prompt", 1), ("chosen", 2), ("rejected", 3)):
                assert b["input_ids"][row][segments == segment].tolist() == getattr(pairs, f"{side}_ids")(i)
            labels = b["rejected_labels"][row][b["rejected_label_mask"][row]]
            assert labels.tolist() == pairs.rejected_ids(i)
    halves = [PairBatcher(pairs, 8, 3, BUCKETS, p, 2, prefix_sharing=True) for p in range(2)]
    for expected in batches[:3]:
        got = [next(h) for h in halves]
        for key, value in expected.items():
            assert np.array_equal(np.concatenate([g[key] for g in got]), value), key
    assert batcher.state()["data_id"] != PairBatcher(pairs, 8, 3, BUCKETS).state()["data_id"]
