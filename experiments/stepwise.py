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
import sys
import time
from pathlib import Path

from experiments.measure import greedy_quality
from experiments.provenance import provenance, provenance_line, publish, same_platform
from experiments.reproduce import differences, largest_final_change
from experiments.runtime import start_experiment
from experiments.seed_run import (
    PROGRAM,
    QUICK,
    ExperimentSettings,
    prepare_seed,
    run_variant,
    settings_from_record,
    settings_record,
)
from experiments.summary import markdown_table, plot, summarize
from experiments.tuning import QUICK_TUNING, TuningSettings, grid_table, tune, tuned_dpo
from experiments.variants import VARIANT_NAMES, VARIANTS, DPOSettings

#: The committed results behind docs/experiments.md.
PUBLISHED = Path(__file__).resolve().parent / "results" / "stepwise.json"
#: The committed tuning grid's choices (experiments.tuning), read by the normal run.
TUNED = Path(__file__).resolve().parent / "results" / "tuning.json"


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
    change, name = largest_final_change(seed0, now)
    spread = [v["gain"]["std"] for v in committed["summary"]["variants"].values()]
    print(
        f"largest change of a final reward: {change:.3f} ({name}); the committed gains over M0 vary by a "
        f"seed-to-seed std of {min(spread):.3f}-{max(spread):.3f}"
    )
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
    start_experiment(out)
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
        print(grid_table(record))
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
        records = {f"seed {r['seed']}": r for r in results}
        publish(args.results, {"variants": names, "seeds": results, "summary": summary}, records, PROGRAM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
