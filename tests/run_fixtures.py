"""Helpers for tests that drive whole sdpo-train runs: their flags and their stage snapshots."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import jax

from sdpo_jax.checkpointing import RunCheckpoints
from sdpo_jax.models import LlamaForCausalLM, ModelConfig
from sdpo_jax.models.llama import init_params


def token_pair_run_flags(model: Path, sources: tuple, cache: Path, eval_fraction: float, every_steps: int) -> list[str]:
    """sdpo-train flags for a 2-stage `datasets` run of a tiny model on pre-tokenized pair files."""
    return [
        f"--config.model.path={model}",
        f"--config.data.train={sources!r}",
        "--config.data.limit=0",
        "--config.data.max_length=64",
        "--config.data.length_buckets=(64,)",
        "--config.data.max_prompt_length=32",
        "--config.train.batch_size=8",
        "--config.sdpo.partition=datasets",
        "--config.train.learning_rate=1e-3",
        f"--config.data.eval_fraction={eval_fraction}",
        f"--config.checkpoint.every_steps={every_steps}",
        f"--config.data.cache_dir={cache}",
        "--config.eval.prompts=()",
        "--config.eval.choices=",
        "--config.log.progress=never",
    ]


def stage_params(output_dir: Path, model_folder: Path, stage: int):
    """The host params of stage ``stage``'s snapshot in a run directory."""
    config = ModelConfig.from_pretrained(model_folder)
    abstract = jax.eval_shape(lambda: init_params(LlamaForCausalLM(config), jax.random.key(0)))
    checkpoints = RunCheckpoints(output_dir)
    params, _ = checkpoints.load_stage(stage, abstract)
    checkpoints.close()
    return jax.device_get(params)


def cpu_env(devices: int) -> dict:
    """This environment with `devices` fake CPU devices per process."""
    return {
        **{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_processes(flags: list[str]) -> list[subprocess.Popen]:
    """`sdpo-train FLAGS` as two processes x 4 CPU devices joined by jax.distributed on 127.0.0.1."""
    port = free_port()
    return [
        subprocess.Popen(
            [
                "sdpo-train",
                *flags,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num_processes",
                "2",
                "--process_id",
                str(i),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cpu_env(4),
        )
        for i in range(2)
    ]
