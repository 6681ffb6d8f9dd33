"""Two processes x 4 CPU devices (jax.distributed on 127.0.0.1) train exactly like one process x 8."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from run_fixtures import free_port

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SCRIPT = Path(__file__).with_name("multihost_step_script.py")


def _env():
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def test_two_processes_equal_one_process():
    single = subprocess.run(
        [sys.executable, str(SCRIPT), "single"], capture_output=True, text=True, timeout=300, env=_env()
    )
    assert single.returncode == 0, single.stderr[-3000:]
    port = str(free_port())
    workers = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(i), port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    one = json.loads(single.stdout.strip().splitlines()[-1])
    two = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert (one["process_count"], two["process_count"], two["devices"]) == (1, 2, 8)
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    np.testing.assert_allclose(two["params_sum_sq"], one["params_sum_sq"], rtol=1e-5)
    np.testing.assert_allclose(two["embed_checksum"], one["embed_checksum"], rtol=1e-5)
