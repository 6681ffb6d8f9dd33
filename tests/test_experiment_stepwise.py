"""The stepwise experiment: the sorting task's reward and tokenizer, the stage files, and a tiny
end-to-end run of the pipeline (SFT -> pairs -> stage driver -> greedy reward -> table)."""

from __future__ import annotations

import math

import pytest
import transformers

from experiments.pairs import Pair, split_by_difficulty
from experiments.provenance import provenance, provenance_line, same_platform
from experiments.reproduce import differences
from experiments.sorting import EOS_ID, TOKEN_ID, Problem, build_tokenizer, reward, score, strip_eos
from experiments.stepwise import QUICK, run_seed, settings_from_record, settings_record
from experiments.summary import markdown_table, summarize
from experiments.variants import VARIANTS, DPOSettings, variant_config


def ids(text: str) -> list[int]:
    return [TOKEN_ID[t] for t in text.split()]


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("1 2 3 3 </s>", 1.0),  # exact
        ("1 2 3 3", 1.0),  # no EOS generated: the answer is what was produced
        ("1 3 2 3 </s>", 0.5),  # two items in the wrong place
        ("1 2 3 </s>", 0.75),  # one item missing
        ("1 2 3 3 3 3 </s>", 4 / 6),  # two extra items
        ("= 2 3 3 </s>", 0.75),  # a non-digit counts as a wrong item
        ("</s> 1 2 3 3", 0.0),  # nothing before the EOS
        ("3 3 2 1 </s>", 0.0),
    ],
)
def test_reward_is_the_fraction_of_right_items(answer, expected):
    problem = Problem((3, 1, 3, 2))
    assert math.isclose(reward(problem, ids(answer)), expected)


def test_the_scorer_reads_the_decoded_texts_as_the_reward_does(tmp_path):
    build_tokenizer(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    problem, answers = Problem((3, 1, 3, 2)), ["1 2 3 3 </s>", "1 3 2 3 </s>", "= 2 3 3 </s>"]
    prompt = tokenizer.decode(problem.prompt_ids, skip_special_tokens=True)
    completions = [tokenizer.decode(ids(a), skip_special_tokens=True) for a in answers]
    assert prompt == "3 1 3 2 =" and score([prompt] * 3, completions, [None] * 3) == [
        reward(problem, ids(a)) for a in answers
    ]


def test_on_policy_variants_generate_every_stage_with_the_true_reward():
    onpolicy = next(v for v in VARIANTS if v.name == "onpolicy-3")
    config = variant_config(
        onpolicy,
        model_folder="m0",
        all_pairs="all.jsonl",
        stage_files={},
        eval_pairs="eval.jsonl",
        num_pairs=960,
        output_dir="out",
        cache_dir="cache",
        seed=0,
        dpo=DPOSettings(),
        samples=4,
        temperature=1.0,
        max_new_tokens=14,
    )
    assert (config.sdpo.num_stages, config.sdpo.partition, config.sdpo.stage_data) == (3, "random", "generated")
    assert (config.generate.scorer, config.generate.samples_per_prompt, config.generate.chosen) == (
        "experiments.sorting:score",
        4,
        "best",
    )
    assert (
        config.train.steps_per_stage == 40
    )  # the same total steps as every variant: 4 epochs x 960 pairs / 3 stages / 32
    gold = next(v for v in VARIANTS if v.name == "onpolicy-gold-2")
    config = variant_config(
        gold,
        model_folder="m0",
        all_pairs="all.jsonl",
        stage_files={},
        eval_pairs="eval.jsonl",
        num_pairs=960,
        output_dir="out",
        cache_dir="cache",
        seed=0,
        dpo=DPOSettings(),
        samples=4,
        temperature=1.0,
        max_new_tokens=14,
    )
    assert (config.sdpo.stage_data, config.generate.chosen, config.train.steps_per_stage) == ("generated", "gold", 60)


def test_problem_ids_and_saved_tokenizer_agree(tmp_path):
    problem = Problem((3, 1, 2))
    assert problem.prompt_ids == ids("<s> 3 1 2 =")
    assert problem.answer_ids == ids("1 2 3 </s>")
    assert strip_eos(problem.answer_ids + ids("7")) == ids("1 2 3")
    build_tokenizer(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer("<s> 3 1 2 =", add_special_tokens=False)["input_ids"] == problem.prompt_ids
    assert tokenizer.eos_token_id == EOS_ID


def test_true_difficulty_files_are_easiest_first_and_equal():
    problems = [Problem(tuple(range(n))) for n in (5, 2, 4, 3, 2, 5, 3, 4, 2)]
    pairs = [Pair(p, p.answer_ids, [EOS_ID], 1.0, 0.0) for p in problems]
    chunks = split_by_difficulty(pairs, 3, seed=0)
    lengths = [[p.problem.difficulty for p in chunk] for chunk in chunks]
    assert [len(c) for c in chunks] == [3, 3, 3]
    assert lengths[0] == [2, 2, 2] and sorted(lengths[1]) == [3, 3, 4] and sorted(lengths[2]) == [4, 5, 5]


@pytest.mark.slow
def test_pipeline_end_to_end_produces_the_table_fields(tmp_path):
    variants = [v for v in VARIANTS if v.name in ("dpo", "true-2")]
    result = run_seed(0, tmp_path / "seed_0", QUICK, variants, log=lambda _: None)
    assert 0.0 <= result["m0"]["reward"] <= 1.0
    assert result["pairs"]["num_pairs"] > 0 and result["pairs"]["mean_chosen_reward"] == 1.0
    for variant in variants:
        stages = result["variants"][variant.name]["stages"]
        assert [s["stage"] for s in stages] == list(range(1, variant.stages + 1))
        for s in stages:
            assert 0.0 <= s["reward"] <= 1.0 and 0.0 <= s["eval_accuracy"] <= 1.0 and math.isfinite(s["gamma"])
    true_stages = result["variants"]["true-2"]["stages"]
    assert sum(s["num_pairs"] for s in true_stages) == result["pairs"]["num_pairs"]
    summary = summarize([result], [v.name for v in variants])
    assert summary["variants"]["true-2"]["gamma"][1]["mean"] == pytest.approx(true_stages[1]["gamma"])
    table = markdown_table(summary)
    assert "| dpo |" in table and "| true-2 |" in table


def test_check_names_every_number_that_differs_and_ignores_timings():
    committed = {
        "seed": 0,
        "seconds": 12.0,
        "provenance": {"commit": "a"},
        "variants": {"dpo": {"stages": [{"reward": 0.8, "gamma": 3.0}], "seconds": 4.0}},
    }
    now = {
        "seed": 0,
        "seconds": 99.0,
        "provenance": {"commit": "b"},
        "variants": {"dpo": {"stages": [{"reward": 0.8, "gamma": 3.5}, {"reward": 0.7}], "seconds": 5.0}},
    }
    assert differences(committed, committed | {"seconds": 1.0, "provenance": {}}) == []
    found = {d.path: d for d in differences(committed, now)}
    assert set(found) == {"variants.dpo.stages[0].gamma", "variants.dpo.stages[1].reward"}
    assert "diff +0.5" in found["variants.dpo.stages[0].gamma"].describe()
    assert found["variants.dpo.stages[1].reward"].committed == "(absent)"


def test_provenance_names_the_commit_packages_and_device():
    record = provenance("python -m experiments.stepwise", ["--check"])
    assert set(record["packages"]) == {"jax", "jaxlib", "flax", "optax", "numpy"}
    assert record["platform"] == "cpu" and record["command"] == "python -m experiments.stepwise --check"
    assert record["commit"] is None or len(record["commit"]) == 40
    assert provenance_line(record).startswith(f"commit {(record['commit'] or 'none')[:7]} (")
    assert same_platform(record, record) and not same_platform(record, record | {"device_kind": "TPU v5e"})


def test_committed_settings_round_trip():
    assert settings_from_record(settings_record(QUICK)) == QUICK
