"""sdpo-eval against TRL's DPOTrainer.evaluate on the same checkpoints and token ids."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import transformers
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from data_paths import ORCA_PAIRS
from hf_fixtures import load_torch_model, make_chat_checkpoint, make_hf_checkpoint
from sdpo_jax.cli.eval import main as eval_main

METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    return make_hf_checkpoint("llama2", root / "policy", seed=0), make_hf_checkpoint(
        "llama2", root / "reference", seed=1
    )


@pytest.fixture(scope="module")
def tokenized_pairs(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = [
        {
            "prompt_ids": rng.integers(3, 160, rng.integers(2, 12)).tolist(),
            "chosen_ids": rng.integers(3, 160, rng.integers(1, 9)).tolist() + [2],
            "rejected_ids": rng.integers(3, 160, rng.integers(1, 9)).tolist() + [2],
        }
        for _ in range(12)
    ]
    path = tmp_path_factory.mktemp("eval_data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, rows


def _trl_metrics(policy, reference, rows, tmp_path, monkeypatch, **dpo):
    """DPOTrainer.evaluate() of all rows in one batch (TRL's batch losses then cover the set, as ours do)."""
    # The rows are already in the token layout TRL's collator consumes; TRL 1.16 only prepares text.
    monkeypatch.setattr(DPOTrainer, "_prepare_dataset", lambda self, dataset, *args, **kwargs: dataset)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_eval_batch_size=len(rows),
        bf16=False,
        report_to="none",
        use_cpu=True,
        max_length=None,
        prediction_loss_only=True,
        **dpo,
    )
    dataset = Dataset.from_list(rows)
    trainer = DPOTrainer(
        model=load_torch_model(policy),
        ref_model=load_torch_model(reference),
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=transformers.AutoTokenizer.from_pretrained(policy),
    )
    result = trainer.evaluate()
    return {name: result[f"eval_{name}"] for name in METRICS}


# (sdpo-eval flags, TRL DPOConfig arguments) of the same loss
CASES = {
    "sigmoid": (["--beta", "0.1"], dict(beta=0.1, loss_type=["sigmoid"])),
    "ipo": (["--beta", "0.5", "--loss-type", "ipo"], dict(beta=0.5, loss_type=["ipo"])),
    "hinge": (["--beta", "0.3", "--loss-type", "hinge"], dict(beta=0.3, loss_type=["hinge"])),
    "robust": (["--loss-type", "robust", "--label-smoothing", "0.2"], dict(loss_type=["robust"], label_smoothing=0.2)),
    "aot": (["--loss-type", "aot", "--label-smoothing", "0.1"], dict(loss_type=["aot"], label_smoothing=0.1)),
    "mpo": (
        ["--loss-type", "sigmoid,bco_pair,sft", "--loss-weights", "0.8,0.2,1.0"],
        dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    ),
    "alpha+wpo+ld": (
        [
            "--loss-type",
            "discopop,ipo",
            "--f-divergence-type",
            "alpha_divergence",
            "--f-alpha-divergence-coef",
            "0.7",
            "--use-weighting",
            "--ld-alpha",
            "0.3",
            "--discopop-tau",
            "0.2",
        ],
        dict(
            loss_type=["discopop", "ipo"],
            f_divergence_type="alpha_divergence",
            f_alpha_divergence_coef=0.7,
            use_weighting=True,
            ld_alpha=0.3,
            discopop_tau=0.2,
        ),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_trl_dpo_trainer(models, tokenized_pairs, tmp_path, monkeypatch, case):
    """Ours in 3 batches of 4 pairs, TRL in one batch of 12: the batch losses (aot, sft) cover all 12 in both."""
    policy, reference = models
    path, rows = tokenized_pairs
    flags, trl_args = CASES[case]
    out = tmp_path / "metrics.json"
    assert (
        eval_main(
            [
                "--policy",
                str(policy),
                "--reference",
                str(reference),
                "--data",
                str(path),
                *flags,
                "--batch-size",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ours = json.loads(out.read_text())
    assert ours["num_pairs"] == 12
    expected = _trl_metrics(policy, reference, rows, tmp_path, monkeypatch, **trl_args)
    assert abs(expected["rewards/margins"]) > 1e-3  # the two models really differ
    for name in METRICS:
        np.testing.assert_allclose(ours[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_padding_pairs_do_not_count(models, tokenized_pairs, tmp_path):
    """12 pairs in batches of 8 (the last one half padding) give the same means as batches of 4."""
    policy, reference = models
    path, _ = tokenized_pairs
    results = []
    for batch_size in ("4", "8"):
        out = tmp_path / f"m{batch_size}.json"
        eval_main(
            [
                "--policy",
                str(policy),
                "--reference",
                str(reference),
                "--data",
                str(path),
                "--batch-size",
                batch_size,
                "--out",
                str(out),
            ]
        )
        results.append(json.loads(out.read_text()))
    for name in METRICS:
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sdpo_jax.cli.eval", *map(str, args)], capture_output=True, text=True)


def test_bad_input_is_one_line_and_exit_2(models, tmp_path):
    policy, reference = models
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 2]}\n'
        '{"prompt_ids": [5], "chosen_ids": [9999], "rejected_ids": [8]}\n'
    )
    result = _run_cli("--policy", policy, "--reference", reference, "--data", bad, "--out", tmp_path / "o.json")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "bad.jsonl line 2" in line and "chosen_ids" in line, result.stderr
    result = _run_cli(
        "--policy", tmp_path / "nope", "--reference", reference, "--data", bad, "--out", tmp_path / "o.json"
    )
    assert result.returncode == 2 and result.stderr.strip().endswith("nope: no such model folder")


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--loss-type", "sigmoid,kto"], "loss_type"),
        (["--loss-type", "bco_pair", "--f-divergence-type", "js_divergence"], "f_divergence_type"),
        (["--loss-type", "sigmoid,sft", "--loss-weights", "0.5"], "loss_weights"),
    ],
)
def test_bad_loss_flags_exit_2_naming_the_field(models, tokenized_pairs, tmp_path, capsys, flags, field):
    policy, reference = models
    path, _ = tokenized_pairs
    with pytest.raises(SystemExit) as exit_info:
        eval_main(
            [
                "--policy",
                str(policy),
                "--reference",
                str(reference),
                "--data",
                str(path),
                *flags,
                "--out",
                str(tmp_path / "o.json"),
            ]
        )
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"sdpo-eval: error: dpo.{field}")


@pytest.mark.slow
def test_text_pairs_use_the_tokenizer(tmp_path):
    """Conversational pairs from the shipped orca sample, through the Llama tokenizer's vocabulary."""
    policy = make_chat_checkpoint(tmp_path / "big_vocab")
    data = ORCA_PAIRS
    out = tmp_path / "m.json"
    assert (
        eval_main(
            [
                "--policy",
                str(policy),
                "--reference",
                str(policy),
                "--data",
                str(data),
                "--batch-size",
                "16",
                "--max-length",
                "256",
                "--max-prompt-length",
                "128",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads(out.read_text())
    assert metrics["num_pairs"] == 100
    np.testing.assert_allclose(metrics["loss"], np.log(2), rtol=1e-5)  # policy == reference
    assert metrics["logps/chosen"] < -100
