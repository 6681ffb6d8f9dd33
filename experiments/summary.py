"""Mean and spread over seeds, the paired per-seed counts, the markdown tables and the plot of the stepwise
experiment.

For a quantity q measured once per seed s = 1..S: mean = sum_s q_s / S and std = the sample
standard deviation (ddof = 1; 0 for one seed). "vs M0" is the per-seed difference q_s - q_s(M0)
averaged the same way (paired: every variant of a seed starts from that seed's M0). The paired counts
are the firmer evidence when means differ by less than a std: for variants a and b,
#{s : final reward_s(a) > final reward_s(b)} out of S.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def mean_std(values) -> dict:
    values = np.asarray(values, np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "values": values.tolist(),
    }


def summarize(results: list[dict], names: list[str]) -> dict:
    """Per variant: its learning rate and beta (the same in every seed), final reward, exact-match rate,
    held-out preference accuracy, gain over M0, and per stage reward and gamma; each as mean/std over seeds."""
    m0 = [r["m0"]["reward"] for r in results]
    bands = length_bands(results)
    summary = {
        "seeds": [r["seed"] for r in results],
        "m0": {
            "reward": mean_std(m0),
            "exact": mean_std([r["m0"]["exact"] for r in results]),
            "reward_by_band": {
                band: mean_std([_band_reward(r["m0"], n) for r in results]) for band, n in bands.items()
            },
        },
        "pairs": mean_std([r["pairs"]["num_pairs"] for r in results]),
        "variants": {},
    }
    for name in names:
        runs = [r["variants"][name]["stages"] for r in results]
        final = [stages[-1] for stages in runs]
        summary["variants"][name] = {
            **_dpo_setting(results, name),
            "reward": mean_std([f["reward"] for f in final]),
            "gain": mean_std([f["reward"] - base for f, base in zip(final, m0)]),
            "exact": mean_std([f["exact"] for f in final]),
            "eval_accuracy": mean_std([f["eval_accuracy"] for f in final]),
            "stage_reward": [mean_std([stages[t]["reward"] for stages in runs]) for t in range(len(runs[0]))],
            "stage_gain": [
                mean_std([stages[t]["reward"] - base for stages, base in zip(runs, m0)]) for t in range(len(runs[0]))
            ],
            "gamma": [mean_std([stages[t]["gamma"] for stages in runs]) for t in range(len(runs[0]))],
            "seconds": mean_std([r["variants"][name]["seconds"] for r in results]),
            "reward_by_band": {
                band: mean_std([_band_reward(f, lengths) for f in final]) for band, lengths in bands.items()
            },
            "seeds_above_m0": sum(f["reward"] > base for f, base in zip(final, m0)),
            "seeds_gamma_rises": sum(_rises([stage["gamma"] for stage in stages]) for stages in runs),
        }
    for name in names:
        summary["variants"][name]["seeds_best"] = sum(
            all(final_reward(r, name) > final_reward(r, other) for other in names if other != name) for r in results
        )
    summary["paired"] = [
        {"a": a, "b": b, "a_above_b": sum(final_reward(r, a) > final_reward(r, b) for r in results), "of": len(results)}
        for a, b in COMPARISONS
        if a in names and b in names
    ]
    return summary


#: The paired comparisons the write-up quotes, as (a, b): each claim's variant against its baseline.
COMPARISONS = (
    ("dpo", "random-2"),
    ("random-2", "random-3"),
    ("random-2", "true-2"),
    ("random-2", "model-2"),
    ("random-3", "true-3"),
    ("random-3", "model-3"),
    ("true-2", "true-2-init-sft"),
    ("true-3", "true-3-init-sft"),
    ("onpolicy-2", "random-2"),
    ("onpolicy-3", "random-3"),
    ("onpolicy-gold-2", "random-2"),
    ("onpolicy-gold-3", "random-3"),
    ("onpolicy-gold-2", "onpolicy-2"),
    ("onpolicy-gold-3", "onpolicy-3"),
    ("onpolicy-2", "true-2"),
    ("onpolicy-3", "true-3"),
    ("replay-2", "true-2"),
    ("replay-3", "true-3"),
    ("replay-2", "random-2"),
    ("replay-3", "random-3"),
)


def final_reward(result: dict, name: str) -> float:
    """A seed's (results.json's) final-stage reward of a variant."""
    return result["variants"][name]["stages"][-1]["reward"]


def _rises(values: list[float]) -> bool:
    """Whether a stage-by-stage series rises at every stage (False for a single stage)."""
    return len(values) > 1 and all(later > earlier for earlier, later in zip(values, values[1:]))


def _dpo_setting(results: list[dict], name: str) -> dict:
    """{'learning_rate', 'beta'} a variant was trained at; refused when the seeds disagree."""
    used = {(r["variants"][name]["learning_rate"], r["variants"][name]["beta"]) for r in results}
    if len(used) != 1:
        raise ValueError(f"{name}: the seeds were trained at different (learning rate, beta): {sorted(used)}")
    learning_rate, beta = used.pop()
    return {"learning_rate": learning_rate, "beta": beta}


def length_bands(results: list[dict]) -> dict[str, list[int]]:
    """The list lengths seen, cut into three bands (short, middle, long) of near-equal width."""
    lengths = sorted({int(n) for r in results for n in r["m0"]["reward_by_length"]})
    thirds = np.array_split(np.asarray(lengths), 3)
    return {f"n={part[0]}-{part[-1]}": [int(n) for n in part] for part in thirds if len(part)}


def _band_reward(quality: dict, lengths: list[int]) -> float:
    """Mean over the band's lengths of the per-length mean reward (each length weighs the same)."""
    return float(np.mean([quality["reward_by_length"][str(n)] for n in lengths]))


def _pm(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown_table(summary: dict) -> str:
    """One row per variant (M0 first); gamma and reward listed stage by stage."""
    seeds = ", ".join(str(s) for s in summary["seeds"])
    lines = [
        f"Seeds {seeds} (mean ± sample std over seeds); M0 reward {_pm(summary['m0']['reward'])}, "
        f"exact {_pm(summary['m0']['exact'])}; {_pm(summary['pairs'], 0)} training pairs.",
        "",
        "| variant | lr | beta | final reward | gain vs M0 | exact match | held-out pref. acc. | reward per stage | "
        "gamma per stage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in summary["variants"].items():
        per_stage = " → ".join(f"{s['mean']:.3f}" for s in v["stage_reward"])
        gammas = " → ".join(_pm(g, 2) for g in v["gamma"])
        lines.append(
            f"| {name} | {v['learning_rate']:g} | {v['beta']:g} | {_pm(v['reward'])} | {_pm(v['gain'])} | "
            f"{_pm(v['exact'])} | {_pm(v['eval_accuracy'])} | {per_stage} | {gammas} |"
        )
    bands = list(summary["m0"]["reward_by_band"])
    lines += [
        "",
        "Final reward by list length (mean over the band's lengths; mean ± std over seeds):",
        "",
        "| model | " + " | ".join(bands) + " |",
        "|---|" + "---|" * len(bands),
        "| M0 (SFT) | " + " | ".join(_pm(summary["m0"]["reward_by_band"][b]) for b in bands) + " |",
    ]
    for name, v in summary["variants"].items():
        lines.append(f"| {name} | " + " | ".join(_pm(v["reward_by_band"][b]) for b in bands) + " |")
    return "\n".join(lines + ["", *per_seed_table(summary)]) + "\n"


def per_seed_table(summary: dict) -> list[str]:
    """The per-seed evidence as markdown lines: each variant's gain over M0 in every seed, the seeds in which
    it is above M0, the best variant, and its gamma rises at every stage; then the paired counts."""
    seeds = len(summary["seeds"])
    m0 = ", ".join(f"{value:.3f}" for value in summary["m0"]["reward"]["values"])
    lines = [
        f"Per seed ({', '.join(str(s) for s in summary['seeds'])}; M0 reward {m0}): gain over M0, and in how many of "
        f"the {seeds} seeds the variant is above M0, the best of all variants, and has gamma rising at every stage:",
        "",
        "| variant | gain vs M0 per seed | above M0 | best | gamma rises |",
        "|---|---|---|---|---|",
    ]
    for name, v in summary["variants"].items():
        gains = ", ".join(f"{value:+.3f}" for value in v["gain"]["values"])
        rises = f"{v['seeds_gamma_rises']}/{seeds}" if len(v["gamma"]) > 1 else ""
        lines.append(f"| {name} | {gains} | {v['seeds_above_m0']}/{seeds} | {v['seeds_best']}/{seeds} | {rises} |")
    if summary["paired"]:
        lines += ["", "Paired counts (final reward): a above b in k of the seeds.", "", "| a | b | a above b |"]
        lines.append("|---|---|---|")
        lines += [f"| {p['a']} | {p['b']} | {p['a_above_b']}/{p['of']} |" for p in summary["paired"]]
    return lines


def plot(summary: dict, path: Path) -> None:
    """Left: final reward minus the seed's M0 reward per variant (mean, std bars, seeds as dots).
    Middle: the same gain stage by stage. Right: gamma_t stage by stage."""
    names = list(summary["variants"])
    figure = Figure(figsize=(14, 4.8), dpi=110)
    FigureCanvasAgg(figure)
    left, middle, right = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1.4, 1, 1]})
    left.axhline(0.0, color="0.3", lw=1)
    for i, name in enumerate(names):
        stat = summary["variants"][name]["gain"]
        left.bar(i, stat["mean"], yerr=stat["std"], color=_color(name), alpha=0.8, capsize=3)
        left.scatter([i] * len(stat["values"]), stat["values"], color="k", s=8, zorder=3)
    left.set_xticks(range(len(names)), names, rotation=35, ha="right")
    left.set_ylabel("reward(final) - reward(M0), same seed")
    m0 = summary["m0"]["reward"]
    left.set_title(f"gain over M0 (M0 reward {m0['mean']:.3f} ± {m0['std']:.3f})")
    for name in names:
        v = summary["variants"][name]
        stages = np.arange(0, len(v["stage_gain"]) + 1)
        gain = [0.0] + [s["mean"] for s in v["stage_gain"]]
        if len(v["stage_gain"]) == 1:
            middle.scatter([1], gain[1:], marker="*", s=120, color=_color(name), label=name, zorder=3)
            continue
        middle.plot(stages, gain, marker="o", color=_color(name), ls=_style(name), label=name)
        right.plot(
            stages[1:], [g["mean"] for g in v["gamma"]], marker="o", color=_color(name), ls=_style(name), label=name
        )
    middle.axhline(0.0, color="0.3", lw=1)
    middle.set_xlabel("stage t (0 = M0)")
    middle.set_ylabel("reward(M_t) - reward(M0)")
    middle.set_title("gain stage by stage (mean over seeds)")
    middle.legend(fontsize=7, ncol=2)
    right.set_xlabel("stage t")
    right.set_ylabel("gamma_t = mean log-ratio under M_(t-1)")
    right.set_title("reference log-ratio of each stage's chunk")
    right.legend(fontsize=7, ncol=2)
    for axis in (middle, right):
        axis.xaxis.get_major_locator().set_params(integer=True)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


#: Plot colour of each variant family (the name without its stage count).
COLORS = {
    "dpo": "tab:gray",
    "random": "tab:blue",
    "true": "tab:green",
    "model": "tab:orange",
    "true-init-sft": "tab:red",
    "onpolicy": "tab:purple",
    "onpolicy-gold": "tab:pink",
    "replay": "tab:cyan",
}


def _color(name: str) -> str:
    return COLORS[re.sub(r"-\d+", "", name)]


def _style(name: str) -> str:
    return "--" if name.endswith("2") or "-2-" in name else "-"
