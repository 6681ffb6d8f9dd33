"""The one config check: every field, stage overrides, stage count vs data, mesh x batch, in one line each."""

from __future__ import annotations

import ml_collections
import pytest

from configs.default import get_config
from configs.tiny import get_config as tiny_config
from sdpo_jax.config_check import check_config, known_fields, override_value, parse_stage_override, stage_fields
from sdpo_jax.errors import ConfigError


def _config(**changes):
    """The default config with ``section__field=value`` changes, built from a plain dict (a config file
    written from scratch may hold any type)."""
    fields = get_config().to_dict()
    for key, value in changes.items():
        section, _, name = key.rpartition("__")
        (fields[section] if section else fields)[name] = value
    return ml_collections.ConfigDict(fields)


def test_the_shipped_configs_pass():
    for config in (get_config(), tiny_config()):
        checked = check_config(config, device_count=1)
        assert [s.stage for s in checked.stages] == [1, 2]
        assert checked.config.is_locked and checked.mesh_shape == (1, 1, 1)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"train__batch_size": -3}, "train.batch_size: must be >= 1, got -3"),
        ({"train__batch_size": 0}, "train.batch_size: must be >= 1, got 0"),
        ({"checkpoint__every_steps": 0}, "checkpoint.every_steps: must be >= 1, got 0"),
        ({"train__learning_rate": -1.0}, "train.learning_rate: must be > 0, got -1"),
        ({"train__learning_rate": float("nan")}, "train.learning_rate: must be finite, got nan"),
        (
            {"train__lr_schedule": "cosin"},
            "train.lr_schedule: expected one of linear, cosine, constant, got 'cosin' (did you mean 'cosine'?)",
        ),
        ({"train__warmup_ratio": 1.5}, "train.warmup_ratio: must be <= 1, got 1.5"),
        (
            {"train__host_allocator": "retained"},
            "train.host_allocator: expected one of auto, retain, system, got 'retained' (did you mean 'retain'?)",
        ),
        ({"train__grad_accum": 3}, "train.grad_accum: train.batch_size 4 does not split into 3 micro-batches"),
        ({"model__dtype": "fp16"}, "model.dtype: expected one of float32, bfloat16, got 'fp16'"),
        ({"model__remat": "ful"}, "model.remat: expected one of none, full, dots, got 'ful' (did you mean 'full'?)"),
        ({"model__path": "/no/such/folder"}, "model.path: '/no/such/folder' is not a folder, a .gguf file, a hub id"),
        ({"model__path": "missing.gguf"}, "model.path: missing.gguf: no such GGUF file"),
        ({"data__train": ("missing.jsonl",)}, "data.train: [0] 'missing.jsonl': no such file"),
        ({"data__train": ()}, "data.train: no sources given"),
        (
            {"data__max_prompt_length": 192},
            "data.max_prompt_length: 192 leaves no room for a completion within data.max_length 192",
        ),
        ({"data__length_buckets": (64,)}, "data.length_buckets (64,) must be positive and reach max_length 192"),
        ({"data__eval_fraction": 1.0}, "data.eval_fraction: must be < 1, got 1"),
        ({"data__skip_invalid": "yes"}, "data.skip_invalid: expected True or False, got string 'yes'"),
        (
            {"sdpo__partition": "hard_to_easy"},
            "sdpo.partition: expected one of datasets, random, easy_to_hard, got 'hard_to_easy'",
        ),
        (
            {"sdpo__num_stages": 3},
            "sdpo.num_stages: 3 stages, but sdpo.partition=easy_to_hard with difficulty source_accuracy puts "
            "one source per stage and data.train has 2 source(s)",
        ),
        ({"sdpo__policy_init": "m0"}, "sdpo.policy_init: expected one of previous, sft, got 'm0'"),
        ({"sdpo__replay_fraction": 1.0}, "sdpo.replay_fraction: must be < 1, got 1"),
        ({"sdpo__replay_fraction": -0.1}, "sdpo.replay_fraction: must be >= 0, got -0.1"),
        ({"sdpo__replay_fraction": "0.5"}, "sdpo.replay_fraction: expected a number, got string '0.5'"),
        (
            {"sdpo__replay_fraction": 0.5, "sdpo__stage_data": "generated", "generate__scorer": "exact_match"},
            "sdpo.replay_fraction: 0.5, but stage(s) 1, 2 use sdpo.stage_data=generated; replay is defined for "
            "offline stages only for now",
        ),
        ({"dpo__beta": 0.0}, "dpo.beta"),
        ({"dpo__loss_type": "sigmod"}, "dpo.loss_type"),
        ({"eval__choices": "sample:arc_easy/nope.json"}, "eval.choices: 'sample:arc_easy/nope.json': no such file"),
        ({"log__progress": "sometimes"}, "log.progress: expected one of auto, always, never, got 'sometimes'"),
        ({"mesh__data": 0}, "mesh.data: must be >= 1 (or -1), got 0"),
        ({"mesh__data": 3}, "mesh: data*fsdp*tensor = 3 but there are 1 devices"),
        ({"checkpoint__keep_stages": -1}, "checkpoint.keep_stages: must be >= 0, got -1"),
        ({"train__batch_size": "4"}, "train.batch_size: expected an integer, got string '4'"),
        (
            {"output_dir": "gs://bucket/run"},
            "output_dir: 'gs://bucket/run': the run's files are written with local file I/O",
        ),
    ],
)
def test_a_bad_field_is_one_line_naming_it(changes, message):
    with pytest.raises(ConfigError) as info:
        check_config(_config(**changes), device_count=1)
    text = str(info.value)
    assert "\n" not in text and text.startswith(message), text


def test_unknown_and_missing_fields_are_named():
    config = get_config()
    config.unlock()
    config.train.batchsize = 4
    with pytest.raises(ConfigError, match=r"unknown config field 'train.batchsize'; did you mean 'train.batch_size'\?"):
        check_config(config, device_count=1)
    config = get_config()
    del config.train["grad_accum"]
    with pytest.raises(ConfigError, match=r"config field 'train.grad_accum' is missing"):
        check_config(config, device_count=1)
    assert "hardware.devices" in known_fields() and "dpo.beta" in known_fields()


def test_the_mesh_and_batch_rules_use_the_device_count():
    config = _config(mesh__data=2, mesh__fsdp=4)
    with pytest.raises(
        ConfigError, match="train.batch_size: 4 pairs / grad_accum 1 = 4 per micro-batch, not a multiple of the 8"
    ):
        check_config(config, device_count=8)
    config.train.batch_size, config.eval.choices_batch_size = 8, 12
    with pytest.raises(ConfigError, match="eval.choices_batch_size: 12 questions do not split over the 8 devices"):
        check_config(config, device_count=8)
    config.eval.choices_batch_size = 16
    assert check_config(config, device_count=8).mesh_shape == (2, 4, 1)


@pytest.mark.parametrize(
    "override, message",
    [
        ("7:dpo.beta=0.2", "stage 7 does not exist (sdpo.num_stages is 2)"),
        ("0:dpo.beta=0.2", "stage 0 does not exist"),
        ("2:dpo.beta=abc", "stage 2: dpo.beta: expected a number, got string 'abc'"),
        ("2:dpo.beta=-1", "stage 2: dpo.beta"),
        ("2:dpo.reference_free=1", "stage 2: dpo.reference_free: expected True or False, got int 1"),
        ("2:train.learning_rate=0", "stage 2: train.learning_rate: must be > 0, got 0"),
        ("2:train.batch_size=8", "train.batch_size cannot vary per stage"),
        ("2:dpo.betta=0.2", "unknown config field 'dpo.betta'; did you mean 'dpo.beta'?"),
        ("2 dpo.beta=0.2", "is not STAGE:section.field=value"),
        ("2:dpo.ld_alpha=0.5", "dpo.ld_alpha cannot vary per stage"),
        ("2:dpo.f_divergence_type=js_divergence", "stage 2: dpo.f_divergence_type"),
        ("2:dpo.loss_type=aot", "stage 2: dpo.f_divergence_type 'forward_kl' applies only to"),
        ("2:dpo.beta", "is not STAGE:section.field=value"),
    ],
)
def test_a_bad_stage_override_fails_before_any_stage_runs(override, message):
    config = _config(
        sdpo__stage_overrides=(override,),
        dpo__f_divergence_type="forward_kl" if "aot" in override else "reverse_kl",
        dpo__loss_type="apo_zero" if "js_" in override else "sigmoid",
    )
    with pytest.raises(ConfigError) as info:
        check_config(config, device_count=1)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_stage_overrides_build_each_stages_settings():
    config = _config(
        sdpo__stage_overrides=(
            "2:dpo.beta=0.2",
            "2:train.learning_rate=2e-7",
            "1:train.steps_per_stage=3",
            "2:dpo.loss_type=ipo",
            "2:train.lr_schedule=cosine",
        )
    )
    first, second = check_config(config, device_count=1).stages
    assert (first.dpo.beta, first.learning_rate, first.steps_per_stage, first.dpo.loss_type) == (
        0.1,
        5e-6,
        3,
        ("sigmoid",),
    )
    assert (second.dpo.beta, second.learning_rate, second.steps_per_stage, second.dpo.loss_type) == (
        0.2,
        2e-7,
        0,
        ("ipo",),
    )
    assert second.optimizer(10).schedule == "cosine" and second.optimizer(10).warmup_steps == 1
    assert first.steps(7) == 3 and second.steps(7) == 7
    assert parse_stage_override("2:dpo.reference_free=True", 2) == (2, "dpo.reference_free", "True")
    assert (
        override_value(False, "True"),
        override_value(0.1, "2"),
        override_value("", "1.0"),
        override_value("x", "('a','b')"),
    ) == (True, 2.0, "1.0", ("a", "b"))
    assert stage_fields(config, 2)["dpo.beta"] == 0.2 and isinstance(
        stage_fields(config, 1)["train.learning_rate"], float
    )


def test_the_loss_family_is_configured_per_stage():
    """MPO in stage 1 (TRL's names and weights), APO-zero in stage 2; a weight count that does not match is named."""
    config = _config(
        dpo__loss_type="sigmoid,bco_pair,sft",
        dpo__loss_weights="0.8,0.2,1.0",
        sdpo__stage_overrides=("2:dpo.loss_type=apo_zero", "2:dpo.loss_weights="),
    )
    first, second = check_config(config, device_count=1).stages
    assert (first.dpo.loss_type, first.dpo.loss_weights) == (("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0))
    assert (second.dpo.loss_type, second.dpo.loss_weights) == (("apo_zero",), (1.0,))
    with pytest.raises(ConfigError, match=r"^dpo.loss_weights has 2 weights for 3 loss types$"):
        check_config(_config(dpo__loss_type="sigmoid,bco_pair,sft", dpo__loss_weights="0.8,0.2"), device_count=1)


def test_the_check_writes_nothing(tmp_path):
    config = _config(train__batch_size=-1)
    config.output_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError):
        check_config(config, device_count=1)
    assert not (tmp_path / "run").exists()


def test_replay_may_vary_per_stage_but_not_ask_stage_one_or_follow_a_generated_stage():
    second = check_config(_config(sdpo__stage_overrides=("2:sdpo.replay_fraction=0.3",)), device_count=1).stages[1]
    assert second.replay_fraction == 0.3
    run_wide = check_config(_config(sdpo__replay_fraction=0.5), device_count=1).stages
    assert [s.replay_fraction for s in run_wide] == [0.5, 0.5]  # stage 1 has nothing to replay: 0 pairs
    with pytest.raises(ConfigError, match=r"^stage 1: sdpo.replay_fraction: 0.2, but stage 1 has no earlier chunks"):
        check_config(_config(sdpo__stage_overrides=("1:sdpo.replay_fraction=0.2",)), device_count=1)
    with pytest.raises(ConfigError, match=r"^stage 2: sdpo.replay_fraction: 0.5, but stage\(s\) 1 use sdpo.stage_data"):
        check_config(
            _config(
                sdpo__replay_fraction=0.5,
                generate__scorer="exact_match",
                sdpo__stage_overrides=("1:sdpo.stage_data=generated",),
            ),
            device_count=1,
        )
    generated_first = _config(generate__scorer="exact_match", sdpo__stage_overrides=("1:sdpo.stage_data=generated",))
    assert check_config(generated_first, device_count=1).stages[0].stage_data == "generated"  # no replay: accepted
