"""The prompt/completion boundary, EOS handling, shipped samples, the cache and num_proc."""

import numpy as np
import pytest

from data_fixtures import config, gpt2_tokenizer, make_model_dir, tokenizer, triple, write_jsonl  # noqa: F401
from sdpo_jax.data import DataError, load_pairs

VOCAB = 32000
SAMPLES = {
    "sample:hh_rlhf/helpful-base-test.jsonl.gz": ("shared_prefix", None, 2341),
    "sample:orca_dpo_pairs/validation-100.jsonl": ("conversational", "OpenAI DPO", 100),
    "sample:llamafactory_dpo_en_demo/dpo_en_demo-60.json": ("conversational", "ShareGPT", 60),
}


def test_completion_is_exactly_the_response(tmp_path, tokenizer, config):
    row = {"prompt": "Say two blank lines then hi.", "chosen": "\n\nhi", "rejected": " no"}
    pairs = load_pairs([write_jsonl(tmp_path / "d.jsonl", [row])], tokenizer, config, vocab_size=VOCAB)
    prompt, chosen, rejected = triple(pairs, 0)
    assert prompt == tokenizer(row["prompt"]).input_ids  # as at generation time, with BOS
    # Tokenized alone, "\n\nhi" would start with SentencePiece's dummy "▁" (29871).
    assert tokenizer("\n\nhi", add_special_tokens=False).input_ids[0] == 29871
    assert chosen == [13, 13, 2918, tokenizer.eos_token_id]
    assert tokenizer.convert_ids_to_tokens(rejected) == ["▁no", "</s>"]


def test_chat_completion_keeps_single_eos(tmp_path, tokenizer, config):
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "yo", "rejected": "hey"}
    pairs = load_pairs([write_jsonl(tmp_path / "d.jsonl", [row])], tokenizer, config, vocab_size=VOCAB)
    prompt, chosen, _ = triple(pairs, 0)
    rendered = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    assert prompt == tokenizer(rendered, add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(chosen) == ["▁yo", "</s>"]


def test_boundary_merges_are_counted(tmp_path, gpt2_tokenizer, config):
    rows = [
        {"prompt": "Answer: ", "chosen": "Sure", "rejected": "No"},
        {"prompt": "Answer:", "chosen": " Sure", "rejected": " No"},
    ]
    pairs = load_pairs(
        [write_jsonl(tmp_path / "d.jsonl", rows)], gpt2_tokenizer, config, vocab_size=len(gpt2_tokenizer)
    )
    assert pairs.report["sources"][0]["boundary_merges"] == 2  # both completions of row 0
    prompt, chosen, _ = triple(pairs, 0)
    assert gpt2_tokenizer.decode(prompt + chosen[:-1]) == "Answer: Sure"
    assert chosen[-1] == gpt2_tokenizer.eos_token_id


def test_conversational_needs_a_chat_template(tmp_path, gpt2_tokenizer, config):
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "yo", "rejected": "hey"}
    with pytest.raises(DataError, match="needs a chat template"):
        load_pairs([write_jsonl(tmp_path / "d.jsonl", [row])], gpt2_tokenizer, config, vocab_size=len(gpt2_tokenizer))


@pytest.mark.parametrize("source", sorted(SAMPLES))
def test_shipped_samples_load(source, tokenizer, config):
    config.skip_invalid = True
    pairs = load_pairs([source], tokenizer, config, vocab_size=VOCAB)
    meta = pairs.report["sources"][0]
    assert (meta["format"], meta["layout"], meta["pairs"]) == SAMPLES[source]
    assert len(pairs) == meta["pairs"] and pairs.lengths.max() <= config.max_length
    finished = [i for i in range(len(pairs)) if pairs.chosen_len[i] < config.max_length - 600]
    assert all(pairs.chosen_ids(i)[-1] == tokenizer.eos_token_id for i in finished)
    if source.startswith("sample:hh"):
        assert meta["skipped"] == {"no shared prompt": 9, "empty string": 4}
        assert meta["identical"] == 2


def test_hh_sample_refused_without_skip_invalid(tokenizer, config):
    with pytest.raises(DataError, match="line 121, field 'rejected': empty completion"):
        load_pairs(["sample:hh_rlhf/helpful-base-test.jsonl.gz"], tokenizer, config, vocab_size=VOCAB)


def test_second_load_hits_the_cache(tmp_path, tokenizer, config, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "chosen": " a", "rejected": " b"} for i in range(20)])
    first = load_pairs([path], tokenizer, config, vocab_size=VOCAB)
    import sdpo_jax.data.load as load_module

    def fail(*args):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(load_module, "_tokenize_source", fail)
    second = load_pairs([path], tokenizer, config, vocab_size=VOCAB)
    assert second.report["sources"][0]["from_cache"]
    assert not first.report["sources"][0]["from_cache"]
    assert np.array_equal(first.tokens, second.tokens)
    config.max_length = 64  # truncation is applied after the cache: still a hit
    load_pairs([path], tokenizer, config, vocab_size=VOCAB)
    with pytest.raises(AssertionError, match="tokenized again"):  # other settings: a miss
        config.columns = "q=x"
        load_pairs([path], tokenizer, config, vocab_size=VOCAB)


def test_cache_keyed_by_tokenizer(tmp_path, config):
    from transformers import AutoTokenizer

    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}]
    )
    loaded = []
    for template in (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
    ):
        tok = AutoTokenizer.from_pretrained(make_model_dir(tmp_path / str(len(loaded)), chat_template=template))
        loaded.append(load_pairs([path], tok, config, vocab_size=VOCAB))
    assert not loaded[1].report["sources"][0]["from_cache"]
    assert triple(loaded[0], 0) != triple(loaded[1], 0)


def test_parallel_tokenization_matches_serial(tokenizer, config, tmp_path, recwarn):
    """Workers give the same pairs, and are spawned, not forked: JAX's threads are running by then
    (a fork would warn "os.fork() ... JAX is multithreaded ... deadlock")."""
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()  # JAX's runtime threads are up, as in sdpo-train
    config.skip_invalid, config.limit = True, 600
    serial = load_pairs(["sample:hh_rlhf/helpful-base-test.jsonl.gz"], tokenizer, config, vocab_size=VOCAB)
    config.num_proc, config.cache_dir = 2, str(tmp_path / "cache2")
    parallel = load_pairs(["sample:hh_rlhf/helpful-base-test.jsonl.gz"], tokenizer, config, vocab_size=VOCAB)
    assert len(serial) == len(parallel) > 500
    assert all(triple(serial, i) == triple(parallel, i) for i in range(len(serial)))
    assert not [w for w in recwarn if "os.fork()" in str(w.message)]


def test_local_dataset_folder_as_hub_name(tmp_path, tokenizer, config):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "p", "chosen": " c", "rejected": " r"}] * 3)
    write_jsonl(folder / "test.jsonl", [{"prompt": "p", "chosen": " c", "rejected": " r"}] * 2)
    assert len(load_pairs([str(folder)], tokenizer, config, vocab_size=VOCAB)) == 3
    assert len(load_pairs([f"{folder}@test"], tokenizer, config, vocab_size=VOCAB)) == 2
    with pytest.raises(DataError, match="cannot load dataset split 'nope'"):
        load_pairs([f"{folder}@nope"], tokenizer, config, vocab_size=VOCAB)


def test_the_data_cache_defaults_to_sdpo_jax_cache(tokenizer, config, tmp_path, monkeypatch):
    """With data.cache_dir = '' tokenized sources go under $SDPO_JAX_CACHE/data, like every other cache."""
    monkeypatch.setenv("SDPO_JAX_CACHE", str(tmp_path / "everything"))
    config.cache_dir, config.limit = "", 8
    load_pairs(["sample:hh_rlhf/helpful-base-test.jsonl.gz"], tokenizer, config, vocab_size=VOCAB)
    assert any((tmp_path / "everything" / "data").iterdir())
