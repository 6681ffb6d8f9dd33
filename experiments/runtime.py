"""How an experiment process starts: as sdpo-train does, with XLA's persistent compilation cache on.

Each `sdpo_jax.stages.train` call builds its own jitted steps, so the variants of an experiment compile the
same programs again and again; with the cache on, the repeats are read back from OUT/jax_cache instead.
The host allocator (sdpo_jax.host_memory) must be chosen before JAX starts its backend, which an experiment
does (loading M0) before its first `train` call, where sdpo-train would have chosen it.
"""

from __future__ import annotations

from pathlib import Path

import jax

from sdpo_jax.host_memory import apply_host_allocator


def start_experiment(out: Path) -> None:
    """sdpo-train's default host allocator (``train.host_allocator = auto``), and every compiled program (however
    quick to compile) cached under ``out``/jax_cache. Call it before anything starts JAX's backend."""
    apply_host_allocator("auto")
    jax.config.update("jax_compilation_cache_dir", str((Path(out) / "jax_cache").absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
