"""A human-readable summary of a (finished or partial) sDPO run directory: report.md and PNG plots.

    sdpo-report OUTPUT_DIR     (sdpo_jax.cli.report; sdpo-train writes the report at the end of a run)

reads what ``sdpo-train`` wrote into OUTPUT_DIR (config.json, metrics.jsonl, stage_report.json,
partition.json; only config.json is required) and writes

    plots/train_curves.png   training loss and reward margin per logged step, stages side by side
    plots/eval_accuracy.png  held-out reward accuracy, margin and loss of M_0 (SFT), M_1, ..., M_T
    plots/ref_logratio.png   gamma_t, the mean reference log-ratio log pi_ref(y_w|x) - log pi_ref(y_l|x)
                             of each stage's chunk under its reference M_{t-1}
    report.md                configuration, partition, per-stage table, the plots and a plain reading

A plot without data (no logged steps, no held-out set, no finished stage) is skipped and the
report says so. Plots are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend).
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sdpo_jax.errors import ConfigError
from sdpo_jax.run_log import read_json, read_json_lines

DPI = 120
PLOT_NAMES = {
    "train": "train_curves.png",
    "eval": "eval_accuracy.png",
    "gamma": "ref_logratio.png",
    "reward": "reward.png",
}
_EXTENSIONS = (".gz", ".jsonl", ".json", ".parquet")


@dataclasses.dataclass
class RunData:
    """Everything read from a run directory; missing files read as empty."""

    output_dir: Path
    config: dict
    stages: list[dict]  # stage_report.json entries of finished stages
    partition: dict  # partition.json
    train_rows: dict[int, list[dict]]  # stage -> train rows sorted by step
    evals: dict[int, dict]  # t -> held-out metrics of M_t (M_0 = SFT)

    @property
    def num_stages(self) -> int:
        return int(self.config.get("sdpo", {}).get("num_stages", len(self.stages)))

    @property
    def unfinished(self) -> list[int]:
        finished = {entry["stage"] for entry in self.stages}
        return [t for t in range(1, self.num_stages + 1) if t not in finished]


def read_metrics(path: Path) -> list[dict]:
    """Rows of metrics.jsonl; a later row for the same (split, when, stage, step) replaces an earlier one."""
    rows = {}
    for row in read_json_lines(path):
        rows[(row["split"], row.get("when"), row["stage"], row["step"])] = row
    return list(rows.values())


def train_rows_by_stage(rows: list[dict]) -> dict[int, list[dict]]:
    """Train rows grouped by stage, each group sorted by step."""
    grouped: dict[int, list[dict]] = {}
    for row in sorted((r for r in rows if r["split"] == "train"), key=lambda r: (r["stage"], r["step"])):
        grouped.setdefault(row["stage"], []).append(row)
    return grouped


def model_evals(stages: list[dict], rows: list[dict]) -> dict[int, dict]:
    """Held-out metrics per model index: eval_before of stage t is M_{t-1}, eval_after is M_t.

    The stage report wins; eval rows in metrics.jsonl fill in models it lacks (an unfinished
    stage's 'before' evaluation).
    """
    evals: dict[int, dict] = {}
    for entry in stages:
        if entry.get("eval_before"):
            evals[entry["stage"] - 1] = entry["eval_before"]
        if entry.get("eval_after"):
            evals[entry["stage"]] = entry["eval_after"]
    for row in rows:
        if row["split"] == "eval":
            metrics = {k: v for k, v in row.items() if k not in ("split", "when", "stage", "step")}
            evals.setdefault(row["stage"] - (row["when"] == "before"), metrics)
    return dict(sorted(evals.items()))


def load_run(output_dir: str | Path) -> RunData:
    """Reads a run directory; it must at least hold config.json."""
    out = Path(output_dir)
    if not (out / "config.json").exists():
        raise FileNotFoundError(f"{out}: no config.json; is this an sdpo-train output_dir?")
    stages = sorted(read_json(out / "stage_report.json", {"stages": []})["stages"], key=lambda e: e["stage"])
    rows = read_metrics(out / "metrics.jsonl")
    return RunData(
        out,
        read_json(out / "config.json", {}),
        stages,
        read_json(out / "partition.json", {}),
        train_rows_by_stage(rows),
        model_evals(stages, rows),
    )


def short_source(name: str) -> str:
    """A source as a short label: 'dir/stem' for files ('.../hh_rlhf/x.jsonl.gz' -> 'hh_rlhf/x'), else the last name."""
    parts = name.split(":", 1)[-1].rstrip("/").split("/")
    stem = parts[-1]
    while stem.endswith(_EXTENSIONS):
        stem = stem[: stem.rfind(".")]
    return f"{parts[-2]}/{stem}" if stem != parts[-1] and len(parts) > 1 else stem


def stage_sources(run: RunData) -> dict[int, list[str]]:
    """Short source names of every planned stage (partition.json, then the stage report)."""
    sources = {s["stage"]: s["sources"] for s in run.partition.get("stages", [])}
    sources.update({e["stage"]: e["sources"] for e in run.stages})
    return {t: [short_source(s) for s in names] for t, names in sources.items()}


def source_label(names: list[str], limit: int = 2) -> str:
    """At most ``limit`` names, then '+N more'."""
    shown = ", ".join(names[:limit])
    return shown + (f" +{len(names) - limit}\u00a0more" if len(names) > limit else "")


def stage_lengths(run: RunData) -> dict[int, int]:
    """Steps of every stage with logged steps: the report's count, else the configured or last logged step."""
    configured = int(run.config.get("train", {}).get("steps_per_stage", 0) or 0)
    reported = {e["stage"]: e["steps"] for e in run.stages}
    return {t: reported.get(t) or max(configured, rows[-1]["step"]) for t, rows in sorted(run.train_rows.items())}


def _save(fig: Figure, path: Path) -> Path:
    """Renders ``fig`` on an Agg canvas into the PNG ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def _smoothing_window(num_points: int) -> int:
    """Points per running mean: ~1/15 of the curve; 0 (no smoothing) for curves of under 30 points."""
    window = num_points // 15
    return window if window >= 2 else 0


def _smoothed(values: np.ndarray) -> np.ndarray | None:
    """Trailing running mean of ``values``, or None when the curve is too short to need one."""
    window = _smoothing_window(len(values))
    if not window:
        return None
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def plot_train_curves(run: RunData, path: Path) -> Path:
    """Loss and reward margin vs a global step (stage t offset by the steps of stages < t), stages marked."""
    lengths, sources, unfinished = stage_lengths(run), stage_sources(run), set(run.unfinished)
    fig = Figure(figsize=(10, 6.2), layout="constrained")
    loss_ax, margin_ax = fig.subplots(2, 1, sharex=True)
    offset, total = 0, sum(lengths.values())
    for stage, length in lengths.items():
        rows = run.train_rows[stage]
        x = offset + np.array([r["step"] for r in rows])
        color = f"C{(stage - 1) % 10}"
        for ax, key in ((loss_ax, "loss"), (margin_ax, "rewards/margins")):
            y = np.array([r[key] for r in rows])
            smooth = _smoothed(y)
            ax.plot(
                x,
                y,
                color=color,
                lw=1,
                alpha=0.45 if smooth is not None else 1,
                marker="o" if len(x) <= 40 else None,
                ms=3,
            )
            if smooth is not None:
                ax.plot(x, smooth, color=color, lw=2)
            if stage in unfinished:
                ax.axvspan(offset, offset + length, color="0.92", zorder=0)
            if offset:
                ax.axvline(offset + 0.5, color="0.4", ls="--", lw=1)
        label = f"stage {stage}" + (" (in progress)" if stage in unfinished else "")
        width = max(12, int(110 * length / max(total, 1)))
        text = "\n".join(
            textwrap.wrap(
                f"{label}: {source_label(sources.get(stage, []))}",
                width,
                break_long_words=False,
                break_on_hyphens=False,
            )[:3]
        )
        loss_ax.text(
            offset + length / 2,
            1.02,
            text,
            transform=loss_ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color=color,
        )
        offset += length
    loss_ax.set_ylabel("DPO loss (batch)")
    margin_ax.set_ylabel("reward margin (batch)")
    margin_ax.set_xlabel("global step (stages back to back)")
    margin_ax.axhline(0, color="0.6", lw=0.8)
    for ax in (loss_ax, margin_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, max(total, 1) + 0.5)
    smoothed = any(_smoothing_window(len(rows)) for rows in run.train_rows.values())
    fig.suptitle("Training loss and reward margin per logged step" + (" (thick: running mean)" if smoothed else ""))
    return _save(fig, path)


def _annotate(ax, x, values, fmt: str) -> None:
    """Each value printed next to its point: above it, or below it when negative."""
    for xi, v in zip(x, values):
        ax.annotate(
            format(v, fmt),
            (xi, v),
            textcoords="offset points",
            xytext=(0, -6 if v < 0 else 6),
            ha="center",
            va="top" if v < 0 else "bottom",
            fontsize=8,
        )


def plot_eval(run: RunData, path: Path) -> Path:
    """Held-out reward accuracy, margin and loss of M_0 (SFT), M_1, ..., each against the SFT reference."""
    models = list(run.evals)
    x = np.arange(len(models))
    labels = [f"M{t}" + ("\n(SFT)" if t == 0 else "") for t in models]
    fig = Figure(figsize=(11, 3.9), layout="constrained")
    panels = (
        ("rewards/accuracies", "reward accuracy", ".2f"),
        ("rewards/margins", "reward margin", ".3f"),
        ("loss", "DPO loss", ".3f"),
    )
    for ax, (key, name, fmt) in zip(fig.subplots(1, 3), panels):
        values = [run.evals[t].get(key, np.nan) for t in models]
        ax.plot(x, values, marker="o", color="C0")
        _annotate(ax, x, values, fmt)
        ax.set_xticks(x, labels)
        ax.set_xlabel("model after stage t")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.2)
        if key == "rewards/accuracies":
            ax.set_ylim(-0.05, 1.12)
    num_pairs = next(iter(run.evals.values())).get("num_pairs")
    fig.suptitle(f"Held-out metrics{f' on {num_pairs:g} pairs' if num_pairs else ''}, reference = SFT model (M0)")
    return _save(fig, path)


def plot_ref_logratio(run: RunData, path: Path) -> Path:
    """gamma_t per finished stage: bars labelled with the stage's sources."""
    sources = stage_sources(run)
    stages = [e["stage"] for e in run.stages]
    gammas = [e["ref_logratio_mean"] for e in run.stages]
    fig = Figure(figsize=(max(6.5, 1.8 * len(stages) + 2.5), 4.6), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(stages))
    ax.bar(x, gammas, color=[f"C{(t - 1) % 10}" for t in stages], width=0.6)
    _annotate(ax, x, gammas, ".3f")
    ax.axhline(0, color="0.3", lw=0.8)
    low, high = min(0.0, *gammas), max(0.0, *gammas)
    pad = 0.15 * (high - low) or 1.0
    ax.set_ylim(low - pad, high + pad)
    wrap = dict(width=28, break_long_words=False, break_on_hyphens=False)
    references = {e["stage"]: e.get("reference", {}).get("model", f"M{e['stage'] - 1}") for e in run.stages}
    ax.set_xticks(
        x,
        [
            f"stage {t} (ref {references[t]})\n"
            + "\n".join(textwrap.wrap(source_label(sources.get(t, [])), **wrap)[:3])
            for t in stages
        ],
        fontsize=8,
    )
    ax.set_ylabel(r"$\gamma_t$ = mean log $\pi_{ref}(y_w|x)$ - log $\pi_{ref}(y_l|x)$")
    ax.set_title("Reference log-ratio per stage\n(stage t's chunk under its reference $M_{t-1}$)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_reward(run: RunData, path: Path) -> Path:
    """Mean scorer reward of the greedy answers to the held-out reward prompts, per model M_0..M_T."""
    rewards = per_model(run.stages, "reward")
    models = list(rewards)
    x = np.arange(len(models))
    values = [rewards[t]["mean"] for t in models]
    fig = Figure(figsize=(max(5.5, 1.3 * len(models) + 2.5), 3.9), layout="constrained")
    ax = fig.subplots()
    ax.plot(x, values, marker="o", color="C2")
    _annotate(ax, x, values, ".3f")
    ax.set_xticks(x, [f"M{t}" + ("\n(SFT)" if t == 0 else "") for t in models])
    ax.set_xlabel("model after stage t")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.2)
    scorer = run.config.get("generate", {}).get("scorer", "?")
    ax.set_title(f"Reward of greedy answers to {rewards[models[0]]['num_prompts']} held-out prompts ({scorer})")
    return _save(fig, path)


def stage_data_lines(run: RunData) -> list[str]:
    """Where each stage's pairs and reference came from: offline chunk or M(t-1)'s scored samples; M(t-1) or M0,
    frozen or moving (TR-DPO)."""
    rows = []
    for e in run.stages:
        ref = e.get("reference") or {}
        reference = ref.get("model", f"M{e['stage'] - 1}") + (
            f", moving (every {ref['sync_steps']} steps, alpha {ref['mixup_alpha']:g})"
            if ref.get("moved")
            else ", frozen"
        )
        g = e.get("generated")
        data = (
            (
                f"M{e['stage'] - 1}'s samples: {g['pairs']} pairs from {g['prompts']} prompts x "
                f"{g['samples_per_prompt']} "
                f"({g['prompts_without_pair']} without a pair), mean best {g['mean_best_score']:.3f} / worst "
                f"{g['mean_worst_score']:.3f} by {g['scorer']} (chosen = {g['chosen']})"
            )
            if g
            else "offline chunk"
        )
        rows.append([str(e["stage"]), data, reference])
    return _table(["stage", "pairs", "reference"], rows) if rows else ["No stage has finished yet."]


def reward_lines(run: RunData) -> list[str]:
    """Mean reward of every model on the held-out reward prompts (``eval.reward_prompts``)."""
    rewards = per_model(run.stages, "reward")
    if not rewards:
        return ["No held-out reward prompts in this run (eval.reward_prompts is empty)."]
    return _table(
        ["model", "mean reward", "prompts"],
        [[f"M{t}", f"{v['mean']:.4f}", str(v["num_prompts"])] for t, v in rewards.items()],
    )


def _num(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _change(before: dict, after: dict, key: str, spec: str) -> str:
    return f"{_num(before.get(key), spec)} → {_num(after.get(key), spec)}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]


def _loss_description(dpo: dict) -> str:
    """'sigmoid, beta 0.1' plus every loss setting that differs from its default, compared as the trainer
    reads them (sdpo_jax.losses.DPOSettings: a comma list and a tuple are the same loss)."""
    from sdpo_jax.losses import DPOSettings

    try:
        settings, defaults = DPOSettings(**dpo), DPOSettings()
    except (TypeError, ConfigError):  # a config of another version: shown as written
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in dpo.items())
    text = f"{'+'.join(settings.loss_type)}, beta {settings.beta:g}"
    for field in dataclasses.fields(DPOSettings):
        value = getattr(settings, field.name)
        if field.name in ("loss_type", "beta") or value == getattr(defaults, field.name):
            continue
        if field.name == "loss_weights" and value == (1.0,) * len(settings.loss_type):
            continue
        text += f", {field.name.replace('_', ' ')}" + ("" if value is True else f" {value}")
    return text


def config_lines(run: RunData) -> list[str]:
    """The key settings as a two-column table."""
    c = run.config
    sdpo, dpo, train, data = (c.get(k, {}) for k in ("sdpo", "dpo", "train", "data"))
    partition = sdpo.get("partition", "?")
    difficulty = run.partition.get("difficulty") or (sdpo.get("difficulty") if partition == "easy_to_hard" else None)
    loss = _loss_description(dpo)
    batch = f"{train.get('batch_size', '?')}" + (
        f" × {train['grad_accum']} accumulation" if train.get("grad_accum", 1) > 1 else ""
    )
    steps = train.get("steps_per_stage") or "one epoch of the stage's chunk"
    ran = ", ".join(str(e["steps"]) for e in run.stages)
    held_out = ", ".join(short_source(s) for s in data.get("eval", [])) or (
        f"{data['eval_fraction']:g} of the training pairs" if data.get("eval_fraction") else "none"
    )
    rows = [
        ["model", f"`{c.get('model', {}).get('path', '?')}`"],
        ["stages (T)", f"{run.num_stages} ({len(run.stages)} finished)"],
        ["partition", partition + (f" (difficulty: {difficulty})" if difficulty else "")],
        ["DPO loss", loss],
        [
            "learning rate",
            f"{train.get('learning_rate', '?')} ({train.get('lr_schedule', '?')} schedule, "
            f"warmup ratio {train.get('warmup_ratio', '?')})",
        ],
        ["batch size (pairs)", batch],
        ["steps per stage", f"{steps}" + (f" (ran: {ran})" if ran else "")],
        ["training data", ", ".join(short_source(s) for s in data.get("train", []))],
        ["held-out data", held_out],
    ]
    if sdpo.get("stage_overrides"):
        rows.append(["stage overrides", ", ".join(f"`{o}`" for o in sdpo["stage_overrides"])])
    return _table(["setting", "value"], rows)


def partition_lines(run: RunData) -> list[str]:
    """Stage, sources, pairs and (when scored) each source's SFT preference accuracy."""
    planned = {s["stage"]: s for s in run.partition.get("stages", [])}
    planned.update({e["stage"]: e for e in run.stages if e["stage"] not in planned})
    scores = run.partition.get("source_scores") or {}
    unfinished = set(run.unfinished)
    rows = []
    for t, plan in sorted(planned.items()):
        replayed = f" + {plan['replayed']} replayed" if plan.get("replayed") else ""
        row = [str(t), ", ".join(short_source(s) for s in plan["sources"]), f"{plan['num_pairs']}{replayed}"]
        if scores:
            row.append(", ".join(_num(scores.get(s), ".3f") for s in plan["sources"]))
        rows.append(row + ["unfinished" if t in unfinished else "finished"])
    header = ["stage", "sources", "pairs"] + (["SFT preference accuracy"] if scores else []) + ["status"]
    return _table(header, rows)


def stage_lines(run: RunData) -> list[str]:
    """Per finished stage: steps, gamma and held-out loss / accuracy / margin before -> after."""
    with_eval = bool(run.evals)
    header = ["stage", "steps", "learning rate", "beta", "γ (ref log-ratio)"]
    if with_eval:
        header += ["eval loss", "eval accuracy", "eval margin"]
    rows = []
    for e in run.stages:
        row = [
            str(e["stage"]),
            str(e["steps"]),
            f"{e.get('learning_rate', '–')}",
            f"{e.get('dpo', {}).get('beta', '–')}",
            f"{e['ref_logratio_mean']:.3f}",
        ]
        if with_eval:
            before, after = e.get("eval_before") or {}, e.get("eval_after") or {}
            row += [
                _change(before, after, "loss", ".4f"),
                _change(before, after, "rewards/accuracies", ".3f"),
                _change(before, after, "rewards/margins", ".4f"),
            ]
        rows.append(row)
    return _table(header, rows)


def per_model(stages: list[dict], key: str) -> dict[int, object]:
    """{t: value} for M_0..M_T from the stages' ``{key}_before`` (stage 1: M_0) and ``{key}_after`` (M_t)."""
    values: dict[int, object] = {}
    for entry in stages:
        if entry.get(f"{key}_before") and entry["stage"] - 1 not in values:
            values[entry["stage"] - 1] = entry[f"{key}_before"]
        if entry.get(f"{key}_after"):
            values[entry["stage"]] = entry[f"{key}_after"]
    return dict(sorted(values.items()))


def choice_lines(run: RunData) -> list[str]:
    """Log-likelihood accuracy of every model on the multiple-choice set (``eval.choices``)."""
    scores = per_model(run.stages, "choices")
    if not scores:
        return ["No multiple-choice set in this run (eval.choices is empty)."]
    source = short_source(run.config.get("eval", {}).get("choices", "?"))
    first = next(iter(scores.values()))
    lines = [
        f"`{source}`, {first['num_questions']} questions, scored as lm-evaluation-harness does (sum of the answer's "
        "log-probs; acc_norm divides by the choice's length in characters).",
        "",
    ]
    return lines + _table(
        ["model", "acc", "acc_norm"], [[f"M{t}", f"{v['acc']:.3f}", f"{v['acc_norm']:.3f}"] for t, v in scores.items()]
    )


def generation_lines(run: RunData) -> list[str]:
    """Each fixed prompt with the answer of every model, M_0 first, quoted as written."""
    answers = per_model(run.stages, "generations")
    if not answers:
        return ["No fixed prompts in this run (eval.prompts is empty)."]
    settings = run.config.get("eval", {})
    decoding = "greedy" if not settings.get("temperature") else f"sampled at temperature {settings['temperature']}"
    lines = [f"{decoding.capitalize()} answers, at most {settings.get('max_new_tokens', '?')} new tokens.", ""]
    prompts = [g["prompt"] for g in next(iter(answers.values()))]
    for i, prompt in enumerate(prompts):
        lines += [f"**{prompt}**", ""]
        for t, generated in answers.items():
            text = " ".join(generated[i]["completion"].split()) if i < len(generated) else "–"
            lines.append(f"- M{t}: {text or '(empty)'}")
        lines.append("")
    return lines


def _direction(first: float, last: float) -> str:
    return "rose" if last > first else "fell" if last < first else "stayed"


def _trend(values: list[float]) -> str:
    """How a series of three or more values moved between its ends ('' for two)."""
    if len(values) < 3:
        return ""
    steps = np.diff(values)
    if np.all(steps > 0):
        return " (up at every stage)"
    if np.all(steps < 0):
        return " (down at every stage)"
    return " (not monotonic: " + " → ".join(f"{v:.3f}" for v in values) + ")"


def reading_lines(run: RunData) -> list[str]:
    """Plain statements computed from the numbers; nothing that the numbers do not show."""
    lines = []
    if run.unfinished:
        lines.append(
            f"The run is partial: {len(run.stages)} of {run.num_stages} stages finished; stage(s) "
            f"{', '.join(map(str, run.unfinished))} unfinished."
        )
        for t in run.unfinished:
            if t in run.train_rows:
                lines.append(f"Stage {t} is in progress: last logged step {run.train_rows[t][-1]['step']}.")
    if run.evals:
        first, last = min(run.evals), max(run.evals)
        a, b = run.evals[first], run.evals[last]
        pairs = f" on {a['num_pairs']:g} pairs" if a.get("num_pairs") else ""
        lines.append(
            f"Held-out reward accuracy went from {a['rewards/accuracies']:.3f} (M{first}) to "
            f"{b['rewards/accuracies']:.3f} (M{last}); the reward margin "
            f"{_direction(a['rewards/margins'], b['rewards/margins'])} "
            f"from {a['rewards/margins']:.4f} to {b['rewards/margins']:.4f} and the DPO loss "
            f"{_direction(a['loss'], b['loss'])} from {a['loss']:.4f} to {b['loss']:.4f}"
            f"{pairs}, always against the SFT model."
        )
        if first == 0 and a["rewards/margins"] == 0 and a["rewards/accuracies"] == 0:
            lines.append(
                "M0 is scored against itself: every reward is 0, and accuracy counts ties as misses, "
                "so its accuracy of 0 is by construction, not a measurement."
            )
    else:
        lines.append(
            "No held-out data in this run (no eval sources and eval_fraction 0), so there are no eval "
            "numbers and the eval plot is skipped."
        )
    gammas = [e["ref_logratio_mean"] for e in run.stages]
    if len(gammas) >= 2:
        lines.append(
            f"γ {_direction(gammas[0], gammas[-1])} from {gammas[0]:.3f} (stage 1) to {gammas[-1]:.3f} "
            f"(stage {run.stages[-1]['stage']}){_trend(gammas)}. Each γ_t is measured on stage t's own chunk "
            "under M_(t-1), so it moves with both the reference model and the data."
        )
    elif gammas:
        lines.append(f"γ_1 = {gammas[0]:.3f}: the SFT model's mean log-ratio on the first chunk.")
    for t, rows in sorted(run.train_rows.items()):
        k = max(1, len(rows) // 4)
        start, end = (np.mean([r["loss"] for r in part]) for part in (rows[:k], rows[-k:]))
        lines.append(f"Stage {t} training loss (mean of the first / last {k} logged step(s)): {start:.4f} → {end:.4f}.")
    return ["- " + line for line in lines]


def render_markdown(run: RunData, plots: dict[str, Path | None]) -> str:
    """report.md: title, configuration, partition, stages, plots (or why skipped) and the reading."""
    skipped = {
        "train": "no training steps logged yet",
        "eval": "no held-out data in this run",
        "gamma": "no finished stage yet",
        "reward": "no held-out reward prompts in this run",
    }
    titles = {
        "train": "Training loss and reward margin",
        "eval": "Held-out accuracy, margin and loss per model",
        "gamma": "Reference log-ratio γ per stage",
        "reward": "Reward of greedy answers per model",
    }
    lines = [
        f"# sDPO run report: {run.output_dir.name}",
        "",
        f"Run directory `{run.output_dir}`, model `{run.config.get('model', {}).get('path', '?')}`. "
        "Held-out metrics use the SFT model as reference in every stage, so M0, M1, ... are comparable; "
        "γ_t is the mean of log π_ref(y_w|x) − log π_ref(y_l|x) over stage t's pairs under its reference as the "
        "stage starts (M_(t-1) unless the run says otherwise below).",
        "",
        "## Configuration",
        "",
        *config_lines(run),
        "",
        "## Partition",
        "",
        *partition_lines(run),
        "",
        "## Stages",
        "",
    ]
    lines += stage_lines(run) if run.stages else ["No stage has finished yet."]
    lines += ["", "## Stage data and reference", "", *stage_data_lines(run)]
    lines += ["", "## Plots", ""]
    for key, path in plots.items():
        lines.append(
            f"![{titles[key]}]({path.relative_to(run.output_dir).as_posix()})"
            if path
            else f"*{titles[key]}: skipped ({skipped[key]}).*"
        )
        lines.append("")
    lines += ["## Multiple-choice check", "", *choice_lines(run), ""]
    lines += ["## Reward on held-out prompts", "", *reward_lines(run), ""]
    lines += ["## Answers to fixed prompts", "", *generation_lines(run)]
    lines += ["## Reading", "", *reading_lines(run), ""]
    return "\n".join(lines)


def write_report(output_dir: str | Path) -> list[Path]:
    """Writes the plots that have data and report.md into ``output_dir``; returns the written paths."""
    run = load_run(output_dir)
    plot_dir = run.output_dir / "plots"
    plots = {
        "train": plot_train_curves(run, plot_dir / PLOT_NAMES["train"]) if run.train_rows else None,
        "eval": plot_eval(run, plot_dir / PLOT_NAMES["eval"]) if run.evals else None,
        "gamma": plot_ref_logratio(run, plot_dir / PLOT_NAMES["gamma"]) if run.stages else None,
        "reward": plot_reward(run, plot_dir / PLOT_NAMES["reward"]) if per_model(run.stages, "reward") else None,
    }
    report = run.output_dir / "report.md"
    report.write_text(render_markdown(run, plots), encoding="utf-8")
    return [p for p in plots.values() if p] + [report]
