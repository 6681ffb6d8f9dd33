"""Does stepwise DPO beat all-at-once? The sorting task, end to end, from one command.

    python -m experiments.stepwise --tune      # the tuning grid on seed 0 -> experiments/results/tuning.json
    python -m experiments.stepwise [--seeds 0 1 2 3 4] [--out runs/experiments/stepwise]
                                   [--plot docs/img/stepwise.png] [--variants dpo true-3 ...] [--publish]
    python -m experiments.stepwise --check     # rerun seed 0, compare with experiments/results/stepwise.json

Per seed: SFT a tiny Llama from scratch (M0), sample best-vs-worst preference pairs from M0,
then train every variant of experiments.variants through `sdpo_jax.stages.train` from that M0 on
those pairs, and score M0 and every stage snapshot M_t by the true reward of greedy answers on
held-out prompts. Writes OUT/seed_<s>/results.json per seed, OUT/summary.json and OUT/table.md
over seeds, and the plot. A seed whose results.json exists is not rerun (delete it to redo). Every
results.json carries its provenance (commit, dirty tree, package versions, device, command).

Each variant trains at its own learning rate and beta: the point of the tuning grid chosen for it on
validation prompts (experiments.tuning; ``--tune`` runs the grid, learning rates x betas of
``--tune-learning-rates`` / ``--tune-betas``, on ``--seeds``, default 0, and writes ``--tuned``, by
default experiments/results/tuning.json; each grid point's result is kept in
OUT/tune/seed_<s>/<variant>/<point>/result.json and reused by a rerun). Without that file, or with
``--untuned``, every variant trains at the one ``--learning-rate`` / ``--beta``. results.json records
each variant's learning rate and beta, and the table shows them.

``--publish`` also writes every seed's results and the summary to ``experiments/results/stepwise.json``,
the committed results that docs/experiments.md quotes (refused unless every seed was made at HEAD
from a clean tree); ``--check`` reruns seed 0 with the committed settings, variants and per-variant
learning rates and betas, and exits 1 when any number differs from the committed one, naming each
and by how much.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments.measure import greedy_quality, stage_params
from experiments.pairs import describe, sample_pairs, split_by_difficulty, write_jsonl
from experiments.provenance import provenance, provenance_line, same_platform
from experiments.reproduce import differences
from experiments.sft import SFTSettings, save_model_folder, train_sft
from experiments.sorting import Problem, sample_problems
from experiments.summary import markdown_table, plot, summarize
from experiments.tuning import QUICK_TUNING, TuningSettings, point_name, tuned_dpo, tuning_record
from experiments.variants import VARIANT_NAMES, VARIANTS, DPOSettings, variant_config
from sdpo_jax.stages import train


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


PROGRAM = "python -m experiments.stepwise"
#: The committed results behind docs/experiments.md.
PUBLISHED = Path(__file__).resolve().parent / "results" / "stepwise.json"
#: The committed tuning grid's choices (experiments.tuning), read by the normal run.
TUNED = Path(__file__).resolve().parent / "results" / "tuning.json"

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


def run_seed(
    seed: int, out: Path, settings: ExperimentSettings, variants, dpo_of: dict | None = None, log=print
) -> dict:
    """Everything for one seed; returns (and writes) its results. ``dpo_of``: each variant's DPOSettings by
    name (its tuned learning rate and beta); None: ``settings.dpo`` for every variant."""
    started = time.perf_counter()
    data = prepare_seed(seed, out, settings, variants, log=log)
    m0 = greedy_quality(data.model, data.params, data.heldout)
    log(f"seed {seed}: M0 reward {m0['reward']:.3f}, exact {m0['exact']:.3f}")
    result = {
        "seed": seed,
        "provenance": provenance(PROGRAM),
        "settings": settings_record(settings),
        "m0": {**m0, "sft_final_loss": data.record["sft_final_loss"]},
        "pairs": data.record["pairs"],
        "eval_pairs": data.record["eval_pairs"],
        "variants": {},
    }
    for variant in variants:
        dpo = dpo_of[variant.name] if dpo_of is not None else settings.dpo
        done = run_variant(variant, data, seed, settings, dpo, out / "runs" / variant.name, data.heldout)
        result["variants"][variant.name] = done
        stages = done["stages"]
        log(
            f"seed {seed} {variant.name} (lr {dpo.learning_rate:g}, beta {dpo.beta:g}): reward "
            + " -> ".join(f"{s['reward']:.3f}" for s in stages)
            + ", gamma "
            + " -> ".join(f"{s['gamma']:.2f}" for s in stages)
            + f" ({done['seconds']:.0f} s)"
        )
    result["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


def tune(
    seeds: list[int], out: Path, settings: ExperimentSettings, tuning: TuningSettings, variants, log=print
) -> dict:
    """The tuning grid (experiments.tuning): every variant at every grid point on every seed, scored on the
    seed's validation prompts; returns the tuning.json record. Each point's result is kept in
    OUT/tune/seed_<s>/<variant>/<point>/result.json and reused by a rerun with the same settings."""
    record = settings_record(settings)
    rewards: dict[str, dict] = {v.name: {point: [] for point in tuning.grid()} for v in variants}
    for seed in seeds:
        folder, data = out / "tune" / f"seed_{seed}", None
        for variant in variants:
            for learning_rate, beta in tuning.grid():
                point = folder / variant.name / point_name(learning_rate, beta)
                stored = _stored_point(point / "result.json", record, tuning)
                if stored is None:
                    data = data or prepare_seed(seed, folder, settings, variants, tuning.validation_prompts, log)
                    dpo = dataclasses.replace(settings.dpo, learning_rate=learning_rate, beta=beta)
                    done = run_variant(variant, data, seed, settings, dpo, point / "run", data.validation)
                    stored = {
                        "seed": seed,
                        "variant": variant.name,
                        "validation_reward": done["stages"][-1]["reward"],
                        **done,
                        "settings": record,
                        "validation_prompts": tuning.validation_prompts,
                        "provenance": provenance(PROGRAM),
                    }
                    (point / "result.json").write_text(json.dumps(stored, indent=1))
                log(
                    f"tune seed {seed} {variant.name} lr {learning_rate:g} beta {beta:g}: validation reward "
                    f"{stored['validation_reward']:.3f} ({stored['seconds']:.0f} s)"
                )
                rewards[variant.name][(learning_rate, beta)].append(stored["validation_reward"])
    return tuning_record(record, tuning, seeds, rewards, provenance(PROGRAM))


def _stored_point(path: Path, record: dict, tuning: TuningSettings) -> dict | None:
    """A grid point's finished result, if made under these settings (another's is refused, not reused)."""
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    if stored["settings"] != record or stored["validation_prompts"] != tuning.validation_prompts:
        raise SystemExit(f"{path}: made with other settings than this command's; use another --out or delete it")
    return stored


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


def publish(results: list[dict], summary: dict, names: list[str], path: Path) -> None:
    """Write the committed results: every seed (with its provenance) and the summary over them."""
    head = provenance(PROGRAM)
    made = [r.get("provenance", {}) for r in results]
    stale = [
        r["seed"] for r, p in zip(results, made) if p.get("commit") != head["commit"] or p.get("dirty") is not False
    ]
    if head["commit"] is None or stale:
        raise SystemExit(
            f"--publish: seeds {stale} were not made at HEAD ({head['commit']}) from a clean tree; "
            "rerun them (delete their results.json) after committing"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"variants": names, "seeds": results, "summary": summary}, indent=1) + "\n")
    print(f"published {path}")


def check(out: Path, published: Path) -> int:
    """Rerun seed 0 as the committed results were made (settings, variants and each variant's learning rate
    and beta) and compare every number; 0 when all agree."""
    committed = json.loads(published.read_text())
    seed0 = next(r for r in committed["seeds"] if r["seed"] == 0)
    variants = [v for v in VARIANTS if v.name in committed["variants"]]
    settings = settings_from_record(seed0["settings"])
    now = run_seed(0, out / "check" / "seed_0", settings, variants, committed_dpo(seed0, settings))
    found = differences(seed0, now)
    same = same_platform(seed0["provenance"], now["provenance"])
    print("committed: " + provenance_line(seed0["provenance"]))
    print("now:       " + provenance_line(now["provenance"]))
    if not found:
        print(f"check passed: every number of seed 0 ({len(variants)} variants) equals the committed one")
        return 0
    print(
        f"check FAILED: {len(found)} numbers differ"
        + ("" if same else " (another platform or package versions: some difference is expected, judge the sizes)")
    )
    for difference in found:
        print("  " + difference.describe())
    return 1


def committed_dpo(seed_result: dict, settings: ExperimentSettings) -> dict[str, DPOSettings]:
    """Each variant's DPOSettings as a seed's results record them (results made before variants had their own
    learning rate and beta record none: every variant then used ``settings.dpo``)."""
    return {
        name: dataclasses.replace(
            settings.dpo,
            learning_rate=variant.get("learning_rate", settings.dpo.learning_rate),
            beta=variant.get("beta", settings.dpo.beta),
        )
        for name, variant in seed_result["variants"].items()
    }


def load_seed(path: Path, settings: ExperimentSettings, names: list[str], dpo_of: dict | None) -> dict:
    """A finished seed's results, if they were made with these settings, hold these variants and trained each
    at its learning rate and beta of ``dpo_of`` (None: ``settings.dpo``)."""
    stored = json.loads(path.read_text())
    if stored.get("settings") != settings_record(settings):
        raise SystemExit(f"{path}: made with other settings than this command's; use another --out or delete it")
    missing = [n for n in names if n not in stored["variants"]]
    if missing:
        raise SystemExit(f"{path}: has no results for {', '.join(missing)}; use another --out or delete it")
    made, wanted = committed_dpo(stored, settings), dpo_of or {name: settings.dpo for name in names}
    other = [f"{n} (lr {made[n].learning_rate:g}, beta {made[n].beta:g})" for n in names if made[n] != wanted[n]]
    if other:
        raise SystemExit(
            f"{path}: made at other learning rates or betas for {', '.join(other)}; use another --out or delete it"
        )
    return stored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.stepwise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 3 4; with --tune, 0")
    parser.add_argument("--out", default="runs/experiments/stepwise")
    parser.add_argument("--plot", default="docs/img/stepwise.png")
    parser.add_argument("--variants", nargs="+", default=list(VARIANT_NAMES), choices=VARIANT_NAMES)
    parser.add_argument(
        "--chosen",
        default="gold",
        choices=("gold", "best"),
        help="chosen answer of a pair: the correct one (default) or M0's best sample",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        help=f"with --untuned: DPO peak learning rate per stage of every variant (default {DPOSettings.learning_rate})",
    )
    parser.add_argument(
        "--beta", type=float, help=f"with --untuned: DPO beta of every variant (default {DPOSettings.beta})"
    )
    parser.add_argument(
        "--epochs", type=float, help=f"passes over all pairs, split over the stages (default {DPOSettings.epochs})"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, not a result)")
    parser.add_argument(
        "--tune", action="store_true", help="run the tuning grid (experiments.tuning) and write the --tuned file"
    )
    parser.add_argument(
        "--tune-learning-rates",
        type=float,
        nargs="+",
        help=f"the grid's learning rates (default {' '.join(map(str, TuningSettings.learning_rates))})",
    )
    parser.add_argument(
        "--tune-betas",
        type=float,
        nargs="+",
        help=f"the grid's betas (default {' '.join(map(str, TuningSettings.betas))})",
    )
    parser.add_argument(
        "--tuned",
        type=Path,
        help=f"the tuning file --tune writes and the run reads (default {TUNED.relative_to(TUNED.parents[2])}; "
        "with --quick, OUT/tuning.json)",
    )
    parser.add_argument(
        "--untuned", action="store_true", help="train every variant at the one --learning-rate and --beta"
    )
    parser.add_argument("--publish", action="store_true", help=f"also write the committed results ({PUBLISHED.name})")
    parser.add_argument(
        "--check",
        action="store_true",
        help="rerun seed 0 as the committed results were made; exit 1 if any number differs",
    )
    parser.add_argument(
        "--results", type=Path, default=PUBLISHED, help="the committed results file (--publish, --check)"
    )
    args = parser.parse_args(argv)
    seeds = args.seeds or ([0] if args.tune else [0, 1, 2, 3, 4])
    if min(seeds) < 0:
        parser.error("--seeds must be >= 0")
    one_setting = args.learning_rate is not None or args.beta is not None
    if args.tune and (one_setting or args.untuned or args.publish):
        parser.error("--tune sets each variant's learning rate and beta itself (--tune-learning-rates, --tune-betas)")
    if not args.tune and (args.tune_learning_rates or args.tune_betas):
        parser.error("--tune-learning-rates and --tune-betas set the grid of --tune")
    if one_setting and not args.tune and not args.untuned:
        parser.error("--learning-rate and --beta set one setting for every variant: add --untuned")
    out = Path(args.out)
    _persistent_compilation_cache(out)
    if args.check:
        return check(out, args.results)
    base = QUICK if args.quick else ExperimentSettings()
    overrides = {
        k: v
        for k, v in (("learning_rate", args.learning_rate), ("beta", args.beta), ("epochs", args.epochs))
        if v is not None
    }
    settings = dataclasses.replace(base, chosen=args.chosen, dpo=dataclasses.replace(base.dpo, **overrides))
    variants = [v for v in VARIANTS if v.name in args.variants]
    names = [v.name for v in variants]
    tuned = args.tuned or (out / "tuning.json" if args.quick else TUNED)
    if args.tune:
        grid = {k: tuple(v) for k, v in (("learning_rates", args.tune_learning_rates), ("betas", args.tune_betas)) if v}
        if any(value <= 0 for values in grid.values() for value in values):
            parser.error("--tune-learning-rates and --tune-betas must be > 0")
        tuning = dataclasses.replace(QUICK_TUNING if args.quick else TuningSettings(), **grid)
        record = tune(seeds, out, settings, tuning, variants)
        tuned.parent.mkdir(parents=True, exist_ok=True)
        tuned.write_text(json.dumps(record, indent=1) + "\n")
        for name, variant in record["variants"].items():
            best = variant["best"]
            print(
                f"{name}: lr {best['learning_rate']:g}, beta {best['beta']:g} (validation reward "
                f"{best['validation_reward']:.3f}; grid "
                + ", ".join(
                    f"{p['learning_rate']:g}/{p['beta']:g} {p['validation_reward']:.3f}" for p in variant["grid"]
                )
                + ")"
            )
        print(f"wrote {tuned}")
        return 0
    dpo_of = None
    if not args.untuned:
        if not tuned.is_file():
            if args.tuned is not None:
                parser.error(f"--tuned {tuned}: no such file")
            print(
                f"no tuning file {tuned}: every variant at lr {settings.dpo.learning_rate:g}, beta "
                f"{settings.dpo.beta:g} (run --tune first for each variant's own setting)"
            )
        else:
            dpo_of = tuned_dpo(tuned, settings_record(settings), settings.dpo, names)
    started = time.perf_counter()
    results = []
    for seed in seeds:
        path = out / f"seed_{seed}" / "results.json"
        results.append(
            load_seed(path, settings, names, dpo_of)
            if path.is_file()
            else run_seed(seed, path.parent, settings, variants, dpo_of)
        )
    summary = summarize(results, names)
    summary["settings"] = settings_record(settings)
    summary["tuned"] = str(tuned) if dpo_of is not None else None
    summary["wall_seconds_this_invocation"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = markdown_table(summary)
    (out / "table.md").write_text(table)
    plot(summary, Path(args.plot))
    print(table)
    print(f"wall time {summary['wall_seconds_this_invocation']:.0f} s; {out / 'summary.json'}, {args.plot}")
    if args.publish:
        publish(results, summary, names, args.results)
    return 0


def _persistent_compilation_cache(out: Path) -> None:
    """Variants compile the same train/eval steps again and again (each stages.train builds its own
    jitted functions); XLA's persistent cache turns the repeats into cache reads."""
    jax.config.update("jax_compilation_cache_dir", str((out / "jax_cache").absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


if __name__ == "__main__":
    sys.exit(main())
