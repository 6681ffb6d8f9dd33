"""A stranger's first commands: --help everywhere, one-line errors in seconds with nothing written, the
environment's errors told as such, a loss that climbs, checkpoint checksums, a full disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from sdpo_jax.checkpointing import tree_checksums
from sdpo_jax.cli.errors import user_errors
from sdpo_jax.divergence import LossWatch, first_non_finite
from sdpo_jax.errors import TrainingDiverged

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMMANDS = ["sdpo-train", "sdpo-eval", "sdpo-export", "sdpo-convert", "sdpo-choices", "sdpo-plan", "sdpo-report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = subprocess.run([str(BIN / command), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower() and len(result.stdout.splitlines()) >= 5, result.stdout
    if command == "sdpo-train":
        assert (
            "docs/config.md" in result.stdout
            and "--show_config" in result.stdout
            and "--config.FIELD=VALUE" in result.stdout
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config.train.batchsize=4"],
            "--config.train.batchsize=4: unknown config field 'train.batchsize'; did you mean 'train.batch_size'?",
        ),
        (
            ["--config.train.batch_size=abc"],
            "--config.train.batch_size=abc: invalid literal for int() with base 10: 'abc'",
        ),
        (["--config=no/such/config.py"], "--config no/such/config.py: no such config file"),
        (
            ["--config", "configs/llama3_8b_instruct_sdpo.py:v9"],
            "ValueError: config argument 'v9' is not one of ['8xh100', 'v4-32']",
        ),
        (["--config.checkpoint.every_steps=0"], "checkpoint.every_steps: must be >= 1, got 0"),
        (["--config.train.batch_size=-4"], "train.batch_size: must be >= 1, got -4"),
        (["--config.train.learning_rate=-1"], "train.learning_rate: must be > 0, got -1"),
        (["--config.sdpo.stage_overrides=('7:dpo.beta=0.2',)"], "stage 7 does not exist (sdpo.num_stages is 2)"),
        (
            ["--config.sdpo.stage_overrides=('2:dpo.beta=abc',)"],
            "stage 2: dpo.beta: expected a number, got string 'abc'",
        ),
        (["--num_proceses=2"], "Unknown command line flag 'num_proceses'"),
        (["train"], "unexpected arguments: train"),
    ],
)
def test_a_bad_command_line_fails_in_seconds_and_writes_nothing(tmp_path, args, message):
    run = tmp_path / "run"
    started = time.perf_counter()
    result = subprocess.run(
        [str(BIN / "sdpo-train"), f"--config.output_dir={run}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    elapsed = time.perf_counter() - started
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("sdpo-train: error: ") and message in lines[0], lines[0]
    assert not run.exists() and not (tmp_path / "runs").exists()
    assert elapsed < 30, elapsed  # (a few seconds on an idle machine: no model is loaded, no data read)


def test_show_config_checks_and_lists_every_field(tmp_path):
    result = subprocess.run(
        [
            str(BIN / "sdpo-train"),
            "--config",
            "configs/tiny.py",
            "--config.train.seed=7",
            "--show_config",
            f"--config.output_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "train.seed = 7" in lines and "model.path = 'tiny-random-llama'" in lines and len(lines) > 60
    assert not (tmp_path / "run").exists()


def test_a_missing_package_is_named_not_counted_as_bad_records(tmp_path):
    """Without jinja2 (transformers' chat templates need it) a conversational source is not 'no valid
    pairs (48 skipped)': the run stops at once naming the package."""
    script = (
        "import sys; sys.modules['jinja2'] = None\n"
        "from sdpo_jax.cli.train import main\n"
        f"main(['sdpo-train', '--config', 'configs/tiny.py', '--config.output_dir={tmp_path / 'run'}',"
        f" '--config.data.cache_dir={tmp_path / 'cache'}', '--config.eval.prompts=()', '--config.eval.choices='])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert lines[-1].startswith("sdpo-train: error: a required package is missing: import of jinja2 halted"), lines[-1]
    assert "skipped" not in result.stderr and "Traceback" not in result.stderr


def test_environment_errors_are_one_line_and_bugs_keep_their_traceback(capsys, tmp_path):
    with pytest.raises(SystemExit) as info, user_errors("sdpo-x"):
        open(tmp_path / "missing" / "file.jsonl", encoding="utf-8")
    assert info.value.code == 2
    assert (
        capsys.readouterr().err
        == f"sdpo-x: error: [Errno 2] No such file or directory: '{tmp_path / 'missing' / 'file.jsonl'}'\n"
    )
    with pytest.raises(SystemExit), user_errors("sdpo-x"):
        raise PermissionError(13, "Permission denied", "/data/pairs.jsonl")
    assert capsys.readouterr().err == "sdpo-x: error: [Errno 13] Permission denied: '/data/pairs.jsonl'\n"
    with pytest.raises(SystemExit) as info, user_errors("sdpo-x"):
        raise KeyError("a bug")
    err = capsys.readouterr().err
    assert info.value.code == 70 and err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1] == (
        "sdpo-x: internal error: this is a bug in sdpo_jax, please report it with the "
        "traceback above (KeyError: 'a bug')"
    )


def test_a_local_source_that_is_not_a_readable_file_is_a_config_error(tmp_path):
    from configs.default import get_config
    from sdpo_jax.config_check import check_config
    from sdpo_jax.errors import ConfigError

    (tmp_path / "pairs.jsonl").mkdir()
    config = get_config()
    config.data.train = (str(tmp_path / "pairs.jsonl"),)
    with pytest.raises(ConfigError, match=r"data.train: \[0\] '.*pairs.jsonl': not a file"):
        check_config(config, device_count=1)


def test_the_loss_watch_stops_at_non_finite_and_warns_once_on_a_climb():
    warnings = []
    watch = LossWatch(2, "train.learning_rate 10", warnings.append)
    for step, loss in enumerate([0.69, 0.71, 3.0, 25507.0, 30000.0], start=1):
        watch.observe(step, {"loss": loss, "grad_norm": 1.0})
    assert warnings == [
        "warning: stage 2 step 4: loss 2.551e+04 is far above its first value 0.69; training may be "
        "diverging (train.learning_rate 10)"
    ]
    with pytest.raises(
        TrainingDiverged, match=r"^stage 2 step 6: the loss is 0.5 and the gradient norm inf: training diverged"
    ):
        watch.observe(6, {"loss": 0.5, "grad_norm": float("inf")})
    watch.check()  # nothing tracked yet
    for step, loss in ((7, 0.5), (8, np.nan), (9, np.inf)):  # folded on the device, read at check()
        watch.track(step, {"loss": jnp.float32(loss), "grad_norm": jnp.float32(1.0)})
    with pytest.raises(TrainingDiverged, match="stage 2 step 8: the loss is nan and the gradient norm 1.0"):
        watch.check()
    resumed = LossWatch(2, "lr", warnings.append, first_loss=0.69)
    resumed.observe(30, {"loss": 9.0, "grad_norm": 1.0})  # the baseline is the stage's first step, not the resume's
    assert warnings[-1].startswith("warning: stage 2 step 30: loss 9 is far above its first value 0.69")


def test_first_non_finite_names_the_leaf():
    params = {"a": jnp.ones(3), "b": {"c": jnp.array([1.0, np.inf]), "d": jnp.arange(3)}}
    assert first_non_finite(params) == "['b']['c']"
    assert first_non_finite({"a": jnp.ones(3)}) is None


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint8])
def test_checksums_see_every_single_flipped_bit(dtype):
    x = np.asarray(jnp.asarray(np.random.default_rng(0).normal(size=24) * 5).astype(dtype))
    reference = tree_checksums({"x": x})
    bits = x.view(np.uint8)
    for position in range(bits.size * 8):
        flipped = bits.copy()
        flipped[position // 8] ^= 1 << (position % 8)
        assert tree_checksums({"x": flipped.view(x.dtype)}) != reference, position
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert swapped[0] == swapped[1] or tree_checksums({"x": swapped}) != reference


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_resumes(tmp_path):
    """The tiny smoke config on a 12 MiB file system: the first mid-stage checkpoint does not fit; one line,
    exit 2; with room again the same command finishes. (Needs permission to mount a tmpfs.)"""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root in a container that allows it)")
    try:
        command = [
            str(BIN / "sdpo-train"),
            "--config",
            "configs/tiny.py",
            f"--config.output_dir={mount / 'run'}",
            "--config.checkpoint.every_steps=1",
            f"--config.data.cache_dir={tmp_path / 'cache'}",
            "--config.eval.prompts=()",
            "--config.eval.choices=",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert lines[-1].startswith(
            "sdpo-train: error: [Errno 28] no space left for the checkpoint of stage 1 step 1: it needs ~"
        )
        subprocess.run(["mount", "-o", "remount,size=200m", str(mount)], check=True)
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(json.loads((mount / "run" / "stage_report.json").read_text())["stages"]) == 2
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
        assert os.path.ismount(mount) is False


def test_resume_compares_what_changes_the_result():
    """A moved run folder (output_dir) or a new field the stored config predates (at its default) does not block
    a resume; a changed seed does."""
    from configs.default import get_config
    from sdpo_jax.errors import ConfigError
    from sdpo_jax.stages import check_resume_config

    stored, current = get_config().to_dict(), get_config().to_dict()
    stored["output_dir"] = "/old/place/run"
    del stored["checkpoint"]["keep_stages"], stored["dpo"]["ld_alpha"]
    check_resume_config(stored, current, force=False)
    current["train"]["seed"] = 5
    with pytest.raises(ConfigError, match=r"the config differs .*\(train.seed: 0 -> 5\)"):
        check_resume_config(stored, current, force=False)
    current["train"]["seed"], current["dpo"]["ld_alpha"] = 0, 0.5
    with pytest.raises(ConfigError, match=r"dpo.ld_alpha: 1.0 -> 0.5"):
        check_resume_config(stored, current, force=False)


SHARDED_CHECKSUM = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sdpo_jax.checkpointing import _checksums, tree_checksums
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
x = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
tree = {"x": jax.device_put(x, NamedSharding(mesh, P("a", "b"))),
        "y": jax.device_put(x[:8], NamedSharding(mesh, P(None, "b")))}
assert tree_checksums(tree) == tree_checksums({"x": x, "y": x[:8]}), "layout changed the checksums"
hlo = _checksums.lower(tree).compile().as_text()
assert "all-gather" not in hlo, "an array was gathered whole onto a device"
print("ok")
"""


def test_checksums_of_sharded_arrays_equal_the_whole_arrays_and_gather_nothing():
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_CHECKSUM], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_library_messages_reach_the_run_console_whatever_the_root_level(tmp_path, capsys):
    """absl (under sdpo-train) sets Python's root logger to FATAL; the data loader's truncation and drop
    lines and the reward model's warnings still reach the run's console while the run is open."""
    import logging

    from sdpo_jax.run_log import RunLog

    root_level = logging.root.level
    logging.root.setLevel(logging.FATAL)
    try:
        log = RunLog(tmp_path)
        with log.library_messages():
            logging.getLogger("sdpo_jax.data").info("truncated %d prompt(s)", 3)
            logging.getLogger("sdpo_jax.reward").warning("reward model: 2 of 8 texts were longer")
        logging.getLogger("sdpo_jax.data").info("after the run")
    finally:
        logging.root.setLevel(root_level)
    err = capsys.readouterr().err
    assert "s] truncated 3 prompt(s)" in err and "s] warning: reward model: 2 of 8 texts were longer" in err
    assert "after the run" not in err
    assert logging.getLogger("sdpo_jax").handlers == [] and logging.getLogger("sdpo_jax").propagate
