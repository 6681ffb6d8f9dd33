"""The tuning grid of the stepwise experiment: every variant gets the same budget, chosen on validation prompts.

For every variant v and every grid point (eta, beta) in learning_rates x betas, v is trained from each
tuning seed's M0 and scored by the validation reward of its final stage's model M_T:

    R_val(v, eta, beta) = mean over tuning seeds s of  mean_x r(x, greedy_{M_T}(x)),  x in the validation prompts

The validation prompts of a seed are drawn after, and disjoint from, its training-pair, held-out-pair
and held-out greedy-scored (test) prompts (experiments.stepwise.seed_problems), so the choice never sees
the test prompts. A variant's setting is the argmax of R_val over the grid; ties go to the lower
learning rate, then the higher beta (the smaller step, the stronger pull to the reference).

``tuning.json`` records every point's R_val (and per seed) for every variant, the chosen point, the
grid, the experiment settings it was tuned under and its provenance; the normal run reads it and
trains each variant at its chosen point (`tuned_dpo`). `tune` runs the grid.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from experiments.provenance import provenance
from experiments.seed_run import PROGRAM, ExperimentSettings, prepare_seed, run_variant, settings_record
from experiments.variants import DPOSettings


@dataclasses.dataclass(frozen=True)
class TuningSettings:
    # An earlier grid (2.5e-4, 5e-4, 1e-3) x (0.1, 0.5) put 12 of 15 variants' optima at its corner (the smallest
    # learning rate, the larger beta) and beta 0.1 last at every learning rate: this one extends both edges.
    learning_rates: tuple[float, ...] = (1.25e-4, 2.5e-4, 5e-4, 1e-3)
    betas: tuple[float, ...] = (0.5, 1.0, 2.0)
    validation_prompts: int = 300  # greedy-scored prompts per tuning seed, disjoint from the others

    def grid(self) -> list[tuple[float, float]]:
        """Every (learning rate, beta) point, learning rates outermost."""
        return [(learning_rate, beta) for learning_rate in self.learning_rates for beta in self.betas]


QUICK_TUNING = TuningSettings(learning_rates=(5e-4, 1e-3), betas=(0.5,), validation_prompts=32)


def point_name(learning_rate: float, beta: float) -> str:
    """The folder of a grid point: ``lr0.0005_beta0.5``."""
    return f"lr{learning_rate:g}_beta{beta:g}"


def best_point(points: list[dict]) -> dict:
    """The point of highest ``validation_reward``; ties: the lower ``learning_rate``, then the higher ``beta``."""
    return max(points, key=lambda p: (p["validation_reward"], -p["learning_rate"], p["beta"]))


def tuning_record(tuned_under: dict, tuning: TuningSettings, seeds: list[int], rewards: dict, made_by: dict) -> dict:
    """The contents of tuning.json. ``tuned_under``: the record of the experiment settings tuned
    under (experiments.seed_run.settings_record); ``rewards``: {variant: {(learning_rate, beta): [R_val of each
    seed, in ``seeds`` order]}}; ``made_by``: experiments.provenance.provenance of this command."""
    variants = {}
    for name, by_point in rewards.items():
        points = [
            {
                "learning_rate": learning_rate,
                "beta": beta,
                "validation_reward": sum(per_seed) / len(per_seed),
                "per_seed": per_seed,
            }
            for (learning_rate, beta), per_seed in by_point.items()
        ]
        best = best_point(points)
        variants[name] = {
            "grid": points,
            "best": {k: best[k] for k in ("learning_rate", "beta", "validation_reward")},
        }
    return {
        "provenance": made_by,
        "settings": tuned_under,
        "tuning": json.loads(json.dumps(dataclasses.asdict(tuning))),
        "seeds": seeds,
        "variants": variants,
    }


def grid_table(record: dict) -> str:
    """tuning.json's grid as a markdown table: one row per variant, the validation reward at every point
    (learning rate / beta), the chosen one in bold, and which edges of the grid the choice sits on."""
    learning_rates, betas = record["tuning"]["learning_rates"], record["tuning"]["betas"]
    points = TuningSettings(learning_rates=learning_rates, betas=betas).grid()
    lines = [
        "| variant | " + " | ".join(f"{lr:g} / {beta:g}" for lr, beta in points) + " | chosen | on the grid's edge |",
        "|---|" + "---|" * (len(points) + 2),
    ]
    for name, variant in record["variants"].items():
        reward = {(p["learning_rate"], p["beta"]): p["validation_reward"] for p in variant["grid"]}
        best = (variant["best"]["learning_rate"], variant["best"]["beta"])
        cells = [f"**{reward[p]:.3f}**" if p == best else f"{reward[p]:.3f}" for p in points]
        edges = [
            label
            for label, on_edge in (
                ("smallest lr", best[0] == min(learning_rates)),
                ("largest lr", best[0] == max(learning_rates)),
                ("smallest beta", best[1] == min(betas)),
                ("largest beta", best[1] == max(betas)),
            )
            if on_edge
        ]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {best[0]:g} / {best[1]:g} | {', '.join(edges) or 'no'} |"
        )
    return "\n".join(lines) + "\n"


def tuned_dpo(path: Path, run_settings: dict, dpo: DPOSettings, names: list[str]) -> dict[str, DPOSettings]:
    """Each variant's DPOSettings: ``dpo`` at the variant's chosen learning rate and beta from tuning.json at
    ``path``; refused (SystemExit naming the file) when it was tuned under other settings (anything but the
    two tuned fields differs from ``run_settings``, this run's settings record) or lacks a variant of ``names``."""
    stored = json.loads(path.read_text())
    if _untuned_part(stored["settings"]) != _untuned_part(run_settings):
        raise SystemExit(
            f"{path}: tuned under other experiment settings than this command's; rerun --tune for them, pass "
            "another --tuned file, or --untuned"
        )
    missing = [name for name in names if name not in stored["variants"]]
    if missing:
        raise SystemExit(f"{path}: has no tuned setting for {', '.join(missing)}; rerun --tune with them or --untuned")
    return {
        name: dataclasses.replace(
            dpo,
            learning_rate=stored["variants"][name]["best"]["learning_rate"],
            beta=stored["variants"][name]["best"]["beta"],
        )
        for name in names
    }


def _untuned_part(record: dict) -> dict:
    """A settings record without the two fields the grid sets."""
    dpo = {k: v for k, v in record["dpo"].items() if k not in ("learning_rate", "beta")}
    return {**record, "dpo": dpo}


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
