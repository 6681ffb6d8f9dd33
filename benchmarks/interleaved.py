"""Compare sdpo_jax source trees step by step in one process: the steadiest A/B on a shared machine.

    python benchmarks/interleaved.py --rounds 20 --common "--prefix-sharing --remat full --dtype bfloat16" \\
        before=/tmp/before after=.

Each LABEL=DIR names a directory that holds an ``sdpo_jax`` package (``.`` for this checkout; an older
version e.g. with ``mkdir /tmp/before && git archive 03d15bf sdpo_jax | tar -x -C /tmp/before``). The
train step of every tree is built with throughput.py's ``build`` and the same flags, compiled and
warmed up; then the trees take one step each in turn, the order reversed every round, so that load
from other processes falls on all of them alike within milliseconds, which separate processes
(benchmarks/knobs.py) cannot promise. Printed per tree: the median wall time and CPU time (the
process's, all threads: steps never overlap, so it belongs to the step) per step, and pairs/s.
The host allocator (throughput.py's ``--host-allocator``, by default sdpo-train's) applies to the
whole process, so to every tree. A module
missing from a tree (one added later) is imported from the installed sdpo_jax instead.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _import_tree(tree: Path):
    """throughput.py (this checkout's) bound to the sdpo_jax package under ``tree``."""
    for name in [m for m in sys.modules if m in ("sdpo_jax", "throughput") or m.startswith("sdpo_jax.")]:
        del sys.modules[name]
    sys.path[:0] = [str(tree), str(HERE)]
    try:
        import throughput

        import sdpo_jax
    finally:
        del sys.path[:2]
    if not Path(sdpo_jax.__file__).resolve().is_relative_to(tree):
        raise SystemExit(f"{tree} holds no sdpo_jax package (imported {sdpo_jax.__file__})")
    return throughput


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trees", nargs="+", help="LABEL=DIR, DIR holding an sdpo_jax package")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--common", default="", help="throughput.py flags for every tree")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    trees = []
    for item in a.trees:
        label, sep, directory = item.partition("=")
        if not sep or not directory:
            p.error(f"{item!r} is not LABEL=DIR")
        trees.append((label, Path(directory).resolve()))
    flags = shlex.split(a.common) + [f"--steps={a.rounds}", f"--warmup={a.warmup}"]
    built = []
    for index, (label, tree) in enumerate(trees):
        throughput = _import_tree(tree)
        args = throughput.parse_args(flags)
        if index == 0:
            from sdpo_jax.host_memory import apply_host_allocator

            apply_host_allocator(args.host_allocator)  # before the first tree starts JAX's backend
        step, state, ref, batches, _ = throughput.build(args)
        built.append(
            {
                "label": label,
                "step": step,
                "state": state,
                "ref": ref,
                "batch": batches[0],
                "pairs": args.batch,
                "wall": [],
                "cpu": [],
            }
        )

    import jax

    def one_step(entry, record: bool):
        start, cpu_start = time.perf_counter(), time.process_time()
        entry["state"], metrics = entry["step"](entry["state"], entry["ref"], entry["batch"])
        jax.block_until_ready(metrics)
        if record:
            entry["wall"].append(time.perf_counter() - start)
            entry["cpu"].append(time.process_time() - cpu_start)

    for entry in built:
        for _ in range(1 + a.warmup):
            one_step(entry, record=False)
    for r in range(a.rounds):
        for entry in built if r % 2 == 0 else reversed(built):
            one_step(entry, record=True)
    summary = {
        e["label"]: {
            "step_s_median": statistics.median(e["wall"]),
            "cpu_s_per_step_median": statistics.median(e["cpu"]),
            "pairs_per_s": e["pairs"] / statistics.median(e["wall"]),
            "cpu_s_per_pair": statistics.median(e["cpu"]) / e["pairs"],
        }
        for e in built
    }
    if a.json:
        print(json.dumps(summary))
    else:
        for label, s in summary.items():
            print(
                f"{label:20s} {s['pairs_per_s']:8.2f} pairs/s  step {s['step_s_median'] * 1e3:7.1f} ms  "
                f"CPU {s['cpu_s_per_step_median'] * 1e3:7.1f} ms/step  {s['cpu_s_per_pair']:.4f} CPU s/pair"
            )


if __name__ == "__main__":
    main()
