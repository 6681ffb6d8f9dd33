"""The compared trainings and their stage-driver configs (configs/default.py with overrides).

Every variant trains from the same M0 on the same pairs with the same total number of optimizer
steps (``epochs`` passes over all pairs, split over the T stages):

    dpo              T = 1, all pairs at once (plain DPO)
    random-T         sDPO, a seeded random partition (sdpo.partition='random')
    true-T           sDPO easy-to-hard by the true difficulty: one file per stage, shortest lists
                     first (sdpo.partition='datasets')
    model-T          sDPO easy-to-hard by M0's log-ratio on each pair (sdpo.partition='easy_to_hard',
                     sdpo.difficulty='pair_logratio')
    true-T-init-sft  true-T, but every stage's policy starts from M0 while its reference is
                     M(t-1) (sdpo.policy_init='sft'; the paper's ablation)
    onpolicy-T       sDPO on a random partition whose stage t trains on M(t-1)'s own samples on its
                     chunk's prompts (sdpo.stage_data='generated'), scored by the true reward
                     (experiments.sorting:score): chosen the best sample, rejected the worst
    onpolicy-gold-T  onpolicy-T, but chosen is the correct answer (generate.chosen='gold'), as in the
                     offline pairs: only the rejected answers (M(t-1)'s worst) are on-policy
    replay-T         true-T, but stage t >= 2 also trains on a replay of earlier chunks
                     (sdpo.replay_fraction = 0.5: half as many pairs as its own chunk, drawn uniformly
                     from D_1..D_(t-1)), the natural fix for the forgetting easy-to-hard shows

The replay share 0.5 is fixed in advance, not tuned (a tuned share would give this variant a third
grid axis the others do not get): the stage's own chunk keeps 2/3 of its pairs, and with equal
chunks the replay stays within what the earlier chunks hold (stage 2 of T=2 draws half of D_1).
The replayed pairs share the stage's optimizer steps (train.steps_per_stage is set per variant
below), so every variant keeps the same total steps.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from configs.default import get_config


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    stages: int
    partition: str  # 'random' | 'true' | 'model'
    policy_init: str = "previous"
    stage_data: str = "offline"  # 'offline' | 'generated'
    chosen: str = "best"  # a generated pair's chosen answer: 'best' sample | 'gold' (the correct one)
    replay_fraction: float = 0.0  # sdpo.replay_fraction: replayed earlier pairs per pair of the stage's chunk


VARIANTS = (
    Variant("dpo", 1, "random"),
    Variant("random-2", 2, "random"),
    Variant("random-3", 3, "random"),
    Variant("true-2", 2, "true"),
    Variant("true-3", 3, "true"),
    Variant("model-2", 2, "model"),
    Variant("model-3", 3, "model"),
    Variant("true-2-init-sft", 2, "true", "sft"),
    Variant("true-3-init-sft", 3, "true", "sft"),
    Variant("onpolicy-2", 2, "random", stage_data="generated"),
    Variant("onpolicy-3", 3, "random", stage_data="generated"),
    Variant("onpolicy-gold-2", 2, "random", stage_data="generated", chosen="gold"),
    Variant("onpolicy-gold-3", 3, "random", stage_data="generated", chosen="gold"),
    Variant("replay-2", 2, "true", replay_fraction=0.5),
    Variant("replay-3", 3, "true", replay_fraction=0.5),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    batch_size: int = 32
    learning_rate: float = 5e-4
    beta: float = 0.5
    epochs: float = 4.0
    warmup_ratio: float = 0.1
    max_length: int = 32


def variant_config(
    variant: Variant,
    *,
    model_folder: str,
    all_pairs: str,
    stage_files: dict[int, list[str]],
    eval_pairs: str,
    num_pairs: int,
    output_dir: str,
    cache_dir: str,
    seed: int,
    dpo: DPOSettings,
    samples: int,
    temperature: float,
    max_new_tokens: int,
) -> ml_collections.ConfigDict:
    """The driver config of ``variant``; ``stage_files[T]`` are the true-difficulty files, easiest first; a
    generated stage samples ``samples`` completions per prompt at ``temperature`` (as M0's pairs were)."""
    c = get_config()
    c.output_dir = output_dir
    c.model.path = model_folder
    c.model.logprob_chunk = dpo.max_length
    c.data.train = tuple(stage_files[variant.stages]) if variant.partition == "true" else (all_pairs,)
    c.data.eval = (eval_pairs,)
    c.data.limit = 0
    c.data.skip_invalid = False
    c.data.eval_fraction = 0.0
    c.data.max_length = dpo.max_length
    c.data.max_prompt_length = dpo.max_length // 2
    c.data.length_buckets = (dpo.max_length,)
    c.data.cache_dir = cache_dir
    c.sdpo.num_stages = variant.stages
    c.sdpo.partition = {"random": "random", "true": "datasets", "model": "easy_to_hard"}[variant.partition]
    c.sdpo.difficulty = "pair_logratio"
    c.sdpo.policy_init = variant.policy_init
    c.sdpo.stage_data = variant.stage_data
    c.sdpo.replay_fraction = variant.replay_fraction
    c.generate.scorer = "experiments.sorting:score"
    c.generate.samples_per_prompt = samples
    c.generate.temperature = temperature
    c.generate.max_new_tokens = max_new_tokens
    c.generate.chosen = variant.chosen
    c.generate.batch_size = 256
    c.train.batch_size = dpo.batch_size
    c.train.steps_per_stage = max(1, math.ceil(dpo.epochs * num_pairs / variant.stages / dpo.batch_size))
    c.train.seed = seed
    c.train.learning_rate = dpo.learning_rate
    c.train.warmup_ratio = dpo.warmup_ratio
    c.train.log_every = 1000
    c.dpo.beta = dpo.beta
    c.eval.prompts = ()  # the driver's free-text sample answers mean nothing for this task
    c.eval.choices = ""  # nor does a multiple-choice benchmark for a sorting model
    c.log.progress = "never"
    c.log.tensorboard = False
    c.checkpoint.every_steps = 1_000_000  # stage snapshots only: runs are short
    c.checkpoint.keep = 1
    c.checkpoint.async_save = False
    return c
