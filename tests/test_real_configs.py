"""The real-model configs validate on their target device counts with sdpo-plan (no weights), and
configs that cannot run are refused with one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from configs import llama3_8b_instruct_sdpo, mistral_7b_instruct_sdpo, solar_10_7b_sdpo

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "solar_10_7b_sdpo": solar_10_7b_sdpo,
    "llama3_8b_instruct_sdpo": llama3_8b_instruct_sdpo,
    "mistral_7b_instruct_sdpo": mistral_7b_instruct_sdpo,
}
TARGETS = [(name, target) for name, module in CONFIGS.items() for target in module.TARGETS]


def _plan(config: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdpo_jax.cli.plan", f"--config=configs/{config}", *flags],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def _gib(stdout: str, item: str) -> float:
    return float(re.search(rf"^{re.escape(item)}\s+([\d.]+)", stdout, re.M).group(1))


@pytest.mark.parametrize("name, target", TARGETS)
def test_each_real_config_fits_its_target(name, target):
    config = CONFIGS[name].get_config(target)
    result = _plan(f"{name}.py:{target}")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert f"{config.hardware.devices} devices" in out and "train step traced and lowered" in out
    # The state rows are exact: 4 bytes per parameter each for params, 8 for the two moments, split over fsdp.
    params = _gib(out, "params (float32 master)")
    num_params = float(re.search(r" ([\d.]+)B \(", out).group(1)) * 1e9
    assert params == pytest.approx(num_params * 4 / config.mesh.fsdp / 2**30, abs=0.01)
    assert _gib(out, "optimizer (AdamW mu, nu)") == pytest.approx(2 * params, abs=0.02)
    assert _gib(out, "total (estimate)") < config.hardware.device_memory_gib


def test_a_mesh_that_does_not_split_the_heads_is_refused():
    # Llama-3-8B has 8 key/value heads: a tensor axis of 16 cannot split them.
    result = _plan(
        "llama3_8b_instruct_sdpo.py:8xh100", "--devices=16", "--config.mesh.fsdp=1", "--config.mesh.tensor=16"
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdpo-plan: error: mesh data=1 fsdp=1 tensor=16")
    assert "k_proj_kernel" in lines[0] and "dimension of 8" in lines[0]


def test_a_batch_that_does_not_split_over_the_devices_is_refused():
    result = _plan("mistral_7b_instruct_sdpo.py:v5litepod-64", "--config.train.grad_accum=4")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "sdpo-plan: error: train.batch_size: 128 pairs / grad_accum 4 = 32 per micro-batch, "
        "not a multiple of the 64 devices the batch splits over (dcn_data x data x fsdp)"
    ]


def test_too_little_memory_is_a_one_line_refusal():
    result = _plan("solar_10_7b_sdpo.py:8xh100", "--device_memory_gib=16")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert re.match(r"sdpo-plan: does not fit: [\d.]+ GiB per device \(estimate\) > 16.0 GiB \(largest ", lines[0])


def test_compiled_step_arguments_match_the_state_rows():
    """XLA's own argument bytes for the compiled step are the train state the budget counts (plus the batch),
    and XLA's whole per-device figure fits: activations stay split by rows over the fsdp axis
    (without the layers' activation sharding constraint this target compiled to 75 GiB > 72)."""
    result = _plan("mistral_7b_instruct_sdpo.py:8xh100", "--compile")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    total = float(re.search(r"total ([\d.]+) GiB; with the", out).group(1))
    assert total < 72.0
    argument = float(re.search(r"XLA \(CPU backend\) per device: argument ([\d.]+) GiB", out).group(1))
    state = _gib(out, "params (float32 master)") + _gib(out, "optimizer (AdamW mu, nu)")
    assert argument == pytest.approx(state, abs=0.02)


def test_multi_slice_mesh_is_planned_over_its_global_shape():
    # Two v5p-32 slices: data-parallel across slices, FSDP 16 inside each; 32 devices in all.
    result = _plan("solar_10_7b_sdpo.py:v5p-32", "--devices=32", "--config.mesh.dcn_data=2")
    assert (
        result.returncode == 2
        and "eval.choices_batch_size: 16 questions do not split over the 32 devices" in result.stderr
    )
    result = _plan(
        "solar_10_7b_sdpo.py:v5p-32", "--devices=32", "--config.mesh.dcn_data=2", "--config.eval.choices_batch_size=32"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mesh {'data': 2, 'fsdp': 16, 'tensor': 1} (dcn_data 2)" in result.stdout
