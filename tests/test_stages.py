"""The sDPO stage driver end to end: report, stage chaining, export, and exact resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import torch

from batch_fixtures import write_token_pairs
from configs.default import get_config
from hf_fixtures import load_torch_model, make_hf_checkpoint
from run_fixtures import stage_params
from sdpo_jax.checkpoint.hf_import import load_hf_checkpoint
from sdpo_jax.cli.export import export
from sdpo_jax.cli.export import main as export_main
from sdpo_jax.stages import train

pytestmark = [pytest.mark.slow]

CONTRACT_METRICS = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    model = make_hf_checkpoint("llama2", root / "model", seed=0)
    rng = np.random.default_rng(0)
    sources = [write_token_pairs(root / f"{name}.jsonl", count, rng) for name, count in (("easy", 14), ("hard", 18))]
    overrides = {
        "model.path": str(model),
        "data.train": tuple(sources),
        "data.limit": 0,
        "data.max_length": 64,
        "data.max_prompt_length": 32,
        "data.length_buckets": (64,),
        "data.eval_fraction": 0.125,
        "data.cache_dir": str(root / "data_cache"),
        "sdpo.partition": "datasets",
        "train.batch_size": 2,
        "train.learning_rate": 1e-3,
        "checkpoint.every_steps": 2,
        "eval.prompts": (),
        "eval.choices": "",
        "log.progress": "never",
    }
    return root, model, overrides


def _config(overrides: dict, output_dir: Path | str) -> ml_collections.ConfigDict:
    config = get_config()
    for key, value in {**overrides, "output_dir": str(output_dir)}.items():
        section, name = key.split(".") if "." in key else (None, key)
        (config[section] if section else config)[name] = value
    return config


def _flags(overrides: dict, output_dir: Path) -> list[str]:
    return [
        f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
        for k, v in {**overrides, "output_dir": output_dir}.items()
    ]


def _train_rows(output_dir: Path) -> list[dict]:
    return [
        row
        for row in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
        if row["split"] == "train"
    ]


@pytest.fixture(scope="module")
def baseline(setup):
    root, _, overrides = setup
    report = train(_config(overrides, root / "baseline"))
    return root / "baseline", report


def _torch_logps(model, pairs_rows):
    chosen, rejected = [], []
    for row in pairs_rows:
        for completion, out in ((row["chosen_ids"], chosen), (row["rejected_ids"], rejected)):
            ids = torch.tensor([row["prompt_ids"] + completion])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            targets = ids[0, 1:]
            out.append(logp[torch.arange(len(targets)), targets][len(row["prompt_ids"]) - 1 :].sum().item())
    return np.array(chosen), np.array(rejected)


def _tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} read from the TFRecord event files (length, crc, Event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    for path in folder.glob("events.out.tfevents.*"):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            length = int.from_bytes(data[offset : offset + 8], "little")
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_two_stage_run_writes_the_contract_files(baseline):
    output_dir, report = baseline
    assert [s["stage"] for s in report] == [1, 2]
    assert json.loads((output_dir / "stage_report.json").read_text())["stages"] == report
    for entry in report:
        assert CONTRACT_METRICS <= set(entry["eval_before"]) and CONTRACT_METRICS <= set(entry["eval_after"])
        assert entry["num_pairs"] > 0 and len(entry["sources"]) == 1
    assert report[0]["sources"][0].endswith("easy.jsonl") and report[1]["sources"][0].endswith("hard.jsonl")
    # eval_before of stage 2 is M_1 against the SFT model: exactly stage 1's eval_after.
    assert report[1]["eval_before"] == report[0]["eval_after"]
    rows = _train_rows(output_dir)
    assert {r["stage"] for r in rows} == {1, 2} and all({"loss", "stage", "step"} <= set(r) for r in rows)
    assert json.loads((output_dir / "config.json").read_text())["sdpo"]["num_stages"] == 2
    assert (output_dir / "report.md").is_file()
    assert {p.name for p in (output_dir / "plots").iterdir()} == {
        "train_curves.png",
        "eval_accuracy.png",
        "ref_logratio.png",
    }
    # TensorBoard mirrors metrics.jsonl at run-wide steps: stage 2 continues where stage 1 ended.
    scalars = _tensorboard_scalars(output_dir / "tensorboard")
    offset = report[0]["steps"]
    expected = {(offset if r["stage"] == 2 else 0) + r["step"]: r["loss"] for r in rows}
    assert scalars["train/loss"] == pytest.approx(expected, rel=1e-6)
    assert scalars["eval_after/rewards/accuracies"] == pytest.approx(
        {
            offset: report[0]["eval_after"]["rewards/accuracies"],
            offset + report[1]["steps"]: report[1]["eval_after"]["rewards/accuracies"],
        }
    )


def test_stage_two_reference_is_stage_one_and_gamma_is_exact(setup, baseline, tmp_path):
    """Export M_1, run it in transformers over stage 2's pairs: its mean log-ratio is the reported gamma."""
    root, model_folder, _ = setup
    output_dir, report = baseline
    exported = export(str(output_dir), str(tmp_path / "m1"), stage=1)
    torch_m1 = load_torch_model(exported)
    hard_rows = [json.loads(line) for line in Path(report[1]["sources"][0]).read_text().splitlines()]
    stage2 = np.load(output_dir / "reference" / "stage_2.npz")
    chosen, rejected = _torch_logps(torch_m1, hard_rows)
    held_out = len(hard_rows) - report[1]["num_pairs"]
    # Which rows were held out is the data layer's choice; the reference log-probs of the kept rows
    # must each appear among the independently computed ones.
    gamma_torch = chosen - rejected
    gamma_ours = stage2["chosen"] - stage2["rejected"]
    assert len(gamma_ours) == report[1]["num_pairs"] and held_out >= 0
    for value in gamma_ours:
        assert np.min(np.abs(gamma_torch - value)) < 1e-3
    np.testing.assert_allclose(report[1]["ref_logratio_mean"], gamma_ours.mean(), rtol=1e-6)
    # And the reference differs from the SFT model's: stage 2 really chained on M_1.
    sft_chosen, sft_rejected = _torch_logps(load_torch_model(model_folder), hard_rows)
    assert np.abs(np.sort(gamma_torch) - np.sort(sft_chosen - sft_rejected)).max() > 1e-3


def test_every_stage_exports_and_loads_in_transformers(setup, baseline, tmp_path):
    _, model_folder, _ = setup
    output_dir, _ = baseline
    ids = torch.arange(3, 20)[None]
    outputs = []
    for stage in (1, 2):
        folder = export(str(output_dir), str(tmp_path / f"s{stage}"), stage=stage)
        with torch.no_grad():
            outputs.append(load_torch_model(folder)(input_ids=ids).logits)
        np.testing.assert_array_equal(
            load_torch_model(folder).model.embed_tokens.weight.detach().numpy(),
            stage_params(output_dir, model_folder, stage)["embed_tokens"],
        )
    assert not torch.equal(outputs[0], outputs[1])


def _start(overrides, output_dir, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "sdpo_jax.cli.train", *_flags(overrides, output_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(predicate, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError


def _rows_logged(output_dir, stage, step):
    path = output_dir / "metrics.jsonl"
    return path.exists() and any(
        r["stage"] == stage and r["step"] >= step and r["split"] == "train"
        for r in map(json.loads, path.read_text().splitlines())
    )


def test_killed_and_preempted_runs_resume_bit_identically(setup, baseline, tmp_path):
    """SIGKILL mid-stage, SIGKILL during a checkpoint save, SIGTERM (preemption) mid-stage 2, SIGKILL at the
    stage boundary: each time the same command continues, and the end equals the uninterrupted run."""
    _, model_folder, overrides = setup
    baseline_dir, _ = baseline
    run = tmp_path / "run"
    kills = [
        (signal.SIGKILL, lambda: _rows_logged(run, 1, 3)),  # mid-stage 1
        (signal.SIGKILL, lambda: any((run / "checkpoints" / "stage_1" / "steps").glob("*"))),  # around a save
        (signal.SIGKILL, lambda: (run / "checkpoints" / "stage_1" / "final").is_dir()),  # stage boundary
        (signal.SIGTERM, lambda: _rows_logged(run, 2, 3)),  # preemption
    ]
    interrupted, codes = 0, []
    for sig, when in kills:
        process = _start(overrides, run)
        if _wait_for(when, process):
            process.send_signal(sig)
            interrupted += 1
        _, stderr = process.communicate(timeout=240)
        if sig == signal.SIGTERM and process.returncode == 143:
            assert "run the same command to resume" in stderr
        assert process.returncode in (0, 143, -signal.SIGKILL), stderr[-2000:]
        codes.append(process.returncode)
    assert interrupted >= 3 and 143 in codes and -signal.SIGKILL in codes, codes
    process = _start(overrides, run)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-2000:]
    for stage in (1, 2):
        ours, reference = stage_params(run, model_folder, stage), stage_params(baseline_dir, model_folder, stage)
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(reference)):
            np.testing.assert_array_equal(a, b)
    assert (run / "metrics.jsonl").read_text() == (
        baseline_dir / "metrics.jsonl"
    ).read_text()  # eval rows too, none twice
    assert (
        _tensorboard_scalars(run / "tensorboard")["train/loss"]
        == _tensorboard_scalars(baseline_dir / "tensorboard")["train/loss"]
    )
    assert json.loads((run / "stage_report.json").read_text()) == json.loads(
        (baseline_dir / "stage_report.json").read_text()
    )


def test_resume_with_another_config_is_refused(setup, baseline):
    _, _, overrides = setup
    output_dir, _ = baseline
    result = subprocess.run(
        [sys.executable, "-m", "sdpo_jax.cli.train", *_flags({**overrides, "train.learning_rate": 2e-3}, output_dir)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sdpo-train: error: the config differs") and "train.learning_rate: 0.001 -> 0.002" in last


def test_plain_dpo_is_one_stage(setup, tmp_path, monkeypatch):
    _, _, overrides = setup
    monkeypatch.chdir(tmp_path)  # a relative output_dir, as the default config has
    report = train(_config({**overrides, "sdpo.num_stages": 1, "sdpo.partition": "random"}, Path("dpo")))
    assert len(report) == 1 and report[0]["num_pairs"] == 28  # 32 pairs less the 4 held out
    assert os.path.isdir(tmp_path / "dpo" / "checkpoints" / "stage_1" / "final")


def test_dpo_probe_partition_and_stage_overrides(setup, tmp_path):
    _, _, overrides = setup
    config = _config(
        {
            **overrides,
            "sdpo.partition": "easy_to_hard",
            "sdpo.difficulty": "dpo_probe",
            "sdpo.probe_steps": 3,
            "sdpo.stage_overrides": ("2:dpo.beta=0.3", "2:train.steps_per_stage=2"),
        },
        tmp_path / "probe",
    )
    report = train(config)
    partition = json.loads((tmp_path / "probe" / "partition.json").read_text())
    assert partition["difficulty"] == "dpo_probe" and [s["num_pairs"] for s in partition["stages"]] == [14, 14]
    assert report[0]["dpo"]["beta"] == 0.1 and report[1]["dpo"]["beta"] == 0.3 and report[1]["steps"] == 2
    probe_file = tmp_path / "probe" / "reference" / "train_probe.npz"
    stamp = probe_file.stat().st_mtime_ns
    config.output_dir = str(tmp_path / "probe")
    train(config)  # finished run: scores come from the cache, nothing is retrained
    assert probe_file.stat().st_mtime_ns == stamp


def test_replay_adds_earlier_pairs_to_stage_two_and_a_resume_plans_the_same_sample(
    setup, tmp_path, monkeypatch, capsys
):
    """sdpo.replay_fraction 0.5: stage 2 trains one epoch over its chunk plus round(0.5 x chunk) pairs of
    stage 1's chunk, with gamma over all of them; killed after stage 1, the rerun replays the same pairs."""
    import sdpo_jax.stages as stages_module

    _, _, overrides = setup
    replay = {**overrides, "sdpo.replay_fraction": 0.5}
    report = train(_config(replay, tmp_path / "replay"))
    planned = json.loads((tmp_path / "replay" / "partition.json").read_text())["stages"]
    first, second = (stage["num_pairs"] for stage in planned)
    wanted = int(np.floor(0.5 * second + 0.5))
    assert [stage["replayed"] for stage in planned] == [0, wanted] and 0 < wanted <= first
    assert [(e["num_pairs"], e["replayed"]) for e in report] == [(first, 0), (second + wanted, wanted)]
    assert report[1]["steps"] == -(-(second + wanted) // 2)  # steps_per_stage 0: one epoch over chunk + replay
    reference = np.load(tmp_path / "replay" / "reference" / "stage_2.npz")
    assert len(reference["chosen"]) == second + wanted
    np.testing.assert_allclose(report[1]["ref_logratio_mean"], np.mean(reference["chosen"] - reference["rejected"]))
    log = capsys.readouterr().err
    assert f"{second} pairs from" in log and f"+ {wanted} replayed from stage 1 (sdpo.replay_fraction 0.5)" in log
    assert f"stage 2/2: {second + wanted} pairs from" in log and f"and {wanted} replayed from stage 1" in log

    real_run_stage = stages_module.run_stage

    def killed_before_stage_two(ctx, settings, *args):
        if settings.stage == 2:
            raise KeyboardInterrupt
        return real_run_stage(ctx, settings, *args)

    monkeypatch.setattr(stages_module, "run_stage", killed_before_stage_two)
    with pytest.raises(KeyboardInterrupt):
        train(_config(replay, tmp_path / "resumed"))
    monkeypatch.setattr(stages_module, "run_stage", real_run_stage)
    resumed = train(_config(replay, tmp_path / "resumed"))
    assert resumed[1]["num_pairs"] == second + wanted
    assert resumed[1]["ref_logratio_mean"] == report[1]["ref_logratio_mean"]
    assert resumed[1]["eval_after"] == report[1]["eval_after"]


def test_policy_init_from_sft_keeps_the_chained_reference(setup, baseline, tmp_path):
    """Ablation: stage 2's policy starts at M0 while its reference is still M1.

    Step 1's rewards are beta * (log pi - log pi_ref) before any update: 0 (up to float rounding
    between the precompute and the train step) when the policy starts at its reference (the
    paper), clearly not 0 when it starts at M0.
    """
    _, _, overrides = setup
    baseline_dir, baseline_report = baseline
    report = train(_config({**overrides, "sdpo.policy_init": "sft"}, tmp_path / "ablation"))
    assert report[1]["ref_logratio_mean"] == pytest.approx(baseline_report[1]["ref_logratio_mean"], rel=1e-6)
    first = {
        run: next(r for r in _train_rows(run) if r["stage"] == 2 and r["step"] == 1)
        for run in (baseline_dir, tmp_path / "ablation")
    }
    assert abs(first[baseline_dir]["rewards/chosen"]) < 1e-5 and abs(first[baseline_dir]["rewards/rejected"]) < 1e-5
    assert abs(first[tmp_path / "ablation"]["rewards/chosen"]) > 1e-3
    with pytest.raises(ValueError, match="sdpo.policy_init: expected one of previous, sft, got 'm0'"):
        train(_config({**overrides, "sdpo.policy_init": "m0"}, tmp_path / "bad_init"))


def test_bucket_url_output_dir_is_refused(setup):
    _, _, overrides = setup
    with pytest.raises(ValueError, match="mount the bucket"):
        train(_config(overrides, "gs://bucket/run"))


def test_bad_stage_override_is_refused(setup, tmp_path):
    _, _, overrides = setup
    with pytest.raises(ValueError, match="model.path cannot vary per stage"):
        train(_config({**overrides, "sdpo.stage_overrides": ("2:model.path=x",)}, tmp_path / "bad"))


def test_tiny_config_smoke_run_then_export(tmp_path):
    """`sdpo-train --config configs/tiny.py` (the one-minute smoke run: a tiny random Llama on the shipped
    orca + hh-rlhf samples, chat template, easy-to-hard, eval, generation, multiple choice) and `sdpo-export`."""
    run = tmp_path / "run"
    env = {**os.environ, "SDPO_JAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    flags = [
        "--config",
        str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py"),
        "--config.eval.choices_limit=16",
        f"--config.data.cache_dir={tmp_path / 'data_cache'}",
        f"--config.output_dir={run}",
    ]
    result = subprocess.run(["sdpo-train", *flags], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # stderr is a pipe, not a terminal: a plain log (the summary, one line per step), no progress bars
    assert "tokenizing" not in result.stderr and "%|" not in result.stderr and "stage 1 step 1/" in result.stderr
    # train.host_allocator auto on a CPU-only JAX: glibc keeps XLA's step buffers (sdpo_jax.host_memory)
    assert "host allocator retain (train.host_allocator auto)" in result.stderr, result.stderr[:3000]
    report = json.loads((run / "stage_report.json").read_text())["stages"]
    assert len(report) == 2 and {s["sources"][0].split("/")[-1] for s in report} == {
        "validation-100.jsonl",
        "helpful-base-test.jsonl.gz",
    }
    assert all(s["eval_after"]["num_pairs"] > 0 and s["choices_after"]["num_questions"] == 16 for s in report)
    assert report[0]["choices_before"]["num_questions"] == 16 and len(report[1]["generations_after"]) == 3
    result = subprocess.run(
        ["sdpo-export", "--run", str(run), "--out", str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exported = load_torch_model(tmp_path / "hf")
    assert exported.config.vocab_size == 32000


def test_embedded_default_shortened(tmp_path, smollm2_gguf):
    """`sdpo-train` with no --config (the real SmolLM2-135M-Instruct, shipped data, easy-to-hard by the
    SFT model), cut to a few pairs per source: every output a user is promised, and M0's greedy answer
    to the fixed capital-of-France prompt, decoded with the KV cache through the chat template, is right."""
    run = tmp_path / "run"
    flags = [
        "--config.data.limit=10",
        "--config.data.length_buckets=(192,)",
        "--config.eval.max_new_tokens=12",
        "--config.eval.choices_limit=16",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
        f"--config.output_dir={run}",
    ]
    result = subprocess.run(["sdpo-train", *flags], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "easy-to-hard by SFT preference accuracy" in result.stderr and "stage 1: " in result.stderr
    report = json.loads((run / "stage_report.json").read_text())["stages"]
    assert [s["stage"] for s in report] == [1, 2]
    for entry in report:
        assert CONTRACT_METRICS <= set(entry["eval_before"]) and CONTRACT_METRICS <= set(entry["eval_after"])
        assert len(entry["generations_after"]) == 3
    assert "Paris" in report[0]["generations_before"][0]["completion"]
    for name in (
        "config.json",
        "metrics.jsonl",
        "partition.json",
        "report.md",
        "plots/train_curves.png",
        "plots/eval_accuracy.png",
        "plots/ref_logratio.png",
    ):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    assert "- M0: " in (run / "report.md").read_text()


# ---- a stranger's first hour: disk, corruption, divergence, a second trainer, a moved folder ----


def _largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_a_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x08
    path.write_bytes(bytes(data))


def test_a_finished_stage_keeps_only_its_snapshot(baseline):
    output_dir, _ = baseline
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["stage_1", "stage_2"]
    for stage in ("stage_1", "stage_2"):
        assert [p.name for p in (output_dir / "checkpoints" / stage).iterdir()] == ["final"]  # mid-stage ones removed


def test_a_corrupt_checkpoint_falls_back_and_a_copied_folder_resumes(setup, baseline, tmp_path):
    """Preempted mid-stage 1, the newest mid-stage checkpoint damaged (one flipped bit, which Orbax reads
    back without complaint), the run folder copied elsewhere: the same command with the new output_dir
    sets the damaged checkpoint aside, resumes from the one before and ends as the uninterrupted run;
    keep_stages=1 then removes stage 1's snapshot, which sdpo-export names in one line."""
    _, model_folder, overrides = setup
    baseline_dir, _ = baseline
    run = tmp_path / "run"
    process = _start(overrides, run)
    assert _wait_for(lambda: _rows_logged(run, 1, 3), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 143, stderr[-2000:]
    steps = sorted(int(p.name) for p in (run / "checkpoints" / "stage_1" / "steps").iterdir() if p.name.isdigit())
    assert len(steps) == 2, steps
    damaged = _largest_file(run / "checkpoints" / "stage_1" / "steps" / str(steps[-1]) / "state")
    _flip_a_bit(damaged, damaged.stat().st_size // 2)
    copied = tmp_path / "elsewhere" / "copied"
    shutil.copytree(run, copied)
    shutil.rmtree(run)
    process = _start({**overrides, "checkpoint.keep_stages": 1}, copied)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-2000:]
    assert (
        f"the checkpoint {copied / 'checkpoints' / 'stage_1' / 'steps' / str(steps[-1])}: its contents differ" in stderr
    )
    assert f"resuming from step {steps[0]}" in stderr and f"stage 1: resuming at step {steps[0]}/" in stderr
    ours, reference = stage_params(copied, model_folder, 2), stage_params(baseline_dir, model_folder, 2)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(reference)):
        np.testing.assert_array_equal(a, b)
    assert (copied / "metrics.jsonl").read_text() == (baseline_dir / "metrics.jsonl").read_text()
    assert json.loads((copied / "checkpoints" / "pruned_stages.json").read_text()) == [1]
    assert not (copied / "checkpoints" / "stage_1" / "final").exists()
    with pytest.raises(FileNotFoundError, match="the snapshot of stage 1 was removed"):
        export(str(copied), str(tmp_path / "m1"), stage=1)
    assert (export(str(copied), str(tmp_path / "m2")) / "model.safetensors").is_file()  # the last stage: M2


def test_a_damaged_stage_snapshot_is_one_line(baseline, tmp_path, capsys):
    output_dir, _ = baseline
    run = tmp_path / "run"
    shutil.copytree(output_dir, run)
    params = _largest_file(run / "checkpoints" / "stage_1" / "final")
    _flip_a_bit(params, 100)
    with pytest.raises(SystemExit) as info:
        export_main(["--run", str(run), "--stage", "1", "--out", str(tmp_path / "m1")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert (
        err[0].startswith("sdpo-export: error: the snapshot of stage 1 in ")
        and "its contents differ from what was saved" in err[0]
    )
    params.write_bytes(params.read_bytes()[:64])  # truncated
    with pytest.raises(SystemExit) as info:
        export_main(["--run", str(run), "--stage", "1", "--out", str(tmp_path / "m1")])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        info.value.code == 2
        and len(err) == 1
        and "the snapshot of stage 1 in " in err[0]
        and "cannot be read" in err[0]
    ), err
    assert not (tmp_path / "m1").exists()


def test_a_diverged_stage_stops_and_is_never_saved(setup, tmp_path):
    """A learning rate of 1e10 without clipping: the loss turns NaN within a few steps; the stage stops with
    one line naming it and the step, exit 2, and no snapshot or checkpoint holds a non-finite number."""
    _, _, overrides = setup
    run = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdpo_jax.cli.train",
            *_flags({**overrides, "train.learning_rate": 1e10, "train.max_grad_norm": 0.0}, run),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"sdpo-train: error: stage 1 step \d+: the loss is nan and the gradient norm \S+: training diverged "
        r"\(train.learning_rate 1e\+10, train.max_grad_norm 0\); the stage was not saved as finished",
        last,
    ), last
    assert "Traceback" not in result.stderr
    assert not (run / "checkpoints" / "stage_1" / "final").exists() and not (run / "stage_report.json").exists()
    diverged = int(re.search(r"step (\d+)", last).group(1))
    saved = [int(p.name) for p in (run / "checkpoints" / "stage_1" / "steps").glob("[0-9]*")]
    assert all(step < diverged for step in saved)


def test_a_second_trainer_on_the_same_folder_is_refused(setup, tmp_path):
    """While one sdpo-train runs (made long: 60 steps in stage 1), a second on the same output_dir stops at once
    naming the first; the first, preempted afterwards, wrote each of its rows once."""
    _, _, overrides = setup
    run = tmp_path / "run"
    first = _start({**overrides, "train.steps_per_stage": 60}, run)
    assert _wait_for(lambda: _rows_logged(run, 1, 1), first)
    second = subprocess.run(
        [sys.executable, "-m", "sdpo_jax.cli.train", *_flags(overrides, run)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    still_running = first.poll() is None
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=240)
    assert still_running and first.returncode == 143, stderr[-2000:]
    err = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(err) == 1, second.stderr[-2000:]
    assert err[0].startswith(
        f"sdpo-train: error: output_dir {run} is in use by another sdpo-train (pid {first.pid} on "
        f"{socket.gethostname()}, started "
    ) and err[0].endswith("wait for it to finish or use another output_dir")
    rows = [
        (r["split"], r["stage"], r["step"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    ]
    assert len(rows) == len(set(rows)) and ("train", 1, 1) in rows  # nothing written twice


def test_a_model_folder_without_a_usable_tokenizer_is_refused(setup, tmp_path):
    _, model_folder, overrides = setup
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(model_folder, folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        train(_config({**overrides, "model.path": str(folder)}, tmp_path / "run"))


def test_the_loss_family_trains_through_the_driver(setup, tmp_path):
    """MPO (sigmoid + bco_pair + sft, TRL's weights) in stage 1, aot over 2 micro-batches in stage 2, LD-DPO
    throughout: the precomputed reference log-probs (LD-weighted) give the same training as the reference
    run inside every step. And WPO-weighted sigmoid + bco_pair trains to finite numbers."""
    _, _, overrides = setup
    losses = {
        **overrides,
        "dpo.loss_type": "sigmoid,bco_pair,sft",
        "dpo.loss_weights": "0.8,0.2,1.0",
        "dpo.ld_alpha": 0.5,
        "train.batch_size": 4,
        "train.grad_accum": 2,
        "sdpo.stage_overrides": ("2:dpo.loss_type=aot", "2:dpo.loss_weights=", "2:train.steps_per_stage=2"),
    }
    runs = {}
    for precompute in (True, False):
        folder = tmp_path / f"precompute_{precompute}"
        report = train(
            _config({**losses, "train.precompute_reference": precompute, "dpo.use_weighting": False}, folder)
        )
        runs[precompute] = _train_rows(folder)
        assert [e["dpo"]["loss_type"] for e in report] == [["sigmoid", "bco_pair", "sft"], ["aot"]]
    assert [(r["stage"], r["step"]) for r in runs[True]] == [(r["stage"], r["step"]) for r in runs[False]]
    for a, b in zip(runs[True], runs[False]):
        assert np.isfinite(a["loss"]) and a["loss"] == pytest.approx(b["loss"], rel=2e-5, abs=1e-6), (a, b)
    weighted = train(
        _config(
            {
                **losses,
                "dpo.use_weighting": True,
                "dpo.loss_type": "sigmoid,bco_pair",
                "dpo.loss_weights": "0.8,0.2",
                "sdpo.stage_overrides": ("2:train.steps_per_stage=2",),
            },
            tmp_path / "wpo",
        )
    )
    assert all(np.isfinite(e["eval_after"]["loss"]) for e in weighted)


def test_a_fixed_reference_is_m0_in_every_stage(setup, baseline, tmp_path):
    """sdpo.reference=initial: stage 2's reference log-probs are M0's (transformers' forward of the SFT folder
    over stage 2's pairs), while its policy still starts from M1 (step 1's rewards are not 0)."""
    _, model_folder, overrides = setup
    baseline_dir, baseline_report = baseline
    run = tmp_path / "initial"
    report = train(_config({**overrides, "sdpo.reference": "initial"}, run))
    assert [e["reference"]["model"] for e in report] == ["M0", "M0"] and not report[1]["reference"]["moved"]
    assert [e["reference"]["model"] for e in baseline_report] == ["M0", "M1"]
    hard_rows = [json.loads(line) for line in Path(report[1]["sources"][0]).read_text().splitlines()]
    m0_chosen, m0_rejected = _torch_logps(load_torch_model(model_folder), hard_rows)
    stage2 = np.load(run / "reference" / "stage_2.npz")
    for chosen, rejected in zip(stage2["chosen"], stage2["rejected"]):
        assert np.min(np.abs(m0_chosen - chosen) + np.abs(m0_rejected - rejected)) < 1e-3
    first = next(r for r in _train_rows(run) if r["stage"] == 2 and r["step"] == 1)
    assert abs(first["rewards/chosen"]) > 1e-3  # M1 against M0
    assert report[0]["eval_after"] == report[1]["eval_before"]  # 'before' is M1 whatever the reference


def _checkpoint(run: Path, model_folder: Path, stage: int, step: int, steps: int):
    """(policy params, moving reference) of a mid-stage checkpoint, as host arrays."""
    from sdpo_jax.checkpointing import RunCheckpoints
    from sdpo_jax.models import LlamaForCausalLM, ModelConfig
    from sdpo_jax.models.llama import init_params
    from sdpo_jax.optim import OptimizerSettings, make_optimizer
    from sdpo_jax.train_step import TrainState

    model = LlamaForCausalLM(ModelConfig.from_pretrained(model_folder))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def place(tree):
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)

    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    state = jax.eval_shape(lambda p: TrainState.create(p, make_optimizer(OptimizerSettings(total_steps=steps))), params)
    checkpoints = RunCheckpoints(run)
    restored, _, reference = checkpoints.restore_step(stage, step, place(state), place(params))
    checkpoints.close()
    return jax.device_get(restored.params), jax.device_get(reference)


def test_a_moving_reference_follows_tr_dpo_and_resumes_bit_identically(setup, tmp_path):
    """sdpo.ref_sync_steps=2, alpha 0.6: the reference saved with the step-2 and step-4 checkpoints is
    0.6 * policy + 0.4 * the reference before, from M0; preempted mid-stage 1, the same command ends with the
    uninterrupted run's snapshots and metrics, bit for bit."""
    _, model_folder, overrides = setup
    moving = {
        **overrides,
        "sdpo.ref_sync_steps": 2,
        "sdpo.ref_mixup_alpha": 0.6,
        "checkpoint.keep": 10,
        "train.steps_per_stage": 16,
    }  # (long enough that the SIGTERM lands inside stage 1)
    uninterrupted = tmp_path / "uninterrupted"
    report = train(_config(moving, uninterrupted))
    assert all(e["reference"]["moved"] and e["reference"]["sync_steps"] == 2 for e in report)
    run = tmp_path / "run"
    process = _start(moving, run)
    assert _wait_for(lambda: _rows_logged(run, 1, 5), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 143, stderr[-2000:]
    _, m0 = load_hf_checkpoint(model_folder)
    steps = report[0]["steps"]
    p2, r2 = _checkpoint(run, model_folder, 1, 2, steps)
    p4, r4 = _checkpoint(run, model_folder, 1, 4, steps)
    for expected, got in (
        (jax.tree_util.tree_map(lambda p, r: 0.6 * p + 0.4 * r, p2, m0), r2),
        (jax.tree_util.tree_map(lambda p, r: 0.6 * p + 0.4 * r, p4, r2), r4),
    ):
        for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    process = _start(moving, run)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-2000:]
    for stage in (1, 2):
        for a, b in zip(
            jax.tree_util.tree_leaves(stage_params(run, model_folder, stage)),
            jax.tree_util.tree_leaves(stage_params(uninterrupted, model_folder, stage)),
        ):
            np.testing.assert_array_equal(a, b)
    assert (run / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()


SCORERS = """
def length(prompts, completions, references):
    return [float(len(c)) for c in completions]
"""


def test_an_on_policy_stage_pairs_scored_samples_and_resumes_without_sampling_again(setup, tmp_path, monkeypatch):
    """Stage 1 offline, stage 2 generated from M1's samples (3 per prompt, scored by a user function): the pairs
    file holds the best and worst sample of each prompt; a second run samples the same; killed while sampling,
    the same command keeps the saved batches and ends with the uninterrupted run's pairs and snapshots; the
    held-out reward prompts are scored before and after each stage."""
    _, _, overrides = setup
    model_folder = make_hf_checkpoint(
        "llama2", tmp_path / "model", seed=0, vocab_size=32000
    )  # (text prompts need the vocabulary)
    overrides = {**overrides, "model.path": str(model_folder)}
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "stage_scorers.py").write_text(SCORERS)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "lib"), os.environ.get("PYTHONPATH", "")])}
    prompts = tmp_path / "reward_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hello there", "Count to three", "Why?")))
    generated = {
        **overrides,
        "generate.scorer": "stage_scorers:length",
        "generate.samples_per_prompt": 3,
        "generate.max_new_tokens": 8,
        "generate.batch_size": 1,
        "eval.reward_prompts": str(prompts),
        "sdpo.stage_overrides": ("2:sdpo.stage_data=generated",),
    }
    first = tmp_path / "first"
    report = train(_config(generated, first))
    summary = report[1]["generated"]
    lines = [json.loads(line) for line in (first / "generated" / "stage_2.jsonl").read_text().splitlines()]
    assert summary["pairs"] == len(lines) == report[1]["num_pairs"] > 0 and summary["prompts"] == 16
    assert summary["pairs"] + summary["prompts_without_pair"] == summary["prompts"] and "generated" not in report[0]
    for line in lines:
        assert {"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "sample_scores"} <= set(line)
        assert line["chosen_score"] == max(line["sample_scores"]) > line["rejected_score"] == min(line["sample_scores"])
        assert line["chosen_score"] == len(line["chosen"]) and line["rejected_score"] == len(line["rejected"])
    assert all(e["reward_before"]["num_prompts"] == 3 and "mean" in e["reward_after"] for e in report)
    assert report[1]["reward_before"] == report[0]["reward_after"]
    assert (
        "## Reward on held-out prompts" in (first / "report.md").read_text()
        and (first / "plots" / "reward.png").is_file()
    )
    again = tmp_path / "again"
    train(_config(generated, again))
    assert (again / "generated" / "stage_2.jsonl").read_bytes() == (first / "generated" / "stage_2.jsonl").read_bytes()

    killed = tmp_path / "killed"
    partial = killed / "generated" / "stage_2.partial.jsonl"
    process = _start(generated, killed, env=env)
    assert _wait_for(lambda: partial.exists() and len(partial.read_text().splitlines()) >= 3, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=240)
    saved = len(partial.read_text().splitlines()) - 1
    assert 2 <= saved < 16, saved
    process = _start(generated, killed, env=env)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-2000:]
    assert f"stage 2: {saved} of 16 sampled batches saved by an earlier run are reused" in stderr
    assert (killed / "generated" / "stage_2.jsonl").read_bytes() == (first / "generated" / "stage_2.jsonl").read_bytes()
    for a, b in zip(
        jax.tree_util.tree_leaves(stage_params(killed, model_folder, 2)),
        jax.tree_util.tree_leaves(stage_params(first, model_folder, 2)),
    ):
        np.testing.assert_array_equal(a, b)
