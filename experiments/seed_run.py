"""One seed of the stepwise experiment: its settings, prompts, M0 and pair files, and one variant's training.

    data = prepare_seed(seed, out, settings, variants)          # SFT M0, sample its pairs, write the files
    result = run_variant(variant, data, seed, settings, dpo, run_dir, prompts)

`run_variant` is the one way a variant is trained and scored, by the normal run (on the held-out test
prompts) and by the tuning grid (on the validation prompts, experiments.tuning).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.measure import greedy_quality, stage_params
from experiments.pairs import describe, sample_pairs, split_by_difficulty, write_jsonl
from experiments.sft import SFTSettings, save_model_folder, train_sft
from experiments.sorting import Problem, sample_problems
from experiments.variants import DPOSettings, variant_config
from sdpo_jax.stages import train

#: The command that runs the experiment, named in every result's provenance.
PROGRAM = "python -m experiments.stepwise"


@dataclasses.dataclass(frozen=True)
class ExperimentSettings:
    sft: SFTSettings = SFTSettings()
    dpo: DPOSettings = DPOSettings()
    train_prompts: int = 1500  # prompts sampled for training pairs
    eval_pair_prompts: int = 300  # prompts sampled for held-out pairs
    heldout_prompts: int = 550  # prompts whose greedy answers are scored
    samples: int = 4  # M0 completions per prompt (the worst is rejected)
    temperature: float = 1.0
    chosen: str = "gold"  # experiments.pairs: 'gold' or 'best'


QUICK = ExperimentSettings(
    sft=SFTSettings(steps=30, batch_size=32, hidden_size=32, lengths=(2, 5)),
    dpo=DPOSettings(batch_size=16, max_length=16),
    train_prompts=96,
    eval_pair_prompts=32,
    heldout_prompts=48,
    samples=2,
)


def seed_problems(seed: int, settings: ExperimentSettings, validation: int = 0):
    """(training-pair, held-out-pair, greedy-scored, validation) prompts of a seed, always drawn in this order
    from one generator, so the first three do not depend on ``validation``. The ``validation`` prompts (the
    tuning grid's, experiments.tuning) share the others' length distribution but none of their lists: a
    drawn list that is in one of the other three sets is redrawn (same length) until it is in none."""
    rng = np.random.default_rng([seed, 2])
    lengths = settings.sft.lengths
    train = sample_problems(rng, settings.train_prompts, lengths)
    eval_pairs = sample_problems(rng, settings.eval_pair_prompts, lengths)
    heldout = sample_problems(rng, settings.heldout_prompts, lengths)
    taken = {p.digits for p in train + eval_pairs + heldout}
    return train, eval_pairs, heldout, [_unseen(rng, p, taken) for p in sample_problems(rng, validation, lengths)]


def _unseen(rng: np.random.Generator, problem: Problem, taken: set) -> Problem:
    """``problem``, or (while its list is in ``taken``) a fresh list of the same length."""
    n = problem.difficulty
    if sum(len(digits) == n for digits in taken) == 10**n:
        raise SystemExit(f"every list of {n} digits is already a training or test prompt: no validation prompt left")
    while problem.digits in taken:
        problem = Problem(tuple(int(d) for d in rng.integers(0, 10, size=n)))
    return problem


@dataclasses.dataclass(frozen=True)
class SeedData:
    """What every variant of a seed trains from and is scored on: M0, its pair files and the prompt sets."""

    model: Any
    params: Any
    folder: Path  # M0 as a Hugging Face folder
    all_pairs: str
    eval_pairs: str
    stage_files: dict[int, list[str]]  # the true-difficulty files per T, easiest first
    num_pairs: int
    heldout: list[Problem]  # the test prompts (greedy-scored)
    validation: list[Problem]  # the tuning grid's prompts (empty outside --tune)
    record: dict  # M0's SFT loss and the pair counts, for results.json
    cache_dir: Path


def prepare_seed(
    seed: int, out: Path, settings: ExperimentSettings, variants, validation: int = 0, log=print
) -> SeedData:
    """SFT M0 from scratch, sample its best-vs-worst pairs, write the pair files into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, params, losses = train_sft(settings.sft, seed)
    folder = save_model_folder(params, model.config, out / "m0")
    train_problems, eval_problems, heldout, validation_problems = seed_problems(seed, settings, validation)
    pairs = sample_pairs(model, params, train_problems, settings.samples, settings.temperature, seed, settings.chosen)
    eval_pairs = sample_pairs(
        model, params, eval_problems, settings.samples, settings.temperature, seed + 1000, settings.chosen
    )
    data = out / "data"
    stage_files = {
        t: [
            write_jsonl(data / f"train_true_T{t}_stage{k + 1}.jsonl", chunk)
            for k, chunk in enumerate(split_by_difficulty(pairs, t, seed))
        ]
        for t in sorted({v.stages for v in variants if v.partition == "true"})
    }
    log(
        f"seed {seed}: M0 after {settings.sft.steps} SFT steps (loss {losses[-1]:.3f}); {len(pairs)} train pairs, "
        f"{len(eval_pairs)} eval pairs ({time.perf_counter() - started:.0f} s)"
    )
    return SeedData(
        model,
        params,
        folder,
        write_jsonl(data / "train_all.jsonl", pairs),
        write_jsonl(data / "eval.jsonl", eval_pairs),
        stage_files,
        len(pairs),
        heldout,
        validation_problems,
        {"sft_final_loss": losses[-1], "pairs": describe(pairs), "eval_pairs": describe(eval_pairs)},
        out / "cache",
    )


def run_variant(
    variant, data: SeedData, seed: int, settings: ExperimentSettings, dpo: DPOSettings, run_dir: Path, scored
) -> dict:
    """Train ``variant`` from the seed's M0 at ``dpo`` (its learning rate and beta) through the stage driver in
    ``run_dir`` (a fresh run), and score every stage snapshot M_t by greedy quality on the ``scored`` prompts
    (the test prompts of the normal run, the validation prompts of the tuning grid)."""
    t0 = time.perf_counter()
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: the driver would otherwise resume
    config = variant_config(
        variant,
        model_folder=str(data.folder),
        all_pairs=data.all_pairs,
        stage_files=data.stage_files,
        eval_pairs=data.eval_pairs,
        num_pairs=data.num_pairs,
        output_dir=str(run_dir),
        cache_dir=str(data.cache_dir),
        seed=seed,
        dpo=dpo,
        samples=settings.samples,
        temperature=settings.temperature,
        max_new_tokens=settings.sft.lengths[1] + 2,
    )
    report = train(config)
    stages = []
    for entry, stage_p in zip(report, stage_params(data.model, run_dir)):
        stages.append(
            {
                "stage": entry["stage"],
                "num_pairs": entry["num_pairs"],
                "replayed": entry["replayed"],
                "steps": entry["steps"],
                "gamma": entry["ref_logratio_mean"],
                "eval_accuracy": entry["eval_after"]["rewards/accuracies"],
                "eval_margin": entry["eval_after"]["rewards/margins"],
                **greedy_quality(data.model, stage_p, scored),
            }
        )
    return {
        "learning_rate": dpo.learning_rate,
        "beta": dpo.beta,
        "stages": stages,
        "seconds": time.perf_counter() - t0,
    }


def settings_record(settings: ExperimentSettings) -> dict:
    """The settings as stored in results.json (JSON types: tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(settings)))


def settings_from_record(record: dict) -> ExperimentSettings:
    """The inverse of ``settings_record``."""
    sft = {k: tuple(v) if isinstance(v, list) else v for k, v in record["sft"].items()}
    rest = {k: v for k, v in record.items() if k not in ("sft", "dpo")}
    settings = ExperimentSettings(sft=SFTSettings(**sft), dpo=DPOSettings(**record["dpo"]), **rest)
    assert settings_record(settings) == record, "settings do not survive the JSON round trip"
    return settings
