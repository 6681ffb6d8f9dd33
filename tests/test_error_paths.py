"""How the commands end: a user's mistake (config, data file, checkpoint, command line, run folder) in one
line with exit status 2; a bug in sdpo_jax with its traceback, a line saying it is a bug, exit status 70.

The commands run in-process (their ``main``), so a bug can be planted with monkeypatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdpo_jax.cli import choices as choices_cli
from sdpo_jax.cli import eval as eval_cli
from sdpo_jax.cli import export as export_cli
from sdpo_jax.cli import report as report_cli
from sdpo_jax.cli import train as train_cli
from sdpo_jax.cli.errors import INTERNAL_ERROR_EXIT_CODE, USER_ERROR_EXIT_CODE
from sdpo_jax.models import ModelConfig

TINY = ModelConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
)


def _exit_and_stderr(capsys, main, argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, capsys.readouterr().err


def _model_folder(path: Path, **config_changes) -> Path:
    """A model folder with a config.json (of TINY, with ``config_changes``) and no weights."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**TINY.to_hf_dict(), **config_changes}))
    return path


def _run_folder(path: Path, config: dict, metrics: str = "") -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    if metrics:
        (path / "metrics.jsonl").write_text(metrics)
    return path


def _user_mistakes(tmp: Path) -> dict[str, tuple]:
    """Per family: (main, argv, the start of the one line after '<command>: error: ')."""
    bad_data = tmp / "questions.jsonl"
    bad_data.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": \n')
    no_weights = _model_folder(tmp / "no_weights")
    bad_config = _model_folder(tmp / "bad_config", rms_norm_eps="tiny")
    damaged = _run_folder(tmp / "damaged", {}, '{"split": "train", "stage": 1, "step": 1}\n{"split": "tr\n')
    foreign = _run_folder(tmp / "foreign", {"something": "else"})
    out = str(tmp / "out.json")
    return {
        "config field": (
            train_cli.main,
            ["sdpo-train", "--config.dpo.beta=-1", f"--config.output_dir={tmp / 'run'}"],
            "sdpo-train: error: dpo.beta must be positive, got -1.0",
        ),
        "config combination": (
            train_cli.main,
            [
                "sdpo-train",
                "--config.data.prefix_sharing=True",
                "--config.model.attention=splash",
                f"--config.output_dir={tmp / 'run'}",
            ],
            "sdpo-train: error: data.prefix_sharing: a packed pair needs a dense attention mask",
        ),
        "data file": (
            choices_cli.main,
            ["--model", "unused", "--data", str(bad_data), "--out", out],
            f"sdpo-choices: error: data error: {bad_data} line 2: invalid JSON (Expecting value",
        ),
        "checkpoint weights": (
            eval_cli.main,
            ["--policy", str(no_weights), "--reference", str(no_weights), "--data", "x", "--out", out],
            f"sdpo-eval: error: {no_weights}: neither model.safetensors nor model.safetensors.index.json",
        ),
        "checkpoint config": (
            eval_cli.main,
            ["--policy", str(bad_config), "--reference", str(bad_config), "--data", "x", "--out", out],
            f"sdpo-eval: error: {bad_config / 'config.json'}: field 'rms_norm_eps' must be float, got 'tiny'",
        ),
        "command-line option": (
            eval_cli.main,
            ["--policy", str(tmp), "--reference", str(tmp), "--data", "x", "--batch-size", "0", "--out", out],
            "sdpo-eval: error: --batch-size must be positive, got 0",
        ),
        "run folder file": (
            report_cli.main,
            [str(damaged)],
            f"sdpo-report: error: {damaged / 'metrics.jsonl'}: line 2, column 11: not valid JSON",
        ),
        "run folder config": (
            export_cli.main,
            ["--run", str(foreign), "--out", str(tmp / "hf")],
            f"sdpo-export: error: {foreign / 'config.json'}: has no model.path",
        ),
    }


@pytest.mark.parametrize(
    "family",
    [
        "config field",
        "config combination",
        "data file",
        "checkpoint weights",
        "checkpoint config",
        "command-line option",
        "run folder file",
        "run folder config",
    ],
)
def test_a_user_mistake_is_one_line_and_exit_status_2(tmp_path, capsys, family):
    main, argv, start = _user_mistakes(tmp_path)[family]
    code, err = _exit_and_stderr(capsys, main, argv)
    assert code == USER_ERROR_EXIT_CODE and err.count("\n") == 1 and err.startswith(start), err[-3000:]


def test_a_bug_keeps_its_traceback_and_is_named_a_bug(tmp_path, capsys, monkeypatch):
    """A ValueError of our own code is no longer taken for the user's mistake."""

    def broken(run, plots):
        raise ValueError("an impossible state\nwith a second line")

    monkeypatch.setattr("sdpo_jax.report.render_markdown", broken)
    code, err = _exit_and_stderr(capsys, report_cli.main, [str(_run_folder(tmp_path / "run", {}))])
    lines = err.strip().splitlines()
    assert code == INTERNAL_ERROR_EXIT_CODE and lines[0] == "Traceback (most recent call last):", err
    assert "in broken" in err and "ValueError: an impossible state" in lines
    assert lines[-1] == (
        "sdpo-report: internal error: this is a bug in sdpo_jax, please report it with the traceback "
        "above (ValueError: an impossible state)"
    )


def test_a_bug_deep_in_a_command_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    def broken(folder, *args, **kwargs):
        raise KeyError("weight_map")

    monkeypatch.setattr("sdpo_jax.checkpoint.hf_import.load_hf_checkpoint", broken)
    folder = _model_folder(tmp_path / "model")
    code, err = _exit_and_stderr(
        capsys,
        eval_cli.main,
        ["--policy", str(folder), "--reference", str(folder), "--data", "x", "--out", str(tmp_path / "out.json")],
    )
    assert code == INTERNAL_ERROR_EXIT_CODE and "Traceback (most recent call last):" in err and "in run" in err
    assert err.splitlines()[-1].endswith("(KeyError: 'weight_map')")
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(vocab_size="32"), "field 'vocab_size' must be a positive integer, got '32'"),
        (dict(num_key_value_heads=0), "field 'num_key_value_heads' must be a positive integer, got 0"),
        (
            dict(rope_parameters={"rope_type": "default", "rope_theta": [1]}),
            "field 'rope_theta' must be float, got [1]",
        ),
        (dict(max_position_embeddings="long"), "field 'max_position_embeddings' must be int, got 'long'"),
    ],
)
def test_a_config_json_value_of_the_wrong_kind_names_the_field(changes, message):
    from sdpo_jax.models import UnsupportedModelError

    with pytest.raises(UnsupportedModelError) as raised:
        ModelConfig.from_hf_dict({**TINY.to_hf_dict(), **changes}, source="m/config.json")
    assert str(raised.value) == f"m/config.json: {message}"
    assert ModelConfig.from_hf_dict({**TINY.to_hf_dict(), "head_dim": None}, source="m/config.json").head_dim == 8


def test_a_metrics_row_cut_short_by_a_kill_is_left_out(tmp_path):
    """The row being appended when the run was killed (no newline yet) is not an error; the rows before it stay."""
    from sdpo_jax.errors import SdpoError
    from sdpo_jax.run_log import read_json_lines

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": 1, "step": 1}\n{"stage": 1, "step": 2}\n{"stage": 1, "st')
    assert read_json_lines(path) == [{"stage": 1, "step": 1}, {"stage": 1, "step": 2}]
    path.write_text('{"stage": 1, "step": 1}\n{"stage": 1, "st\n{"stage": 1, "step": 3}\n')
    with pytest.raises(SdpoError, match="metrics.jsonl: line 2, column"):
        read_json_lines(path)
