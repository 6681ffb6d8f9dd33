"""Format detection/forcing, the column map, and identical layouts across the four formats."""

import json
import re

import numpy as np
import pytest

from data_fixtures import config, tokenizer, triple, write_jsonl  # noqa: F401 (fixtures)
from sdpo_jax.data import DataError, load_pairs
from sdpo_jax.data.formats import parse_columns
from sdpo_jax.data.sources import SAMPLES_DIR

VOCAB = 32000
ORCA = f"{SAMPLES_DIR}/orca_dpo_pairs/validation-100.jsonl"


def load(path, tokenizer, config, **settings):
    for key, value in settings.items():
        config[key] = value
    return load_pairs([str(path)], tokenizer, config, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def orca_rows():
    with open(ORCA) as f:
        return [json.loads(line) for line in f][:12]


def test_four_formats_give_identical_token_layouts(tmp_path, tokenizer, config, orca_rows):
    """The same orca content: OpenAI-layout messages, orca columns (explicit column map),
    whole conversations sharing a prefix, text pre-rendered by the chat template, and the text
    path's ids pre-tokenized, all load into the same ids, masks and batches."""

    def parts(row):
        system, user = (m["content"] for m in row["input"]["messages"])
        return system, user, row["preferred_output"][0]["content"], row["non_preferred_output"][0]["content"]

    orca = [dict(zip(("sys", "q", "good", "bad"), parts(r))) for r in orca_rows]
    render = lambda r: tokenizer.apply_chat_template(  # noqa: E731
        [{"role": "system", "content": r["sys"]}, {"role": "user", "content": r["q"]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    files = {
        "openai": ORCA,
        "orca_columns": write_jsonl(
            tmp_path / "orca.jsonl",
            [{"system": r["sys"], "question": r["q"], "chosen": r["good"], "rejected": r["bad"]} for r in orca],
        ),
        "shared_prefix": write_jsonl(
            tmp_path / "shared.jsonl",
            [
                {
                    side: [
                        {"role": "system", "content": r["sys"]},
                        {"role": "user", "content": r["q"]},
                        {"role": "assistant", "content": r[key]},
                    ]
                    for side, key in (("chosen", "good"), ("rejected", "bad"))
                }
                for r in orca
            ],
        ),
        "text": write_jsonl(
            tmp_path / "text.jsonl",
            [{"prompt": render(r), "chosen": " " + r["good"], "rejected": " " + r["bad"]} for r in orca],
        ),
    }
    settings = {
        "openai": {"limit": 12},
        "orca_columns": {"columns": "question=prompt"},
        "shared_prefix": {"format": "shared_prefix"},
        "text": {"format": "text"},
    }
    loaded = {}
    for name, path in files.items():
        config.columns, config.format, config.limit = "", "auto", 0
        loaded[name] = load(path, tokenizer, config, **settings[name])
    text = loaded["text"]
    files["tokenized"] = write_jsonl(
        tmp_path / "ids.jsonl",
        [dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), triple(text, i))) for i in range(len(text))],
    )
    config.columns, config.format = "", "auto"
    loaded["tokenized"] = load(files["tokenized"], tokenizer, config)
    assert loaded["tokenized"].report["sources"][0]["format"] == "tokenized"

    reference = [triple(text, i) for i in range(len(text))]
    assert reference[0][1][-1] == tokenizer.eos_token_id
    assert reference[0][0][0] == tokenizer.bos_token_id != reference[0][0][1]  # a single BOS
    for name, pairs in loaded.items():
        assert [triple(pairs, i) for i in range(len(pairs))] == reference, name
        batch = pairs.gather(np.arange(len(pairs)), 1024)
        assert all(np.array_equal(v, text.gather(np.arange(len(text)), 1024)[k]) for k, v in batch.items()), name
        assert pairs.report["sources"][0]["boundary_merges"] == 0, name


def test_hh_transcripts_match_explicit_text(tmp_path, tokenizer, config):
    transcripts = [
        {
            "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Sky colour?\n\nAssistant: Blue.",
            "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Sky colour?\n\nAssistant: Green, mostly.",
        }
    ]
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Sky colour?\n\nAssistant:"
    shared = load(write_jsonl(tmp_path / "hh.jsonl", transcripts), tokenizer, config)
    text = load(
        write_jsonl(tmp_path / "t.jsonl", [{"prompt": prompt, "chosen": " Blue.", "rejected": " Green, mostly."}]),
        tokenizer,
        config,
    )
    assert shared.report["sources"][0]["format"] == "shared_prefix"
    assert triple(shared, 0) == triple(text, 0)
    assert tokenizer.decode(shared.chosen_ids(0)[:-1]) == "Blue."


@pytest.mark.parametrize(
    "row,fmt,layout",
    [
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, "text", None),
        (
            {
                "prompt": [{"role": "user", "content": "p"}],
                "chosen": [{"role": "assistant", "content": "c"}],
                "rejected": "r",
            },
            "conversational",
            None,
        ),
        ({"prompt": "p", "system": "", "chosen": "c", "rejected": "r"}, "conversational", None),
        ({"system": "s", "question": "q", "chosen": "c", "rejected": "r"}, "conversational", "orca_dpo_pairs"),
        (
            {
                "conversations": [{"from": "human", "value": "p"}],
                "chosen": {"from": "gpt", "value": "c"},
                "rejected": {"from": "gpt", "value": "r"},
            },
            "conversational",
            "ShareGPT",
        ),
        ({"chosen": "\n\nHuman: p\n\nAssistant: c", "rejected": "\n\nHuman: p\n\nAssistant: r"}, "shared_prefix", None),
        (
            {
                "prompt": "p",
                "prompt_id": "x",
                "messages": [],
                "score_chosen": 1.0,
                "score_rejected": 0.0,
                "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
                "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}],
            },
            "shared_prefix",
            "UltraFeedback",
        ),
        ({"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 2]}, "tokenized", None),
    ],
)
def test_detection(tmp_path, tokenizer, config, row, fmt, layout):
    pairs = load(write_jsonl(tmp_path / "d.jsonl", [row]), tokenizer, config)
    meta = pairs.report["sources"][0]
    assert (meta["format"], meta["layout"], len(pairs)) == (fmt, layout, 1)


@pytest.mark.parametrize(
    "fmt,fragment",
    [
        ("tokenized", "field 'prompt_ids': missing (required by the tokenized format)"),
        ("conversational", "field 'chosen': expected a non-empty string, got list"),
        ("shared_prefix", "field 'prompt': unexpected in the shared_prefix format"),
    ],
)
def test_forced_format_refuses_other_shapes(tmp_path, tokenizer, config, fmt, fragment):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}]
    if fmt == "conversational":
        rows = [
            {"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"},
            {"prompt": "p", "chosen": ["c"], "rejected": "r"},
        ]
        fragment = "field 'chosen[0]': expected a message object, got string"
    with pytest.raises(DataError, match=re.escape(fragment)):
        load(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, config, format=fmt)


def test_text_format_forced_on_a_system_column(tmp_path, tokenizer, config):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "system": "s", "chosen": "c", "rejected": "r"}])
    with pytest.raises(DataError, match="field 'system': unexpected in the text format"):
        load(path, tokenizer, config, format="text")


def test_whole_conversations_with_a_prompt_column_are_refused(tmp_path, tokenizer, config):
    conv = [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": conv, "rejected": conv}])
    with pytest.raises(DataError, match=r"field 'chosen\[0\]': expected assistant messages only"):
        load(path, tokenizer, config)


def test_unknown_role(tmp_path, tokenizer, config):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": [{"role": "narrator", "content": "p"}], "chosen": "c", "rejected": "r"}]
    )
    with pytest.raises(DataError, match=r"field 'prompt\[0\]': unknown role 'narrator'"):
        load(path, tokenizer, config)


def test_column_map_parsing():
    assert parse_columns("question=prompt, prompt_id=") == {"question": "prompt", "prompt_id": ""}
    assert parse_columns({"question": "prompt"}) == {"question": "prompt"}
    assert parse_columns("") == {}
    with pytest.raises(DataError, match="source=destination"):
        parse_columns("question")


def test_column_map_missing_source(tmp_path, tokenizer, config):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(DataError, match="line 1, field 'question': missing"):
        load(path, tokenizer, config, columns="question=prompt")
