"""Every bad input is refused with a one-line error naming file, line/row and field."""

import json
import logging

import pytest

from data_fixtures import config, tokenizer, write_jsonl  # noqa: F401 (fixtures)
from sdpo_jax.data import DataError, exit_on_data_error, load_pairs
from sdpo_jax.data.load import source_lines

GOOD = {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"}
VOCAB = 32000


def refuse(path, tokenizer, config, *fragments):
    with pytest.raises(DataError) as info:
        load_pairs([str(path)], tokenizer, config, vocab_size=VOCAB)
    message = str(info.value)
    assert message.startswith("data error: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


def with_bad_line(tmp_path, bad, n_good=3):
    rows = [GOOD] * n_good + [bad]
    return write_jsonl(tmp_path / "d.jsonl", rows)


def test_missing_field(tmp_path, tokenizer, config):
    path = with_bad_line(tmp_path, {"prompt": "p", "chosen": "c"})
    refuse(path, tokenizer, config, "d.jsonl line 4", "field 'rejected'", "missing")


def test_extra_field_refused_unless_ignored(tmp_path, tokenizer, config):
    path = with_bad_line(tmp_path, dict(GOOD, score=3))
    refuse(path, tokenizer, config, "line 4", "field 'score'", "unexpected")
    config.extra_fields = "ignore"
    assert len(load_pairs([path], tokenizer, config, vocab_size=VOCAB)) == 4


def test_wrong_type(tmp_path, tokenizer, config):
    path = with_bad_line(tmp_path, dict(GOOD, chosen=7))
    refuse(path, tokenizer, config, "line 4, field 'chosen': expected a non-empty string, got int")


def test_empty_string(tmp_path, tokenizer, config):
    path = with_bad_line(tmp_path, dict(GOOD, rejected="  "))
    refuse(path, tokenizer, config, "line 4, field 'rejected'", "empty string")


def test_invalid_json_line(tmp_path, tokenizer, config):
    path = with_bad_line(tmp_path, '{"prompt": "p", "chosen": ')
    refuse(path, tokenizer, config, "line 4", "invalid JSON")


def test_non_utf8_bytes(tmp_path, tokenizer, config):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    refuse(path, tokenizer, config, "line 2", "invalid UTF-8 byte 0xe9")


def test_non_utf8_in_json_list(tmp_path, tokenizer, config):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"prompt": "\xff"}\n]')
    refuse(path, tokenizer, config, "d.json line 2", "invalid UTF-8")


@pytest.mark.parametrize(
    "ids,detail", [([5, 32000], "token id 32000 is outside the vocabulary"), ([5, -1], "token id -1 is negative")]
)
def test_token_ids_out_of_range(tmp_path, tokenizer, config, ids, detail):
    row = {"prompt_ids": [1, 5], "chosen_ids": [7, 2], "rejected_ids": ids}
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt_ids": [1], "chosen_ids": [3], "rejected_ids": [4]}, row])
    refuse(path, tokenizer, config, "line 2, field 'rejected_ids'", detail)


def test_tokenizer_ids_beyond_model_vocab(tmp_path, tokenizer, config):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(
        DataError,
        match=r"line 1, field 'prompt': token id \d+ is outside the "
        r"vocabulary \(size 100\)",
    ):
        load_pairs([path], tokenizer, config, vocab_size=100)


def test_token_ids_wrong_type(tmp_path, tokenizer, config):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt_ids": [1], "chosen_ids": [3.5], "rejected_ids": [4]}])
    refuse(path, tokenizer, config, "line 1, field 'chosen_ids'", "integer token ids, got float")


def test_empty_file(tmp_path, tokenizer, config):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n \n")
    refuse(path, tokenizer, config, "empty.jsonl: file is empty")


def test_missing_file(tmp_path, tokenizer, config):
    refuse(tmp_path / "nope.jsonl", tokenizer, config, "nope.jsonl: file not found")


def test_parquet_rows_are_located(tmp_path, tokenizer, config):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "chosen": [" c", ""], "rejected": [" d", " e"]}), path)
    refuse(path, tokenizer, config, "d.parquet row 1, field 'chosen'")


def test_skip_invalid_counts_per_reason(tmp_path, tokenizer, config, caplog):
    rows = [GOOD, "{oops", dict(GOOD, chosen=""), dict(GOOD, chosen=""), {"prompt": "p"}, dict(GOOD, extra=1), GOOD]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    config.skip_invalid = True
    with caplog.at_level(logging.WARNING, "sdpo_jax.data"):
        pairs = load_pairs([path], tokenizer, config, vocab_size=VOCAB)
    assert len(pairs) == 2
    assert pairs.report["sources"][0]["skipped"] == {
        "invalid JSON": 1,
        "empty string": 2,
        "missing field": 1,
        "extra field": 1,
    }
    assert "skipped 2 invalid record(s): empty string, first: " in caplog.text
    info, warnings = source_lines(pairs.report["sources"][0])  # the start-up summary's lines
    assert info.endswith("d.jsonl: 2 pairs, text format")
    assert warnings[0].endswith(
        "d.jsonl: skipped 2 invalid record(s): empty string, first: "
        f"{path} line 3, field 'chosen': expected a non-empty string, got an empty string"
    )
    assert [w.split(": skipped ")[1].split(" invalid")[0] for w in warnings] == ["2", "1", "1", "1"]  # most first


def test_no_valid_pairs_names_the_commonest_reason_and_where(tmp_path, tokenizer, config):
    rows = [dict(GOOD, chosen=""), {"prompt": "p"}, dict(GOOD, chosen=""), dict(GOOD, rejected="")]
    config.skip_invalid = True
    refuse(
        write_jsonl(tmp_path / "d.jsonl", rows),
        tokenizer,
        config,
        "d.jsonl: no valid pairs (4 skipped; most for empty string: 3, first: ",
        "d.jsonl line 1, field 'chosen'",
    )


def test_identical_pairs_warned(tmp_path, tokenizer, config, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, dict(GOOD, rejected=" 4"), dict(GOOD)])
    with caplog.at_level(logging.WARNING, "sdpo_jax.data"):
        pairs = load_pairs([path], tokenizer, config, vocab_size=VOCAB)
    assert len(pairs) == 3 and pairs.report["sources"][0]["identical"] == 1
    assert "1 pair(s) have identical chosen and rejected" in caplog.text


def test_cli_helper_exits_2(capsys):
    with pytest.raises(SystemExit) as info, exit_on_data_error():
        raise DataError("f.jsonl", "file is empty")
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == "data error: f.jsonl: file is empty"


def test_bad_setting(tmp_path, tokenizer, config):
    config.format = "csv"
    with pytest.raises(DataError, match="data.format"):
        load_pairs([with_bad_line(tmp_path, GOOD)], tokenizer, config, vocab_size=VOCAB)
