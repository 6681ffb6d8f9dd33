"""Each process reads and tokenizes only its shard; shards combine into exactly the whole dataset.

The processes are simulated in one Python process: `read_shard` for every shard, then
`combine_shards` with all their summaries (what `load_pairs` exchanges with `jax.distributed`),
once per process index. The real multi-process run is in tests/test_multihost_train.py.
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_fixtures import config, tokenizer, triple, write_jsonl  # noqa: F401 (fixtures)
from sdpo_jax.data import DataError, PairBatcher, load_pairs, split_eval
from sdpo_jax.data.load import combine_shards, read_shard, truncation_id
from sdpo_jax.data.sources import read_source

VOCAB = 32000
HH = "sample:hh_rlhf/helpful-base-test.jsonl.gz"


def sharded(sources, tokenizer, config, count):
    """Every process's view of `sources` loaded as `count` processes would."""
    shards = [read_shard(sources, tokenizer, config, vocab_size=VOCAB, shard=(p, count)) for p in range(count)]
    summaries = [json.loads(json.dumps(s.summary())) for s in shards]
    fields = [s.pair_fields() for s in shards]
    return [
        combine_shards(shards[p], summaries, fields, p, sources, truncation_id(config, tokenizer.bos_token_id))
        for p in range(count)
    ]


def test_read_source_shards_partition_the_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"i": i} for i in range(11)] + [""] + [{"i": 11}])
    whole = read_source(path)
    parts = [read_source(path, shard=(p, 3)) for p in range(3)]
    assert [r.value for part in parts for r in part.records] == [r.value for r in whole.records]
    assert [len(part.records) for part in parts] == [4, 4, 4]
    assert [r.where.number for r in parts[2].lead] == list(range(1, 9))  # lines before the shard, decoded on demand
    assert parts[2].records[-1].where.number == 13 and parts[0].unit == "line"
    folder = tmp_path / "hub"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"i": i} for i in range(5)])
    hub = [read_source(str(folder), shard=(p, 2)) for p in range(2)]
    assert [(r.where.number, r.value["i"]) for part in hub for r in part.records] == [(i, i) for i in range(5)]
    assert [r.value["i"] for r in hub[1].lead] == [0, 1]
    pq.write_table(pa.table({"i": list(range(7))}), tmp_path / "d.parquet")
    table = [read_source(str(tmp_path / "d.parquet"), limit=6, sample_seed=1, shard=(p, 2)) for p in range(2)]
    whole = read_source(str(tmp_path / "d.parquet"), limit=6, sample_seed=1)
    assert [(r.where.number, r.value) for part in table for r in part.records] == [
        (r.where.number, r.value) for r in whole.records
    ]
    assert [r.value for r in table[1].lead] == [r.value for r in table[0].records]


@pytest.mark.parametrize("count", [2, 3])
def test_shards_combine_into_the_whole_dataset(tmp_path, tokenizer, config, count):
    config.skip_invalid, config.limit, config.max_length, config.max_prompt_length = True, 120, 256, 128
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"prompt": "a", "chosen": " b", "rejected": " c"}, "{oops", {"prompt": "a", "chosen": 3, "rejected": " c"}]
        * 4,
    )
    sources = [HH, bad]
    whole = load_pairs(sources, tokenizer, config, vocab_size=VOCAB)
    config.cache_dir = str(tmp_path / f"cache{count}")
    views = sharded(sources, tokenizer, config, count)
    for view in views:
        for name in ("source_id", "number", "head", "prompt_len", "chosen_len", "rejected_len"):
            assert np.array_equal(getattr(view, name), getattr(whole, name)), name
        assert view.report == whole.report and view.identity() == whole.identity()
    owner = views[0].owner
    assert sorted(set(owner.tolist())) == list(range(count))
    assert all(np.array_equal(v.owner, owner) for v in views)
    for p, view in enumerate(views):
        mine = np.flatnonzero(owner == p)
        assert len(mine) < len(whole) and all(triple(view, i) == triple(whole, i) for i in mine)
        assert view.tokens.size < whole.tokens.size  # only its own pairs' tokens
        with pytest.raises(ValueError, match=f"held by process {owner[np.flatnonzero(owner != p)[0]]}"):
            view.gather(np.flatnonzero(owner != p)[:1], 512)
    report = whole.report["sources"]
    assert report[1]["skipped"] == {"invalid JSON": 4, "wrong type": 4} and report[1]["pairs"] == 4
    assert whole.report["truncated_prompts"] + whole.report["truncated_completions"] > 0


def test_first_bad_record_is_reported_as_the_whole_file_would(tmp_path, tokenizer, config):
    text = [
        {"chosen": f"\n\nHuman: q{i}\n\nAssistant: a", "rejected": f"\n\nHuman: q{i}\n\nAssistant: b"} for i in range(6)
    ]
    chat = [
        {
            side: [{"role": "user", "content": "q"}, {"role": "assistant", "content": side}]
            for side in ("chosen", "rejected")
        }
    ] * 3
    path = write_jsonl(tmp_path / "d.jsonl", text + chat)  # shared_prefix transcripts, then conversations
    with pytest.raises(DataError) as whole:
        load_pairs([path], tokenizer, config, vocab_size=VOCAB)
    assert "line 7, field 'chosen': expected text like the first record, got list" in str(whole.value)
    config.cache_dir = str(tmp_path / "sharded")  # the third shard (lines 7-9) learns the source's kind from line 1
    with pytest.raises(DataError) as shard:
        sharded([path], tokenizer, config, 3)
    assert str(shard.value) == str(whole.value)
    config.skip_invalid = True
    assert (
        len(sharded([path], tokenizer, config, 3)[2])
        == len(load_pairs([path], tokenizer, config, vocab_size=VOCAB))
        == 6
    )


def test_errors_of_several_sources_and_other_failures_reach_every_process(tmp_path, tokenizer, config):
    good = {"prompt": "q", "chosen": " a", "rejected": " b"}
    first = write_jsonl(
        tmp_path / "a.jsonl", [good] * 3 + [{"prompt": "q", "chosen": 1, "rejected": " b"}]
    )  # line 4: shard 1
    second = write_jsonl(tmp_path / "b.jsonl", ["{oops"] + [good] * 3)  # line 1: shard 0
    with pytest.raises(DataError) as whole:
        load_pairs([first, second], tokenizer, config, vocab_size=VOCAB)
    assert f"{first} line 4" in str(whole.value)  # the first source's error, as one process reads them
    config.cache_dir = str(tmp_path / "sharded")
    with pytest.raises(DataError) as shard:
        sharded([first, second], tokenizer, config, 2)
    assert str(shard.value) == str(whole.value)
    clean = write_jsonl(tmp_path / "c.jsonl", [good] * 4)
    shards = [read_shard([clean], tokenizer, config, vocab_size=VOCAB, shard=(p, 2)) for p in range(2)]
    shards[1].error, shards[1].pairs = OSError("cache entry unreadable"), None  # not bad data: say, a broken disk
    summaries, fields = [s.summary() for s in shards], [s.pair_fields() for s in shards]
    with pytest.raises(
        RuntimeError, match=f"process 1 could not read its shard of {clean}: OSError: cache entry unreadable"
    ):
        combine_shards(shards[0], summaries, fields, 0, [clean], [])
    with pytest.raises(OSError, match="cache entry unreadable"):
        combine_shards(shards[1], summaries, fields, 1, [clean], [])


def local_batches(tmp_path, tokenizer, config, count):
    """(one-process train/eval pairs, per-process train/eval pairs) of a 90-pair hh-rlhf sample."""
    config.limit, config.max_length, config.max_prompt_length = 90, 128, 64
    whole = split_eval(load_pairs([HH], tokenizer, config, vocab_size=VOCAB), 0.2, 3)
    config.cache_dir = str(tmp_path / "sharded")
    return whole, [split_eval(view, 0.2, 3) for view in sharded([HH], tokenizer, config, count)]


def on_devices(locals_: list[dict]) -> dict:
    """The global batch from every process's local batch, as `placement.global_batch` builds it."""
    glued = {k: np.concatenate([b[k] for b in locals_]) for k in locals_[0]}
    if "source_row" in glued:
        rows = glued.pop("source_row")
        glued = {k: v[rows] for k, v in glued.items()}
    return glued


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_training_batches_from_process_local_tokens_equal_one_process(tmp_path, tokenizer, config, prefix_sharing):
    (train, _), views = local_batches(tmp_path, tokenizer, config, 4)
    one = PairBatcher(train, 8, 5, (32, 64, 128), prefix_sharing=prefix_sharing)
    many = [
        PairBatcher(view[0], 8, 5, (32, 64, 128), p, 4, prefix_sharing=prefix_sharing) for p, view in enumerate(views)
    ]
    staged = 0
    for _ in range(2 * one.steps_per_epoch):
        expected, locals_ = next(one), [next(b) for b in many]
        staged += "source_row" in locals_[0]
        got = on_devices(locals_)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert np.array_equal(got[key], value), key
    assert staged == 2 * one.steps_per_epoch


def test_unshuffled_batches_cover_every_pair_once_from_its_holder(tmp_path, tokenizer, config):
    (_, held_out), views = local_batches(tmp_path, tokenizer, config, 4)
    many = [PairBatcher(view[1], 8, 0, (32, 64, 128), p, 4, shuffle=False) for p, view in enumerate(views)]
    seen = []
    for _step in range(many[0].steps_per_epoch):
        batch = on_devices([next(b) for b in many])
        for row, i in enumerate(batch["pair_index"]):
            if i >= 0:
                seen.append(i)
                for side in ("chosen", "rejected"):
                    ids = batch[f"{side}_input_ids"][row][batch[f"{side}_attention_mask"][row] > 0].tolist()
                    assert ids == held_out.prompt_ids(i) + getattr(held_out, f"{side}_ids")(i)
    assert sorted(seen) == list(range(len(held_out)))
