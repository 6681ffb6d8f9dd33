"""One stage of sDPO, in three parts: prepare, train, finish.

    run_stage(ctx, settings, models, chunk, sources, replayed, held_out, stop, report) -> StageReport

prepare: the stage's pairs (the offline chunk with any replayed earlier pairs, or pairs from M(t-1)'s
    samples, sdpo_jax.stage_data);
    its reference, M(t-1) or M0 (``sdpo.reference``), and that reference's log-probs of the pairs;
    the data order, optimizer and compiled step; the train state restored from the newest intact
    mid-stage checkpoint, or fresh from M(t-1) (M0 with ``sdpo.policy_init = sft``) after the
    'before' checks of M(t-1).
train: the optimizer steps. With ``sdpo.ref_sync_steps`` = N > 0 the reference moves (TR-DPO):
    after every N-th step, reference <- alpha * policy + (1 - alpha) * reference; its log-probs are
    then computed inside the step, and the moving reference is saved with every checkpoint.
finish: the 'after' checks of M(t), then the snapshot of M(t) (refused when not finite).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdpo_jax.checkpointing import abstract_with_shardings
from sdpo_jax.config_check import StageSettings
from sdpo_jax.data.batching import PairBatcher
from sdpo_jax.divergence import LossWatch, first_non_finite
from sdpo_jax.errors import SdpoError, TrainingDiverged
from sdpo_jax.host_exchange import LaggedAgreement
from sdpo_jax.optim import make_optimizer
from sdpo_jax.partition import earlier_stages
from sdpo_jax.placement import global_batch, place, state_shardings
from sdpo_jax.progress import progress
from sdpo_jax.reference import attach_reference, mix_reference
from sdpo_jax.run_context import RunContext
from sdpo_jax.stage_data import (
    StageSampler,
    chunk_prompts,
    generated_origin,
    generated_stage,
    load_generated,
    sampling_key,
)
from sdpo_jax.stage_report import StageReport
from sdpo_jax.train_step import TrainState


class Preempted(Exception):
    """SIGTERM arrived; the state was saved and the run can be resumed by the same command."""


@dataclasses.dataclass
class StageModels:
    """The models a stage draws on, with the keys that identify them in caches: M0 and M(t-1)."""

    sft: Any
    sft_key: str
    previous: Any
    previous_key: str
    previous_name: str  # 'M0', 'M1', ...


@dataclasses.dataclass
class HeldOut:
    """The held-out preference pairs and M0's log-probs of them (every stage's eval reference), or None."""

    pairs: Any
    reference: tuple[np.ndarray, np.ndarray] | None


@dataclasses.dataclass
class _Prepared:
    """A stage ready to train: its data order, compiled step, starting state and report entry."""

    settings: StageSettings
    steps: int
    chunk_key: str  # the pairs and their reference: a mid-stage checkpoint must match it
    batcher: PairBatcher
    step_fn: Any
    state: Any
    start_step: int
    ref_logps: tuple[np.ndarray, np.ndarray] | None  # precomputed reference log-probs, or None (reference in the step)
    ref_params: Any  # the reference given to the step when it is in the step (it moves with ref_sync_steps)
    step_offset: int  # run-wide step of this stage's step 0
    entry: StageReport


def run_stage(
    ctx: RunContext,
    settings: StageSettings,
    models: StageModels,
    chunk,
    sources: list[str],
    replayed: int,
    held_out: HeldOut,
    stop: dict,
    report: list[StageReport],
) -> StageReport:
    """Stage t (module docstring); ``report`` holds the stages before it.

    ``ctx``: what every stage of the run shares (config, model, mesh, tokenizer, log, checkpoints,
    compiled steps); ``settings``: this stage's StageSettings (``ctx.stages[t - 1]``: t itself,
    loss, optimizer, reference and stage data settings); ``models``: M0 and M(t-1), with their
    cache keys; ``chunk``: the stage's chunk of the training pairs (TokenizedPairs), trained on as
    it is (offline: with its replayed earlier pairs, ``sdpo.replay_fraction``) or whose prompts are
    sampled (generated); ``sources``: the names of the sources the chunk comes from, for the log and
    the report; ``replayed``: how many of ``chunk``'s pairs are replayed from earlier chunks (0: none);
    ``held_out``: the held-out pairs and M0's
    log-probs of them (``held_out.pairs`` None: no held-out evaluation); ``stop``:
    ``{"requested": bool}``, set by the SIGTERM handler; once it is true on any process, every
    process saves the state at the same step and `Preempted` is raised (unless that step ends the
    stage); ``report``: the StageReports of stages 1..t-1, in order (run-wide step numbers, and
    the measurements of M(t-1) taken after stage t-1). Returns stage t's StageReport.
    """
    prepared = _prepare(ctx, settings, models, chunk, sources, replayed, held_out, report)
    state = _train(ctx, prepared, stop)
    return _finish(ctx, prepared, state, held_out)


def _stage_pairs(ctx: RunContext, settings: StageSettings, models: StageModels, chunk) -> tuple[Any, dict | None]:
    """The offline chunk, or (sdpo.stage_data = generated) the pairs of M(t-1)'s scored samples on its prompts."""
    if settings.stage_data == "offline":
        return chunk, None
    stage, config = settings.stage, ctx.config
    prompts = chunk_prompts(chunk)
    sampler = StageSampler(
        ctx.model,
        models.previous,
        ctx.tokenizer,
        ctx.mesh,
        ctx.scorer(settings.generate.scorer),
        settings.generate,
        config.train.seed,
    )
    key = sampling_key(models.previous_key, prompts, settings.generate, config.train.seed, stage)
    path, summary = generated_stage(
        ctx.output_dir / "generated",
        stage,
        sampler,
        prompts,
        key,
        lambda items, n: progress(items, n, f"stage {stage}: sampling {models.previous_name}", ctx.bars, unit="batch"),
        ctx.log.info,
    )
    ctx.log.info(
        f"stage {stage}: {summary['pairs']} pairs from {summary['prompts']} prompts x "
        f"{settings.generate.samples_per_prompt} samples of {models.previous_name} (mean best score "
        f"{summary['mean_best_score']:.3f}, worst {summary['mean_worst_score']:.3f}); {path}"
    )
    if not summary["pairs"]:
        raise SdpoError(
            f"stage {stage}: the samples gave no pairs (no prompt's chosen scored above its rejected by at "
            f"least generate.min_margin {settings.generate.min_margin}); raise generate.temperature or "
            f"generate.samples_per_prompt, lower generate.min_margin, use generate.chosen=gold, or check that "
            f"generate.scorer {settings.generate.scorer} tells the samples apart"
        )
    pairs = load_generated(path, config.data, ctx.tokenizer, ctx.model.config.vocab_size)
    return pairs, {**summary, "file": str(path)}


def _prepare(
    ctx: RunContext,
    settings: StageSettings,
    models: StageModels,
    chunk,
    sources,
    replayed: int,
    held_out: HeldOut,
    report: list[StageReport],
) -> _Prepared:
    """The stage's pairs, reference, data order, optimizer and compiled step, and its starting state.

    The arguments are `run_stage`'s (``report``: the earlier stages' reports). The state is the
    newest intact mid-stage checkpoint of the stage when there is one (refused when its pairs or
    reference differ, unless ``checkpoint.force_resume``), else fresh from M(t-1) (or M0) after
    `_checks_before`.
    """
    config, log, stage = ctx.config, ctx.log, settings.stage
    pairs, generated = _stage_pairs(ctx, settings, models, chunk)
    initial = settings.reference == "initial"
    ref_params, ref_key, ref_name = (
        (models.sft, models.sft_key, "M0") if initial else (models.previous, models.previous_key, models.previous_name)
    )
    chunk_key = f"{ref_key}-{pairs.identity()}"
    ref_chosen, ref_rejected = ctx.cached_reference_logps(
        ref_params,
        pairs,
        ctx.output_dir / "reference" / f"stage_{stage}.npz",
        chunk_key,
        f"stage {stage}: reference log-probs of its pairs",
    )
    gamma = float(np.mean(ref_chosen - ref_rejected))
    if ctx.ld_alpha != 1.0:  # gamma is defined on the plain sums; the loss reads LD-weighted ones
        plain = ctx.cached_reference_logps(
            ref_params,
            pairs,
            ctx.output_dir / "reference" / f"stage_{stage}_plain.npz",
            chunk_key,
            f"stage {stage}: plain reference log-probs (gamma)",
            ld_alpha=1.0,
        )
        gamma = float(np.mean(plain[0] - plain[1]))
    batcher = ctx.batches(pairs, shuffle=True, seed=config.train.seed + stage)
    steps = settings.steps(batcher.steps_per_epoch)
    optimizer_settings = settings.optimizer(steps)
    optimizer = make_optimizer(optimizer_settings)
    shardings, abstract_state = state_shardings(ctx.model, optimizer, ctx.mesh)
    in_step = settings.moving_reference or not config.train.precompute_reference
    step_fn = ctx.train_step(settings.dpo, optimizer_settings, optimizer, shardings, with_reference_params=in_step)
    entry = StageReport(
        stage=stage,
        num_pairs=len(pairs),
        replayed=replayed,
        sources=sources,
        steps=steps,
        ref_logratio_mean=gamma,
        reference={
            "model": ref_name,
            "moved": settings.moving_reference,
            "sync_steps": settings.ref_sync_steps,
            "mixup_alpha": settings.ref_mixup_alpha,
        },
        dpo={k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings.dpo).items()},
        learning_rate=settings.learning_rate,
        generated=generated,
    )
    step_offset = sum(e.steps for e in report)
    abstract_reference = (
        abstract_with_shardings(ctx.abstract_params, ctx.param_shardings) if settings.moving_reference else None
    )
    restored = ctx.checkpoints.restore_latest(
        stage, abstract_with_shardings(abstract_state, shardings), abstract_reference
    )
    ctx.open_trackers(report, stage, restored[0] if restored else 0)
    if restored is not None:
        start_step, state, meta, moved_reference = restored
        if meta["chunk"] != chunk_key and not config.checkpoint.force_resume:
            raise SdpoError(
                f"stage {stage}: the training data or its reference differ from the checkpoint's "
                f"(tokenized pairs of the chunk or the reference model changed); use another output_dir"
            )
        batcher.restore(meta["data"])
        for name in ("eval_before", "generations_before", "choices_before", "reward_before"):
            setattr(entry, name, meta.get(name, getattr(entry, name)))
        ref_params = moved_reference if settings.moving_reference else ref_params
        log.info(f"stage {stage}: resuming at step {start_step}/{steps}")
    else:
        _checks_before(ctx, entry, models.previous, held_out, settings, step_offset, report[-1] if report else None)
        state = place(
            TrainState.create(jax.tree_util.tree_map(jnp.copy, _start_params(ctx, models)), optimizer), shardings
        )
        start_step = 0
    origin = generated_origin(stage, sources) if generated else ", ".join(sources)
    if replayed:
        origin += f" and {replayed} replayed from {earlier_stages(stage)}"
    log.info(
        f"stage {stage}/{config.sdpo.num_stages}: {len(pairs)} pairs from {origin}, {steps} steps, "
        f"reference {ref_name}{' (moving, TR-DPO)' if settings.moving_reference else ''}, reference log-ratio mean "
        f"{entry.ref_logratio_mean:.3f}"
    )
    if not in_step and _reference_not_needed_again(ctx, settings, initial):
        # The reference lives on as log-probs and the policy holds its own copy: free the device
        # buffers of M_{t-1} (for stage 1, the SFT model) for the optimizer state and activations.
        for leaf in jax.tree_util.tree_leaves(ref_params):
            leaf.delete()
    return _Prepared(
        settings,
        steps,
        chunk_key,
        batcher,
        step_fn,
        state,
        start_step,
        None if in_step else (ref_chosen, ref_rejected),
        ref_params if in_step else None,
        step_offset,
        entry,
    )


def _start_params(ctx: RunContext, models: StageModels):
    """Where the policy starts: M(t-1) (the paper), or M0 with sdpo.policy_init = sft (the ablation)."""
    return models.sft if ctx.config.sdpo.policy_init == "sft" else models.previous


def _reference_not_needed_again(ctx: RunContext, settings: StageSettings, initial: bool) -> bool:
    """Whether the reference's device buffers can go once its log-probs are known: it is M(t-1), the policy
    starts from its own copy of it, and (for stage 1, where it is M0) no later stage needs M0 again."""
    later = ctx.stages[settings.stage :]
    return (
        not initial
        and ctx.config.sdpo.policy_init == "previous"
        and (settings.stage > 1 or all(s.reference == "previous" for s in later))
    )


def _checks_before(
    ctx: RunContext,
    entry: StageReport,
    params,
    held_out: HeldOut,
    settings: StageSettings,
    step_offset: int,
    previous: StageReport | None,
) -> None:
    """Held-out metrics, answers, choice accuracy and reward of M(t-1), into ``entry`` (what the previous
    stage measured after training is reused).

    ``entry``: the stage's StageReport, whose ``*_before`` fields are filled in; ``params``:
    M(t-1)'s parameters, placed on the mesh; ``held_out``: as in `run_stage` (no pairs: no
    held-out eval); ``settings``: the stage's StageSettings (its number and DPO settings for the
    eval); ``step_offset``: the run-wide step of this stage's step 0 (the earlier stages' steps
    summed), under which the 'before' metrics are logged; ``previous``: the report of stage t-1,
    whose answers, choice accuracy and reward after training are M(t-1)'s and are copied, or None
    for stage 1, where M0 is measured now. The held-out eval (against M0's log-probs) is run anew
    either way.
    """
    stage, log = settings.stage, ctx.log
    if held_out.pairs is not None:
        entry.eval_before = ctx.evaluate(
            params, held_out.pairs, held_out.reference, settings.dpo, f"stage {stage}: held-out eval before"
        )
        log.metrics({"split": "eval", "when": "before", "stage": stage, "step": 0, **entry.eval_before}, step_offset)
    if previous is None:
        entry.generations_before, entry.choices_before, entry.reward_before = (
            ctx.generations(params),
            ctx.choices(params),
            ctx.rewards(params),
        )
    else:
        entry.generations_before, entry.choices_before, entry.reward_before = (
            previous.generations_after,
            previous.choices_after,
            previous.reward_after,
        )
    for split, values in (("choices", entry.choices_before), ("reward", entry.reward_before)):
        if values:
            log.metrics({"split": split, "when": "before", "stage": stage, "step": 0, **values}, step_offset)


def _train(ctx: RunContext, s: _Prepared, stop: dict) -> Any:
    """The stage's optimizer steps from ``s.start_step``: metrics logged, mid-stage checkpoints saved,
    a SIGTERM on any process saves and raises `Preempted`, a non-finite loss raises `TrainingDiverged`."""
    config, log, stage, steps, settings = ctx.config, ctx.log, s.settings.stage, s.steps, s.settings
    state, reference = s.state, s.ref_params
    advice = f"train.learning_rate {settings.learning_rate:g}, train.max_grad_norm {settings.max_grad_norm:g}"
    watch = LossWatch(stage, advice, log.info, _first_logged_loss(ctx, stage) if s.start_step else None)
    started, agreement = time.perf_counter(), LaggedAgreement()
    for step in progress(
        range(s.start_step, steps), steps - s.start_step, f"stage {stage}: training", ctx.bars, unit="step"
    ):
        local = next(s.batcher)
        if s.ref_logps is not None:
            local = attach_reference(local, *s.ref_logps)
        state, metrics = s.step_fn(state, reference, global_batch(local, ctx.mesh))
        done = step + 1
        if settings.moving_reference and done % settings.ref_sync_steps == 0:
            reference = mix_reference(state.params, reference, settings.ref_mixup_alpha)
        watch.track(done, metrics)
        if done % config.train.log_every == 0 or done == steps:
            row = {k: float(v) for k, v in jax.device_get(metrics).items()}
            log.metrics({"split": "train", "stage": stage, "step": done, **row}, s.step_offset + done)
            watch.check()
            watch.observe(done, row)
            rate = (time.perf_counter() - started) / (done - s.start_step)
            log.info(
                f"stage {stage} step {done}/{steps} loss {row['loss']:.4f} acc {row['rewards/accuracies']:.2f} "
                f"margin {row['rewards/margins']:.4f} ({rate:.2f} s/step, ETA {rate * (steps - done):.0f} s)"
            )
        stopping = agreement.poll(stop["requested"])  # all processes save and stop at the same step
        if done < steps and (done % config.checkpoint.every_steps == 0 or stopping):
            watch.check()  # nothing non-finite is saved
            e = s.entry
            ctx.checkpoints.save_step(
                stage,
                done,
                state,
                {
                    "stage": stage,
                    "step": done,
                    "data": s.batcher.state(),
                    "chunk": s.chunk_key,
                    "eval_before": e.eval_before,
                    "generations_before": e.generations_before,
                    "choices_before": e.choices_before,
                    "reward_before": e.reward_before,
                    "config": config.to_dict(),
                },
                reference=reference if settings.moving_reference else None,
            )
        if stopping and done < steps:
            ctx.checkpoints.wait()
            log.info(
                f"SIGTERM (on at least one process): saved stage {stage} step {done}; run the same command to resume"
            )
            raise Preempted(f"preempted at stage {stage} step {done}")
    watch.check()
    return state


def _first_logged_loss(ctx: RunContext, stage: int) -> float | None:
    """The first train loss metrics.jsonl holds for ``stage`` (a resumed stage's climb baseline), on process 0."""
    rows = ctx.log.read_metrics() if ctx.log.is_main else []
    return next((row["loss"] for row in rows if row["stage"] == stage and row["split"] == "train"), None)


def _finish(ctx: RunContext, s: _Prepared, state, held_out: HeldOut) -> StageReport:
    """Checks of M(t), then its snapshot (refused when any parameter is not finite)."""
    log, stage, steps, entry = ctx.log, s.settings.stage, s.steps, s.entry
    bad = first_non_finite(state.params)
    if bad is not None:
        raise TrainingDiverged(
            f"stage {stage}: parameter {bad} is not finite after step {steps}; the stage was not saved"
        )
    end = s.step_offset + steps
    if held_out.pairs is not None:
        entry.eval_after = ctx.evaluate(
            state.params, held_out.pairs, held_out.reference, s.settings.dpo, f"stage {stage}: held-out eval after"
        )
        log.metrics({"split": "eval", "when": "after", "stage": stage, "step": steps, **entry.eval_after}, end)
    entry.generations_after, entry.choices_after, entry.reward_after = (
        ctx.generations(state.params),
        ctx.choices(state.params),
        ctx.rewards(state.params),
    )
    for split, values in (("choices", entry.choices_after), ("reward", entry.reward_after)):
        if values:
            log.metrics({"split": split, "when": "after", "stage": stage, "step": steps, **values}, end)
    if entry.choices_after:
        log.info(
            f"stage {stage} multiple choice: acc {entry.choices_before.get('acc', float('nan')):.3f} -> "
            f"{entry.choices_after['acc']:.3f} on {entry.choices_after['num_questions']} questions"
        )
    if entry.reward_after:
        log.info(
            f"stage {stage} reward on {entry.reward_after['num_prompts']} held-out prompts: "
            f"{entry.reward_before.get('mean', float('nan')):.4f} -> {entry.reward_after['mean']:.4f}"
        )
    for generated in entry.generations_after:
        log.info(f"stage {stage} answer to {generated['prompt']!r}: {generated['completion']!r}")
    ctx.checkpoints.save_stage(stage, state.params, {"stage": stage, "steps": steps})
    log.info(f"stage {stage} done: eval {json_round(entry.eval_after)}")
    return entry


def json_round(values: dict) -> str:
    import json

    return json.dumps({k: round(v, 4) for k, v in values.items()})
