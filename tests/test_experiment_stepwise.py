"""The stepwise experiment: the sorting task's reward and tokenizer, the stage files, and a tiny
end-to-end run of the pipeline (SFT -> pairs -> stage driver -> greedy reward -> table)."""

from __future__ import annotations

import json
import math

import pytest
import transformers

import experiments.provenance
from experiments.pairs import Pair, split_by_difficulty
from experiments.provenance import (
    NUMERIC_CPU_FLAGS,
    cpu_description,
    provenance,
    provenance_line,
    publish,
    same_platform,
)
from experiments.reproduce import differences, largest_final_change
from experiments.seed_run import QUICK, seed_problems, settings_from_record, settings_record
from experiments.sorting import EOS_ID, TOKEN_ID, Problem, build_tokenizer, reward, score, strip_eos
from experiments.stepwise import main, run_seed
from experiments.summary import _color, markdown_table, summarize
from experiments.tuning import best_point, grid_table, tuned_dpo
from experiments.variants import VARIANT_NAMES, VARIANTS, DPOSettings, variant_config


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
        assert (result["variants"][variant.name]["learning_rate"], result["variants"][variant.name]["beta"]) == (
            QUICK.dpo.learning_rate,
            QUICK.dpo.beta,
        )
        assert [s["stage"] for s in stages] == list(range(1, variant.stages + 1))
        for s in stages:
            assert 0.0 <= s["reward"] <= 1.0 and 0.0 <= s["eval_accuracy"] <= 1.0 and math.isfinite(s["gamma"])
    true_stages = result["variants"]["true-2"]["stages"]
    assert sum(s["num_pairs"] for s in true_stages) == result["pairs"]["num_pairs"]
    summary = summarize([result], [v.name for v in variants])
    assert summary["variants"]["true-2"]["gamma"][1]["mean"] == pytest.approx(true_stages[1]["gamma"])
    table = markdown_table(summary)
    assert "| dpo | 0.0005 | 0.5 |" in table and "| true-2 | 0.0005 | 0.5 |" in table


def _seed_result(seed: int, m0: float, finals: dict[str, list[tuple[float, float]]]) -> dict:
    """A results.json of one seed: M0's reward and each variant's (reward, gamma) per stage."""
    by_length = {"2": m0, "3": m0, "4": m0}
    return {
        "seed": seed,
        "m0": {"reward": m0, "exact": 0.5, "reward_by_length": by_length},
        "pairs": {"num_pairs": 100},
        "variants": {
            name: {
                "learning_rate": 5e-4,
                "beta": 0.5,
                "seconds": 1.0,
                "stages": [
                    {"reward": r, "gamma": g, "exact": 0.5, "eval_accuracy": 0.7, "reward_by_length": by_length}
                    for r, g in stages
                ],
            }
            for name, stages in finals.items()
        },
    }


def test_summary_counts_the_paired_per_seed_evidence():
    results = [
        _seed_result(0, 0.70, {"dpo": [(0.75, 3.0)], "random-2": [(0.72, 3.0), (0.74, 3.5)]}),
        _seed_result(1, 0.80, {"dpo": [(0.79, 3.0)], "random-2": [(0.81, 3.0), (0.82, 2.5)]}),
        _seed_result(2, 0.60, {"dpo": [(0.66, 3.0)], "random-2": [(0.61, 3.0), (0.62, 3.1)]}),
    ]
    summary = summarize(results, ["dpo", "random-2"])
    dpo, random2 = summary["variants"]["dpo"], summary["variants"]["random-2"]
    assert (dpo["seeds_above_m0"], dpo["seeds_best"]) == (2, 2)
    assert (random2["seeds_above_m0"], random2["seeds_best"], random2["seeds_gamma_rises"]) == (3, 1, 2)
    assert summary["paired"] == [{"a": "dpo", "b": "random-2", "a_above_b": 2, "of": 3}]
    table = markdown_table(summary)
    assert "| random-2 | +0.040, +0.020, +0.020 | 3/3 | 1/3 | 2/3 |" in table
    assert "| dpo | +0.050, -0.010, +0.060 | 2/3 | 2/3 |  |" in table
    assert "| dpo | random-2 | 2/3 |" in table


def test_largest_final_change_names_the_variant_that_moved_most():
    committed = _seed_result(0, 0.7, {"dpo": [(0.75, 3.0)], "true-2": [(0.72, 3.0), (0.70, 3.5)]})
    now = _seed_result(0, 0.7, {"dpo": [(0.76, 3.0)], "true-2": [(0.50, 3.0), (0.73, 3.5)]})
    change, name = largest_final_change(committed, now)
    assert name == "true-2" and change == pytest.approx(0.03)


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
    assert set(record["cpu"]) == {"model", "flags"} and set(record["cpu"]["flags"]) <= set(NUMERIC_CPU_FLAGS)
    assert " on " in provenance_line(record)


def test_a_cpu_with_other_vector_units_is_another_platform(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Xeon X\nflags\t\t: fpu sse2 avx avx2 fma avx512f amx_bf16\n\n"
        "processor\t: 1\nmodel name\t: Xeon X\nflags\t\t: fpu sse2 avx avx2 fma avx512f amx_bf16\n"
    )
    cpu = cpu_description(cpuinfo)
    assert cpu == {"model": "Xeon X", "flags": ["avx", "avx2", "fma", "avx512f", "amx_bf16"]}
    assert cpu_description(tmp_path / "absent")["flags"] == []
    record = provenance("python -m experiments.stepwise", ["--check"]) | {"cpu": cpu}
    avx2_only = record | {"cpu": {"model": "Xeon X", "flags": ["avx", "avx2", "fma"]}}
    assert same_platform(record, dict(record)) and not same_platform(record, avx2_only)
    unrecorded = {k: v for k, v in record.items() if k != "cpu"}  # made before the CPU was recorded
    assert not same_platform(record, unrecorded) and not same_platform(unrecorded, unrecorded)
    assert "host CPU not recorded" in provenance_line(unrecorded)
    assert "Xeon X (avx avx2 fma avx512f amx_bf16)" in provenance_line(record)


def test_publish_refuses_every_record_not_made_at_head_from_a_clean_tree(tmp_path, monkeypatch):
    head = {"commit": "c" * 40, "dirty": False}
    monkeypatch.setattr(experiments.provenance, "provenance", lambda program, argv=None: head)
    path = tmp_path / "results.json"
    fresh = {"seed": 0, "provenance": head}
    stale = {
        "seed 1": {"provenance": {"commit": "c" * 40, "dirty": True}},
        "out/m0_arc_easy.json": {"provenance": {"commit": "d" * 40, "dirty": False}},  # a record without a seed
    }
    with pytest.raises(SystemExit, match=r"seed 1, out/m0_arc_easy.json were not made at HEAD"):
        publish(path, {"seeds": [fresh]}, {"seed 0": fresh, **stale}, "python -m experiments.x")
    assert not path.exists()
    publish(path, {"seeds": [fresh]}, {"seed 0": fresh}, "python -m experiments.x")
    assert json.loads(path.read_text()) == {"seeds": [fresh]}


def test_committed_settings_round_trip():
    assert settings_from_record(settings_record(QUICK)) == QUICK


def _config_of(name: str, num_pairs: int = 960):
    return variant_config(
        next(v for v in VARIANTS if v.name == name),
        model_folder="m0",
        all_pairs="all.jsonl",
        stage_files={2: ["a.jsonl", "b.jsonl"], 3: ["a.jsonl", "b.jsonl", "c.jsonl"]},
        eval_pairs="eval.jsonl",
        num_pairs=num_pairs,
        output_dir="out",
        cache_dir="cache",
        seed=0,
        dpo=DPOSettings(),
        samples=4,
        temperature=1.0,
        max_new_tokens=14,
    )


def test_replay_variants_are_true_difficulty_stages_with_half_a_chunk_replayed_in_the_same_steps():
    for t in (2, 3):
        replay, true = _config_of(f"replay-{t}"), _config_of(f"true-{t}")
        assert (replay.sdpo.partition, replay.sdpo.replay_fraction, true.sdpo.replay_fraction) == ("datasets", 0.5, 0)
        assert replay.data.train == true.data.train and replay.train.steps_per_stage == true.train.steps_per_stage


def test_every_variant_family_has_its_own_plot_colour():
    families = {name.replace("-2", "").replace("-3", ""): _color(name) for name in VARIANT_NAMES}
    assert len(set(families.values())) == len(families) == 8


def test_validation_prompts_come_after_the_other_draws_and_share_no_list_with_them():
    without = seed_problems(0, QUICK)
    train, eval_pairs, heldout, validation = seed_problems(0, QUICK, validation=200)
    assert (train, eval_pairs, heldout) == without[:3] and without[3] == [] and len(validation) == 200
    assert not {p.digits for p in validation} & {p.digits for p in train + eval_pairs + heldout}
    assert {p.difficulty for p in validation} == set(range(QUICK.sft.lengths[0], QUICK.sft.lengths[1] + 1))


def test_the_best_grid_point_breaks_ties_to_the_lower_learning_rate_then_the_higher_beta(tmp_path):
    points = [
        {"learning_rate": 1e-3, "beta": 0.5, "validation_reward": 0.8},
        {"learning_rate": 5e-4, "beta": 0.1, "validation_reward": 0.8},
        {"learning_rate": 5e-4, "beta": 0.5, "validation_reward": 0.8},
        {"learning_rate": 2.5e-4, "beta": 0.5, "validation_reward": 0.7},
    ]
    assert best_point(points) == points[2]
    record = settings_record(QUICK)
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"settings": record, "variants": {"dpo": {"best": points[0]}}}))
    assert tuned_dpo(path, record, QUICK.dpo, ["dpo"])["dpo"] == DPOSettings(
        batch_size=16, max_length=16, learning_rate=1e-3, beta=0.5
    )
    with pytest.raises(SystemExit, match="has no tuned setting for true-2"):
        tuned_dpo(path, record, QUICK.dpo, ["dpo", "true-2"])
    other = settings_record(QUICK) | {"samples": 4}
    with pytest.raises(SystemExit, match="tuned under other experiment settings"):
        tuned_dpo(path, other, QUICK.dpo, ["dpo"])


def test_grid_table_marks_the_choice_and_the_edges_it_sits_on():
    grid = [
        {"learning_rate": lr, "beta": beta, "validation_reward": reward}
        for (lr, beta), reward in zip([(1e-4, 0.5), (1e-4, 1.0), (2e-4, 0.5), (2e-4, 1.0)], [0.70, 0.72, 0.75, 0.71])
    ]
    record = {
        "tuning": {"learning_rates": [1e-4, 2e-4], "betas": [0.5, 1.0]},
        "variants": {"dpo": {"grid": grid, "best": best_point(grid)}},
    }
    table = grid_table(record)
    assert (
        table.splitlines()[0]
        == "| variant | 0.0001 / 0.5 | 0.0001 / 1 | 0.0002 / 0.5 | 0.0002 / 1 | chosen | on the grid's edge |"
    )
    assert "| dpo | 0.700 | 0.720 | **0.750** | 0.710 | 0.0002 / 0.5 | largest lr, smallest beta |" in table


@pytest.mark.slow
def test_quick_tuning_writes_every_grid_point_and_the_run_trains_each_variant_at_its_best(tmp_path, capsys):
    out, tuned = tmp_path / "out", tmp_path / "tuning.json"
    common = ["--quick", "--out", str(out), "--tuned", str(tuned), "--plot", str(tmp_path / "plot.png")]
    assert main(["--tune", "--variants", "dpo", "replay-2", *common]) == 0
    record = json.loads(tuned.read_text())
    assert record["seeds"] == [0] and record["tuning"] == {
        "learning_rates": [5e-4, 1e-3],
        "betas": [0.5],
        "validation_prompts": 32,
    }
    assert record["settings"] == settings_record(QUICK) and record["provenance"]["commit"] == provenance("x")["commit"]
    for name in ("dpo", "replay-2"):
        grid = record["variants"][name]["grid"]
        assert [(p["learning_rate"], p["beta"]) for p in grid] == [(5e-4, 0.5), (1e-3, 0.5)]
        for p in grid:
            stored = json.loads(
                (out / "tune" / "seed_0" / name / f"lr{p['learning_rate']:g}_beta0.5" / "result.json").read_text()
            )
            assert p["per_seed"] == [stored["validation_reward"]] == [stored["stages"][-1]["reward"]]
        best = max(grid, key=lambda p: (p["validation_reward"], -p["learning_rate"]))
        assert record["variants"][name]["best"] == {k: best[k] for k in ("learning_rate", "beta", "validation_reward")}
    replay = json.loads((out / "tune" / "seed_0" / "replay-2" / "lr0.0005_beta0.5" / "result.json").read_text())
    assert replay["stages"][0]["replayed"] == 0 and replay["stages"][1]["replayed"] > 0
    assert main(["--tune", "--variants", "dpo", "replay-2", *common]) == 0  # every point reused, nothing trained
    assert json.loads(tuned.read_text())["variants"] == record["variants"]
    assert "tune seed 0 dpo lr 0.0005 beta 0.5: validation reward" in capsys.readouterr().out
    assert main(["--seeds", "0", "--variants", "dpo", *common]) == 0
    used = json.loads((out / "seed_0" / "results.json").read_text())["variants"]["dpo"]
    assert (used["learning_rate"], used["beta"]) == tuple(
        record["variants"]["dpo"]["best"][k] for k in ("learning_rate", "beta")
    )
