"""launch/tpu.sh and launch/gpu.sh: the --dry-run command listings, flag errors, shell lint.

The scripts run through subprocess with a fake `gcloud`, `srun` and `sdpo-train` first on PATH
that record any call: a dry run must print every command and run none of them.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu.sh"
GPU = REPO / "launch" / "gpu.sh"
SBATCH = REPO / "launch" / "slurm_gpu.sbatch"
CONFIG = "configs/default.py"
LAUNCH_ENV_PREFIXES = ("TPU_", "GCP_", "SDPO_", "GPU_", "SLURM_", "SRUN_")
LAUNCH_ENV_NAMES = {"DRY_RUN", "LOG_DIR", "RUN_NAME", "CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_MEM_FRACTION"}


@pytest.fixture
def env(tmp_path):
    """A clean environment whose PATH starts with recording stubs of the remote tools."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    for tool in ("gcloud", "srun", "sdpo-train"):
        stub = bindir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\nexit 97\n')
        stub.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_ENV_PREFIXES) and k not in LAUNCH_ENV_NAMES}
    clean["PATH"] = f"{bindir}{os.pathsep}{os.environ['PATH']}"
    clean["TMPDIR"] = str(tmp_path)
    yield clean
    assert not calls.exists(), f"a dry run executed: {calls.read_text()}"


def launch(script, args, env, extra_env=None, cwd=None):
    return subprocess.run(
        ["bash", str(script), *args],
        env={**env, **(extra_env or {})},
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


def parse(line):
    """A printed command line -> (argv, tee target or None); also proves it is valid shell."""
    toks = shlex.split(line)
    if "|" not in toks:
        return toks, None
    bar = toks.index("|")
    assert toks[bar - 1] == "2>&1" and toks[bar + 1 : bar + 3] == ["tee", "-a"], line
    assert len(toks) == bar + 4, line
    return toks[: bar - 1], toks[bar + 3]


def dry(script, args, env, **kw):
    """Run a dry run; return (commands as (argv, log) pairs, comment lines)."""
    proc = launch(script, ["--dry-run", *args], env, **kw)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return ([parse(ln) for ln in lines if not ln.startswith("#")], [ln for ln in lines if ln.startswith("#")])


def flag(argv, name):
    """The value of --name=VALUE in argv (asserting it appears exactly once)."""
    vals = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(vals) == 1, (name, argv)
    return vals[0]


def gcloud(cmds, *sub):
    """Indices and argvs of the gcloud calls whose subcommand path starts with `sub`."""
    n = len(sub)
    return [(i, argv) for i, (argv, _) in enumerate(cmds) if argv[:1] == ["gcloud"] and tuple(argv[1 : 1 + n]) == sub]


TPU_BASE = [
    "--name",
    "sdpo-a",
    "--zone",
    "us-central2-b",
    "--project",
    "proj-1",
    "--config",
    CONFIG,
    "--output-dir",
    "gs://bkt/runs/a",
]
VM = ("compute", "tpus", "tpu-vm")
QR = ("compute", "tpus", "queued-resources")


def gcsfuse_mounts(cmds):
    """(index, argv) of each `gcsfuse FLAGS... BUCKET DIR` in the workers' ssh commands."""
    found = []
    for i, argv in gcloud(cmds, *VM, "ssh"):
        remote = [t.rstrip(";") for t in shlex.split(flag(argv, "command"))]
        for j, tok in enumerate(remote):
            if tok == "gcsfuse" and remote[j + 1].startswith("--"):
                k = next(k for k in range(j + 1, len(remote)) if not remote[k].startswith("--"))
                found.append((i, remote[j : k + 2]))
    return found


def check_tpu_run(
    cmds,
    workers,
    name="sdpo-a",
    zone="us-central2-b",
    project="proj-1",
    log_dir=None,
    overrides=(),
    install=True,
    output_dir="$HOME/gcs/bkt/runs/a",
    bucket="bkt",
):
    """The parts every tpu.sh run has: copy, install, mount a bucket run folder, train on all
    workers, per-worker logs. `output_dir` is what sdpo-train gets, as the worker's shell sees it
    ($HOME unexpanded); `bucket` is the one mounted (None: nothing is mounted)."""
    log_dir = log_dir or f"logs/{name}"
    for _, argv in gcloud(cmds):  # zone and project on every gcloud call, never prompting
        assert flag(argv, "zone") == zone and flag(argv, "project") == project, argv
        assert "--quiet" in argv, argv
    ssh = gcloud(cmds, *VM, "ssh")
    scp = gcloud(cmds, *VM, "scp")
    # install: git archive -> scp to all workers -> pip install -e . with jax[tpu] everywhere
    archive = [i for i, (argv, _) in enumerate(cmds) if argv[:1] == ["git"]]
    if install:
        assert len(archive) == 1
        tarball = cmds[archive[0]][0][cmds[archive[0]][0].index("-o") + 1]
        assert cmds[archive[0]][0][-1] == "HEAD"
        up = [(i, a) for i, a in scp if a[5] == tarball]
        assert len(up) == 1 and flag(up[0][1], "worker") == "all"
        assert up[0][1][6] == f"{name}:sdpo_jax.tar.gz"
        setup_i, setup = ssh[0]
        assert setup[5] == name and flag(setup, "worker") == "all"
        remote = [t.rstrip(";") for t in shlex.split(flag(setup, "command"))]
        assert "jax[tpu]" in remote and "-e" in remote and "install" in remote
        assert archive[0] < up[0][0] < setup_i
    else:
        assert not archive and len(ssh) == 1 + (bucket is not None)  # [mount,] train
    # mount: once per run, on every worker, before training: in the install step, or on its own
    mounts = gcsfuse_mounts(cmds)
    if bucket is None:
        assert not mounts
    else:
        ((mount_i, mount),) = mounts
        assert mount_i == ssh[0][0] and flag(ssh[0][1], "worker") == "all"
        assert "--implicit-dirs" in mount and int(flag(mount, "rename-dir-limit")) > 0
        assert mount[-2:] == [bucket, f"$HOME/gcs/{bucket}"]
    # train: the same sdpo-train line on every worker, its output into a per-worker log file
    train_i, train = ssh[-1]
    assert train[5] == name and flag(train, "worker") == "all"
    assert cmds[train_i][1] == f"{log_dir}/launcher.log"
    remote = shlex.split(flag(train, "command"))
    st = next(i for i, t in enumerate(remote) if t.endswith("/sdpo-train"))
    assert remote[st + 1 : st + 3] == ["--config", CONFIG]
    assert remote[st + 3] == f"--config.output_dir={output_dir}"
    assert remote[st + 4 : st + 4 + len(overrides)] == list(overrides)
    assert remote[st + 4 + len(overrides)] == ">"  # stdout to sdpo_logs/<name>.log on the worker
    assert remote[st + 5 + len(overrides)] == f"../sdpo_logs/{name}.log"
    # gather: one scp per worker, worker i -> LOG_DIR/worker-i.log, after training
    back = [(i, a) for i, a in scp if a[5].startswith(f"{name}:")]
    assert [flag(a, "worker") for _, a in back] == [str(w) for w in range(workers)]
    assert [a[5:7] for _, a in back] == [
        [f"{name}:sdpo_logs/{name}.log", f"{log_dir}/worker-{w}.log"] for w in range(workers)
    ]
    assert all(i > train_i for i, _ in back)
    mkdir = [i for i, (argv, _) in enumerate(cmds) if argv == ["mkdir", "-p", log_dir]]
    assert len(mkdir) == 1 and mkdir[0] < train_i
    return train_i, back[-1][0]


def test_tpu_create_and_run(env):
    cmds, _ = dry(
        TPU, [*TPU_BASE, "--type", "v4-32", "--extra", "--config.train.learning_rate=1e-6 --config.seed=3"], env
    )
    create = gcloud(cmds, *VM, "create")
    assert len(create) == 1
    ci, argv = create[0]
    assert argv[5] == "sdpo-a"
    assert flag(argv, "accelerator-type") == "v4-32"
    assert flag(argv, "version") == "tpu-ubuntu2204-base"
    assert "--spot" not in argv and "--preemptible" not in argv
    wait = gcloud(cmds, *VM, "describe")
    assert len(wait) == 1 and flag(wait[0][1], "format") == "value(state)" and wait[0][0] > ci
    train_i, _ = check_tpu_run(cmds, workers=4, overrides=("--config.train.learning_rate=1e-6", "--config.seed=3"))
    assert wait[0][0] < train_i
    assert not gcloud(cmds, *VM, "delete") and not gcloud(cmds, *QR)


def test_tpu_reuse_skips_create(env):
    cmds, comments = dry(TPU, [*TPU_BASE, "--type", "v5p-64", "--reuse", "--preemptible"], env)
    assert not gcloud(cmds, *VM, "create")
    describe = gcloud(cmds, *VM, "describe")
    assert len(describe) == 2  # the existence check, then the READY poll
    assert any("--reuse" in c for c in comments)
    check_tpu_run(cmds, workers=8)


def test_tpu_queued_spot(env):
    cmds, _ = dry(TPU, [*TPU_BASE, "--type", "v5litepod-16", "--queued", "--spot"], env)
    assert not gcloud(cmds, *VM, "create")
    ((ci, argv),) = gcloud(cmds, *QR, "create")
    assert argv[5] == "sdpo-a" and flag(argv, "node-id") == "sdpo-a"
    assert flag(argv, "accelerator-type") == "v5litepod-16"
    assert flag(argv, "runtime-version") == "v2-alpha-tpuv5-lite"
    assert "--spot" in argv and "--preemptible" not in argv
    ((wi, wait),) = gcloud(cmds, *QR, "describe")
    assert flag(wait, "format") == "value(state.state)" and wi > ci
    train_i, _ = check_tpu_run(cmds, workers=4)
    assert wi < train_i


@pytest.mark.parametrize("queued", [False, True])
def test_tpu_delete_after(env, queued):
    args = [*TPU_BASE, "--type", "v4-8", "--delete-after", "--spot"] + (["--queued"] if queued else [])
    cmds, _ = dry(TPU, args, env)
    _, last_gather = check_tpu_run(cmds, workers=1)
    api = QR if queued else VM
    ((di, argv),) = gcloud(cmds, *api, "delete")
    assert argv[5] == "sdpo-a" and di == len(cmds) - 1 and di > last_gather
    assert ("--force" in argv) == queued  # a queued resource is deleted with its node
    create = gcloud(cmds, *api, "create")[0][1]
    assert "--spot" in create


def test_tpu_env_vars_equal_flags(env, tmp_path):
    flags = [
        *TPU_BASE,
        "--type",
        "v5litepod-8",
        "--spot",
        "--queued",
        "--delete-after",
        "--extra",
        "--config.seed=1",
        "--log-dir",
        str(tmp_path / "L"),
    ]
    by_env = {
        "TPU_NAME": "sdpo-a",
        "TPU_ZONE": "us-central2-b",
        "GCP_PROJECT": "proj-1",
        "SDPO_CONFIG": CONFIG,
        "SDPO_OUTPUT_DIR": "gs://bkt/runs/a",
        "TPU_TYPE": "v5litepod-8",
        "TPU_SPOT": "1",
        "TPU_QUEUED": "1",
        "TPU_DELETE_AFTER": "1",
        "SDPO_EXTRA": "--config.seed=1",
        "LOG_DIR": str(tmp_path / "L"),
        "DRY_RUN": "1",
    }
    a = launch(TPU, ["--dry-run", *flags], env)
    b = launch(TPU, [], env, extra_env=by_env)
    assert a.returncode == b.returncode == 0, (a.stderr, b.stderr)
    assert a.stdout == b.stdout
    check_tpu_run(dry(TPU, flags, env)[0], workers=1, log_dir=str(tmp_path / "L"), overrides=("--config.seed=1",))


def test_tpu_passthrough_args_survive_two_shells(env):
    """Args after -- keep spaces and quotes through the local and the worker's shell."""
    odd = "--config.run_note=it's a b"
    cmds, _ = dry(TPU, [*TPU_BASE, "--type", "v4-8", "--no-install", "--", odd], env)
    check_tpu_run(cmds, workers=1, overrides=(odd,), install=False)


def test_tpu_worker_command_runs_in_a_shell(env, tmp_path):
    """The --command string a worker's shell runs: cwd, argv, log file, tail and status on failure."""
    odd = "--config.run_note=it's a b"
    cmds, _ = dry(TPU, [*TPU_BASE, "--type", "v4-8", "--no-install", "--extra", "--config.x=1", "--", odd], env)
    remote = flag(gcloud(cmds, *VM, "ssh")[-1][1], "command")
    home = tmp_path / "home"
    (home / "sdpo_jax").mkdir(parents=True)
    (home / "sdpo_venv" / "bin").mkdir(parents=True)
    trainer = home / "sdpo_venv" / "bin" / "sdpo-train"
    trainer.write_text('#!/bin/sh\npwd\nprintf "%s\\n" "$@"\nexit 4\n')
    trainer.chmod(0o755)
    proc = subprocess.run(
        ["bash", "-c", remote], cwd=home, capture_output=True, text=True, env={**env, "HOME": str(home)}, timeout=30
    )
    assert proc.returncode == 4
    log = (home / "sdpo_logs" / "sdpo-a.log").read_text().splitlines()
    assert log == [
        str(home / "sdpo_jax"),
        "--config",
        CONFIG,
        f"--config.output_dir={home}/gcs/bkt/runs/a",
        "--config.x=1",
        odd,
    ]
    assert proc.stdout.splitlines() == log  # the tail of the log on failure


@pytest.mark.parametrize(
    "output_dir,worker_dir,bucket",
    [
        ("gs://bkt", "$HOME/gcs/bkt", "bkt"),
        ("gs://my.bkt_2/runs/a b/", "$HOME/gcs/my.bkt_2/runs/a b", "my.bkt_2"),
        ("/mnt/shared/runs/a", "/mnt/shared/runs/a", None),
    ],
)
@pytest.mark.parametrize("install", [True, False])
def test_tpu_output_dir_mount(env, output_dir, worker_dir, bucket, install):
    """A gs:// run folder is mounted once per run and sdpo-train gets the mounted path; an
    absolute worker path is passed unchanged, with nothing mounted and a warning."""
    args = [*TPU_BASE, "--type", "v4-16", "--output-dir", output_dir] + ([] if install else ["--no-install"])
    proc = launch(TPU, ["--dry-run", *args], env)
    assert proc.returncode == 0, proc.stderr
    cmds, comments = dry(TPU, args, env)
    check_tpu_run(cmds, workers=2, install=install, output_dir=worker_dir, bucket=bucket)
    assert ("gcsfuse" in proc.stdout) == (bucket is not None)
    assert any("is not gs://" in c for c in comments) == (bucket is None)


FAKE_MOUNT_TOOLS = {  # the system tools the mount command calls, recording into $FAKE/calls
    "sudo": r"""echo "sudo $*" >> "$FAKE/calls"
case "$*" in
  "tee "*) cat > "$FAKE/$(basename "$2")" ;;
  *"apt-get install"*)
    printf '#!/bin/sh\necho "gcsfuse $*" >> "$FAKE/calls"\ntouch "$FAKE/mounted"\n' > "$FAKE/bin/gcsfuse"
    chmod +x "$FAKE/bin/gcsfuse" ;;
esac
""",
    "lsb_release": "echo jammy\n",
    "curl": 'echo "$*" > "$FAKE/curl_args"; echo KEY\n',  # runs alongside `sudo tee`: own file
    "mountpoint": 'echo "mountpoint $*" >> "$FAKE/calls"; [ -e "$FAKE/mounted" ]\n',
}


def test_tpu_mount_command_installs_once_and_is_idempotent(env, tmp_path):
    """The worker-side mount command, run twice: the first run adds Google's apt repository,
    installs gcsfuse, mounts and makes the run folder; the second finds both and only checks."""
    cmds, _ = dry(TPU, [*TPU_BASE, "--type", "v4-8", "--no-install"], env)
    mount_cmd = flag(gcloud(cmds, *VM, "ssh")[0][1], "command")
    fake, home = tmp_path / "fake", tmp_path / "home"
    (fake / "bin").mkdir(parents=True)
    home.mkdir()
    for tool, body in FAKE_MOUNT_TOOLS.items():
        (fake / "bin" / tool).write_text("#!/bin/sh\n" + body)
        (fake / "bin" / tool).chmod(0o755)
    run_env = {**env, "HOME": str(home), "FAKE": str(fake), "PATH": f"{fake / 'bin'}{os.pathsep}{env['PATH']}"}
    first = subprocess.run(["bash", "-c", mount_cmd], cwd=home, env=run_env, capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stderr
    calls = (fake / "calls").read_text().splitlines()
    mnt = home / "gcs" / "bkt"
    assert calls == [
        "sudo tee /etc/apt/sources.list.d/gcsfuse.list",
        "sudo tee /usr/share/keyrings/cloud.google.asc",
        "sudo apt-get update -q",
        "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 gcsfuse",
        f"mountpoint -q {mnt}",
        f"gcsfuse --implicit-dirs --rename-dir-limit=1000000 bkt {mnt}",
    ]
    assert (fake / "gcsfuse.list").read_text() == (
        "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt "
        "gcsfuse-jammy main\n"
    )
    assert (fake / "curl_args").read_text() == "-fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg\n"
    assert (fake / "cloud.google.asc").read_text() == "KEY\n"
    assert (mnt / "runs" / "a").is_dir()
    (fake / "calls").unlink()
    again = subprocess.run(["bash", "-c", mount_cmd], cwd=home, env=run_env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 0, again.stderr
    assert (fake / "calls").read_text().splitlines() == [f"mountpoint -q {mnt}"]


@pytest.mark.parametrize(
    "acc_type,hosts",
    [
        ("v2-8", 1),
        ("v3-32", 4),
        ("v4-8", 1),
        ("v4-32", 4),
        ("v4-128", 16),
        ("v5p-8", 1),
        ("v5p-64", 8),
        ("v5litepod-1", 1),
        ("v5litepod-8", 1),
        ("v5litepod-16", 4),
        ("v5litepod-256", 64),
        ("v6e-4", 1),
        ("v6e-16", 4),
        ("v6e-256", 64),
    ],
)
def test_tpu_worker_count_from_type(env, acc_type, hosts):
    cmds, comments = dry(TPU, [*TPU_BASE, "--type", acc_type, "--reuse"], env)
    back = [a for _, a in gcloud(cmds, *VM, "scp") if a[6].endswith(".log")]
    assert len(back) == hosts
    assert f"({hosts} worker(s))" in comments[0]


def test_tpu_num_workers_override_and_version(env):
    cmds, _ = dry(TPU, [*TPU_BASE, "--type", "tpu7x-32", "--num-workers", "8", "--version", "v2-alpha-tpu7x"], env)
    assert flag(gcloud(cmds, *VM, "create")[0][1], "version") == "v2-alpha-tpu7x"
    check_tpu_run(cmds, workers=8)


def _without(args, name):
    i = args.index(name)
    return args[:i] + args[i + 2 :]


@pytest.mark.parametrize(
    "args,needle",
    [
        (_without([*TPU_BASE, "--type", "v4-8"], "--name"), "--name"),
        (_without([*TPU_BASE, "--type", "v4-8"], "--zone"), "--zone"),
        (_without([*TPU_BASE, "--type", "v4-8"], "--project"), "--project"),
        (TPU_BASE, "--type"),
        (_without([*TPU_BASE, "--type", "v4-8"], "--config"), "--config"),
        (_without([*TPU_BASE, "--type", "v4-8"], "--output-dir"), "--output-dir"),
        ([*TPU_BASE, "--type", "v4-8", "--zone"], "--zone needs a value"),
        ([*TPU_BASE, "--type", "v9-8"], "unknown accelerator type"),
        ([*TPU_BASE, "--type", "v4-12"], "unknown accelerator type"),
        ([*TPU_BASE, "--type", "v4-8", "--queued", "--preemptible"], "--spot"),
        ([*TPU_BASE, "--type", "v4-8", "--spot", "--preemptible"], "exclusive"),
        ([*TPU_BASE, "--type", "v4-8", "--bogus"], "--bogus"),
        ([*TPU_BASE, "--type", "v4-8", "--config", "configs/missing.py"], "configs/missing.py"),
        ([*TPU_BASE, "--type", "v4-8", "--output-dir", "runs/a"], "--output-dir"),
        ([*TPU_BASE, "--type", "v4-8", "--output-dir", "gs://Bkt/runs/a"], "not a bucket name"),
        ([*TPU_BASE, "--type", "v4-8", "--output-dir", "gs:///runs/a"], "not a bucket name"),
        ([*TPU_BASE, "--type", "v4-8", "--name", "Bad_Name"], "--name"),
    ],
)
def test_tpu_usage_errors(env, args, needle):
    proc = launch(TPU, ["--dry-run", *args], env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tpu.sh: error:") and needle in err[0], proc.stderr


def test_tpu_dry_run_prints_gcloud_free(env):
    """Dry run works without any gcloud: PATH holds only bash's own tools and git."""
    bare = Path(env["TMPDIR"]) / "bare"
    bare.mkdir()
    for tool in ("bash", "git", "dirname", "cat"):
        found = shutil.which(tool)
        if found:
            (bare / tool).symlink_to(found)
    proc = launch(TPU, ["--dry-run", *TPU_BASE, "--type", "v4-8"], {**env, "PATH": str(bare)})
    assert proc.returncode == 0, proc.stderr
    assert "gcloud compute tpus tpu-vm create" in proc.stdout


# ---- tpu.sh without --dry-run, against a scripted fake gcloud ---------------------------------

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records each call, answers describe from $FAKE/states (one line per call), fails sdpo-train.
printf '%s\n' "$*" >> "$FAKE/gcloud_calls"
args="$*"
case $args in
  *describe*networkEndpoints.len*) echo "${FAKE_WORKERS:-1}" ;;
  *describe*)
    state=$(head -n 1 "$FAKE/states"); sed -i 1d "$FAKE/states"
    [[ $state == MISSING ]] && { echo "ERROR: NOT_FOUND" >&2; exit 1; }
    echo "$state" ;;
  *ssh*sdpo-train*) echo "training output"; exit "${FAKE_TRAIN_RC:-0}" ;;
  *scp*--worker=all*) ;;
  *scp*) dest=$6; echo "log of $dest" > "$dest" ;;
esac
"""


def fake_tpu(env, tmp_path, states, **extra):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "states").write_text("".join(f"{s}\n" for s in states))
    gc = fake / "gcloud"
    gc.write_text(FAKE_GCLOUD)
    gc.chmod(0o755)
    run_env = {
        **env,
        "PATH": f"{fake}{os.pathsep}{env['PATH']}",
        "FAKE": str(fake),
        **{k: str(v) for k, v in extra.items()},
    }
    return fake, run_env


def test_tpu_real_flow_reuse_preempted_spot(env, tmp_path):
    """--reuse on a PREEMPTED node: delete, recreate, poll to READY, train (fails), gather, delete."""
    fake, run_env = fake_tpu(env, tmp_path, ["PREEMPTED", "CREATING", "READY"], FAKE_WORKERS=2, FAKE_TRAIN_RC=3)
    proc = subprocess.run(
        ["bash", str(TPU), *TPU_BASE, "--type", "v4-16", "--spot", "--reuse", "--delete-after", "--poll", "1"],
        env=run_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 3, proc.stderr  # sdpo-train's status comes back
    calls = (fake / "gcloud_calls").read_text().splitlines()
    verbs = [c.split()[3] for c in calls]
    assert verbs == [
        "describe",
        "delete",
        "create",
        "describe",
        "describe",
        "describe",
        "scp",
        "ssh",
        "ssh",
        "scp",
        "scp",
        "delete",
    ]
    assert "--spot" in calls[2] and "--worker=all" in calls[7] and "--worker=all" in calls[8]
    assert "--worker=0" in calls[9] and "--worker=1" in calls[10]
    logs = tmp_path / "logs" / "sdpo-a"
    assert sorted(p.name for p in logs.iterdir()) == ["launcher.log", "worker-0.log", "worker-1.log"]
    assert "training output" in (logs / "launcher.log").read_text()
    assert (tmp_path / "sdpo_jax-sdpo-a.tar.gz").stat().st_size > 0  # the git archive
    assert "sdpo-a is PREEMPTED: deleting and recreating it" in proc.stderr


def test_tpu_real_flow_reuse_healthy_queued(env, tmp_path):
    """--reuse --queued on an ACTIVE queued resource: no create; an unknown type uses the node's count."""
    fake, run_env = fake_tpu(env, tmp_path, ["ACTIVE", "ACTIVE"], FAKE_WORKERS=3)
    proc = subprocess.run(
        ["bash", str(TPU), *TPU_BASE, "--type", "v4-8", "--queued", "--reuse", "--no-install"],
        env=run_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    calls = (fake / "gcloud_calls").read_text().splitlines()
    assert [c.split()[2:4] for c in calls] == [
        ["queued-resources", "describe"],
        ["queued-resources", "describe"],
        ["tpu-vm", "describe"],
        ["tpu-vm", "ssh"],
        ["tpu-vm", "ssh"],
        ["tpu-vm", "scp"],
        ["tpu-vm", "scp"],
        ["tpu-vm", "scp"],
    ]
    assert "gcsfuse --implicit-dirs" in calls[3] and "sdpo-train" in calls[4]  # mount, then train
    assert "has 3 workers (expected 1" in proc.stderr
    assert len(list((tmp_path / "logs" / "sdpo-a").glob("worker-*.log"))) == 3


# ---- gpu.sh ----------------------------------------------------------------------------------


def train_argv(argv):
    st = argv.index("sdpo-train")
    assert argv[:st][0] == "env" or "env" in argv[:st]
    envs = dict(a.split("=", 1) for a in argv[argv.index("env") + 1 : st])
    return envs, argv[st:]


def test_gpu_single_node(env):
    cmds, _ = dry(
        GPU,
        [
            "--config",
            CONFIG,
            "--gpus",
            "0,1,2,3",
            "--output-dir",
            "/ckpt/a",
            "--extra",
            "--config.seed=2",
            "--",
            "--config.run_note=a b",
        ],
        env,
    )
    assert cmds[0] == (["mkdir", "-p", "logs/sdpo"], None)
    ((argv, log),) = cmds[1:]
    envs, train = train_argv(argv)
    assert envs == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert train == [
        "sdpo-train",
        "--config",
        CONFIG,
        "--config.output_dir=/ckpt/a",
        "--config.seed=2",
        "--config.run_note=a b",
    ]
    assert log == "logs/sdpo/node-0.log"


def test_gpu_explicit_multi_node_rank1(env):
    cmds, comments = dry(
        GPU,
        ["--config", CONFIG, "--coordinator", "10.0.0.1:8476", "--num-nodes", "2", "--node-rank", "1", "--name", "exp"],
        env,
    )
    ((argv, log),) = cmds[1:]
    envs, train = train_argv(argv)
    assert envs == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90"}
    assert train == [
        "sdpo-train",
        "--config",
        CONFIG,
        "--coordinator",
        "10.0.0.1:8476",
        "--num_processes",
        "2",
        "--process_id",
        "1",
    ]
    assert log == "logs/exp/node-1.log"
    # the same through the environment
    same = launch(
        GPU,
        [],
        env,
        extra_env={
            "SDPO_CONFIG": CONFIG,
            "GPU_COORDINATOR": "10.0.0.1:8476",
            "GPU_NUM_NODES": "2",
            "GPU_NODE_RANK": "1",
            "RUN_NAME": "exp",
            "DRY_RUN": "1",
        },
    )
    assert same.returncode == 0 and [parse(ln) for ln in same.stdout.splitlines() if not ln.startswith("#")] == cmds


def test_gpu_slurm(env, tmp_path):
    cmds, _ = dry(
        GPU,
        [
            "--slurm",
            "--num-nodes",
            "4",
            "--config",
            CONFIG,
            "--output-dir",
            "/shared/a",
            "--srun-args",
            "--gpus-per-task=8",
            "--mem-fraction",
            ".8",
        ],
        env,
        cwd=tmp_path,
    )
    logs = f"{tmp_path}/logs/sdpo"
    assert cmds[0] == (["mkdir", "-p", logs], None)
    ((argv, log),) = cmds[1:]
    assert log is None
    srun = argv[: argv.index("env")]
    assert srun == [
        "srun",
        "--ntasks-per-node=1",
        "--nodes=4",
        "--kill-on-bad-exit=1",
        "--open-mode=append",
        f"--output={logs}/node-%t.log",
        "--gpus-per-task=8",
    ]
    envs, train = train_argv(argv)
    assert envs == {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".8"}
    assert train == ["sdpo-train", "--config", CONFIG, "--config.output_dir=/shared/a"]


def test_sbatch_template_runs_gpu_sh(env):
    proc = launch(
        SBATCH,
        ["--", "--config.seed=5"],
        env,
        extra_env={"SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": str(REPO), "SDPO_OUTPUT_DIR": "/shared/x", "DRY_RUN": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    ((argv, _),) = [parse(ln) for ln in proc.stdout.splitlines() if ln.startswith("srun")]
    assert f"--output={REPO}/logs/sdpo-77/node-%t.log" in argv
    assert argv[argv.index("sdpo-train") :] == [
        "sdpo-train",
        "--config",
        CONFIG,
        "--config.output_dir=/shared/x",
        "--config.seed=5",
    ]


def test_gpu_flags_match_the_trainer():
    """The multi-host flags gpu.sh passes are the ones sdpo-train defines (absl, underscores)."""
    train_py = REPO / "sdpo_jax" / "cli" / "train.py"
    if not train_py.exists():
        pytest.skip("sdpo_jax/cli/train.py not written yet")
    import re

    defined = set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", train_py.read_text()))
    passed = {a[2:] for a in re.findall(r"--\w+", GPU.read_text().split("explicit)\n", 1)[1])}
    for name in ("coordinator", "num_processes", "process_id"):
        assert name in defined, f"sdpo-train defines no --{name}: update launch/gpu.sh"
        assert name in passed


@pytest.mark.parametrize(
    "args,needle",
    [
        ([], "--config"),
        (["--config", CONFIG, "--coordinator", "h:1", "--node-rank", "0"], "--num-nodes"),
        (["--config", CONFIG, "--coordinator", "h:1", "--num-nodes", "2"], "--node-rank"),
        (["--config", CONFIG, "--node-rank", "0", "--num-nodes", "2"], "--coordinator"),
        (["--config", CONFIG, "--coordinator", "h", "--num-nodes", "2", "--node-rank", "0"], "HOST:PORT"),
        (["--config", CONFIG, "--coordinator", "h:1", "--num-nodes", "2", "--node-rank", "2"], "0..1"),
        (["--config", CONFIG, "--num-nodes", "2"], "--slurm"),
        (["--config", CONFIG, "--slurm", "--coordinator", "h:1"], "--slurm"),
        (["--config", CONFIG, "--gpus", "all"], "--gpus"),
        (["--config", CONFIG, "--mem-fraction", "1.5"], "--mem-fraction"),
        (["--config", CONFIG, "--nodes", "2"], "--nodes"),
    ],
)
def test_gpu_usage_errors(env, args, needle):
    proc = launch(GPU, ["--dry-run", *args], env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu.sh: error:") and needle in err[0], proc.stderr


def test_gpu_slurm_needs_an_allocation_outside_dry_run(env):
    proc = launch(GPU, ["--slurm", "--config", CONFIG], env)
    assert proc.returncode == 2 and "allocation" in proc.stderr


# ---- shell lint ------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [TPU, GPU, SBATCH], ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    proc = subprocess.run(
        [
            "shellcheck",
            "--shell=bash",
            "--external-sources",
            "--source-path=SCRIPTDIR",
            str(TPU),
            str(GPU),
            str(SBATCH),
            str(TPU.with_name("lib.sh")),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", [TPU, GPU], ids=lambda p: p.name)
def test_help_and_executable(script, env):
    assert os.access(script, os.X_OK)
    proc = launch(script, ["--help"], env)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout
