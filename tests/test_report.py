"""report.md and the PNG plots from synthetic run directories (no training, no model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from sdpo_jax.cli.report import main  # noqa: E402
from sdpo_jax.report import short_source, write_report  # noqa: E402

SOURCES = [
    "/data/samples/hh_rlhf/helpful-base-test.jsonl.gz",
    "sample:orca_dpo_pairs/validation-100.jsonl",
    "HuggingFaceH4/ultrafeedback_binarized@train_prefs",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _metrics(index: int, eval_set: bool) -> dict:
    """Held-out metrics of M_index: accuracy, margin up and loss down with the index."""
    if not eval_set:
        return {}
    return {
        "loss": 0.6931 - 0.05 * index,
        "rewards/chosen": 0.01 * index,
        "rewards/rejected": -0.02 * index,
        "rewards/accuracies": min(1.0, 0.5 + 0.2 * index),
        "rewards/margins": 0.03 * index,
        "logps/chosen": -100.0,
        "logps/rejected": -110.0,
        "num_pairs": 16,
    }


def _train_row(stage: int, step: int) -> dict:
    loss = 0.69 * math.exp(-0.01 * step) / stage
    return {
        "split": "train",
        "stage": stage,
        "step": step,
        "loss": loss,
        "rewards/chosen": 0.0,
        "rewards/rejected": 0.0,
        "rewards/accuracies": 0.5,
        "rewards/margins": 0.69 - loss,
        "logps/chosen": -50.0,
        "logps/rejected": -60.0,
        "num_pairs": 4.0,
        "grad_norm": 1.0,
    }


def _answers(model_index: int) -> list[dict]:
    return [
        {"prompt": "Capital of France?", "completion": f"answer {model_index}:\n Paris"},
        {"prompt": "Two study tips?", "completion": "" if model_index == 0 else "Sleep |and| breaks."},
    ]


def _choices(model_index: int) -> dict:
    return {"acc": 0.4 + 0.01 * model_index, "acc_norm": 0.3, "num_questions": 100}


def make_run(
    root: Path,
    num_stages: int,
    finished: int,
    steps: int,
    gammas: list[float],
    eval_set: bool = True,
    in_progress_steps: int = 0,
) -> Path:
    """A run directory as sdpo-train leaves it: `finished` stages done, the next one `in_progress_steps` in."""
    out = root / "run"
    out.mkdir()
    config = {
        "model": {"path": "tiny-llama"},
        "output_dir": str(out),
        "sdpo": {
            "num_stages": num_stages,
            "partition": "easy_to_hard",
            "difficulty": "source_accuracy",
            "stage_overrides": [],
        },
        "dpo": {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "rpo_alpha": 0.0, "reference_free": False},
        "train": {
            "batch_size": 4,
            "grad_accum": 1,
            "learning_rate": 5e-6,
            "lr_schedule": "linear",
            "warmup_ratio": 0.1,
            "steps_per_stage": steps,
        },
        "data": {"train": SOURCES[:num_stages], "eval": [], "eval_fraction": 0.1 if eval_set else 0.0},
    }
    stage_sources = [[SOURCES[t % len(SOURCES)]] for t in range(num_stages)]
    partition = {
        "partition": "easy_to_hard",
        "difficulty": "source_accuracy",
        "source_scores": {s[0]: 0.7 - 0.1 * t for t, s in enumerate(stage_sources)},
        "stages": [{"stage": t + 1, "num_pairs": 40 + t, "sources": s} for t, s in enumerate(stage_sources)],
    }
    rows, report = [], []
    for t in range(1, finished + 1):
        rows += (
            [{"split": "eval", "when": "before", "stage": t, "step": 0, **_metrics(t - 1, True)}] if eval_set else []
        )
        rows += [_train_row(t, s) for s in range(1, steps + 1)]
        rows += [{"split": "eval", "when": "after", "stage": t, "step": steps, **_metrics(t, True)}] if eval_set else []
        report.append(
            {
                "stage": t,
                "num_pairs": 40 + t - 1,
                "sources": stage_sources[t - 1],
                "steps": steps,
                "ref_logratio_mean": gammas[t - 1],
                "eval_before": _metrics(t - 1, eval_set),
                "eval_after": _metrics(t, eval_set),
                "dpo": config["dpo"],
                "learning_rate": 5e-6,
                "generations_before": _answers(t - 1) if t == 1 else [],
                "generations_after": _answers(t),
                "choices_before": _choices(t - 1) if t == 1 else {},
                "choices_after": _choices(t),
            }
        )
    rows += [_train_row(finished + 1, s) for s in range(1, in_progress_steps + 1)]
    (out / "config.json").write_text(json.dumps(config))
    (out / "partition.json").write_text(json.dumps(partition))
    (out / "stage_report.json").write_text(json.dumps({"stages": report}))
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def assert_png(path: Path, min_width: int = 500, min_height: int = 300) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = imread(path).shape[:2]
    assert width >= min_width and height >= min_height, (path, width, height)


def test_two_stages_with_eval(tmp_path):
    out = make_run(tmp_path, num_stages=2, finished=2, steps=60, gammas=[-14.5116, -0.0231])
    written = write_report(out)
    names = sorted(p.relative_to(out).as_posix() for p in written)
    assert names == ["plots/eval_accuracy.png", "plots/ref_logratio.png", "plots/train_curves.png", "report.md"]
    for path in written[:-1]:
        assert_png(path)
    text = (out / "report.md").read_text()
    for expected in (
        "-14.512",
        "-0.023",
        "γ rose from -14.512 (stage 1) to -0.023 (stage 2)",
        "from 0.500 (M0) to 0.900 (M2)",
        "0.6931 → 0.6431",
        "0.500 → 0.700",
        "![Training loss and reward margin](plots/train_curves.png)",
        "(plots/eval_accuracy.png)",
        "(plots/ref_logratio.png)",
        "hh_rlhf/helpful-base-test",
        "orca_dpo_pairs/validation-100",
        "| 1 | hh_rlhf/helpful-base-test | 40 | 0.700 | finished |",
        "2 (2 finished)",
        "on 16 pairs",
    ):
        assert expected in text, expected
    assert "/data/samples" not in text and "unfinished" not in text
    answers = text[text.index("## Answers to fixed prompts") : text.index("## Reading")]
    assert "**Capital of France?**\n\n- M0: answer 0: Paris\n- M1: answer 1: Paris\n- M2: answer 2: Paris" in answers
    assert "- M0: (empty)\n- M1: Sleep |and| breaks." in answers
    assert "| M0 | 0.400 | 0.300 |\n| M1 | 0.410 | 0.300 |\n| M2 | 0.420 | 0.300 |" in text and "100 questions" in text


def test_one_stage_without_eval(tmp_path):
    out = make_run(tmp_path, num_stages=1, finished=1, steps=8, gammas=[1.25], eval_set=False)
    written = write_report(out)
    assert not (out / "plots" / "eval_accuracy.png").exists()
    assert [p.name for p in written] == ["train_curves.png", "ref_logratio.png", "report.md"]
    text = (out / "report.md").read_text()
    assert "γ_1 = 1.250" in text
    assert "eval plot is skipped" in text and "skipped (no held-out data in this run)" in text
    assert "eval accuracy" not in text


def test_partial_run_notes_unfinished_stages(tmp_path):
    out = make_run(tmp_path, num_stages=4, finished=2, steps=30, gammas=[-3.0, -1.5], in_progress_steps=12)
    assert main([str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "2 of 4 stages finished; stage(s) 3, 4 unfinished" in text
    assert "Stage 3 is in progress: last logged step 12." in text
    assert "| 3 | ultrafeedback_binarized@train_prefs | 42 | 0.500 | unfinished |" in text
    assert "M3" not in text
    for name in ("train_curves.png", "eval_accuracy.png", "ref_logratio.png"):
        assert_png(out / "plots" / name)


def test_fresh_run_has_only_the_report(tmp_path):
    out = make_run(tmp_path, num_stages=2, finished=0, steps=10, gammas=[])
    assert [p.name for p in write_report(out)] == ["report.md"]
    text = (out / "report.md").read_text()
    assert "No stage has finished yet." in text and "skipped (no training steps logged yet)" in text


def test_missing_config_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("sdpo-report: error: ") and "no config.json" in err[0]


@pytest.mark.parametrize(
    "name, short",
    [
        ("/home/user/sdpo_jax/sdpo_jax/data/samples/hh_rlhf/helpful-base-test.jsonl.gz", "hh_rlhf/helpful-base-test"),
        ("sample:orca_dpo_pairs/validation-100.jsonl", "orca_dpo_pairs/validation-100"),
        ("Intel/orca_dpo_pairs", "orca_dpo_pairs"),
        ("pairs.parquet", "pairs"),
    ],
)
def test_short_source(name, short):
    assert short_source(name) == short
