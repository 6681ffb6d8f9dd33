"""What every stage of a run shares: the model, mesh, tokenizer, stage settings, checkpoints, log, and
the compiled steps and measurements built on them (each compiled once per run).

Caches under output_dir (beside checkpoints/, see sdpo_jax.checkpointing):
    reference/train_sft.npz     M0's log-probs of every training pair (easy_to_hard difficulty)
    reference/train_probe.npz   the DPO probe's (sdpo.difficulty = dpo_probe)
    reference/eval_sft.npz      M0's log-probs of the held-out pairs (every stage's eval reference)
    reference/stage_<t>.npz     stage t's reference log-probs of its pairs
    generated/stage_<t>.*       an on-policy stage's samples and pairs (sdpo_jax.stage_data)
Each .npz holds a key (the model's identity, the pairs' identity, dpo.ld_alpha when not 1) and is
reused only when the key matches on every process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import zipfile
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from sdpo_jax.checkpointing import RunCheckpoints
from sdpo_jax.choice_eval import choice_loglikelihoods, choice_metrics, choice_step
from sdpo_jax.config_check import StageSettings
from sdpo_jax.data.batching import PairBatcher
from sdpo_jax.data.chat_template import ChatTemplateRefused, render_chat, user_turn
from sdpo_jax.errors import ConfigError
from sdpo_jax.evaluation import evaluate_pairs, jit_eval_step
from sdpo_jax.generation import generate
from sdpo_jax.host_exchange import any_process
from sdpo_jax.losses import DPOSettings
from sdpo_jax.optim import OptimizerSettings
from sdpo_jax.progress import progress
from sdpo_jax.reference import attach_reference, jit_reference_step, precompute_reference_logps
from sdpo_jax.run_log import RunLog
from sdpo_jax.scorers import REWARD_MODEL_PREFIX, Scorer, load_scorer
from sdpo_jax.tracking import TensorBoardSink, WandbSink
from sdpo_jax.train_step import jit_train_step


def folder_identity(folder: Path) -> str:
    """Identity of a model folder: its config and the names, sizes and times of its weight files."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A user prompt as the model sees it at generation time: the chat template with its generation
    prompt when the tokenizer has one, else the text with the tokenizer's special tokens (BOS).
    A template that refuses the prompt raises `ChatTemplateRefused`."""
    if tokenizer.chat_template:
        rendered = render_chat(tokenizer, user_turn(text), generation_prompt=True, needed_by="a user prompt")
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


@dataclasses.dataclass
class RunContext:
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
    reward_prompts: list = dataclasses.field(default_factory=list)  # eval.reward_prompts: (text, reference)
    _steps: dict = dataclasses.field(default_factory=dict)  # compiled steps and loaded scorers, built once per run
    _trackers_open: bool = False

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    def _once(self, key, build):
        if key not in self._steps:
            self._steps[key] = build()
        return self._steps[key]

    def train_step(
        self,
        settings: DPOSettings,
        optimizer_settings: OptimizerSettings,
        optimizer,
        shardings,
        with_reference_params: bool,
    ):
        """The jitted train step, compiled once for all stages that share what it compiles in (the
        schedule's numbers, which differ per stage, are optimizer state: sdpo_jax.optim)."""
        config = self.config
        key = (
            "train",
            settings,
            optimizer_settings.compiled(),
            config.train.grad_accum,
            config.model.logprob_chunk,
            with_reference_params,
        )
        return self._once(
            key,
            lambda: jit_train_step(
                self.model,
                settings,
                optimizer,
                self.mesh,
                shardings,
                with_reference_params,
                config.train.grad_accum,
                config.model.logprob_chunk,
            ),
        )

    def scorer(self, spec: str) -> Scorer:
        """The scorer ``spec`` names (sdpo_jax.scorers); a reward model is loaded on the run's mesh for each
        use and freed with it (its weights do not stay on the devices during training), others once."""
        if spec.startswith(REWARD_MODEL_PREFIX):
            return load_scorer(spec, mesh=self.mesh)
        return self._once(("scorer", spec), lambda: load_scorer(spec, mesh=self.mesh))

    def open_trackers(self, report: list, stage: int, step: int) -> None:
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
            folder = self.output_dir / "tensorboard"
            shutil.rmtree(folder, ignore_errors=True)
            board = TensorBoardSink(folder)
            offsets = np.cumsum([0] + [entry.steps for entry in report]).tolist()
            for row in log.read_metrics():
                board.write(row, offsets[row["stage"] - 1] + row["step"])
            log.trackers.append(board)
        if config.log.wandb:
            log.trackers.append(
                WandbSink(config.log.wandb_project, self.output_dir.name, config.to_dict(), self.output_dir)
            )

    def batches(self, pairs, shuffle=False, seed=0):
        return PairBatcher(
            pairs,
            self.config.train.batch_size,
            seed=seed,
            buckets=self.buckets,
            shuffle=shuffle,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            prefix_sharing=self.config.data.prefix_sharing,
        )

    @staticmethod
    def stored_logps(cache: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The log-probs stored in ``cache`` for ``key``, when every process finds them (else None on all,
        so that all of them recompute together)."""
        found = None
        if cache.exists():
            try:
                with np.load(cache) as stored:
                    if str(stored["key"]) == key:
                        found = stored["chosen"], stored["rejected"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                found = None  # a damaged cache file is recomputed (and replaced), as a stale one is
        return None if any_process(found is None) else found

    def progress(self, batcher: PairBatcher, description: str):
        return progress(batcher.epoch_batches(0), batcher.steps_per_epoch, description, self.bars)

    @property
    def ld_alpha(self) -> float:
        """The run's dpo.ld_alpha (the same in every stage: config_check)."""
        return self.stages[0].dpo.ld_alpha

    def cached_reference_logps(
        self, ref_params, pairs, cache: Path, key: str, description: str, ld_alpha: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Reference log-probs of every pair, LD-weighted with ``ld_alpha`` (default: the run's, as the loss
        reads them; 1.0: the plain sums), from ``cache`` when it was made for ``key``."""
        ld_alpha = self.ld_alpha if ld_alpha is None else ld_alpha
        key = key if ld_alpha == 1.0 else f"{key}-ld{ld_alpha!r}"
        cached = self.stored_logps(cache, key)
        if cached is not None:
            return cached
        step = self._once(
            ("reference", ld_alpha),
            lambda: jit_reference_step(
                self.model, self.mesh, self.param_shardings, self.config.model.logprob_chunk, ld_alpha
            ),
        )
        chosen, rejected = precompute_reference_logps(
            step, ref_params, self.progress(self.batches(pairs), description), len(pairs), self.mesh
        )
        if jax.process_index() == 0:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, key=key, chosen=chosen, rejected=rejected)
            tmp.replace(cache)
        return chosen, rejected

    def evaluate(self, params, eval_pairs, eval_ref, settings, description: str) -> dict:
        batches = (attach_reference(b, *eval_ref) for b in self.progress(self.batches(eval_pairs), description))
        # (the step's outputs depend on the loss settings only through ld_alpha and use_weighting)
        step = self._once(
            ("eval", settings.ld_alpha, settings.use_weighting),
            lambda: jit_eval_step(
                self.model, settings, self.mesh, self.param_shardings, False, self.config.model.logprob_chunk
            ),
        )
        return evaluate_pairs(step, params, None, batches, settings, self.mesh)

    def user_prompt_ids(self, texts, field: str) -> list[list[int]]:
        """Token ids of user prompts (``field`` names them in errors); one the vocabulary cannot hold is an error."""
        prompts = []
        for i, text in enumerate(texts):
            try:
                prompts.append(prompt_ids(self.tokenizer, text))
            except ChatTemplateRefused as err:
                raise ConfigError(f"{field}[{i}]: the tokenizer's chat template refuses this prompt: {err}") from None
        vocab = self.model.config.vocab_size
        for i, ids in enumerate(prompts):
            if max(ids, default=-1) >= vocab:
                raise ConfigError(f"{field}[{i}]: token id {max(ids)} is outside the model's vocabulary of {vocab}")
            if not ids:
                raise ConfigError(f"{field}[{i}]: the prompt tokenizes to nothing")
        return prompts

    def choices(self, params) -> dict:
        """Multiple-choice log-likelihood accuracy (acc, acc_norm) on ``eval.choices``; {} without it."""
        if self.choice_set is None:
            return {}
        step = self._once("choices", lambda: choice_step(self.model, self.mesh))
        scores = choice_loglikelihoods(step, params, self.choice_set, self.config.eval.choices_batch_size, self.mesh)
        result = choice_metrics(self.choice_set, scores)
        return {k: result[k] for k in ("acc", "acc_norm", "num_questions")}

    def generations(self, params) -> list[dict]:
        """Greedy (or sampled) answers of ``params`` to the fixed ``eval.prompts``, decoded with a KV cache."""
        checks = self.config.eval
        if not checks.prompts:
            return []
        prompts = self.user_prompt_ids(checks.prompts, "eval.prompts")
        completions = generate(
            self.model,
            params,
            prompts,
            checks.max_new_tokens,
            self.tokenizer.eos_token_id,
            temperature=checks.temperature,
            seed=self.config.train.seed,
            batch_size=len(prompts),
        )
        return [
            {"prompt": text, "completion": self.tokenizer.decode(ids, skip_special_tokens=True)}
            for text, ids in zip(checks.prompts, completions)
        ]

    def rewards(self, params) -> dict:
        """Mean ``generate.scorer`` score of the greedy answers of ``params`` to ``eval.reward_prompts``; {} without
        them."""
        if not self.reward_prompts:
            return {}
        texts = [text for text, _ in self.reward_prompts]
        ids = self.user_prompt_ids(texts, "eval.reward_prompts")
        answers = generate(
            self.model,
            params,
            ids,
            self.config.generate.max_new_tokens,
            self.tokenizer.eos_token_id,
            temperature=0.0,
            batch_size=min(len(ids), 32),
        )
        completions = [self.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        scores = self.scorer(self.config.generate.scorer)(texts, completions, [ref for _, ref in self.reward_prompts])
        return {"mean": float(np.mean(scores)), "num_prompts": len(scores)}
