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

from hf_fixtures import SHARED_DATA, load_torch_model, make_chat_checkpoint, make_hf_checkpoint
from sdpo_jax.cli.eval import main as eval_main

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    return make_hf_checkpoint("llama2", root / "policy", seed=0), make_hf_checkpoint("llama2", root / "reference", seed=1)


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


def _trl_metrics(policy, reference, rows, loss_type, beta, label_smoothing, tmp_path, monkeypatch):
    # The rows are already in the token layout TRL's collator consumes; TRL 1.16 only prepares text.
    monkeypatch.setattr(DPOTrainer, "_prepare_dataset", lambda self, dataset, *args, **kwargs: dataset)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_eval_batch_size=4, beta=beta, loss_type=[loss_type],
                     label_smoothing=label_smoothing, bf16=False, report_to="none", use_cpu=True, max_length=None)
    dataset = Dataset.from_list(rows)
    trainer = DPOTrainer(model=load_torch_model(policy), ref_model=load_torch_model(reference), args=args,
                         train_dataset=dataset, eval_dataset=dataset,
                         processing_class=transformers.AutoTokenizer.from_pretrained(policy))
    result = trainer.evaluate()
    return {name: result[f"eval_{name}"] for name in METRICS}


@pytest.mark.parametrize("loss_type, beta, label_smoothing", [("sigmoid", 0.1, 0.0), ("ipo", 0.5, 0.0), ("hinge", 0.3, 0.0), ("robust", 0.1, 0.2)])
def test_matches_trl_dpo_trainer(models, tokenized_pairs, tmp_path, monkeypatch, loss_type, beta, label_smoothing):
    policy, reference = models
    path, rows = tokenized_pairs
    out = tmp_path / "metrics.json"
    assert eval_main(["--policy", str(policy), "--reference", str(reference), "--data", str(path), "--beta", str(beta),
                      "--loss-type", loss_type, "--label-smoothing", str(label_smoothing), "--batch-size", "4",
                      "--out", str(out)]) == 0
    ours = json.loads(out.read_text())
    assert ours["num_pairs"] == 12
    expected = _trl_metrics(policy, reference, rows, loss_type, beta, label_smoothing, tmp_path, monkeypatch)
    assert abs(expected["rewards/margins"]) > 1e-3  # the two models really differ
    for name in METRICS:
        np.testing.assert_allclose(ours[name], expected[name], rtol=1e-3, atol=1e-6, err_msg=name)


def test_padding_pairs_do_not_count(models, tokenized_pairs, tmp_path):
    """12 pairs in batches of 8 (the last one half padding) give the same means as batches of 4."""
    policy, reference = models
    path, _ = tokenized_pairs
    results = []
    for batch_size in ("4", "8"):
        out = tmp_path / f"m{batch_size}.json"
        eval_main(["--policy", str(policy), "--reference", str(reference), "--data", str(path), "--batch-size", batch_size, "--out", str(out)])
        results.append(json.loads(out.read_text()))
    for name in METRICS:
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sdpo_jax.cli.eval", *map(str, args)], capture_output=True, text=True)


def test_bad_input_is_one_line_and_exit_2(models, tmp_path):
    policy, reference = models
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 2]}\n{"prompt_ids": [5], "chosen_ids": [9999], "rejected_ids": [8]}\n')
    result = _run_cli("--policy", policy, "--reference", reference, "--data", bad, "--out", tmp_path / "o.json")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "bad.jsonl line 2" in line and "chosen_ids" in line, result.stderr
    result = _run_cli("--policy", tmp_path / "nope", "--reference", reference, "--data", bad, "--out", tmp_path / "o.json")
    assert result.returncode == 2 and result.stderr.strip().endswith("nope: no such model folder")


def test_text_pairs_use_the_tokenizer(tmp_path):
    """Conversational pairs from the shipped orca sample, through the Llama tokenizer's vocabulary."""
    policy = make_chat_checkpoint(tmp_path / "big_vocab")
    data = SHARED_DATA / "preference" / "orca_dpo_pairs" / "validation.jsonl"
    out = tmp_path / "m.json"
    assert eval_main(["--policy", str(policy), "--reference", str(policy), "--data", str(data), "--batch-size", "16",
                      "--max-length", "256", "--max-prompt-length", "128", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_pairs"] == 284
    np.testing.assert_allclose(metrics["loss"], np.log(2), rtol=1e-5)  # policy == reference
    assert metrics["logps/chosen"] < -100
