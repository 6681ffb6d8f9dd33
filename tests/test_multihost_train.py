"""`sdpo-train` as two processes x 4 CPU devices (explicit coordinator) equals one process x 8 devices.

The two processes each read and tokenize half of every source (their tokenization cache entries
show it) and build the global batches from their own pairs; a bad record in one process's half
stops both with the same one-line error.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import jax
import numpy as np
import pytest

from batch_fixtures import write_token_pairs
from hf_fixtures import make_hf_checkpoint
from run_fixtures import cpu_env, stage_params, start_two_processes, token_pair_run_flags

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _two_processes(flags: list[str]) -> list[subprocess.CompletedProcess]:
    workers = start_two_processes(flags)
    outputs = [w.communicate(timeout=400) for w in workers]
    return [subprocess.CompletedProcess(w.args, w.returncode, *out) for w, out in zip(workers, outputs)]


def test_two_process_sdpo_train_equals_one_process(tmp_path):
    model = make_hf_checkpoint("llama2", tmp_path / "model")
    rng = np.random.default_rng(1)
    sources = tuple(write_token_pairs(tmp_path / f"{n}.jsonl", 20, rng) for n in ("a", "b"))
    flags = [
        *token_pair_run_flags(model, sources, tmp_path / "cache", eval_fraction=0.2, every_steps=1),
        "--config.sdpo.partition=easy_to_hard",
        "--config.sdpo.difficulty=pair_logratio",
    ]  # chunks from scores of every pair
    single = subprocess.run(
        ["sdpo-train", *flags, f"--config.output_dir={tmp_path / 'one'}"],
        capture_output=True,
        text=True,
        timeout=400,
        env=cpu_env(8),
    )
    assert single.returncode == 0, single.stderr[-3000:]
    shutil.rmtree(tmp_path / "cache")
    for worker in _two_processes([*flags, f"--config.output_dir={tmp_path / 'two'}"]):
        assert worker.returncode == 0, worker.stderr[-3000:]
    shards = [json.loads(path.read_text()) for path in (tmp_path / "cache").glob("*/meta.json")]
    assert sorted((meta["name"], meta["shard"], meta["pairs"]) for meta in shards) == [
        (source, [p, 2], 10) for source in sources for p in (0, 1)
    ]  # each process tokenized its half only
    partitions = [json.loads((tmp_path / d / "partition.json").read_text()) for d in ("one", "two")]
    assert partitions[0] == partitions[1] and partitions[0]["difficulty"] == "pair_logratio"
    one, two = (json.loads((tmp_path / d / "stage_report.json").read_text())["stages"] for d in ("one", "two"))
    for a, b in zip(one, two):
        assert a["num_pairs"] == b["num_pairs"] and a["steps"] == b["steps"]
        np.testing.assert_allclose(b["ref_logratio_mean"], a["ref_logratio_mean"], rtol=1e-5)
        for name, value in a["eval_after"].items():
            # rewards are beta x differences of ~40-nat float32 log-probs: rounding alone is ~1e-6 abs
            np.testing.assert_allclose(b["eval_after"][name], value, rtol=1e-4, atol=1e-5, err_msg=name)

    def rows(d):
        return [
            r
            for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"
        ]

    np.testing.assert_allclose([r["loss"] for r in rows("two")], [r["loss"] for r in rows("one")], rtol=1e-5)
    for stage_one, stage_two in zip(
        *([stage_params(tmp_path / run, model, t) for t in (1, 2)] for run in ("one", "two"))
    ):
        for a, b in zip(jax.tree_util.tree_leaves(stage_one), jax.tree_util.tree_leaves(stage_two)):
            # Adam (lr 1e-3) turns last-bit differences of the two all-reduce orders into steps of up to
            # lr on weights whose gradient is near zero; everything else agrees to 1e-4
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_bad_record_in_one_process_stops_both_with_its_line(tmp_path):
    model = make_hf_checkpoint("llama2", tmp_path / "model")
    path = write_token_pairs(tmp_path / "a.jsonl", 20, np.random.default_rng(0))
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    lines[16] = lines[16].replace('"chosen_ids": [', '"chosen_ids": [9999, ')  # line 17: in process 1's half
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    flags = token_pair_run_flags(model, (path, path), tmp_path / "cache", eval_fraction=0.2, every_steps=1)
    workers = _two_processes([*flags, "--config.data.skip_invalid=False", f"--config.output_dir={tmp_path / 'out'}"])
    for worker in workers:
        assert worker.returncode == 2, worker.stderr[-3000:]
        assert worker.stderr.strip().splitlines()[-1] == (
            f"sdpo-train: error: data error: {path} line 17, field 'chosen_ids': token id 9999 is outside the "
            "vocabulary (size 160)"
        )
