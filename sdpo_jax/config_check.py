"""One check of a run's config before anything heavy: every field, the stages, the mesh.

    checked = check_config(config, device_count=jax.device_count())

takes the ml_collections config of `sdpo-train` / `sdpo-plan` (configs/default.py or one built on
it) and either returns a `CheckedConfig` or raises `ConfigError` with one line naming the field.
It reads no weights and no data (it only looks whether named local files exist), so a typo fails
in seconds, before the model is loaded and before anything is written.

What is checked:
  * every field of configs/default.py is present, and no other (a misspelt field is named with the
    nearest valid one); each value has the field's type and lies in its range or allowed set;
  * ``sdpo.stage_overrides`` entries 'STAGE:section.field=value': the stage exists, the field may
    vary per stage, the value is valid for that field in that stage;
  * stage count vs data: one source per stage where the partition puts one source per stage, and
    at least one pair per stage within ``data.limit``;
  * replay (``sdpo.replay_fraction``) only from stage 2 on and only among offline stages;
  * ``data.prefix_sharing`` only with an attention path that takes its dense mask (not splash);
  * the mesh against ``device_count``, and the batch rules on it: ``train.batch_size`` splits into
    ``train.grad_accum`` micro-batches, each a multiple of the batch-sharded devices
    (dcn_data x data x fsdp), and so does ``eval.choices_batch_size``.
The loss and optimizer settings of each stage (after its overrides) are built here once, as
`StageSettings`; the stage driver and `sdpo-plan` take them from the `CheckedConfig`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from sdpo_jax.data.config import FORMATS, TRUNCATION_MODES
from sdpo_jax.data.sources import local_source_problem
from sdpo_jax.errors import ConfigError
from sdpo_jax.host_memory import HOST_ALLOCATORS
from sdpo_jax.losses import DPOSettings
from sdpo_jax.models.attention import ATTENTION_IMPLEMENTATIONS
from sdpo_jax.models.llama import REMAT_POLICIES
from sdpo_jax.models.loading import COMPUTE_DTYPES, model_path_problem
from sdpo_jax.optim import SCHEDULES, OptimizerSettings
from sdpo_jax.partition import DIFFICULTIES, PARTITIONS
from sdpo_jax.scorers import spec_problem
from sdpo_jax.sharding import MeshError, global_mesh_shape
from sdpo_jax.stage_data import GenerateSettings

POLICY_INITS = ("previous", "sft")
REFERENCES = ("previous", "initial")
STAGE_DATA = ("offline", "generated")
CHOSEN_RULES = ("best", "gold")
PROGRESS_MODES = ("auto", "always", "never")
# Fields a stage may set for itself with sdpo.stage_overrides (besides the dpo.* fields but RUN_WIDE_DPO).
STAGE_FIELDS = (
    "train.learning_rate",
    "train.steps_per_stage",
    "train.lr_schedule",
    "train.warmup_ratio",
    "train.weight_decay",
    "train.max_grad_norm",
    "sdpo.reference",
    "sdpo.ref_sync_steps",
    "sdpo.ref_mixup_alpha",
    "sdpo.stage_data",
    "sdpo.replay_fraction",
    "generate.scorer",
    "generate.samples_per_prompt",
    "generate.temperature",
    "generate.top_p",
    "generate.max_new_tokens",
    "generate.chosen",
    "generate.min_margin",
    "generate.batch_size",
)
# dpo fields that must be the same in every stage: LD-DPO's weighting is part of every reference log-prob,
# and the held-out set's are computed once per run.
RUN_WIDE_DPO = ("dpo.ld_alpha",)
# Sections a config may add beside the default's fields: the real-model recipes' target machine
# (read by sdpo-plan and the launchers) and the architecture of a model not downloaded yet.
OPTIONAL_FIELDS = {
    "model.shape_config": str,
    "hardware.name": str,
    "hardware.platform": str,
    "hardware.devices": int,
    "hardware.device_memory_gib": float,
    "hardware.description": str,
}


# ---- value rules: each takes the value and returns a problem (str) or None --------------------------------


def _type_name(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", tuple: "tuple", list: "list"}.get(
        type(value), type(value).__name__
    )


def _integer(low: int | None = None, high: int | None = None, minus_one: bool = False) -> Callable:
    def rule(value):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer, got {_type_name(value)} {value!r}"
        if minus_one and value == -1:
            return None
        if low is not None and value < low:
            return f"must be >= {low}{' (or -1)' if minus_one else ''}, got {value}"
        if high is not None and value > high:
            return f"must be <= {high}, got {value}"
        return None

    return rule


def _number(
    low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Callable:
    def rule(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {_type_name(value)} {value!r}"
        if not math.isfinite(value):
            return f"must be finite, got {value}"
        if low is not None and (value < low or (low_open and value == low)):
            return f"must be {'>' if low_open else '>='} {low:g}, got {value:g}"
        if high is not None and (value > high or (high_open and value == high)):
            return f"must be {'<' if high_open else '<='} {high:g}, got {value:g}"
        return None

    return rule


def _choice(*allowed: str) -> Callable:
    def rule(value):
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            return f"expected one of {', '.join(allowed)}, got {value!r}" + (
                f" (did you mean {close[0]!r}?)" if close else ""
            )
        return None

    return rule


def _boolean(value):
    return None if isinstance(value, bool) else f"expected True or False, got {_type_name(value)} {value!r}"


def _text(allow_empty: bool = False) -> Callable:
    def rule(value):
        if not isinstance(value, str):
            return f"expected a string, got {_type_name(value)} {value!r}"
        if not allow_empty and not value.strip():
            return "must not be empty"
        return None

    return rule


def _sequence(item: Callable, allow_empty: bool = True) -> Callable:
    def rule(value):
        if not isinstance(value, (tuple, list)):
            return f"expected a tuple, got {_type_name(value)} {value!r}"
        if not value and not allow_empty:
            return "must not be empty"
        for i, element in enumerate(value):
            problem = item(element)
            if problem:
                return f"item {i}: {problem}"
        return None

    return rule


def _sources(allow_empty: bool) -> Callable:
    """A tuple of source strings (or one string, commas separating several)."""

    def rule(value):
        from sdpo_jax.data.load import source_list

        if not isinstance(value, (str, tuple, list)):
            return f"expected a tuple of sources, got {_type_name(value)} {value!r}"
        if not isinstance(value, str) and any(not isinstance(v, str) for v in value):
            return f"expected source strings, got {value!r}"
        if not source_list(value) and not allow_empty:
            return "no sources given"
        return None

    return rule


def _local_sources(value) -> str | None:
    """Which source names a local file that is not there (or not readable)."""
    from sdpo_jax.data.load import source_list

    for i, spec in enumerate(source_list(value)):
        problem = local_source_problem(spec)
        if problem:
            return f"[{i}] {spec!r}: {problem}"
    return None


def _local_file(value) -> str | None:
    problem = local_source_problem(value) if value else None
    return f"{value!r}: {problem}" if problem else None


def _output_dir(value):
    problem = _text()(value)
    if problem:
        return problem
    if "://" in value:
        return (
            f"{value!r}: the run's files are written with local file I/O; mount the bucket (e.g. gcsfuse, as "
            "launch/tpu.sh does for gs:// output dirs) and pass the mounted path"
        )
    if os.path.exists(value) and not os.path.isdir(value):
        return f"{value!r} exists and is not a folder"
    return None


FIELD_RULES: dict[str, Callable] = {
    "output_dir": _output_dir,
    "model.path": _text(),
    "model.dtype": _choice(*COMPUTE_DTYPES),
    "model.attention": _choice(*ATTENTION_IMPLEMENTATIONS),
    "model.remat": _choice(*REMAT_POLICIES),
    "model.logprob_chunk": _integer(1),
    "data.train": _sources(allow_empty=False),
    "data.eval": _sources(allow_empty=True),
    "data.split": _text(),
    "data.format": _choice(*FORMATS),
    "data.columns": lambda v: (
        None if isinstance(v, (str, dict, ml_collections.ConfigDict)) else f"expected 'src=dst,...', got {v!r}"
    ),
    "data.extra_fields": _choice("error", "ignore"),
    "data.assistant_marker": _text(),
    "data.limit": _integer(0),
    "data.sample_seed": _integer(0),
    "data.max_length": _integer(2),
    "data.max_prompt_length": _integer(0),
    "data.truncation_mode": _choice(*TRUNCATION_MODES),
    "data.skip_invalid": _boolean,
    "data.length_buckets": _sequence(_integer(1)),
    "data.num_proc": _integer(1),
    "data.cache_dir": _text(allow_empty=True),
    "data.eval_fraction": _number(0.0, 1.0, high_open=True),
    "data.eval_seed": _integer(0),
    "data.prefix_sharing": _boolean,
    "sdpo.num_stages": _integer(1),
    "sdpo.partition": _choice(*PARTITIONS),
    "sdpo.difficulty": _choice(*DIFFICULTIES),
    "sdpo.probe_steps": _integer(1),
    "sdpo.stage_fractions": _sequence(_number(0.0, low_open=True)),
    "sdpo.policy_init": _choice(*POLICY_INITS),
    "sdpo.reference": _choice(*REFERENCES),
    "sdpo.ref_sync_steps": _integer(0),
    "sdpo.ref_mixup_alpha": _number(0.0, 1.0, low_open=True),
    "sdpo.stage_data": _choice(*STAGE_DATA),
    "sdpo.replay_fraction": _number(0.0, 1.0, high_open=True),
    "sdpo.stage_overrides": _sequence(_text()),
    "generate.scorer": _text(allow_empty=True),
    "generate.samples_per_prompt": _integer(1),
    "generate.temperature": _number(0.0, low_open=True),
    "generate.top_p": _number(0.0, 1.0, low_open=True),
    "generate.max_new_tokens": _integer(1),
    "generate.chosen": _choice(*CHOSEN_RULES),
    "generate.min_margin": _number(0.0),
    "generate.batch_size": _integer(1),
    "train.batch_size": _integer(1),
    "train.grad_accum": _integer(1),
    "train.steps_per_stage": _integer(0),
    "train.seed": _integer(0),
    "train.learning_rate": _number(0.0, low_open=True),
    "train.lr_schedule": _choice(*SCHEDULES),
    "train.warmup_ratio": _number(0.0, 1.0),
    "train.weight_decay": _number(0.0),
    "train.max_grad_norm": _number(0.0),
    "train.precompute_reference": _boolean,
    "train.host_allocator": _choice(*HOST_ALLOCATORS),
    "train.log_every": _integer(1),
    "eval.prompts": _sequence(_text()),
    "eval.max_new_tokens": _integer(1),
    "eval.temperature": _number(0.0),
    "eval.choices": _text(allow_empty=True),
    "eval.choices_limit": _integer(0),
    "eval.choices_chat_template": _boolean,
    "eval.choices_batch_size": _integer(1),
    "eval.reward_prompts": _text(allow_empty=True),
    "log.progress": _choice(*PROGRESS_MODES),
    "log.tensorboard": _boolean,
    "log.wandb": _boolean,
    "log.wandb_project": _text(),
    "mesh.data": _integer(1, minus_one=True),
    "mesh.fsdp": _integer(1, minus_one=True),
    "mesh.tensor": _integer(1, minus_one=True),
    "mesh.dcn_data": _integer(1),
    "checkpoint.every_steps": _integer(1),
    "checkpoint.keep": _integer(1),
    "checkpoint.keep_stages": _integer(0),
    "checkpoint.async_save": _boolean,
    "checkpoint.force_resume": _boolean,
}


# Whether what a field names is there (skipped by sdpo-plan, which checks a config for another machine).
FILE_RULES: dict[str, Callable] = {
    "model.path": model_path_problem,
    "data.train": _local_sources,
    "data.eval": _local_sources,
    "eval.choices": _local_file,
    "eval.reward_prompts": _local_file,
    "generate.scorer": lambda spec: spec_problem(spec) if spec else None,
}


# ---- what the check returns ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """Stage ``stage``'s loss and optimizer settings, its overrides applied."""

    stage: int
    dpo: DPOSettings
    learning_rate: float
    steps_per_stage: int  # 0: one epoch over the stage's chunk
    lr_schedule: str
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    reference: str  # 'previous': M(t-1) | 'initial': M0
    ref_sync_steps: int  # TR-DPO soft update every N steps (0: the reference stays frozen)
    ref_mixup_alpha: float
    stage_data: str  # 'offline' | 'generated'
    replay_fraction: float  # replayed pairs of earlier chunks per pair of the stage's own chunk (0: none)
    generate: GenerateSettings

    @property
    def moving_reference(self) -> bool:
        """Whether the reference moves within the stage (its log-probs are then computed in the step)."""
        return self.ref_sync_steps > 0

    def steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of this stage, given its chunk's batches per epoch."""
        return self.steps_per_stage or steps_per_epoch

    def optimizer(self, total_steps: int) -> OptimizerSettings:
        """The stage's AdamW and schedule over ``total_steps`` steps."""
        return OptimizerSettings(
            learning_rate=self.learning_rate,
            total_steps=total_steps,
            warmup_steps=int(round(self.warmup_ratio * total_steps)),
            schedule=self.lr_schedule,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
        )


@dataclasses.dataclass(frozen=True)
class CheckedConfig:
    """An accepted config (locked against changes), each stage's settings and the mesh it runs on."""

    config: ml_collections.ConfigDict
    stages: tuple[StageSettings, ...]
    mesh_shape: tuple[int, int, int]  # global (data, fsdp, tensor), dcn_data folded into data

    @property
    def batch_devices(self) -> int:
        """Devices a batch's rows split over: dcn_data x data x fsdp."""
        return self.mesh_shape[0] * self.mesh_shape[1]


def flat_fields(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{'section.field': value}`` of a ConfigDict or dict (tuples kept as they are)."""
    items = config.items() if hasattr(config, "items") else []
    out: dict[str, Any] = {}
    for key, value in items:
        if isinstance(value, (dict, ml_collections.ConfigDict)) and f"{prefix}{key}" != "data.columns":
            out.update(flat_fields(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def known_fields() -> list[str]:
    """Every field a config may have: configs/default.py's and the optional sections'."""
    return sorted(set(FIELD_RULES) | set(_dpo_fields()) | set(OPTIONAL_FIELDS))


def _dpo_fields() -> list[str]:
    return [f"dpo.{field.name}" for field in dataclasses.fields(DPOSettings)]


def unknown_field_message(name: str, where: str = "") -> str:
    """'unknown config field X; did you mean Y?' with the nearest known field."""
    close = difflib.get_close_matches(name, known_fields(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{where}unknown config field {name!r}{hint} (every field: docs/config.md, or sdpo-train --show_config)"


def check_config(config: ml_collections.ConfigDict, device_count: int, local_files: bool = True) -> CheckedConfig:
    """The accepted ``config`` with its stages' settings and mesh shape; else a one-line `ConfigError`.

    ``local_files`` False skips whether the named files and folders exist here (sdpo-plan checks a config
    for another machine)."""
    fields = flat_fields(config)
    for name in fields:
        if name not in FIELD_RULES and name not in OPTIONAL_FIELDS and name not in _dpo_fields():
            raise ConfigError(unknown_field_message(name))
    missing = next((name for name in [*FIELD_RULES, *_dpo_fields()] if name not in fields), None)
    if missing:
        raise ConfigError(f"config field {missing!r} is missing (build configs on configs.default.get_config())")
    for name, rule in FIELD_RULES.items():
        problem = rule(fields[name]) or (FILE_RULES[name](fields[name]) if local_files and name in FILE_RULES else None)
        if problem:
            raise ConfigError(f"{name}: {problem}")
    for name, kind in OPTIONAL_FIELDS.items():
        if name in fields and not isinstance(fields[name], kind if kind is not float else (int, float)):
            raise ConfigError(f"{name}: expected {kind.__name__}, got {_type_name(fields[name])} {fields[name]!r}")
    _check_lengths(config)
    _check_attention(config)
    stages = tuple(_stage_settings(config, stage, local_files) for stage in range(1, config.sdpo.num_stages + 1))
    _check_stage_data(config)
    _check_replay(config, stages)
    if config.eval.reward_prompts and not config.generate.scorer:
        raise ConfigError("eval.reward_prompts: scoring the answers to held-out prompts needs generate.scorer")
    shape = _check_mesh(config, device_count)
    config = ml_collections.ConfigDict(config.to_dict())
    config.lock()
    return CheckedConfig(config, stages, shape)


def _check_lengths(config) -> None:
    from sdpo_jax.data.batching import resolve_buckets

    data = config.data
    if data.max_prompt_length >= data.max_length:
        raise ConfigError(
            f"data.max_prompt_length: {data.max_prompt_length} leaves no room for a completion within "
            f"data.max_length {data.max_length}"
        )
    resolve_buckets(data.length_buckets, data.max_length)


def _check_attention(config) -> None:
    """Prefix sharing packs a pair into one row under a dense mask, which TPU splash attention cannot take."""
    if config.data.prefix_sharing and config.model.attention == "splash":
        raise ConfigError(
            "data.prefix_sharing: a packed pair needs a dense attention mask, which model.attention=splash "
            "cannot take; use model.attention=auto, xla or cudnn"
        )


def parse_stage_override(item: str, num_stages: int) -> tuple[int, str, str]:
    """'STAGE:section.field=value' -> (stage, 'section.field', the value's text)."""
    where = f"sdpo.stage_overrides: {item!r}"
    head, colon, assignment = item.partition(":")
    field, equals, text = assignment.partition("=")
    field = field.strip()
    if not colon or not equals or not head.strip().isdigit() or not field:
        raise ConfigError(f"{where} is not STAGE:section.field=value")
    stage = int(head)
    if not 1 <= stage <= num_stages:
        raise ConfigError(f"{where}: stage {stage} does not exist (sdpo.num_stages is {num_stages})")
    if field not in STAGE_FIELDS and (field not in _dpo_fields() or field in RUN_WIDE_DPO):
        if field not in FIELD_RULES and field not in _dpo_fields():
            raise ConfigError(f"{where}: " + unknown_field_message(field))
        raise ConfigError(
            f"{where}: {field} cannot vary per stage; allowed: dpo.* but {', '.join(RUN_WIDE_DPO)}, and "
            f"{', '.join(STAGE_FIELDS)}"
        )
    return stage, field, text.strip()


def override_value(current: Any, text: str) -> Any:
    """An override's text as the field's kind of value: text for a text field (a tuple when written as one,
    e.g. "('sigmoid','sft')"); otherwise a Python literal (numbers, True/False, tuples), else the text."""
    if isinstance(current, str) and not text.startswith(("(", "[")):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return (
        float(value) if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool) else value
    )


def stage_fields(config, stage: int) -> dict[str, Any]:
    """The fields a stage may set for itself (dpo.*, STAGE_FIELDS): the config's, with that stage's overrides
    applied."""
    fields = {
        name: value for name, value in flat_fields(config).items() if name.startswith("dpo.") or name in STAGE_FIELDS
    }
    for item in config.sdpo.stage_overrides:
        target, field, text = parse_stage_override(item, config.sdpo.num_stages)
        if target == stage:
            fields[field] = override_value(fields[field], text)
    return fields


def _kind_problem(default: Any, value: Any) -> str | None:
    """Whether ``value`` has the kind of the field's ``default`` (a number for a float, text for a string, ...)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:  # strings and tuples: a tuple field may take one string, a string field (loss_type) a tuple
        ok = isinstance(value, (str, tuple, list))
    expected = {bool: "True or False", int: "an integer", float: "a number"}.get(type(default), "text or a tuple")
    return None if ok else f"expected {expected}, got {_type_name(value)} {value!r}"


def _stage_settings(config, stage: int, local_files: bool) -> StageSettings:
    fields = stage_fields(config, stage)
    where = f"stage {stage}: " if config.sdpo.stage_overrides else ""
    for name in STAGE_FIELDS:
        problem = FIELD_RULES[name](fields[name])
        if problem:
            raise ConfigError(f"{where}{name}: {problem}")
    for field in dataclasses.fields(DPOSettings):
        problem = _kind_problem(field.default, fields[f"dpo.{field.name}"])
        if problem:
            raise ConfigError(f"{where}dpo.{field.name}: {problem}")
    try:
        dpo = DPOSettings(**{name.split(".", 1)[1]: value for name, value in fields.items() if name.startswith("dpo.")})
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None
    generate = GenerateSettings(
        **{name.split(".", 1)[1]: fields[name] for name in STAGE_FIELDS if name.startswith("generate.")}
    )
    others = {name.split(".", 1)[1]: fields[name] for name in STAGE_FIELDS if not name.startswith("generate.")}
    settings = StageSettings(stage=stage, dpo=dpo, generate=generate, **others)
    _check_generated_stage(settings, where, local_files)
    return settings


def _check_generated_stage(settings: StageSettings, where: str, local_files: bool) -> None:
    """A generated stage needs a scorer that exists and enough samples to pair."""
    g = settings.generate
    if settings.stage_data != "generated":
        return
    if not g.scorer:
        raise ConfigError(
            f"{where}generate.scorer: sdpo.stage_data=generated needs a scorer (exact_match, "
            "package.module:function or reward_model:HF_DIR)"
        )
    problem = spec_problem(g.scorer) if local_files else None
    if problem:
        raise ConfigError(f"{where}generate.scorer: {problem}")
    if g.chosen == "best" and g.samples_per_prompt < 2:
        raise ConfigError(
            f"{where}generate.samples_per_prompt: chosen=best pairs the best and the worst of at least "
            f"2 samples, got {g.samples_per_prompt}"
        )


def _check_replay(config, stages: tuple[StageSettings, ...]) -> None:
    """Replay (``sdpo.replay_fraction``, sdpo_jax.partition.replay_sample) draws from the offline chunks of the
    stages before: stage 1 has none (the run-wide value starts at stage 2; an override asking stage 1 for
    replay is refused), and with a generated stage up to and including the replaying one it is not defined
    yet (a generated stage trains on samples, not on its chunk)."""
    where = "stage {}: " if config.sdpo.stage_overrides else ""
    first = stages[0]
    if first.replay_fraction and first.replay_fraction != config.sdpo.replay_fraction:
        raise ConfigError(
            f"stage 1: sdpo.replay_fraction: {first.replay_fraction:g}, but stage 1 has no earlier chunks to replay"
        )
    for settings in stages[1:]:
        generated = [s.stage for s in stages[: settings.stage] if s.stage_data == "generated"]
        if settings.replay_fraction and generated:
            raise ConfigError(
                f"{where.format(settings.stage)}sdpo.replay_fraction: {settings.replay_fraction:g}, but stage(s) "
                f"{', '.join(map(str, generated))} use sdpo.stage_data=generated; replay is defined for offline "
                "stages only for now"
            )


def _check_stage_data(config) -> None:
    """One source per stage where the partition needs it; enough pairs for every stage within data.limit."""
    from sdpo_jax.data.load import source_list

    sources, stages, sdpo = source_list(config.data.train), config.sdpo.num_stages, config.sdpo
    per_source = sdpo.partition == "datasets" or (
        sdpo.partition == "easy_to_hard" and sdpo.difficulty == "source_accuracy"
    )
    if per_source and len(sources) != stages:
        rule = "datasets" if sdpo.partition == "datasets" else "easy_to_hard with difficulty source_accuracy"
        raise ConfigError(
            f"sdpo.num_stages: {stages} stages, but sdpo.partition={rule} puts one source per stage and "
            f"data.train has {len(sources)} source(s)"
        )
    if sdpo.stage_fractions and len(sdpo.stage_fractions) != stages:
        raise ConfigError(f"sdpo.stage_fractions: {len(sdpo.stage_fractions)} fractions for {stages} stages")
    if config.data.limit and not per_source:
        held_out = config.data.eval_fraction if not config.data.eval else 0.0
        available = int(config.data.limit * len(sources) * (1 - held_out))
        if available < stages:
            raise ConfigError(
                f"sdpo.num_stages: {stages} stages but data.limit={config.data.limit} leaves at most "
                f"{available} training pairs"
            )


def _check_mesh(config, device_count: int) -> tuple[int, int, int]:
    m = config.mesh
    try:
        shape = global_mesh_shape(m.data, m.fsdp, m.tensor, device_count, m.dcn_data)
    except MeshError as err:
        raise ConfigError(f"mesh: {str(err).removeprefix('mesh: ')}") from None
    replicas = shape[0] * shape[1]
    batch, accum = config.train.batch_size, config.train.grad_accum
    if batch % accum:
        raise ConfigError(f"train.grad_accum: train.batch_size {batch} does not split into {accum} micro-batches")
    if (batch // accum) % replicas:
        raise ConfigError(
            f"train.batch_size: {batch} pairs / grad_accum {accum} = {batch // accum} per micro-batch, not a "
            f"multiple of the {replicas} devices the batch splits over (dcn_data x data x fsdp)"
        )
    if config.eval.choices and config.eval.choices_batch_size % replicas:
        raise ConfigError(
            f"eval.choices_batch_size: {config.eval.choices_batch_size} questions do not split over the "
            f"{replicas} devices (dcn_data x data x fsdp)"
        )
    return shape


def describe_fields(config: ml_collections.ConfigDict) -> list[str]:
    """'section.field = value' lines of every field, for --show_config."""
    return [f"{name} = {value!r}" for name, value in sorted(flat_fields(config).items())]


def resume_neutral(name: str) -> bool:
    """Whether a field may differ between a run and its resumption (it does not change the result)."""
    return name in RESUME_NEUTRAL or name.startswith(("log.", "mesh.", "hardware."))


# Fields that do not change what a run computes: where it lives, how often it saves and logs, how
# it is laid out on devices (snapshots restore onto any mesh), exact memory knobs.
RESUME_NEUTRAL = frozenset(
    {
        "output_dir",
        "data.cache_dir",
        "data.num_proc",
        "checkpoint.force_resume",
        "checkpoint.every_steps",
        "checkpoint.keep",
        "checkpoint.keep_stages",
        "checkpoint.async_save",
        "train.log_every",
        "train.host_allocator",
        "model.remat",
        "model.logprob_chunk",
    }
)
