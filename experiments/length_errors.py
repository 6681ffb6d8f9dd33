"""Where the reward goes: answer-length errors of M0 and of each stage of a finished seed.

    python -m experiments.length_errors [--seed-dir runs/experiments/stepwise/seed_0] [--variants dpo true-3]

For the seed's held-out prompts (re-drawn exactly as `experiments.stepwise` drew them, default
settings) and each model M0, M_1..M_T, per band of list lengths n:

    bias      = mean(|a| - n)            (a = greedy answer before EOS; < 0: answers too short)
    wrong_len = mean([|a| != n])
    reward    = mean r(a, sorted(d)),  and the same over answers of the right length only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ml_collections
import numpy as np

from experiments.measure import greedy_answers, stage_params
from experiments.seed_run import ExperimentSettings, seed_problems
from experiments.sorting import reward, strip_eos
from sdpo_jax.models.loading import load_model

BANDS = ((2, 5), (6, 9), (10, 12))


def length_rows(model, params, problems) -> list[dict]:
    answers = greedy_answers(model, params, problems)
    n = np.array([p.difficulty for p in problems])
    size = np.array([len(strip_eos(a)) for a in answers])
    r = np.array([reward(p, a) for p, a in zip(problems, answers)])
    rows = []
    for low, high in BANDS:
        band = (n >= low) & (n <= high)
        right = band & (size == n)
        rows.append(
            {
                "band": f"n={low}-{high}",
                "bias": float(np.mean(size[band] - n[band])),
                "wrong_len": float(np.mean(size[band] != n[band])),
                "reward": float(r[band].mean()),
                "reward_right_len": float(r[right].mean()) if right.any() else float("nan"),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.length_errors", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed-dir", default="runs/experiments/stepwise/seed_0")
    parser.add_argument("--variants", nargs="+", default=["dpo", "true-3"])
    args = parser.parse_args(argv)
    folder = Path(args.seed_dir)
    if not (folder / "m0" / "config.json").is_file():
        raise SystemExit(f"{folder}: not a seed folder of experiments.stepwise (no m0/config.json)")
    seed = int(folder.name.rsplit("_", 1)[-1])
    model, m0, _ = load_model(
        ml_collections.ConfigDict(
            {"path": str(folder / "m0"), "dtype": "float32", "attention": "auto", "remat": "none"}
        )
    )
    heldout = seed_problems(seed, ExperimentSettings())[2]
    models = [("M0", m0)] + [
        (f"{name} M{t}", p)
        for name in args.variants
        for t, p in enumerate(stage_params(model, folder / "runs" / name), 1)
    ]
    print("| model | band | length bias | wrong length | reward | reward, right length |\n|---|---|---|---|---|---|")
    for label, params in models:
        for row in length_rows(model, params, heldout):
            print(
                f"| {label} | {row['band']} | {row['bias']:+.2f} | {row['wrong_len']:.2f} | {row['reward']:.3f} | "
                f"{row['reward_right_len']:.3f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
