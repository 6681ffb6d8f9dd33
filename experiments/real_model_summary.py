"""Mean and spread over seeds, and paired counts, of the real-model experiment; its markdown table.

For a quantity q measured once per seed: mean and sample std over seeds (experiments.summary.mean_std).
"vs M0" is the per-seed difference q_s - q_s(M0) (paired: every variant of a seed starts from that
seed's M0 and is tested on that seed's test set). Paired counts on the test problems, summed over seeds:
"wins / losses vs X" = the problems a variant answers right and X wrong / wrong and X right.
"""

from __future__ import annotations

import numpy as np

from experiments.summary import mean_std


def summarize(results: list[dict], names: list[str]) -> dict:
    """Per variant: final accuracy, its gain over M0, per-stage accuracy and gamma, held-out preference
    accuracy, ARC-Easy and its change, accuracy by list length, paired counts vs M0 and vs dpo."""
    m0 = [r["m0"]["m0"] for r in results]
    lengths = sorted(m0[0]["accuracy_by_length"], key=int)
    summary = {
        "seeds": [r["seed"] for r in results],
        "m0": {
            "accuracy": mean_std([m["accuracy"] for m in m0]),
            "arc_easy": mean_std([m["arc_easy"]["acc"] for m in m0]),
            "accuracy_by_length": {n: mean_std([m["accuracy_by_length"][n] for m in m0]) for n in lengths},
        },
        "pairs": mean_std([r["m0"]["pairs"]["num_pairs"] for r in results]),
        "eval_pairs": mean_std([r["m0"]["eval_pairs"]["num_pairs"] for r in results]),
        "variants": {},
    }
    for name in names:
        runs = [r["variants"][name]["stages"] for r in results]
        final = [stages[-1] for stages in runs]
        entry = {
            "accuracy": mean_std([f["accuracy"] for f in final]),
            "gain": mean_std([f["accuracy"] - m["accuracy"] for f, m in zip(final, m0)]),
            "eval_accuracy": mean_std([f["eval_accuracy"] for f in final]),
            "stage_accuracy": [mean_std([st[t]["accuracy"] for st in runs]) for t in range(len(runs[0]))],
            "gamma": [mean_std([st[t]["gamma"] for st in runs]) for t in range(len(runs[0]))],
            "arc_easy": mean_std([f["arc_easy"]["acc"] for f in final]),
            "arc_easy_change": mean_std([f["arc_easy"]["acc"] - m["arc_easy"]["acc"] for f, m in zip(final, m0)]),
            "accuracy_by_length": {n: mean_std([f["accuracy_by_length"][n] for f in final]) for n in lengths},
            "vs_m0": paired_counts(final, m0),
        }
        if name != "dpo" and "dpo" in names:
            entry["vs_dpo"] = paired_counts(final, [r["variants"]["dpo"]["stages"][-1] for r in results])
            entry["seeds_above_dpo"] = sum(
                f["accuracy"] > r["variants"]["dpo"]["stages"][-1]["accuracy"] for f, r in zip(final, results)
            )
        summary["variants"][name] = entry
    return summary


def paired_counts(ours: list[dict], theirs: list[dict]) -> dict:
    """Test problems (summed over seeds) right here and wrong there ('wins'), and the reverse ('losses')."""
    a = np.concatenate([np.asarray(o["correct"]) for o in ours])
    b = np.concatenate([np.asarray(t["correct"]) for t in theirs])
    return {"wins": int(np.sum((a == 1) & (b == 0))), "losses": int(np.sum((a == 0) & (b == 1))), "problems": len(a)}


def _pm(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown_table(summary: dict) -> str:
    """The main table (one row per model, M0 first) and accuracy by list length."""
    seeds = ", ".join(str(s) for s in summary["seeds"])
    m0 = summary["m0"]
    lines = [
        f"Seeds {seeds} (mean ± sample std over seeds); {_pm(summary['pairs'], 0)} training pairs, "
        f"{_pm(summary['eval_pairs'], 0)} held-out pairs per seed.",
        "",
        "| model | exact accuracy | gain vs M0 | wins/losses vs M0 | wins/losses vs dpo | held-out pref. acc. "
        "| accuracy per stage | gamma per stage | ARC-Easy | ARC change |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| M0 | {_pm(m0['accuracy'])} | | | | | | | {_pm(m0['arc_easy'])} | |",
    ]
    for name, v in summary["variants"].items():
        versus = f"{v['vs_dpo']['wins']}/{v['vs_dpo']['losses']}" if "vs_dpo" in v else ""
        lines.append(
            f"| {name} | {_pm(v['accuracy'])} | {_pm(v['gain'])} | {v['vs_m0']['wins']}/{v['vs_m0']['losses']} | "
            f"{versus} | {_pm(v['eval_accuracy'])} | "
            + " → ".join(f"{s['mean']:.3f}" for s in v["stage_accuracy"])
            + " | "
            + " → ".join(_pm(g, 2) for g in v["gamma"])
            + f" | {_pm(v['arc_easy'])} | {_pm(v['arc_easy_change'])} |"
        )
    lengths = list(m0["accuracy_by_length"])
    lines += [
        "",
        "Exact accuracy by list length (final models; mean ± std over seeds):",
        "",
        "| model | " + " | ".join(f"n={n}" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
        "| M0 | " + " | ".join(_pm(m0["accuracy_by_length"][n], 2) for n in lengths) + " |",
    ]
    for name, v in summary["variants"].items():
        lines.append(f"| {name} | " + " | ".join(_pm(v["accuracy_by_length"][n], 2) for n in lengths) + " |")
    return "\n".join(lines) + "\n"
