"""The sDPO stage driver: T rounds of DPO, each against the previous round's model.

    M_0 = SFT model;  for t = 1..T:  reference_t = M_{t-1} (frozen),  policy_t starts at M_{t-1}
    with a fresh optimizer and its own schedule, DPO on chunk D_t  ->  M_t.

T = 1 is plain DPO through the same code. ``sdpo.policy_init='sft'`` is the ablation that starts
every stage's policy from M_0 while its reference stays M_{t-1}. Per stage the driver records gamma_t, the mean over
D_t of log pi_ref(y_w|x) - log pi_ref(y_l|x) under reference_t, and held-out metrics before and
after the stage. Held-out metrics always use the SFT model as their reference (its eval-set
log-probs are computed once), so rewards are comparable across stages: eval_after of stage t is
M_t against M_0.

Everything that a rerun of the same command needs to continue exactly is on disk: mid-stage
Orbax checkpoints (TrainState + data position), end-of-stage snapshots, the partition, and the
reference log-probs of each chunk (cached, keyed by the chunk and the reference's identity).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs.default import get_config as default_config
from sdpo_jax.checkpointing import RunCheckpoints, abstract_with_shardings
from sdpo_jax.choice_eval import choice_loglikelihoods, choice_metrics, choice_step, encode_choices, load_choice_questions
from sdpo_jax.data.batching import PairBatcher, resolve_buckets
from sdpo_jax.config_check import CheckedConfig, StageSettings, check_config, flat_fields, resume_neutral
from sdpo_jax.data.load import load_datasets, source_lines
from sdpo_jax.divergence import LossWatch, first_non_finite
from sdpo_jax.errors import RunLocked, TrainingDiverged
from sdpo_jax.evaluation import eval_step, evaluate_pairs
from sdpo_jax.generation import generate
from sdpo_jax.host_exchange import LaggedAgreement, any_process
from sdpo_jax.losses import DPOSettings
from sdpo_jax.models.loading import load_model, load_tokenizer
from sdpo_jax.optim import OptimizerSettings, make_optimizer
from sdpo_jax.partition import plan_stages
from sdpo_jax.progress import bars_enabled, progress
from sdpo_jax.reference import attach_reference, precompute_reference_logps, reference_step
from sdpo_jax.report import write_report
from sdpo_jax.run_lock import RunFolderLock
from sdpo_jax.run_log import RunLog
from sdpo_jax.sharded_steps import global_batch, jit_train_step, place, state_shardings
from sdpo_jax.sharding import build_mesh, check_process_rows
from sdpo_jax.tracking import TensorBoardSink, WandbSink
from sdpo_jax.train_step import TrainState, make_train_step

PREEMPTED_EXIT_CODE = 143
CHOICE_MAX_LENGTH = 512  # tokens per packed multiple-choice question (longer contexts lose their start)


class Preempted(Exception):
    """SIGTERM arrived; the state was saved and the run can be resumed by the same command."""


def check_resume_config(stored: dict, current: dict, force: bool) -> None:
    """A resumed run must have the config it started with, up to fields that do not change its result
    (where it lives, how often it saves and logs, its device layout: config_check.resume_neutral). A field
    the stored config lacks (it was written before the field existed) counts as its default."""
    a, b, defaults = (json.loads(json.dumps(flat_fields(d))) for d in (stored, current, default_config()))
    differences = [f"{k}: {a.get(k, defaults.get(k))!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                   if a.get(k, defaults.get(k)) != b.get(k) and not resume_neutral(k)]
    if differences and not force:
        raise ValueError(
            "the config differs from the run already in output_dir ("
            + "; ".join(differences)
            + "); use another output_dir, or --config.checkpoint.force_resume=True"
        )


def folder_identity(folder: Path) -> str:
    """Identity of a model folder: its config and the names, sizes and times of its weight files."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


@dataclasses.dataclass
class _Run:
    config: ml_collections.ConfigDict
    stages: tuple[StageSettings, ...]
    log: RunLog
    checkpoints: RunCheckpoints
    model: Any
    model_folder: Path
    mesh: Any
    buckets: tuple[int, ...]
    param_shardings: Any
    abstract_params: Any
    tokenizer: Any
    bars: bool
    choice_set: Any = None  # eval.choices tokenized and packed once per run (choice_eval.EncodedChoices)
    _steps: dict = dataclasses.field(default_factory=dict)  # jitted reference/eval steps, compiled once per run
    _trackers_open: bool = False

    def _step(self, key, build):
        if key not in self._steps:
            self._steps[key] = build()
        return self._steps[key]

    def train_step(self, settings: DPOSettings, optimizer_settings: OptimizerSettings, optimizer, shardings, with_reference_params: bool):
        """The jitted train step, compiled once for all stages that share what it compiles in (the
        schedule's numbers, which differ per stage, are optimizer state: sdpo_jax.optim)."""
        config = self.config
        key = ("train", settings, optimizer_settings.compiled(), config.train.grad_accum, config.model.logprob_chunk, with_reference_params)
        return self._step(key, lambda: jit_train_step(make_train_step(self.model, settings, optimizer, config.train.grad_accum,
                                                                      config.model.logprob_chunk), self.mesh, shardings, with_reference_params))

    def open_trackers(self, report: list[dict], stage: int, step: int) -> None:
        """Once per run, where it continues (stage, step): rewind metrics.jsonl to that position and start
        TensorBoard (and W&B when asked).

        The TensorBoard files are written anew from the kept metrics.jsonl rows, so after any number of
        kills and resumes they hold exactly what an uninterrupted run's would. W&B keeps its own
        history (a resumed run continues the same W&B run).
        """
        if self._trackers_open:
            return
        self._trackers_open = True
        config, log = self.config, self.log
        log.rewind_metrics(stage, step)
        if not log.is_main:
            return
        if config.log.tensorboard:
            folder = Path(config.output_dir) / "tensorboard"
            shutil.rmtree(folder, ignore_errors=True)
            board = TensorBoardSink(folder)
            offsets = np.cumsum([0] + [entry["steps"] for entry in report]).tolist()
            for row in log.read_metrics():
                board.write(row, offsets[row["stage"] - 1] + row["step"])
            log.trackers.append(board)
        if config.log.wandb:
            log.trackers.append(WandbSink(config.log.wandb_project, Path(config.output_dir).name, config.to_dict(),
                                          Path(config.output_dir)))

    def batches(self, pairs, shuffle=False, seed=0):
        return PairBatcher(pairs, self.config.train.batch_size, seed=seed, buckets=self.buckets, shuffle=shuffle,
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           prefix_sharing=self.config.data.prefix_sharing)

    @staticmethod
    def cached_logps(cache: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The log-probs stored in ``cache`` for ``key``, when every process finds them (else None on all,
        so that all of them recompute together)."""
        found = None
        if cache.exists():
            stored = np.load(cache)
            if str(stored["key"]) == key:
                found = stored["chosen"], stored["rejected"]
        return None if any_process(found is None) else found

    def progress(self, batcher: PairBatcher, description: str):
        return progress(batcher.epoch_batches(0), batcher.steps_per_epoch, description, self.bars)

    def reference_logps(self, ref_params, pairs, cache: Path, key: str, description: str) -> tuple[np.ndarray, np.ndarray]:
        """Reference log-probs of every pair (LD-weighted with the run's dpo.ld_alpha), from ``cache`` when it
        was made for ``key``."""
        ld_alpha = self.stages[0].dpo.ld_alpha  # the same in every stage (config_check)
        key = key if ld_alpha == 1.0 else f"{key}-ld{ld_alpha!r}"
        cached = self.cached_logps(cache, key)
        if cached is not None:
            return cached
        step = self._step("reference", lambda: reference_step(self.model, self.mesh, self.param_shardings,
                                                              self.config.model.logprob_chunk, ld_alpha))
        chosen, rejected = precompute_reference_logps(step, ref_params, self.progress(self.batches(pairs), description),
                                                      len(pairs), self.mesh)
        if jax.process_index() == 0:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, key=key, chosen=chosen, rejected=rejected)
            tmp.replace(cache)
        return chosen, rejected

    def evaluate(self, params, eval_pairs, eval_ref, settings, description: str) -> dict:
        batches = (attach_reference(b, *eval_ref) for b in self.progress(self.batches(eval_pairs), description))
        step = self._step(("eval", settings), lambda: eval_step(self.model, settings, self.mesh, self.param_shardings, False,
                                                                self.config.model.logprob_chunk))
        return evaluate_pairs(step, params, None, batches, settings, self.mesh)

    def eval_prompt_ids(self) -> list[list[int]]:
        """Token ids of ``eval.prompts``; a prompt the model's vocabulary cannot hold is an error."""
        prompts = [prompt_ids(self.tokenizer, text) for text in self.config.eval.prompts]
        vocab = self.model.config.vocab_size
        for i, ids in enumerate(prompts):
            if max(ids, default=-1) >= vocab:
                raise ValueError(f"eval.prompts[{i}]: token id {max(ids)} is outside the model's vocabulary of {vocab}")
            if not ids:
                raise ValueError(f"eval.prompts[{i}]: the prompt tokenizes to nothing")
        return prompts

    def choices(self, params) -> dict:
        """Multiple-choice log-likelihood accuracy (acc, acc_norm) on ``eval.choices``; {} without it."""
        if self.choice_set is None:
            return {}
        step = self._step("choices", lambda: choice_step(self.model, self.mesh))
        scores = choice_loglikelihoods(step, params, self.choice_set, self.config.eval.choices_batch_size, self.mesh)
        result = choice_metrics(self.choice_set, scores)
        return {k: result[k] for k in ("acc", "acc_norm", "num_questions")}

    def generations(self, params) -> list[dict]:
        """Greedy (or sampled) answers of ``params`` to the fixed ``eval.prompts``, decoded with a KV cache."""
        checks = self.config.eval
        if not checks.prompts:
            return []
        prompts = self.eval_prompt_ids()
        completions = generate(self.model, params, prompts, checks.max_new_tokens, self.tokenizer.eos_token_id,
                               temperature=checks.temperature, seed=self.config.train.seed, batch_size=len(prompts))
        return [{"prompt": text, "completion": self.tokenizer.decode(ids, skip_special_tokens=True)}
                for text, ids in zip(checks.prompts, completions)]


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A user prompt as the model sees it at generation time: the chat template with its generation
    prompt when the tokenizer has one, else the text with the tokenizer's special tokens (BOS)."""
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def train(config: ml_collections.ConfigDict | CheckedConfig) -> list[dict]:
    """Run (or resume) every stage of ``config`` (checked first when it is a plain ConfigDict);
    returns the stage report. Nothing is written before the config is accepted."""
    checked = config if isinstance(config, CheckedConfig) else check_config(config, jax.device_count())
    config = checked.config
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, is_main=jax.process_index() == 0)
    lock = _lock_run_folder(out, log)
    try:
        return _train_locked(checked, log)
    finally:
        lock.release()


def _lock_run_folder(out: Path, log: RunLog) -> RunFolderLock:
    """The run folder's lock, taken by process 0; every process stops when it is held elsewhere."""
    lock, refusal = RunFolderLock(out), None
    if jax.process_index() == 0:
        try:
            warning = lock.acquire()
            if warning:
                log.info(f"warning: {warning}")
        except RunLocked as err:
            refusal = err
    if any_process(refusal is not None):
        raise refusal or RunLocked(f"output_dir {out} is in use by another sdpo-train (process 0 could not lock it)")
    return lock


def _train_locked(checked: CheckedConfig, log: RunLog) -> list[dict]:
    config = checked.config
    out = Path(config.output_dir)
    resolved = config.to_dict()
    if (out / "config.json").exists():
        check_resume_config(json.loads((out / "config.json").read_text()), resolved, config.checkpoint.force_resume)
    log.write_json("config.json", resolved)

    mesh = build_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, dcn_data=config.mesh.dcn_data)
    check_process_rows(mesh, config.train.batch_size)
    model, sft_params, folder = load_model(config.model, mesh=mesh)  # each tensor read straight onto its devices
    tokenizer = load_tokenizer(folder)
    train_pairs, eval_pairs = load_datasets(config.data, tokenizer, vocab_size=model.config.vocab_size,
                                            process_index=jax.process_index(), process_count=jax.process_count(),
                                            progress_bars=bars_enabled(config.log.progress, log.is_main))
    probe_shardings, abstract = state_shardings(model, make_optimizer(OptimizerSettings()), mesh)
    checkpoints = RunCheckpoints(out, config.checkpoint.keep, config.checkpoint.async_save, config.checkpoint.keep_stages,
                                 warn=log.info)
    run = _Run(config, checked.stages, log, checkpoints, model, folder, mesh,
               resolve_buckets(config.data.length_buckets, config.data.max_length), probe_shardings.params,
               abstract.params, tokenizer, bars_enabled(config.log.progress, log.is_main))
    sft_key = folder_identity(folder)
    data_key = train_pairs.identity()

    run.eval_prompt_ids()  # fail now, not after the first stage
    if config.eval.choices:
        questions = load_choice_questions(config.eval.choices, limit=config.eval.choices_limit or None)
        run.choice_set = encode_choices(tokenizer, questions, vocab_size=model.config.vocab_size, max_length=CHOICE_MAX_LENGTH,
                                        chat_template=config.eval.choices_chat_template)
    plan = _plan(run, train_pairs, sft_params, f"{sft_key}-{data_key}")
    _summary(run, train_pairs, eval_pairs, plan)
    eval_ref = run.reference_logps(sft_params, eval_pairs, out / "reference" / "eval_sft.npz", f"{sft_key}-eval-{eval_pairs.identity()}",
                                   "reference log-probs of the eval pairs (M0)") if eval_pairs else None
    report = log.read_report()
    finished = run.checkpoints.finished_stages()
    report = [entry for entry in report if entry["stage"] in finished]
    previous_params = sft_params
    if finished:
        previous_params, _ = run.checkpoints.load_stage(finished[-1], abstract_with_shardings(run.abstract_params, run.param_shardings))
        log.info(f"resuming after finished stage {finished[-1]}")
    previous_key = sft_key if not finished else f"stage{finished[-1]}-{sft_key}-{data_key}"
    stop = {"requested": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    try:
        for stage in range(len(finished) + 1, config.sdpo.num_stages + 1):
            chunk = train_pairs.subset(plan.indices[stage - 1])
            start_params = sft_params if config.sdpo.policy_init == "sft" else previous_params
            entry = _train_stage(run, run.stages[stage - 1], chunk, plan.sources[stage - 1], previous_params, start_params,
                                 previous_key, eval_pairs, eval_ref, stop, report)
            report.append(entry)
            log.write_report(report)
            previous_params, _ = run.checkpoints.load_stage(stage, abstract_with_shardings(run.abstract_params, run.param_shardings))
            previous_key = f"stage{stage}-{sft_key}-{data_key}"
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        run.checkpoints.wait()
        run.checkpoints.close()
        log.close()
    if jax.process_index() == 0:
        log.info(f"done: {len(report)} stage(s); {log.report_path}, report {write_report(out)[-1]}")
    return report


def _previous_checks(report: list[dict]) -> dict | None:
    """The previous stage's answers and choice accuracy: this stage's 'before' (its reference is that model)."""
    if not report:
        return None
    return {"generations": report[-1].get("generations_after", []), "choices": report[-1].get("choices_after", {})}


def _summary(run: _Run, train_pairs, eval_pairs, plan) -> None:
    """The start-up summary: model, mesh, data, the stages and their steps, where outputs go."""
    config, model = run.config, run.model
    steps = [settings.steps(-(-len(indices) // config.train.batch_size)) for settings, indices in zip(run.stages, plan.indices)]
    lines = [
        f"model {run.model_folder}: {model.config.num_params / 1e6:.1f}M params, {model.config.num_hidden_layers} layers, "
        f"compute {config.model.dtype}, attention {config.model.attention}, remat {config.model.remat}",
        f"mesh {dict(run.mesh.shape)} over {jax.device_count()} {jax.default_backend()} device(s), {jax.process_count()} process(es)",
        f"data {len(train_pairs)} train pairs, {len(eval_pairs) if eval_pairs else 0} held-out pairs, length buckets "
        f"{run.buckets}, {config.train.batch_size} pairs per step",
        f"{config.sdpo.num_stages} stage(s), partition {config.sdpo.partition}, policy starts from "
        f"{'M(t-1)' if config.sdpo.policy_init == 'previous' else 'M0 (ablation)'}:",
    ]
    for t, (indices, sources, count) in enumerate(zip(plan.indices, plan.sources, steps), start=1):
        lines.append(f"  stage {t}: {len(indices)} pairs from {', '.join(sources)}; {count} steps")
    for pairs in (train_pairs, eval_pairs if config.data.eval else None):  # (held-out pairs split from train: same sources)
        for meta in pairs.report["sources"] if pairs is not None else []:
            info, warnings = source_lines(meta)
            lines += [f"  {info}"] + [f"  warning: {line}" for line in warnings]
    lines.append(f"outputs in {Path(config.output_dir).resolve()} (metrics.jsonl, stage_report.json, report.md, "
                 f"plots/, tensorboard/, checkpoints/)")
    lines.append(_disk_estimate(run, steps))
    for line in lines:
        run.log.info(line)


def _disk_estimate(run: _Run, steps: list[int]) -> str:
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


def _plan(run: _Run, train_pairs, sft_params, key: str):
    config = run.config
    gamma = None
    if config.sdpo.partition == "easy_to_hard":
        gamma = _difficulty_scores(run, train_pairs, sft_params, key)
    names = [name for name, _ in train_pairs.sources]
    plan = plan_stages(config.sdpo.partition, config.sdpo.num_stages, train_pairs.source_id, names, seed=config.train.seed,
                       fractions=tuple(config.sdpo.stage_fractions), difficulty=config.sdpo.difficulty, gamma=gamma)
    run.log.write_json("partition.json", {
        "partition": config.sdpo.partition, "difficulty": config.sdpo.difficulty if gamma is not None else None,
        "source_scores": plan.source_scores, "stages": [{"stage": t + 1, "num_pairs": len(idx), "sources": src}
                                                       for t, (idx, src) in enumerate(zip(plan.indices, plan.sources))],
    })
    if plan.source_scores:
        run.log.info("easy-to-hard by SFT preference accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in plan.source_scores.items()))
    return plan


def _difficulty_scores(run: _Run, train_pairs, sft_params, key: str) -> np.ndarray:
    """Per-pair easiness (higher = easier): the SFT log-ratio, or the margin a short DPO probe learns."""
    config, cache = run.config, Path(run.config.output_dir) / "reference"
    chosen, rejected = run.reference_logps(sft_params, train_pairs, cache / "train_sft.npz", key,
                                           "difficulty: SFT log-probs of every train pair")
    if config.sdpo.difficulty != "dpo_probe":
        return chosen - rejected
    steps, first = config.sdpo.probe_steps, run.stages[0]
    optimizer_settings = OptimizerSettings(learning_rate=first.learning_rate, total_steps=steps, max_grad_norm=first.max_grad_norm)
    optimizer = make_optimizer(optimizer_settings)
    shardings, _ = state_shardings(run.model, optimizer, run.mesh)
    step_fn = run.train_step(first.dpo, optimizer_settings, optimizer, shardings, with_reference_params=False)
    probe_key = f"{key}-probe{steps}-{first.learning_rate}-{first.dpo.beta}-{config.train.seed}"
    probe = run.cached_logps(cache / "train_probe.npz", probe_key)
    if probe is None:
        run.log.info(f"DPO probe: {steps} steps over all {len(train_pairs)} pairs to score difficulty")
        state = place(TrainState.create(jax.tree_util.tree_map(jnp.copy, sft_params), optimizer), shardings)
        batcher = run.batches(train_pairs, shuffle=True, seed=config.train.seed)
        for _ in progress(range(steps), steps, "difficulty: DPO probe steps", run.bars, unit="step"):
            state, _ = step_fn(state, None, global_batch(attach_reference(next(batcher), chosen, rejected), run.mesh))
        probe = run.reference_logps(state.params, train_pairs, cache / "train_probe.npz", probe_key,
                                    "difficulty: probe log-probs of every train pair")
    probe_chosen, probe_rejected = probe
    return (probe_chosen - chosen) - (probe_rejected - rejected)


@dataclasses.dataclass
class _StageRun:
    """A stage ready to train: its settings, data order, compiled step, starting state and report entry."""

    settings: StageSettings
    steps: int
    chunk_key: str  # the chunk's tokens and its reference model: a mid-stage checkpoint must match it
    batcher: PairBatcher
    step_fn: Any
    state: Any
    start_step: int
    ref_logps: tuple[np.ndarray, np.ndarray] | None  # precomputed reference log-probs, or None (reference in the step)
    ref_params: Any  # the reference passed to the step when it is not precomputed
    step_offset: int  # run-wide step of this stage's step 0
    entry: dict


def _train_stage(run: _Run, settings: StageSettings, chunk, sources, ref_params, start_params, ref_key: str, eval_pairs,
                 eval_ref, stop, report: list[dict]) -> dict:
    """What happens in stage t: DPO of a policy from ``start_params`` (M(t-1), or M0 in the sft ablation)
    against ``ref_params`` (M(t-1)) on ``chunk``; returns the stage's report entry.

    ``report`` holds the entries of the stages before (run-wide step offsets, and the reference
    model's answers and choice accuracy already measured after the previous stage).
    """
    stage_run = _prepare_stage(run, settings, chunk, sources, ref_params, start_params, ref_key, eval_pairs, eval_ref, report)
    state = _train_loop(run, stage_run, stop)
    return _finish_stage(run, stage_run, state, eval_pairs, eval_ref)


def _prepare_stage(run: _Run, settings: StageSettings, chunk, sources, ref_params, start_params, ref_key: str, eval_pairs,
                   eval_ref, report: list[dict]) -> _StageRun:
    """Reference log-probs, data order, optimizer and compiled step; the state restored from the newest
    intact mid-stage checkpoint or fresh from ``start_params`` (then the 'before' checks run)."""
    config, log, stage = run.config, run.log, settings.stage
    chunk_key = f"{ref_key}-{chunk.identity()}"
    ref_chosen, ref_rejected = run.reference_logps(ref_params, chunk, Path(config.output_dir) / "reference" / f"stage_{stage}.npz",
                                                   chunk_key, f"stage {stage}: reference log-probs of the chunk")
    batcher = run.batches(chunk, shuffle=True, seed=config.train.seed + stage)
    steps = settings.steps(batcher.steps_per_epoch)
    optimizer_settings = settings.optimizer(steps)
    optimizer = make_optimizer(optimizer_settings)
    shardings, abstract_state = state_shardings(run.model, optimizer, run.mesh)
    precompute = config.train.precompute_reference
    step_fn = run.train_step(settings.dpo, optimizer_settings, optimizer, shardings, with_reference_params=not precompute)
    entry = {"stage": stage, "num_pairs": len(chunk), "sources": sources, "steps": steps,
             "ref_logratio_mean": float(np.mean(ref_chosen - ref_rejected)), "eval_before": {}, "eval_after": {},
             "dpo": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings.dpo).items()},
             "learning_rate": settings.learning_rate,
             "generations_before": [], "generations_after": [], "choices_before": {}, "choices_after": {}}
    step_offset = sum(e["steps"] for e in report)
    restored = run.checkpoints.restore_latest(stage, abstract_with_shardings(abstract_state, shardings))
    run.open_trackers(report, stage, restored[0] if restored else 0)
    if restored is not None:
        start_step, state, meta = restored
        if meta["chunk"] != chunk_key and not config.checkpoint.force_resume:
            raise ValueError(f"stage {stage}: the training data or its reference differ from the checkpoint's "
                             f"(tokenized pairs of the chunk or the reference model changed); use another output_dir")
        batcher.restore(meta["data"])
        entry["eval_before"] = meta["eval_before"]
        entry["generations_before"] = meta.get("generations_before", [])
        entry["choices_before"] = meta.get("choices_before", {})
        log.info(f"stage {stage}: resuming at step {start_step}/{steps}")
    else:
        _checks_before(run, entry, ref_params, eval_pairs, eval_ref, settings, step_offset, _previous_checks(report))
        state = place(TrainState.create(jax.tree_util.tree_map(jnp.copy, start_params), optimizer), shardings)
        start_step = 0
    log.info(f"stage {stage}/{config.sdpo.num_stages}: {len(chunk)} pairs from {', '.join(sources)}, {steps} steps, "
             f"reference log-ratio mean {entry['ref_logratio_mean']:.3f}")
    if precompute and config.sdpo.policy_init == "previous":
        # The reference lives on as log-probs and the policy holds its own copy: free the device
        # buffers of M_{t-1} (for stage 1, the SFT model) for the optimizer state and activations.
        for leaf in jax.tree_util.tree_leaves(ref_params):
            leaf.delete()
    return _StageRun(settings, steps, chunk_key, batcher, step_fn, state, start_step,
                     (ref_chosen, ref_rejected) if precompute else None, None if precompute else ref_params, step_offset, entry)


def _checks_before(run: _Run, entry: dict, ref_params, eval_pairs, eval_ref, settings: StageSettings, step_offset: int,
                   before: dict | None) -> None:
    """Held-out metrics, answers and choice accuracy of the stage's reference model, into ``entry``."""
    stage, log = settings.stage, run.log
    if eval_pairs is not None:
        entry["eval_before"] = run.evaluate(ref_params, eval_pairs, eval_ref, settings.dpo, f"stage {stage}: held-out eval before")
        log.metrics({"split": "eval", "when": "before", "stage": stage, "step": 0, **entry["eval_before"]}, step_offset)
    if before is None:
        entry["generations_before"] = run.generations(ref_params)
        entry["choices_before"] = run.choices(ref_params)
    else:
        entry["generations_before"], entry["choices_before"] = before["generations"], before["choices"]
    if entry["choices_before"]:
        log.metrics({"split": "choices", "when": "before", "stage": stage, "step": 0, **entry["choices_before"]}, step_offset)


def _train_loop(run: _Run, s: _StageRun, stop) -> Any:
    """The stage's optimizer steps from ``s.start_step``: metrics logged, mid-stage checkpoints saved,
    a SIGTERM on any process saves and raises `Preempted`, a non-finite loss raises `TrainingDiverged`."""
    config, log, stage, steps = run.config, run.log, s.settings.stage, s.steps
    state = s.state
    advice = f"train.learning_rate {s.settings.learning_rate:g}, train.max_grad_norm {s.settings.max_grad_norm:g}"
    watch = LossWatch(stage, advice, log.info)
    started, agreement = time.perf_counter(), LaggedAgreement()
    for step in progress(range(s.start_step, steps), steps - s.start_step, f"stage {stage}: training", run.bars, unit="step"):
        local = next(s.batcher)
        if s.ref_logps is not None:
            local = attach_reference(local, *s.ref_logps)
        state, metrics = s.step_fn(state, s.ref_params, global_batch(local, run.mesh))
        done = step + 1
        if done % config.train.log_every == 0 or done == steps:
            row = {k: float(v) for k, v in jax.device_get(metrics).items()}
            log.metrics({"split": "train", "stage": stage, "step": done, **row}, s.step_offset + done)
            watch.flush()
            watch.observe(done, row)
            rate = (time.perf_counter() - started) / (done - s.start_step)
            log.info(f"stage {stage} step {done}/{steps} loss {row['loss']:.4f} acc {row['rewards/accuracies']:.2f} "
                     f"margin {row['rewards/margins']:.4f} ({rate:.2f} s/step, ETA {rate * (steps - done):.0f} s)")
        else:
            watch.defer(done, metrics)  # looked at while the next step runs
        stopping = agreement.poll(stop["requested"])  # all processes save and stop at the same step
        if done < steps and (done % config.checkpoint.every_steps == 0 or stopping):
            watch.flush()  # nothing non-finite is saved
            run.checkpoints.save_step(stage, done, state, {"stage": stage, "step": done, "data": s.batcher.state(),
                                                           "chunk": s.chunk_key, "eval_before": s.entry["eval_before"],
                                                           "generations_before": s.entry["generations_before"],
                                                           "choices_before": s.entry["choices_before"],
                                                           "config": config.to_dict()})
        if stopping and done < steps:
            run.checkpoints.wait()
            log.info(f"SIGTERM (on at least one process): saved stage {stage} step {done}; run the same command to resume")
            raise Preempted(f"preempted at stage {stage} step {done}")
    watch.flush()
    return state


def _finish_stage(run: _Run, s: _StageRun, state, eval_pairs, eval_ref) -> dict:
    """Checks after the stage, then its snapshot M_t (refused when any parameter is not finite)."""
    log, stage, steps, entry = run.log, s.settings.stage, s.steps, s.entry
    bad = first_non_finite(state.params)
    if bad is not None:
        raise TrainingDiverged(f"stage {stage}: parameter {bad} is not finite after step {steps}; the stage was not saved")
    if eval_pairs is not None:
        entry["eval_after"] = run.evaluate(state.params, eval_pairs, eval_ref, s.settings.dpo, f"stage {stage}: held-out eval after")
        log.metrics({"split": "eval", "when": "after", "stage": stage, "step": steps, **entry["eval_after"]}, s.step_offset + steps)
    entry["generations_after"] = run.generations(state.params)
    entry["choices_after"] = run.choices(state.params)
    if entry["choices_after"]:
        log.metrics({"split": "choices", "when": "after", "stage": stage, "step": steps, **entry["choices_after"]},
                    s.step_offset + steps)
        log.info(f"stage {stage} multiple choice: acc {entry['choices_before'].get('acc', float('nan')):.3f} -> "
                 f"{entry['choices_after']['acc']:.3f} on {entry['choices_after']['num_questions']} questions")
    for generated in entry["generations_after"]:
        log.info(f"stage {stage} answer to {generated['prompt']!r}: {generated['completion']!r}")
    run.checkpoints.save_stage(stage, state.params, {"stage": stage, "steps": steps})
    log.info(f"stage {stage} done: eval {json.dumps({k: round(v, 4) for k, v in entry['eval_after'].items()})}")
    return entry
