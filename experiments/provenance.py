"""Where a result came from: the code, the packages, the device and the command that made it.

Every experiment run records ``provenance()`` beside its numbers, so that a published table can be
traced to a commit and rerun there; ``same_platform`` says whether two records were made on the
same kind of device with the same numerical packages (where a rerun should agree bit for bit). On a CPU
the device includes the processor's vector instruction sets: XLA compiles for the host's, and a machine
with other ones (AVX-512, AMX) rounds some sums differently, which can flip a sampled token of a bf16 model.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

import jax

#: The packages whose versions can change the numbers.
NUMERIC_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")
REPOSITORY = Path(__file__).resolve().parent.parent
#: The CPU instruction sets that change what XLA's CPU backend compiles (vector widths, bf16 and fp16 units).
NUMERIC_CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_bf16", "amx_tile")


def _git(*args: str) -> str | None:
    """The output of ``git args`` in the repository, or None where there is no git or no repository."""
    try:
        done = subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The host processor: its model name and which of ``NUMERIC_CPU_FLAGS`` it has (from ``cpuinfo`` on Linux;
    elsewhere the platform's processor name and no flags)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return {"model": platform.processor() or platform.machine(), "flags": []}
    fields = {}
    for key, _, value in (line.partition(":") for line in lines):
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    flags = set(fields.get("flags", "").split())
    model = fields.get("model name", platform.machine())
    return {"model": model, "flags": [flag for flag in NUMERIC_CPU_FLAGS if flag in flags]}


def provenance(program: str, argv: list[str] | None = None) -> dict:
    """The commit (None outside a git clone), whether tracked or untracked files differ from it, the versions
    of ``NUMERIC_PACKAGES``, the device kind and count, the host CPU (`cpu_description`), the Python version and
    the command line (``program``,
    e.g. ``python -m experiments.stepwise``, followed by ``argv``, by default this process's arguments)."""
    status = _git("status", "--porcelain")
    devices = jax.devices()
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "packages": {name: importlib.metadata.version(name) for name in NUMERIC_PACKAGES},
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu": cpu_description(),
        "python": sys.version.split()[0],
        "command": " ".join([program, *(sys.argv[1:] if argv is None else argv)]),
    }


def provenance_line(record: dict) -> str:
    """One line naming where a result was made: ``commit 9067360 (clean), cpu x1, jax 0.10.2, ...``."""
    commit = (record.get("commit") or "none")[:7]
    tree = {True: "dirty", False: "clean"}.get(record.get("dirty"), "unknown tree")
    packages = ", ".join(f"{name} {version}" for name, version in record.get("packages", {}).items())
    cpu = record.get("cpu")
    host = f"{cpu['model']} ({' '.join(cpu['flags']) or 'no listed flags'})" if cpu else "host CPU not recorded"
    return f"commit {commit} ({tree}), {record.get('device_kind')} x{record.get('device_count')} on {host}, {packages}"


def same_platform(a: dict, b: dict) -> bool:
    """Whether two provenance records share the device kind and count, the host CPU's instruction sets and the
    numeric package versions (a record made before the CPU was recorded matches no other)."""
    if a.get("cpu") is None or b.get("cpu") is None or a["cpu"]["flags"] != b["cpu"]["flags"]:
        return False
    keys = ("platform", "device_kind", "device_count", "packages")
    return all(a.get(k) == b.get(k) for k in keys)


def publish(path: Path, payload: dict, records: dict[str, dict], program: str) -> None:
    """Write the committed results ``payload`` (JSON) to ``path``, refused (SystemExit naming them) unless every
    result record in ``records`` ({label: a record with its 'provenance'}, e.g. ``{"seed 0": ...}``) was made at
    HEAD from a clean tree: what is published must be what the committed code produces."""
    head = provenance(program)
    stale = [
        label
        for label, record in records.items()
        if record["provenance"].get("commit") != head["commit"] or record["provenance"].get("dirty") is not False
    ]
    if head["commit"] is None or stale:
        raise SystemExit(
            f"--publish: {', '.join(stale) or 'these results'} were not made at HEAD ({head['commit']}) from a clean "
            "tree; rerun them (delete their result files) after committing"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"published {path}")
