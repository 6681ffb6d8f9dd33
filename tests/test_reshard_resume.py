"""A run of two processes x 4 devices (8x1x1 mesh), preempted mid-stage on one host, resumes as one
process x 8 devices on a 2x2x2 mesh and ends where the uninterrupted one-process run ends.

SIGTERM reaches one process only; both agree to stop at the same step, save the mid-stage Orbax
checkpoint together and exit 143. The checkpoint (params, AdamW moments, step) is restored straight
into the new layout: `RunCheckpoints.restore_step` hands Orbax the abstract state with the new
mesh's shardings; the data position carries over because the batches do not depend on the number
of processes.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from batch_fixtures import write_token_pairs
from hf_fixtures import make_hf_checkpoint
from run_fixtures import cpu_env, stage_params, start_two_processes, token_pair_run_flags

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ENV = cpu_env(8)


def _train_rows(run) -> list[dict]:
    path = run / "metrics.jsonl"
    rows = map(json.loads, path.read_text().splitlines()) if path.exists() else []
    return [row for row in rows if row["split"] == "train"]


def test_mid_stage_checkpoint_of_two_processes_resumes_in_one_on_another_mesh(tmp_path):
    model = make_hf_checkpoint("llama2", tmp_path / "model")
    rng = np.random.default_rng(3)
    sources = tuple(write_token_pairs(tmp_path / f"{n}.jsonl", 64, rng) for n in ("a", "b"))
    flags = token_pair_run_flags(model, sources, tmp_path / "cache", eval_fraction=0.1, every_steps=2)
    baseline = subprocess.run(
        ["sdpo-train", *flags, f"--config.output_dir={tmp_path / 'baseline'}"],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert baseline.returncode == 0, baseline.stderr[-3000:]

    run = tmp_path / "run"
    first = start_two_processes([*flags, f"--config.output_dir={run}"])  # mesh data=-1: 8x1x1 over 2 processes
    deadline = time.time() + 400
    while not any(r["stage"] == 1 and r["step"] >= 2 for r in _train_rows(run)) and first[1].poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    first[1].send_signal(signal.SIGTERM)  # one host preempted
    for worker in first:
        _, stderr = worker.communicate(timeout=400)
        assert worker.returncode == 143, stderr[-3000:]  # both saved mid-stage at the same step boundary
    # The same command as one process on a 2x2x2 mesh: the mesh is among the fields a resume may change.
    second = subprocess.run(
        [
            "sdpo-train",
            *flags,
            f"--config.output_dir={run}",
            "--config.mesh.data=2",
            "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    step, steps = map(int, re.search(r"stage 1: resuming at step (\d+)/(\d+)", log).groups())
    assert 2 <= step < steps and "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in log

    ours, reference = _train_rows(run), _train_rows(tmp_path / "baseline")
    assert [(r["stage"], r["step"]) for r in ours] == [(r["stage"], r["step"]) for r in reference]
    np.testing.assert_allclose([r["loss"] for r in ours], [r["loss"] for r in reference], rtol=1e-5)
    for stage_ours, stage_reference in zip(
        *([stage_params(r, model, t) for t in (1, 2)] for r in (run, tmp_path / "baseline"))
    ):
        for a, b in zip(jax.tree_util.tree_leaves(stage_ours), jax.tree_util.tree_leaves(stage_reference)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
