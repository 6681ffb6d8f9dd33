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
from sdpo_jax.checkpointing import RunCheckpoints
from sdpo_jax.models import LlamaForCausalLM, ModelConfig
from sdpo_jax.models.llama import init_params


def _env(devices: int) -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage_params(run, model):
    config = ModelConfig.from_pretrained(model)
    abstract = jax.eval_shape(lambda: init_params(LlamaForCausalLM(config), jax.random.key(0)))
    checkpoints = RunCheckpoints(run)
    params = [jax.device_get(checkpoints.load_stage(stage, abstract)[0]) for stage in (1, 2)]
    checkpoints.close()
    return params


def test_two_process_sdpo_train_equals_one_process(tmp_path):
    model = make_hf_checkpoint("llama2", tmp_path / "model")
    rng = np.random.default_rng(1)
    sources = tuple(write_token_pairs(tmp_path / f"{n}.jsonl", 20, rng) for n in ("a", "b"))
    flags = [f"--config.model.path={model}", f"--config.data.train={sources!r}", "--config.data.limit=0",
             "--config.data.max_length=64", "--config.data.length_buckets=(64,)", "--config.data.max_prompt_length=32",
             "--config.train.batch_size=8", "--config.sdpo.partition=datasets", "--config.train.learning_rate=1e-3",
             "--config.data.eval_fraction=0.2", "--config.checkpoint.every_steps=1", f"--config.data.cache_dir={tmp_path / 'cache'}",
             "--config.eval.prompts=()", "--config.eval.choices="]
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
    for stage_one, stage_two in zip(_stage_params(tmp_path / "one", model), _stage_params(tmp_path / "two", model)):
        for a, b in zip(jax.tree_util.tree_leaves(stage_one), jax.tree_util.tree_leaves(stage_two)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
