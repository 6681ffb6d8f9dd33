"""XLA's persistent compilation cache for an experiment's output folder.

Each `sdpo_jax.stages.train` call builds its own jitted steps, so the variants of an experiment compile the
same programs again and again; with the cache on, the repeats are read back from OUT/jax_cache instead.
"""

from __future__ import annotations

from pathlib import Path

import jax


def persistent_compilation_cache(out: Path) -> None:
    """Cache every compiled program (however quick to compile) under ``out``/jax_cache."""
    jax.config.update("jax_compilation_cache_dir", str((Path(out) / "jax_cache").absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
