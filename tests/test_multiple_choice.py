"""Multiple-choice eval: file layouts, log-likelihoods against transformers, the real SmolLM2, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from data_paths import ARC_EASY, OPENBOOKQA
from hf_fixtures import load_torch_model, make_chat_checkpoint, make_hf_checkpoint
from sdpo_jax.checkpoint.hf_import import load_hf_checkpoint
from sdpo_jax.choice_eval import (
    choice_loglikelihoods,
    choice_step,
    encode_choices,
    evaluate_choices,
    load_choice_questions,
)
from sdpo_jax.choice_eval.questions import ChoiceQuestion
from sdpo_jax.choice_eval.score import choice_metrics
from sdpo_jax.cli.choices import main as choices_main
from sdpo_jax.data.errors import DataError, Location
from sdpo_jax.models import LlamaForCausalLM

ARC, OBQA = ARC_EASY, OPENBOOKQA


# ---- reading -------------------------------------------------------------------------------


def test_shipped_arc_easy_parses_every_row():
    raw = json.loads(ARC.read_text())
    questions = load_choice_questions(str(ARC))
    assert len(questions) == len(raw) == 570
    for row, q in zip(raw, questions):
        assert q.question == row["question"] and list(q.choices) == row["choices"]["text"]
        assert row["choices"]["label"][q.answer] == row["answerKey"]
    assert {row["answerKey"] for row in raw} & {"1", "2", "3", "4"}  # the numeric labels are really there
    assert load_choice_questions(str(ARC), limit=7) == questions[:7]


def test_shipped_openbookqa_parses_every_row():
    raw = [json.loads(line) for line in OBQA.read_text().splitlines()]
    questions = load_choice_questions(str(OBQA))
    assert len(questions) == len(raw) == 500
    for number, (row, q) in enumerate(zip(raw, questions), start=1):
        assert q.question == row["question"]["stem"] and q.where.number == number
        assert [c["text"] for c in row["question"]["choices"]] == list(q.choices)
        assert row["question"]["choices"][q.answer]["label"] == row["answerKey"]


def test_generic_layout_takes_index_or_letter(tmp_path):
    path = tmp_path / "generic.jsonl"
    path.write_text(
        '{"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1}\n\n'
        '{"question": "Sky?", "choices": ["green", "red", "blue"], "answer": "C"}\n'
    )
    first, second = load_choice_questions(str(path))
    assert (first.choices, first.answer, second.answer, second.where.number) == (("3", "4", "5"), 1, 2, 3)


GOOD_GENERIC = {"question": "Which?", "choices": ["a", "b", "c"], "answer": 0}
GOOD_ARC = {"id": "x", "question": "Which?", "choices": {"text": ["a", "b"], "label": ["1", "2"]}, "answerKey": "2"}
GOOD_OBQA = {
    "id": "y",
    "question": {"stem": "Which?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]},
    "answerKey": "A",
}


@pytest.mark.parametrize(
    "bad, field, detail",
    [
        ({**GOOD_ARC, "answerKey": "E"}, "answerKey", "answer label 'E' is not among the choice labels 1, 2"),
        ({**GOOD_ARC, "choices": {"text": ["a", "b"], "label": ["A"]}}, "choices.label", "2 texts but 1 labels"),
        ({**GOOD_ARC, "choices": {"text": ["a", ""], "label": ["A", "B"]}}, "choices.text[1]", "empty string"),
        (
            {**GOOD_OBQA, "question": {"stem": "Q", "choices": [{"text": "a", "label": "A"}, {"text": "b"}]}},
            "question.choices[1].label",
            "missing",
        ),
        ({**GOOD_OBQA, "question": {"choices": []}}, "question.stem", "missing"),
        ({**GOOD_GENERIC, "answer": 3}, "answer", "answer index 3 is outside 0..2"),
        ({**GOOD_GENERIC, "answer": "D"}, "answer", "not among the choice labels A, B, C"),
        ({**GOOD_GENERIC, "choices": "a, b"}, "choices", "expected a list of choice texts, got string"),
        ({**GOOD_GENERIC, "choices": ["only one"]}, "choices", "expected at least 2 choices, got 1"),
        ({"question": "Which?", "choices": ["a", "b"]}, "answer", "expected 'answer' (generic layout) or 'answerKey'"),
    ],
)
def test_bad_rows_name_line_and_field(tmp_path, bad, field, detail):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in (GOOD_ARC, GOOD_OBQA, bad, GOOD_GENERIC)))
    with pytest.raises(DataError) as caught:
        load_choice_questions(str(path))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"data error: {path} line 3, field '{field}': ") and detail in message, message


def test_bad_json_list_row_names_row_and_invalid_json_names_line(tmp_path):
    listed = tmp_path / "arc.json"
    listed.write_text(json.dumps([GOOD_ARC, {**GOOD_ARC, "answerKey": 2}]))
    with pytest.raises(
        DataError, match=r"arc\.json row 1, field 'answerKey': expected a choice label \(string\), got int"
    ):
        load_choice_questions(str(listed))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(GOOD_GENERIC) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl line 2: invalid JSON"):
        load_choice_questions(str(broken))


# ---- log-likelihoods against transformers --------------------------------------------------


def _torch_choice_scores(folder, tokenizer, questions, chat_template: bool) -> tuple[np.ndarray, np.ndarray]:
    """(sum of continuation log-probs, characters of the choice text) per (question, choice), unpacked, with torch.

    The boundary by lm-eval's rule, independently of ours: trailing whitespace of the context
    moves to the continuation, the context is tokenized alone, and the continuation's tokens are
    the tail of context + continuation tokenized together.
    """
    model = load_torch_model(folder)
    scores, lengths = [], []
    for q in questions:
        if chat_template:
            context = tokenizer.apply_chat_template(
                [{"role": "user", "content": q.question}], tokenize=False, add_generation_prompt=True
            )
            continuations, special = list(q.choices), False
        else:
            context, continuations, special = f"Question: {q.question}\nAnswer:", [" " + c for c in q.choices], True
        stripped = context.rstrip()
        context_ids = tokenizer(stripped, add_special_tokens=special)["input_ids"]
        for choice, continuation in zip(q.choices, continuations):
            ids = tokenizer(context + continuation, add_special_tokens=special)["input_ids"]
            assert ids[: len(context_ids)] == context_ids
            with torch.no_grad():
                logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
            scores.append(sum(logps[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids))))
            lengths.append(len(choice))  # lm-eval's completion_len: the choice without the joining space
    return np.asarray(scores), np.asarray(lengths)


def _numpy_accuracies(questions, scores, lengths) -> tuple[float, float]:
    hits, norm_hits, row = [], [], 0
    for q in questions:
        n = len(q.choices)
        hits.append(int(np.argmax(scores[row : row + n])) == q.answer)
        norm_hits.append(int(np.argmax(scores[row : row + n] / lengths[row : row + n])) == q.answer)
        row += n
    return float(np.mean(hits)), float(np.mean(norm_hits))


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("choices") / "llama2_chat")


@pytest.fixture(scope="module")
def window_model(tmp_path_factory):
    """Mistral with a 5-token sliding window: the packed mask must keep the window by position."""
    return make_hf_checkpoint("mistral", tmp_path_factory.mktemp("choices") / "mistral", vocab_size=32000)


def _questions():
    """ARC rows (one with 5 choices, one with 3) and OpenBookQA rows: uneven choice counts and lengths."""
    arc = load_choice_questions(str(ARC))
    return (
        [arc[i] for i in (0, 1, 2, 3, 4)]
        + [q for q in arc if len(q.choices) != 4]
        + load_choice_questions(str(OBQA), limit=3)
    )


@pytest.mark.parametrize("family, chat_template", [("llama2", False), ("llama2", True), ("mistral", False)])
def test_loglikelihoods_match_transformers(chat_model, window_model, family, chat_template):
    folder = chat_model if family == "llama2" else window_model
    config, params = load_hf_checkpoint(folder)
    model = LlamaForCausalLM(config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    questions = _questions()
    encoded = encode_choices(
        tokenizer, questions, vocab_size=config.vocab_size, max_length=512, chat_template=chat_template
    )
    ours = choice_loglikelihoods(
        choice_step(model, chunk_size=8), params, encoded, batch_size=4
    )  # 3 batches, padding rows
    expected, lengths = _torch_choice_scores(folder, tokenizer, questions, chat_template)
    # The test template's generation prompt ends in a space, which SentencePiece joins to the choice.
    assert encoded.boundary_merges == (len(expected) if chat_template else 0) and encoded.truncated == 0
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=2e-4)
    assert np.ptp(expected) > 10  # the scores really differ between rows

    metrics = evaluate_choices(model, params, tokenizer, questions, batch_size=4, chat_template=chat_template)
    acc, acc_norm = _numpy_accuracies(questions, expected, lengths)
    assert (metrics["acc"], metrics["acc_norm"]) == (acc, acc_norm)
    assert (metrics["num_questions"], metrics["num_rows"]) == (len(questions), len(expected))


def test_acc_norm_divides_by_the_choice_characters_without_the_space(chat_model):
    """lm-eval's acc_norm: ll / len(choice). With the joining space counted ('a' 2, 'bbbb' 5) the other
    choice would win: -2/2 = -1.0 > -6/5 = -1.2, but -2/1 = -2.0 < -6/4 = -1.5."""
    question = ChoiceQuestion("Which?", ("a", "bbbb"), 1, Location("q.jsonl", "line", 1))
    encoded = encode_choices(
        transformers.AutoTokenizer.from_pretrained(chat_model), [question], vocab_size=32000, max_length=64
    )
    assert encoded.choice_lengths.tolist() == [1, 4]
    metrics = choice_metrics(encoded, np.array([-2.0, -6.0]))
    assert (metrics["acc"], metrics["acc_norm"]) == (0.0, 1.0)


MESH_SCRIPT = """
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import optax, transformers
from sdpo_jax.checkpoint.hf_import import load_hf_checkpoint
from sdpo_jax.choice_eval import choice_loglikelihoods, choice_step, encode_choices, load_choice_questions
from sdpo_jax.models import LlamaForCausalLM
from sdpo_jax.placement import place, state_shardings
from sdpo_jax.sharding import build_mesh
folder, data = sys.argv[1:]
config, params = load_hf_checkpoint(folder)
model = LlamaForCausalLM(config)
mesh = build_mesh(data=2, tensor=2)
shardings, _ = state_shardings(model, optax.identity(), mesh)
encoded = encode_choices(transformers.AutoTokenizer.from_pretrained(folder), load_choice_questions(data, limit=10),
                         vocab_size=config.vocab_size, max_length=512)
scores = choice_loglikelihoods(choice_step(model, mesh), place(params, shardings.params), encoded, 4, mesh)
print(json.dumps(scores.tolist()))
try:
    choice_loglikelihoods(choice_step(model, mesh), params, encoded, 3, mesh)
except ValueError as err:
    print(err)
"""


def test_mesh_sharded_scores_equal_one_device(chat_model):
    """Batches split over data=2 and parameters over tensor=2 (4 host devices) score like 1 device."""
    result = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, str(chat_model), str(OBQA)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    *_, scores_line, refusal = result.stdout.strip().splitlines()
    assert refusal == "batch size 3 must be a positive multiple of the 2 batch shards of the mesh"
    sharded = json.loads(scores_line)
    config, params = load_hf_checkpoint(chat_model)
    encoded = encode_choices(
        transformers.AutoTokenizer.from_pretrained(chat_model),
        load_choice_questions(str(OBQA), limit=10),
        vocab_size=config.vocab_size,
        max_length=512,
    )
    single = choice_loglikelihoods(choice_step(LlamaForCausalLM(config)), params, encoded, 4)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-4)


def test_truncated_rows_score_as_their_truncated_sequence(chat_model):
    """A small max_length cuts each packed question from the left; every choice then scores like
    its own context + choice sequence with the same context tokens dropped."""
    config, params = load_hf_checkpoint(chat_model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_model)
    questions = load_choice_questions(str(ARC), limit=4)
    encoded = encode_choices(tokenizer, questions, vocab_size=config.vocab_size, max_length=40)
    assert encoded.truncated > 0
    ours = choice_loglikelihoods(choice_step(LlamaForCausalLM(config)), params, encoded, batch_size=2)
    torch_model = load_torch_model(chat_model)
    for r, score in enumerate(ours):
        ids, start = encoded.row(r)
        with torch.no_grad():
            logps = torch.log_softmax(torch_model(torch.tensor([ids])).logits[0].double(), dim=-1)
        np.testing.assert_allclose(
            score, sum(logps[i - 1, ids[i]].item() for i in range(start, len(ids))), rtol=1e-5, atol=2e-4
        )
    with pytest.raises(DataError, match=r"field 'choices': the choices take \d+ tokens, more than max_length 12"):
        encode_choices(tokenizer, questions, vocab_size=config.vocab_size, max_length=12)


def test_token_ids_outside_the_model_vocabulary_are_refused(hf_checkpoint):
    folder = hf_checkpoint("llama2")  # a 160-token model beside the 32000-token Llama tokenizer
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    message = r"validation\.json row 0, field 'choices\[0\]': token id \d+ is outside the vocabulary \(size 160\)"
    with pytest.raises(DataError, match=message):
        encode_choices(tokenizer, load_choice_questions(str(ARC), limit=1), vocab_size=160, max_length=512)


# ---- the real SmolLM2 ----------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_is_clearly_above_chance_on_arc_easy(smollm2_hf):
    """The first 96 ARC-Easy questions: SmolLM2-135M-Instruct gets ~0.5 (chance ~0.25).

    A chance-level scorer reaches 0.4 on 96 questions with probability < 0.1%.
    """
    config, params = load_hf_checkpoint(smollm2_hf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
    questions = load_choice_questions(str(ARC), limit=96)
    metrics = evaluate_choices(LlamaForCausalLM(config), params, tokenizer, questions, batch_size=16)
    chance = np.mean([1 / len(q.choices) for q in questions])
    assert metrics["num_questions"] == 96 and metrics["boundary_merges"] == 0
    assert metrics["acc"] >= 0.4 > chance + 0.1, metrics


# ---- the CLI -------------------------------------------------------------------------------


def test_cli_writes_the_metrics(chat_model, tmp_path):
    out = tmp_path / "choices.json"
    assert (
        choices_main(
            ["--model", str(chat_model), "--data", str(OBQA), "--limit", "6", "--batch-size", "4", "--out", str(out)]
        )
        == 0
    )
    written = json.loads(out.read_text())
    config, params = load_hf_checkpoint(chat_model)
    expected = evaluate_choices(
        LlamaForCausalLM(config),
        params,
        transformers.AutoTokenizer.from_pretrained(chat_model),
        load_choice_questions(str(OBQA), limit=6),
        batch_size=2,
    )
    assert written.keys() == expected.keys() and written["num_questions"] == 6
    for name, value in expected.items():
        np.testing.assert_allclose(written[name], value, err_msg=name)


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sdpo_jax.cli.choices", *map(str, args)], capture_output=True, text=True
    )


def test_cli_bad_input_is_one_line_and_exit_2(chat_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD_OBQA) + "\n" + json.dumps({**GOOD_ARC, "answerKey": "Z"}) + "\n")
    result = _run_cli("--model", chat_model, "--data", bad, "--out", tmp_path / "o.json")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"sdpo-choices: error: data error: {bad} line 2, field 'answerKey': "
        "answer label 'Z' is not among the choice labels 1, 2"
    )
    result = _run_cli("--model", tmp_path / "missing", "--data", OBQA, "--out", tmp_path / "o.json")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "missing" in result.stderr
    assert not (tmp_path / "o.json").exists()
