"""Compare throughput.py settings on a shared machine: interleaved runs, medians per setting.

    python benchmarks/knobs.py --rounds 3 --common "--steps 6" \\
        "plain=" "prefix=--prefix-sharing" "prefix-bf16=--prefix-sharing --dtype bfloat16"

Each LABEL=FLAGS setting runs throughput.py (or --script) in a fresh process once per round, the
settings in turn, so that load from other users spreads over all of them; the median pairs/s,
MFU and peak of each setting over the rounds is printed (one JSON line with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_once(script: str, flags: list[str], env_flags: str) -> dict:
    env = dict(os.environ)
    if env_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + env_flags).strip()
    return run_json([script, *flags], env)


def run_json(command: list[str], env: dict[str, str]) -> dict:
    """The last stdout line, as JSON, of ``python COMMAND --json`` in its own process with ``env``; a
    failure stops the benchmark with the end of its stderr."""
    result = subprocess.run([sys.executable, *command, "--json"], capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "settings", nargs="+", help="LABEL=[SCRIPT.py] FLAGS for throughput.py or SCRIPT.py (FLAGS may be empty)"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--common", default="", help="flags added to every setting")
    p.add_argument("--xla-flags", default="", help="XLA_FLAGS for settings whose label ends in '+xla'")
    p.add_argument("--script", default=str(HERE / "throughput.py"))
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    settings = []
    for item in a.settings:
        label, sep, flags = item.partition("=")
        if not sep:
            p.error(f"setting {item!r} is not LABEL=FLAGS")
        flags = shlex.split(flags)
        script = flags.pop(0) if flags and flags[0].endswith(".py") else a.script
        settings.append((label, script, shlex.split(a.common) + flags))
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in settings}
    for _ in range(a.rounds):
        for label, script, flags in settings:
            runs[label].append(run_once(script, flags, a.xla_flags if label.endswith("+xla") else ""))
    summary = {
        label: {
            "pairs_per_s": statistics.median(r["pairs_per_s"] for r in rs),
            "mfu": statistics.median(r["mfu"] for r in rs),
            "peak_flops": statistics.median(r["peak_flops"] for r in rs),
            "cpu_s_per_pair": statistics.median(r["cpu_s_per_step_median"] / r["shape"]["batch"] for r in rs),
            "all_pairs_per_s": [round(r["pairs_per_s"], 2) for r in rs],
        }
        for label, rs in runs.items()
    }
    if a.json:
        print(json.dumps(summary))
    else:
        for label, s in summary.items():
            print(
                f"{label:24s} {s['pairs_per_s']:8.2f} pairs/s  {s['cpu_s_per_pair']:7.4f} CPU s/pair  MFU "
                f"{s['mfu']:6.1%}  "
                f"peak {s['peak_flops'] / 1e9:6.0f} GFLOP/s  runs {s['all_pairs_per_s']}"
            )


if __name__ == "__main__":
    main()
