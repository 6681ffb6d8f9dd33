"""Does stepwise DPO beat all-at-once? The sorting task, end to end, from one command.

    python -m experiments.stepwise [--seeds 0 1 2 3 4] [--out runs/experiments/stepwise]
                                   [--plot docs/img/stepwise.png] [--variants dpo true-3 ...] [--publish]
    python -m experiments.stepwise --check     # rerun seed 0, compare with experiments/results/stepwise.json

Per seed: SFT a tiny Llama from scratch (M0), sample best-vs-worst preference pairs from M0,
then train every variant of experiments.variants through `sdpo_jax.stages.train` from that M0 on
those pairs, and score M0 and every stage snapshot M_t by the true reward of greedy answers on
held-out prompts. Writes OUT/seed_<s>/results.json per seed, OUT/summary.json and OUT/table.md
over seeds, and the plot. A seed whose results.json exists is not rerun (delete it to redo). Every
results.json carries its provenance (commit, dirty tree, package versions, device, command).

``--publish`` also writes every seed's results and the summary to ``experiments/results/stepwise.json``,
the committed results that docs/experiments.md quotes (refused unless every seed was made at HEAD
from a clean tree); ``--check`` reruns seed 0 with the committed settings and variants and exits 1
when any number differs from the committed one, naming each and by how much.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

from experiments.measure import greedy_quality, stage_params
from experiments.pairs import describe, sample_pairs, split_by_difficulty, write_jsonl
from experiments.provenance import provenance, provenance_line, same_platform
from experiments.reproduce import differences
from experiments.sft import SFTSettings, save_model_folder, train_sft
from experiments.sorting import sample_problems
from experiments.summary import markdown_table, plot, summarize
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

QUICK = ExperimentSettings(
    sft=SFTSettings(steps=30, batch_size=32, hidden_size=32, lengths=(2, 5)),
    dpo=DPOSettings(batch_size=16, max_length=16),
    train_prompts=96,
    eval_pair_prompts=32,
    heldout_prompts=48,
    samples=2,
)


def seed_problems(seed: int, settings: ExperimentSettings):
    """(training-pair, held-out-pair, greedy-scored) prompts of a seed, always drawn in this order."""
    rng = np.random.default_rng([seed, 2])
    lengths = settings.sft.lengths
    return (
        sample_problems(rng, settings.train_prompts, lengths),
        sample_problems(rng, settings.eval_pair_prompts, lengths),
        sample_problems(rng, settings.heldout_prompts, lengths),
    )


def run_seed(seed: int, out: Path, settings: ExperimentSettings, variants, log=print) -> dict:
    """Everything for one seed; returns (and writes) its results."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, params, losses = train_sft(settings.sft, seed)
    folder = save_model_folder(params, model.config, out / "m0")
    train_problems, eval_problems, heldout = seed_problems(seed, settings)
    pairs = sample_pairs(model, params, train_problems, settings.samples, settings.temperature, seed, settings.chosen)
    eval_pairs = sample_pairs(
        model, params, eval_problems, settings.samples, settings.temperature, seed + 1000, settings.chosen
    )
    data = out / "data"
    all_file = write_jsonl(data / "train_all.jsonl", pairs)
    eval_file = write_jsonl(data / "eval.jsonl", eval_pairs)
    stage_files = {
        t: [
            write_jsonl(data / f"train_true_T{t}_stage{k + 1}.jsonl", chunk)
            for k, chunk in enumerate(split_by_difficulty(pairs, t, seed))
        ]
        for t in sorted({v.stages for v in variants if v.partition == "true"})
    }
    m0 = greedy_quality(model, params, heldout)
    log(
        f"seed {seed}: M0 after {settings.sft.steps} SFT steps (loss {losses[-1]:.3f}): reward {m0['reward']:.3f}, "
        f"exact {m0['exact']:.3f}; {len(pairs)} train pairs, {len(eval_pairs)} eval pairs "
        f"({time.perf_counter() - started:.0f} s)"
    )
    result = {
        "seed": seed,
        "provenance": provenance(PROGRAM),
        "settings": settings_record(settings),
        "m0": {**m0, "sft_final_loss": losses[-1]},
        "pairs": describe(pairs),
        "eval_pairs": describe(eval_pairs),
        "variants": {},
    }
    for variant in variants:
        t0 = time.perf_counter()
        run_dir = out / "runs" / variant.name
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: the driver would otherwise resume
        config = variant_config(
            variant,
            model_folder=str(folder),
            all_pairs=all_file,
            stage_files=stage_files,
            eval_pairs=eval_file,
            num_pairs=len(pairs),
            output_dir=str(run_dir),
            cache_dir=str(out / "cache"),
            seed=seed,
            dpo=settings.dpo,
            samples=settings.samples,
            temperature=settings.temperature,
            max_new_tokens=settings.sft.lengths[1] + 2,
        )
        report = train(config)
        stages = []
        for entry, stage_p in zip(report, stage_params(model, run_dir)):
            quality = greedy_quality(model, stage_p, heldout)
            stages.append(
                {
                    "stage": entry["stage"],
                    "num_pairs": entry["num_pairs"],
                    "steps": entry["steps"],
                    "gamma": entry["ref_logratio_mean"],
                    "eval_accuracy": entry["eval_after"]["rewards/accuracies"],
                    "eval_margin": entry["eval_after"]["rewards/margins"],
                    **quality,
                }
            )
        result["variants"][variant.name] = {"stages": stages, "seconds": time.perf_counter() - t0}
        log(
            f"seed {seed} {variant.name}: reward "
            + " -> ".join(f"{s['reward']:.3f}" for s in stages)
            + ", gamma "
            + " -> ".join(f"{s['gamma']:.2f}" for s in stages)
            + f" ({time.perf_counter() - t0:.0f} s)"
        )
    result["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


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
    """Rerun seed 0 as the committed results were made and compare every number; 0 when all agree."""
    committed = json.loads(published.read_text())
    seed0 = next(r for r in committed["seeds"] if r["seed"] == 0)
    variants = [v for v in VARIANTS if v.name in committed["variants"]]
    now = run_seed(0, out / "check" / "seed_0", settings_from_record(seed0["settings"]), variants)
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


def load_seed(path: Path, settings: ExperimentSettings, names: list[str]) -> dict:
    """A finished seed's results, if they were made with these settings and hold these variants."""
    stored = json.loads(path.read_text())
    if stored.get("settings") != settings_record(settings):
        raise SystemExit(f"{path}: made with other settings than this command's; use another --out or delete it")
    missing = [n for n in names if n not in stored["variants"]]
    if missing:
        raise SystemExit(f"{path}: has no results for {', '.join(missing)}; use another --out or delete it")
    return stored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.stepwise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
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
        "--learning-rate", type=float, help=f"DPO peak learning rate per stage (default {DPOSettings.learning_rate})"
    )
    parser.add_argument("--beta", type=float, help=f"DPO beta (default {DPOSettings.beta})")
    parser.add_argument(
        "--epochs", type=float, help=f"passes over all pairs, split over the stages (default {DPOSettings.epochs})"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, not a result)")
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
    if min(args.seeds) < 0:
        parser.error("--seeds must be >= 0")
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
    started = time.perf_counter()
    results, names = [], [v.name for v in variants]
    for seed in args.seeds:
        path = out / f"seed_{seed}" / "results.json"
        results.append(
            load_seed(path, settings, names) if path.is_file() else run_seed(seed, path.parent, settings, variants)
        )
    summary = summarize(results, names)
    summary["settings"] = settings_record(settings)
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
