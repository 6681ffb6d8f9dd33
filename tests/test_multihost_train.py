"""`sdpo-train` as two processes x 4 CPU devices (explicit coordinator) equals one process x 8 devices."""
from __future__ import annotations

import json
import os
import socket
import subprocess

import jax
import numpy as np

from batch_fixtures import write_token_pairs
from hf_fixtures import make_hf_checkpoint
from run_fixtures import stage_params, token_pair_run_flags


def _env(devices: int) -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_sdpo_train_equals_one_process(tmp_path):
    model = make_hf_checkpoint("llama2", tmp_path / "model")
    rng = np.random.default_rng(1)
    sources = tuple(write_token_pairs(tmp_path / f"{n}.jsonl", 20, rng) for n in ("a", "b"))
    flags = token_pair_run_flags(model, sources, tmp_path / "cache", eval_fraction=0.2, every_steps=1)
    single = subprocess.run(["sdpo-train", *flags, f"--config.output_dir={tmp_path / 'one'}"], capture_output=True, text=True,
                            timeout=400, env=_env(8))
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    workers = [subprocess.Popen(["sdpo-train", *flags, f"--config.output_dir={tmp_path / 'two'}", "--coordinator", f"127.0.0.1:{port}",
                                 "--num_processes", "2", "--process_id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=_env(4)) for i in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=400)
        assert worker.returncode == 0, err[-3000:]
    one, two = (json.loads((tmp_path / d / "stage_report.json").read_text())["stages"] for d in ("one", "two"))
    for a, b in zip(one, two):
        assert a["num_pairs"] == b["num_pairs"] and a["steps"] == b["steps"]
        np.testing.assert_allclose(b["ref_logratio_mean"], a["ref_logratio_mean"], rtol=1e-5)
        for name, value in a["eval_after"].items():
            np.testing.assert_allclose(b["eval_after"][name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    rows = lambda d: [r for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    np.testing.assert_allclose([r["loss"] for r in rows("two")], [r["loss"] for r in rows("one")], rtol=1e-5)
    for stage_one, stage_two in zip(*([stage_params(tmp_path / run, model, t) for t in (1, 2)] for run in ("one", "two"))):
        for a, b in zip(jax.tree_util.tree_leaves(stage_one), jax.tree_util.tree_leaves(stage_two)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
