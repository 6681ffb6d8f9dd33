"""The stage family's parts: scorers, pairing of scored samples, resumable sampling, TR-DPO's soft update, config."""

from __future__ import annotations

import json
import textwrap

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.default import get_config
from sdpo_jax.config_check import check_config
from sdpo_jax.data.errors import DataError
from sdpo_jax.errors import ConfigError
from sdpo_jax.reference import mix_reference
from sdpo_jax.scorers import ScorerError, exact_match, load_reward_prompts, load_scorer, spec_problem
from sdpo_jax.stage_data import GenerateSettings, _saved_batches, pair_of

SETTINGS = GenerateSettings(
    scorer="exact_match",
    samples_per_prompt=3,
    temperature=1.0,
    top_p=1.0,
    max_new_tokens=8,
    chosen="best",
    min_margin=0.0,
    batch_size=2,
)


def test_exact_match_normalises_whitespace_and_case_and_needs_references():
    assert exact_match(["p"] * 3, ["  1 2  3 ", "1 2 4", "ONE two"], ["1 2 3", "1 2 3", "one   TWO"]) == [1.0, 0.0, 1.0]
    with pytest.raises(ScorerError, match="prompt 1 .* has no reference answer"):
        exact_match(["a", "b"], ["x", "y"], ["x", None])


def test_a_user_function_scorer_is_imported_and_its_results_checked(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(
        textwrap.dedent("""
        def length(prompts, completions, references):
            return [len(c) for c in completions]
        def short(prompts, completions, references):
            return [1.0]
        def broken(prompts, completions, references):
            return [float("nan")] * len(completions)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_scorer("my_scorers:length")(["p", "p"], ["ab", "abcd"], [None, None]) == [2.0, 4.0]
    with pytest.raises(ScorerError, match="returned 1 scores for 2 completions"):
        load_scorer("my_scorers:short")(["p", "p"], ["a", "b"], [None, None])
    with pytest.raises(ScorerError, match="score nan of completion 0 is not finite"):
        load_scorer("my_scorers:broken")(["p"], ["a"], [None])
    with pytest.raises(ScorerError, match="my_scorers has no function 'missing'"):
        load_scorer("my_scorers:missing")


def test_what_a_user_scorer_raises_is_told_with_its_file_and_line_not_as_our_bug(tmp_path, monkeypatch):
    (tmp_path / "raising_scorers.py").write_text(
        "def score(prompts, completions, references):\n    raise ValueError('no reference\\nsecond line')\n"
    )
    (tmp_path / "unimportable_scorers.py").write_text("x = 1\nimport no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ScorerError) as raised:
        load_scorer("raising_scorers:score")(["p"], ["a"], [None])
    assert str(raised.value) == (
        f"generate.scorer raising_scorers:score raised ValueError: no reference "
        f"({tmp_path / 'raising_scorers.py'} line 2)"
    )
    with pytest.raises(
        ScorerError,
        match=r"^generate.scorer: importing unimportable_scorers failed: ModuleNotFoundError: "
        r"No module named 'no_such_dependency_xyz' \(.*unimportable_scorers.py line 2\)$",
    ):
        load_scorer("unimportable_scorers:score")


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("exact", "is not 'exact_match', 'package.module:function' or 'reward_model:HF_DIR'"),
        ("no_such_module_xyz:score", "module 'no_such_module_xyz' is not importable"),
        ("reward_model:/no/such/folder", "reward model folder '/no/such/folder' has no config.json"),
        ("path/to/file.py:score", "is not 'exact_match'"),
    ],
)
def test_a_scorer_spec_that_names_nothing_is_refused(spec, problem):
    assert problem in spec_problem(spec)
    with pytest.raises(ScorerError, match="generate.scorer"):
        load_scorer(spec)


def _record(scores, reference_score=None):
    return {
        "prompt": "p",
        "prompt_ids": [1, 2],
        "reference": "gold",
        "reference_ids": [9, 2],
        "reference_score": reference_score,
        "samples": [f"s{i}" for i in range(len(scores))],
        "sample_ids": [[10 + i, 2] for i in range(len(scores))],
        "sample_scores": scores,
    }


def test_pairs_take_the_best_and_the_worst_sample_above_the_margin():
    pair = pair_of(_record([0.5, 0.9, 0.1]), SETTINGS)
    assert (pair["chosen"], pair["rejected"], pair["chosen_score"], pair["rejected_score"]) == ("s1", "s2", 0.9, 0.1)
    assert (pair["chosen_ids"], pair["rejected_ids"], pair["prompt_ids"]) == ([11, 2], [12, 2], [1, 2])
    assert pair_of(_record([0.3, 0.3, 0.3]), SETTINGS) is None  # all tied: nothing to prefer
    assert pair_of(_record([0.5, 0.9, 0.1]), SETTINGS.__class__(**{**SETTINGS.__dict__, "min_margin": 0.9})) is None
    assert pair_of(_record([0.5, 0.9, 0.1]), SETTINGS.__class__(**{**SETTINGS.__dict__, "min_margin": 0.8})) is not None
    gold = SETTINGS.__class__(**{**SETTINGS.__dict__, "chosen": "gold"})
    pair = pair_of(_record([0.5, 0.9, 0.1], reference_score=1.0), gold)
    assert (pair["chosen"], pair["chosen_ids"], pair["rejected"], pair["chosen_score"]) == ("gold", [9, 2], "s2", 1.0)
    assert pair_of(_record([1.0, 1.0, 1.0], reference_score=1.0), gold) is None  # every sample as good as the reference
    assert (
        pair_of(_record([0.7, 0.9], reference_score=0.5), gold) is None
    )  # the reference scores below the worst sample


def test_a_killed_sampling_keeps_its_whole_batches_only(tmp_path):
    partial = tmp_path / "stage_2.partial.jsonl"
    batch = [_record([0.1, 0.2, 0.3])]
    partial.write_text(json.dumps({"key": "k"}) + "\n" + json.dumps(batch) + "\n" + json.dumps(batch)[:30])
    assert _saved_batches(partial, "k") == [batch]  # the line cut by the kill is sampled again
    assert _saved_batches(partial, "another key") == []
    assert _saved_batches(tmp_path / "none.jsonl", "k") == []


def test_the_soft_update_is_the_tr_dpo_formula():
    policy = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array([[4.0]])}}
    reference = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array([[0.0]])}}
    mixed = mix_reference(policy, reference, 0.6)
    np.testing.assert_allclose(mixed["a"], [0.6 * 1 + 0.4 * 3, 0.6 * 2], rtol=1e-7)
    np.testing.assert_allclose(mixed["b"]["c"], [[2.4]], rtol=1e-7)


def test_reward_prompts_file_is_read_with_locations(tmp_path):
    good = tmp_path / "r.jsonl"
    good.write_text(json.dumps({"prompt": "2+2?", "reference": "4"}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    assert load_reward_prompts(str(good)) == [("2+2?", "4"), ("hi", None)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "answer": "c"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 2, field 'answer': unexpected field"):
        load_reward_prompts(str(bad))


def _config(**changes):
    fields = get_config().to_dict()
    for key, value in changes.items():
        section, name = key.split("__")
        fields[section][name] = value
    return ml_collections.ConfigDict(fields)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sdpo__stage_data": "generated"}, "generate.scorer: sdpo.stage_data=generated needs a scorer"),
        (
            {"sdpo__stage_data": "generated", "generate__scorer": "exact_match", "generate__samples_per_prompt": 1},
            "generate.samples_per_prompt: chosen=best pairs the best and the worst of at least 2 samples, got 1",
        ),
        ({"sdpo__stage_data": "ondevice"}, "sdpo.stage_data: expected one of offline, generated, got 'ondevice'"),
        ({"sdpo__reference": "first"}, "sdpo.reference: expected one of previous, initial, got 'first'"),
        ({"sdpo__ref_mixup_alpha": 0.0}, "sdpo.ref_mixup_alpha: must be > 0, got 0"),
        ({"generate__top_p": 1.5}, "generate.top_p: must be <= 1, got 1.5"),
        ({"generate__chosen": "worst"}, "generate.chosen: expected one of best, gold, got 'worst'"),
        (
            {"eval__reward_prompts": "sample:arc_easy/validation.json"},
            "eval.reward_prompts: scoring the answers to held-out prompts needs generate.scorer",
        ),
        (
            {"sdpo__stage_overrides": ("2:sdpo.stage_data=generated", "2:generate.scorer=nope:x")},
            "stage 2: generate.scorer: module 'nope' is not importable",
        ),
    ],
)
def test_stage_family_config_errors_are_one_line(changes, message):
    with pytest.raises(ConfigError) as info:
        check_config(_config(**changes), device_count=1)
    assert str(info.value).startswith(message) or message in str(info.value), str(info.value)


def test_stages_mix_offline_and_generated_and_reference_modes():
    config = _config(
        generate__scorer="exact_match",
        sdpo__stage_overrides=(
            "2:sdpo.stage_data=generated",
            "2:generate.samples_per_prompt=6",
            "2:sdpo.reference=initial",
            "1:sdpo.ref_sync_steps=4",
            "1:sdpo.ref_mixup_alpha=0.5",
        ),
    )
    first, second = check_config(config, device_count=1).stages
    assert (first.stage_data, first.reference, first.moving_reference, first.ref_mixup_alpha) == (
        "offline",
        "previous",
        True,
        0.5,
    )
    assert (second.stage_data, second.reference, second.moving_reference) == ("generated", "initial", False)
    assert second.generate.samples_per_prompt == 6 and first.generate.samples_per_prompt == 4
