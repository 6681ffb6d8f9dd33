"""The sDPO stage driver: T rounds of DPO, each against a reference model, each from the last one's result.

    M_0 = SFT model;  for t = 1..T:  policy_t starts at M_{t-1} with a fresh optimizer and its own
    schedule, DPO against reference_t on D_t  ->  M_t;   reference_t = M_{t-1} (the paper)

T = 1 is plain DPO through the same code. The stage family (each setting per stage, except where
noted; sdpo_jax.config_check builds one immutable `StageSettings` record per stage):
  * ``sdpo.reference = initial``: M_0 is every stage's reference (iterative DPO with a fixed reference);
  * ``sdpo.ref_sync_steps`` N > 0: TR-DPO's soft update of the reference inside the stage;
  * ``sdpo.stage_data = generated``: D_t is built from M_{t-1}'s own scored samples on the chunk's
    prompts (sdpo_jax.stage_data);
  * ``sdpo.replay_fraction`` f > 0: offline stage t >= 2 trains on D_t plus a seeded sample of
    round(f |D_t|) pairs of D_1..D_(t-1) (sdpo_jax.partition.replay_sample; planned at the start);
  * ``sdpo.policy_init = sft`` (run-wide): the ablation whose policy starts every stage from M_0.
What happens in stage t is `sdpo_jax.stage_runner.run_stage`; what every stage shares (model, mesh,
compiled steps, caches) is `sdpo_jax.run_context.RunContext`; what a stage records is
`sdpo_jax.stage_report.StageReport`. Held-out metrics always use M_0 as their reference (its eval-set
log-probs are computed once), so rewards are comparable across stages: eval_after of stage t is M_t
against M_0.

Everything that a rerun of the same command needs to continue exactly is on disk: mid-stage
Orbax checkpoints (train state, data position, a moving reference), end-of-stage snapshots, the
partition, the reference log-probs and generated pairs of each stage (cached, keyed by what made
them; layout in sdpo_jax.checkpointing and sdpo_jax.run_context).
"""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs.default import get_config as default_config
from sdpo_jax.checkpointing import RunCheckpoints, abstract_with_shardings
from sdpo_jax.choice_eval import encode_choices, load_choice_questions
from sdpo_jax.config_check import CheckedConfig, check_config, flat_fields, resume_neutral
from sdpo_jax.data.batching import resolve_buckets
from sdpo_jax.data.load import load_datasets, source_lines
from sdpo_jax.errors import ConfigError
from sdpo_jax.host_exchange import on_main_process
from sdpo_jax.host_memory import host_allocations_retained
from sdpo_jax.models.loading import load_model, load_tokenizer
from sdpo_jax.optim import OptimizerSettings, make_optimizer
from sdpo_jax.partition import earlier_stages, plan_stages, with_replay
from sdpo_jax.placement import global_batch, place, state_shardings
from sdpo_jax.progress import bars_enabled, progress
from sdpo_jax.reference import attach_reference
from sdpo_jax.report import write_report
from sdpo_jax.run_context import RunContext, folder_identity
from sdpo_jax.run_lock import RunFolderLock
from sdpo_jax.run_log import RunLog, read_json
from sdpo_jax.scorers import load_reward_prompts
from sdpo_jax.sharding import build_mesh, check_process_rows
from sdpo_jax.stage_data import generated_origin
from sdpo_jax.stage_report import StageReport
from sdpo_jax.stage_runner import HeldOut, Preempted, StageModels, run_stage
from sdpo_jax.train_step import TrainState

PREEMPTED_EXIT_CODE = 143
CHOICE_MAX_LENGTH = 512  # tokens per packed multiple-choice question (longer contexts lose their start)
__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "check_resume_config", "train"]


def check_resume_config(stored: dict, current: dict, force: bool) -> None:
    """A resumed run must have the config it started with, up to fields that do not change its result
    (where it lives, how often it saves and logs, its device layout: config_check.resume_neutral). A field
    the stored config lacks (it was written before the field existed) counts as its default."""
    a, b, defaults = (json.loads(json.dumps(flat_fields(d))) for d in (stored, current, default_config()))
    differences = [
        f"{k}: {a.get(k, defaults.get(k))!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, defaults.get(k)) != b.get(k) and not resume_neutral(k)
    ]
    if differences and not force:
        raise ConfigError(
            "the config differs from the run already in output_dir ("
            + "; ".join(differences)
            + "); use another output_dir, or --config.checkpoint.force_resume=True"
        )


def train(config: ml_collections.ConfigDict | CheckedConfig) -> list[dict]:
    """Run (or resume) every stage of ``config`` (checked first when it is a plain ConfigDict);
    returns the stage report. Nothing is written before the config is accepted."""
    checked = config if isinstance(config, CheckedConfig) else check_config(config, jax.device_count())
    out = Path(checked.config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, is_main=jax.process_index() == 0)
    lock = RunFolderLock(out)
    warning = on_main_process(lock.acquire, f"lock {out}")  # a second trainer on the folder stops every process
    if warning:
        log.info(f"warning: {warning}")
    try:
        with log.library_messages():
            return [entry.to_json() for entry in _train_locked(checked, log)]
    finally:
        lock.release()


def _train_locked(checked: CheckedConfig, log: RunLog) -> list[StageReport]:
    config = checked.config
    out = Path(config.output_dir)
    resolved = config.to_dict()
    if (out / "config.json").exists():
        check_resume_config(read_json(out / "config.json"), resolved, config.checkpoint.force_resume)
    log.write_json("config.json", resolved)

    mesh = build_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, dcn_data=config.mesh.dcn_data)
    check_process_rows(mesh, config.train.batch_size)
    model, sft_params, folder = load_model(config.model, mesh=mesh)  # each tensor read straight onto its devices
    tokenizer = load_tokenizer(folder)
    bars = bars_enabled(config.log.progress, log.is_main)
    train_pairs, eval_pairs = load_datasets(
        config.data,
        tokenizer,
        vocab_size=model.config.vocab_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        progress_bars=bars,
        log_sources=False,
    )
    probe_shardings, abstract = state_shardings(model, make_optimizer(OptimizerSettings()), mesh)
    checkpoints = RunCheckpoints(
        out, config.checkpoint.keep, config.checkpoint.async_save, config.checkpoint.keep_stages, warn=log.info
    )
    ctx = RunContext(
        config,
        checked.stages,
        log,
        checkpoints,
        model,
        folder,
        mesh,
        resolve_buckets(config.data.length_buckets, config.data.max_length),
        probe_shardings.params,
        abstract.params,
        tokenizer,
        bars,
    )
    sft_key = folder_identity(folder)
    data_key = train_pairs.identity()

    ctx.user_prompt_ids(config.eval.prompts, "eval.prompts")  # fail now, not after the first stage
    if config.eval.reward_prompts:
        ctx.reward_prompts = load_reward_prompts(config.eval.reward_prompts)
        ctx.user_prompt_ids([text for text, _ in ctx.reward_prompts], "eval.reward_prompts")
    if config.eval.choices:
        questions = load_choice_questions(config.eval.choices, limit=config.eval.choices_limit or None)
        ctx.choice_set = encode_choices(
            tokenizer,
            questions,
            vocab_size=model.config.vocab_size,
            max_length=CHOICE_MAX_LENGTH,
            chat_template=config.eval.choices_chat_template,
        )
    plan = _plan(ctx, train_pairs, sft_params, f"{sft_key}-{data_key}")
    _summary(ctx, train_pairs, eval_pairs, plan)
    held_out = HeldOut(
        eval_pairs,
        ctx.cached_reference_logps(
            sft_params,
            eval_pairs,
            out / "reference" / "eval_sft.npz",
            f"{sft_key}-eval-{eval_pairs.identity()}",
            "reference log-probs of the eval pairs (M0)",
        )
        if eval_pairs
        else None,
    )
    finished = ctx.checkpoints.finished_stages()
    report = [StageReport.from_json(entry) for entry in log.read_report() if entry["stage"] in finished]
    models = StageModels(sft_params, sft_key, sft_params, sft_key, "M0")
    if finished:
        last = finished[-1]
        models.previous = ctx.checkpoints.load_stage(
            last, abstract_with_shardings(ctx.abstract_params, ctx.param_shardings)
        )[0]
        models.previous_key, models.previous_name = f"stage{last}-{sft_key}-{data_key}", f"M{last}"
        log.info(f"resuming after finished stage {last}")
    stop = {"requested": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    try:
        for stage in range(len(finished) + 1, config.sdpo.num_stages + 1):
            entry = run_stage(
                ctx,
                ctx.stages[stage - 1],
                models,
                train_pairs.subset(plan.training_indices(stage)),
                plan.sources[stage - 1],
                plan.replayed_count(stage),
                held_out,
                stop,
                report,
            )
            report.append(entry)
            log.write_report([e.to_json() for e in report])
            models.previous = ctx.checkpoints.load_stage(
                stage, abstract_with_shardings(ctx.abstract_params, ctx.param_shardings)
            )[0]
            models.previous_key, models.previous_name = f"stage{stage}-{sft_key}-{data_key}", f"M{stage}"
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        ctx.checkpoints.wait()
        ctx.checkpoints.close()
        log.close()
    if jax.process_index() == 0:
        log.info(f"done: {len(report)} stage(s); {log.report_path}, report {write_report(out)[-1]}")
    return report


def _summary(run: RunContext, train_pairs, eval_pairs, plan) -> None:
    """The start-up summary: model, mesh, data, the stages and their steps, where outputs go."""
    config, model = run.config, run.model
    sizes = [len(plan.training_indices(settings.stage)) for settings in run.stages]
    steps = [settings.steps(-(-size // config.train.batch_size)) for settings, size in zip(run.stages, sizes)]
    lines = [
        f"model {run.model_folder}: {model.config.num_params / 1e6:.1f}M params, {model.config.num_hidden_layers} "
        "layers, "
        f"compute {config.model.dtype}, attention {config.model.attention}, remat {config.model.remat}",
        f"mesh {dict(run.mesh.shape)} over {jax.device_count()} {jax.default_backend()} device(s), "
        f"{jax.process_count()} process(es); host allocator "
        f"{'retain' if host_allocations_retained() else 'system'} (train.host_allocator {config.train.host_allocator})",
        f"data {len(train_pairs)} train pairs, {len(eval_pairs) if eval_pairs else 0} held-out pairs, length buckets "
        f"{run.buckets}, {config.train.batch_size} pairs per step",
        f"{config.sdpo.num_stages} stage(s), partition {config.sdpo.partition}, policy starts from "
        f"{'M(t-1)' if config.sdpo.policy_init == 'previous' else 'M0 (ablation)'}:",
    ]
    for settings, indices, sources, count in zip(run.stages, plan.indices, plan.sources, steps):
        replayed = plan.replayed_count(settings.stage)
        lines.append(f"  stage {settings.stage}: {_stage_line(settings, len(indices), replayed, sources, count)}")
    for pairs in (
        train_pairs,
        eval_pairs if config.data.eval else None,
    ):  # (held-out pairs split from train: same sources)
        for meta in pairs.report["sources"] if pairs is not None else []:
            info, warnings = source_lines(meta)
            lines += [f"  {info}"] + [f"  warning: {line}" for line in warnings]
    lines.append(
        f"outputs in {Path(config.output_dir).resolve()} (metrics.jsonl, stage_report.json, report.md, "
        "plots/, tensorboard/, checkpoints/)"
    )
    lines.append(_disk_estimate(run, steps))
    for line in lines:
        run.log.info(line)


def _stage_line(settings, pairs: int, replayed: int, sources: list[str], steps: int) -> str:
    """How a stage gets its pairs and reference, for the start-up summary (``pairs``: its chunk's;
    ``replayed``: the earlier chunks' pairs it replays besides)."""
    t, g = settings.stage, settings.generate
    if settings.stage_data == "generated":
        line = (
            f"pairs from {generated_origin(t, sources, pairs)} ({g.samples_per_prompt} per prompt, scored by "
            f"{g.scorer}); "
            + (f"{settings.steps_per_stage} steps" if settings.steps_per_stage else "one epoch of them")
        )
    else:
        line = f"{pairs} pairs from {', '.join(sources)}"
        if replayed:
            line += (
                f" + {replayed} replayed from {earlier_stages(t)} (sdpo.replay_fraction {settings.replay_fraction:g})"
            )
        line += f"; {steps} steps"
    line += f"; reference {'M0' if settings.reference == 'initial' else f'M{t - 1}'}"
    if settings.moving_reference:
        line += f", moving (TR-DPO: every {settings.ref_sync_steps} steps, alpha {settings.ref_mixup_alpha:g})"
    return line


def _disk_estimate(run: RunContext, steps: list[int]) -> str:
    """Roughly what the run's checkpoints take: the stage snapshots kept at the end, and the mid-stage
    checkpoints (params and Adam's two moments) that exist while a stage runs."""
    config = run.config.checkpoint
    params = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(run.abstract_params))
    stages = len(steps)
    kept = min(stages, config.keep_stages) if config.keep_stages else stages
    mid = max(min(config.keep, (count - 1) // config.every_steps) for count in steps)
    line = f"disk: ~{_gib(kept * params)} of stage snapshots at the end ({kept} x {_gib(params)})"
    if mid:
        line += f", up to {_gib(mid * 3 * params)} more of mid-stage checkpoints while a stage runs"
    if kept > 1:
        line += "; --config.checkpoint.keep_stages=1 keeps only the last stage's"
    return line


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def _plan(run: RunContext, train_pairs, sft_params, key: str):
    config = run.config
    gamma = None
    if config.sdpo.partition == "easy_to_hard":
        gamma = _difficulty_scores(run, train_pairs, sft_params, key)
    names = [name for name, _ in train_pairs.sources]
    chunks = plan_stages(
        config.sdpo.partition,
        config.sdpo.num_stages,
        train_pairs.source_id,
        names,
        seed=config.train.seed,
        fractions=tuple(config.sdpo.stage_fractions),
        difficulty=config.sdpo.difficulty,
        gamma=gamma,
    )
    plan = with_replay(chunks, [settings.replay_fraction for settings in run.stages], config.train.seed)
    run.log.write_json(
        "partition.json",
        {
            "partition": config.sdpo.partition,
            "difficulty": config.sdpo.difficulty if gamma is not None else None,
            "source_scores": plan.source_scores,
            "stages": [
                {"stage": t + 1, "num_pairs": len(idx), "sources": src, "replayed": plan.replayed_count(t + 1)}
                for t, (idx, src) in enumerate(zip(plan.indices, plan.sources))
            ],
        },
    )
    if plan.source_scores:
        run.log.info(
            "easy-to-hard by SFT preference accuracy: "
            + ", ".join(f"{k} {v:.3f}" for k, v in plan.source_scores.items())
        )
    return plan


def _difficulty_scores(run: RunContext, train_pairs, sft_params, key: str) -> np.ndarray:
    """Per-pair easiness (higher = easier): the SFT log-ratio, or the margin a short DPO probe learns (both
    on the plain sequence log-probs, whatever dpo.ld_alpha)."""
    config, cache = run.config, Path(run.config.output_dir) / "reference"
    chosen, rejected = run.cached_reference_logps(
        sft_params,
        train_pairs,
        cache / "train_sft.npz",
        key,
        "difficulty: SFT log-probs of every train pair",
        ld_alpha=1.0,
    )
    if config.sdpo.difficulty != "dpo_probe":
        return chosen - rejected
    steps, first = config.sdpo.probe_steps, run.stages[0]
    optimizer_settings = OptimizerSettings(
        learning_rate=first.learning_rate, total_steps=steps, max_grad_norm=first.max_grad_norm
    )
    optimizer = make_optimizer(optimizer_settings)
    shardings, _ = state_shardings(run.model, optimizer, run.mesh)
    step_fn = run.train_step(
        dataclasses.replace(first.dpo, ld_alpha=1.0),
        optimizer_settings,
        optimizer,
        shardings,
        with_reference_params=False,
    )
    probe_key = f"{key}-probe{steps}-{first.learning_rate}-{first.dpo.beta}-{config.train.seed}"
    probe = run.stored_logps(cache / "train_probe.npz", probe_key)
    if probe is None:
        run.log.info(f"DPO probe: {steps} steps over all {len(train_pairs)} pairs to score difficulty")
        state = place(TrainState.create(jax.tree_util.tree_map(jnp.copy, sft_params), optimizer), shardings)
        batcher = run.batches(train_pairs, shuffle=True, seed=config.train.seed)
        for _ in progress(range(steps), steps, "difficulty: DPO probe steps", run.bars, unit="step"):
            state, _ = step_fn(state, None, global_batch(attach_reference(next(batcher), chosen, rejected), run.mesh))
        probe = run.cached_reference_logps(
            state.params,
            train_pairs,
            cache / "train_probe.npz",
            probe_key,
            "difficulty: probe log-probs of every train pair",
            ld_alpha=1.0,
        )
    probe_chosen, probe_rejected = probe
    return (probe_chosen - chosen) - (probe_rejected - rejected)
