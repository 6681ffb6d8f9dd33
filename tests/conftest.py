"""Shared pytest fixtures: tiny Hugging Face checkpoints built once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_fixtures import make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(family) -> folder of a tiny random float32 checkpoint (built once)."""
    built: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in built:
            built[family] = make_hf_checkpoint(family, tmp_path_factory.mktemp(f"hf_{family}"))
        return built[family]

    return build
