"""The real-model experiment: the largest-number task's parser and reward, the easy-to-hard split, the
pair rows as the stage driver reads them, and a tiny end-to-end run that resumes from its cache."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import experiments.real_model_eval
from experiments.largest import Problem, problem_in, problems_per_length, reward, sample_problems, score, stated_number
from experiments.real_model import (
    QUICK_SIZES,
    Pair,
    Seed,
    Settings,
    easy_to_hard,
    length_buckets,
    main,
    variant_config,
    write_jsonl,
)
from hf_fixtures import make_chat_checkpoint
from sdpo_jax.data.batching import PairBatcher, resolve_buckets
from sdpo_jax.data.load import load_pairs
from sdpo_jax.models.loading import load_tokenizer
from sdpo_jax.run_context import prompt_ids


@pytest.mark.parametrize(
    "answer, stated",
    [
        ("The largest number in this list is 57.", 57),
        ("57", 57),
        ("The largest number is 1,057, not 3.", 1057),
        ("-4 is the answer", -4),
        ("I cannot tell.", None),
        ("", None),
    ],
)
def test_stated_number_is_the_first_integer(answer, stated):
    assert stated_number(answer) == stated


def test_reward_is_exact_on_the_first_stated_number():
    problem = Problem((12, 57, 3))
    assert problem.answer == 57 and problem.difficulty == 3
    assert problem.question == "What is the largest number in this list: 12, 57, 3?"
    assert reward(problem, problem.gold) == 1.0
    assert reward(problem, "It is 57.") == 1.0
    assert reward(problem, "The largest is 12, then 57.") == 0.0  # the first stated number counts
    assert reward(problem, "none of them") == 0.0


def test_the_driver_scorer_reads_the_list_from_a_rendered_prompt():
    rendered = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n" + Problem((5, 81, 40)).question
    assert problem_in(rendered + "<|im_end|>\n<|im_start|>assistant\n") == Problem((5, 81, 40))
    assert score([rendered, rendered], ["81", "The answer is 40."], [None, None]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="no 'largest number"):
        problem_in("What is 2 + 2?")


def test_problems_have_distinct_numbers_and_the_asked_lengths():
    rng = np.random.default_rng(0)
    problems = sample_problems(rng, 200, (3, 8))
    assert {p.difficulty for p in problems} == set(range(3, 9))
    assert all(len(set(p.numbers)) == len(p.numbers) and 0 <= min(p.numbers) and max(p.numbers) < 100 for p in problems)
    balanced = problems_per_length(rng, 2, (3, 5))
    assert [p.difficulty for p in balanced] == [3, 3, 4, 4, 5, 5]


def test_easy_to_hard_puts_prompts_m0_solves_more_often_first():
    accuracies = [0.0, 0.75, 0.25, 0.5, 0.75, 0.0]
    pairs = [Pair(Problem(tuple(range(3 + i % 2))), "wrong", a) for i, a in enumerate(accuracies)]
    first, second = easy_to_hard(pairs, 2, seed=0)
    assert [p.m0_accuracy for p in first] == [0.75, 0.75, 0.5]
    assert [p.m0_accuracy for p in second] == [0.25, 0.0, 0.0]
    assert first[0].problem.difficulty <= first[1].problem.difficulty  # equal accuracy: shorter list first


def test_pair_rows_reach_the_driver_with_the_prompt_the_model_was_sampled_with(tmp_path):
    folder = make_chat_checkpoint(tmp_path / "model")
    tokenizer = load_tokenizer(folder)
    problem = Problem((12, 57, 3))
    path = write_jsonl(tmp_path / "pairs.jsonl", [Pair(problem, "The largest number in this list is 12.", 0.5)])
    config = variant_config("dpo", Settings(model=str(folder)), {"all": path, "eval": path}, 1, tmp_path, 0)
    pairs = load_pairs([path], tokenizer, config.data, vocab_size=32000, progress_bars=False, log_sources=False)
    assert list(pairs.prompt_ids(0)) == prompt_ids(tokenizer, problem.question)
    assert json.loads(open(path).readline())["chosen"] == [{"role": "assistant", "content": problem.gold}]


def test_batches_pad_completions_to_the_answer_budget_and_pairs_to_the_packed_prompt_budget(tmp_path):
    s = Settings()
    assert length_buckets(s) == (24, 96, 112)  # answers <= 16 + 2 tokens; prompts <= 76 tokens
    assert length_buckets(Settings(max_new_tokens=12, max_length=64)) == (16, 64, 80)
    folder = make_chat_checkpoint(tmp_path / "model")
    tokenizer = load_tokenizer(folder)
    problems = [Problem(tuple(range(10 * k, 10 * k + n))) for k, n in enumerate((3, 8, 5, 8))]
    path = write_jsonl(tmp_path / "pairs.jsonl", [Pair(p, "I think it is 3.", 0.0) for p in problems])
    config = variant_config("dpo", Settings(model=str(folder)), {"all": path, "eval": path}, 4, tmp_path, 0)
    pairs = load_pairs([path], tokenizer, config.data, vocab_size=32000, progress_bars=False, log_sources=False)
    buckets = resolve_buckets(config.data.length_buckets, config.data.max_length)
    batch = next(PairBatcher(pairs, 4, seed=0, buckets=buckets, prefix_sharing=True))
    assert batch["chosen_labels"].shape == batch["rejected_labels"].shape == (4, 24)
    assert batch["input_ids"].shape[1] in (96, 112)


def test_m0_arc_easy_is_measured_once_for_all_seeds(tmp_path, monkeypatch):
    folder = make_chat_checkpoint(tmp_path / "model")
    s = Settings(model=str(folder), dtype="float32", **QUICK_SIZES)
    calls = []
    measure = experiments.real_model_eval.ArcEasy.__call__
    monkeypatch.setattr(
        experiments.real_model_eval.ArcEasy, "__call__", lambda self, params: calls.append(1) or measure(self, params)
    )
    out = tmp_path / "out"
    first = Seed(0, out / "seed_0", s, out).m0_arc_easy()
    second = Seed(1, out / "seed_1", s, out).m0_arc_easy()
    assert len(calls) == 1 and first == second and first["num_questions"] == QUICK_SIZES["arc_limit"]
    assert json.loads((out / "m0_arc_easy.json").read_text())["arc_easy"] == first
    with pytest.raises(SystemExit, match="other settings"):
        Seed(0, out / "seed_0", dataclasses.replace(s, arc_limit=4), out).m0_arc_easy()


def test_quick_run_end_to_end_and_resumed_from_its_cache(tmp_path, capsys):
    folder = make_chat_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    argv = ["--quick", "--model", str(folder), "--seeds", "0", "--out", str(out), "--variants", "dpo", "easy-2"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {"dpo", "easy-2"}
    easy = json.loads((out / "seed_0" / "easy-2.json").read_text())
    assert [s["stage"] for s in easy["stages"]] == [1, 2]
    assert easy["provenance"]["command"].startswith("python -m experiments.real_model")
    assert set(easy["stages"][-1]["accuracy_by_length"]) == {"3", "4"}
    assert len(easy["stages"][-1]["correct"]) == 8  # 4 test problems of each length
    assert "arc_easy" in easy["stages"][-1] and "vs_dpo" in summary["variants"]["easy-2"]
    stage_files = sorted((out / "seed_0" / "data").glob("train_easy_stage*.jsonl"))
    assert len(stage_files) == 2
    written = {p: p.stat().st_mtime_ns for p in (out / "seed_0").glob("*.json")}
    capsys.readouterr()
    assert main(argv) == 0  # everything cached: nothing is trained or measured again
    assert {p: p.stat().st_mtime_ns for p in (out / "seed_0").glob("*.json")} == written
    assert "stage 1" not in capsys.readouterr().out
    assert "| easy-2 |" in (out / "table.md").read_text()
